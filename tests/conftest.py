import json
import os
import sys
from pathlib import Path

import pytest
import torch

# One thread each: results are reproducible and the suite does not oversubscribe CI's two cores.
torch.set_num_threads(1)
os.environ.setdefault("DIFFDISTILL_CACHE", str(Path(__file__).resolve().parent.parent / ".cache-test"))


def tiny_points_cfg(out, steps=40, **run):
    """A small ring8 teacher config (MLP 64×2) for fast trainer tests."""
    from diffdistill.config import resolve
    cfg = resolve("ring8", flags={"run": {"out": str(out), "steps": steps, "batch_size": 64, "log_every": 10,
                                          "ckpt_every": 0, "sample_every": 0, "progress": False, **run},
                                  "net": {"kwargs": {"hidden": 64, "depth": 2}},
                                  "data": {"n": 2000}})
    return cfg


@pytest.fixture
def python_exe():
    return sys.executable


@pytest.fixture
def float64():
    """float64 as torch's default dtype for one test (the exactness tests)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class Ring8Teacher:
    """A ring8 MLP teacher trained once per session (EDM, or flow matching with ``objective='flow'``), and a helper
    that distils it and measures sliced W2."""

    def __init__(self, root, objective: str = "edm"):
        """Train into ``root``; when ``root/teacher.json`` exists (written last, after the checkpoint, by another
        xdist worker of this same session) use that run instead of training the same deterministic teacher again."""
        done = root / "teacher.json"
        if done.exists():
            self.__dict__.update(json.loads(done.read_text()))
            self.path = Path(self.path)
            return
        from diffdistill.config import resolve
        from diffdistill.eval.evaluate import evaluate_net
        from diffdistill.io.checkpoint import list_checkpoints
        from diffdistill.train.trainer import Trainer
        cfg = resolve("ring8", flags={"run": {"out": str(root), "steps": 800, "batch_size": 512, "log_every": 100,
                                              "ckpt_every": 0, "sample_every": 0, "progress": False},
                                      "net": {"kwargs": {"hidden": 128, "depth": 3}, "precond": objective},
                                      "method": {"name": objective}})
        tr = Trainer(cfg)
        tr.run()
        self.path = list_checkpoints(root / "checkpoints")[-1]
        self.data_cfg = cfg["data"]
        net = tr.method.sampling_net()
        self.teacher_sw2 = evaluate_net(net, {"sampler": "heun", "nfe": 35}, self.data_cfg)["sliced_w2"]
        # the untrained 1-step student: the teacher network used as a 1-step generator from σ_max
        self.untrained_sw2 = evaluate_net(net, {"sampler": "multistep", "sigmas": [80.0]}, self.data_cfg)["sliced_w2"]
        done.write_text(json.dumps({"path": str(self.path), "data_cfg": self.data_cfg, "teacher_sw2": self.teacher_sw2,
                                    "untrained_sw2": self.untrained_sw2}))

    def distill_and_eval(self, method, out, steps=None, overrides=()):
        """``steps=None``: the preset's length."""
        from diffdistill.distill import distill
        from diffdistill.eval.evaluate import evaluate_net
        run = {"out": str(out), "progress": False, "ckpt_every": 0, "sample_every": 0}
        if steps is not None:
            run["steps"] = steps
        tr = distill(method, self.path, flags={"run": run}, overrides=list(overrides))
        m = evaluate_net(tr.method.sampling_net(), tr.method.sampling_spec(), self.data_cfg)
        return {"teacher": self.teacher_sw2, "untrained": self.untrained_sw2, "student": m["sliced_w2"],
                "modes_covered": m.get("modes_covered"), "high_quality": m.get("high_quality_fraction"),
                "trainer": tr}


def _session_teacher(tmp_path_factory, name, **kw) -> Ring8Teacher:
    """One teacher per test session, also under xdist: the workers share this run's base temporary folder (fresh
    for every session, so nothing carries over between runs) and the first to ask trains while the others wait on
    the lock (≈ 30 s of CPU saved per extra worker)."""
    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent          # pytest-N/ above this worker's pytest-N/gwK/
    root = base / name
    with FileLock(str(base / f"{name}.lock")):
        root.mkdir(exist_ok=True)
        return Ring8Teacher(root, **kw)


@pytest.fixture(scope="session")
def ring8_teacher(tmp_path_factory):
    return _session_teacher(tmp_path_factory, "ring8_teacher")


@pytest.fixture(scope="session")
def ring8_flow_teacher(tmp_path_factory):
    return _session_teacher(tmp_path_factory, "ring8_flow_teacher", objective="flow")
