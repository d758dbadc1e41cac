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


@pytest.fixture(scope="session")
def ring8_teacher(tmp_path_factory):
    return Ring8Teacher(tmp_path_factory.mktemp("ring8_teacher"))


@pytest.fixture(scope="session")
def ring8_flow_teacher(tmp_path_factory):
    return Ring8Teacher(tmp_path_factory.mktemp("ring8_flow_teacher"), objective="flow")
