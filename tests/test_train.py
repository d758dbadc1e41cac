"""Trainer: exact resume, NaN guard, checkpoints, 2-D teacher quality, two-rank torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_points_cfg
from diffdistill.io.checkpoint import list_checkpoints, load_checkpoint
from diffdistill.train.trainer import DivergenceError, Trainer


def _params(trainer):
    sd = trainer.method.state_dict()
    flat = {f"net.{k}": v for k, v in sd["nets"]["net"].items()}
    flat.update({f"ema.{k}": v for k, v in sd["emas"]["net"].items()})
    for i, st in sd["optimizers"]["net"]["state"].items():
        flat.update({f"opt.{i}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return flat


def test_resume_is_exact(tmp_path):
    """600 steps straight == 300 steps, stop, resume, 300 more: bitwise, on every tensor of the state. The split
    lies past the 100-step warm-up, inside the EMA ramp-up, after ~10 data epochs and 3 full health windows."""
    full = Trainer(tiny_points_cfg(tmp_path / "full", steps=600, log_every=100))
    full.run()
    half = Trainer(tiny_points_cfg(tmp_path / "split", steps=300, log_every=100))
    half.run()
    resumed = Trainer(tiny_points_cfg(tmp_path / "split", steps=600, log_every=100, resume="auto"))
    resumed.run()
    assert resumed.step == 600
    a, b = _params(full), _params(resumed)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and training really moved the weights between step 300 and step 600
    h = _params(half)
    assert any(not torch.equal(h[k], b[k]) for k in b if k.startswith("net."))
    logs = [json.loads(l) for l in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    logs_split = [json.loads(l) for l in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["loss/net"] for r in logs] == [r["loss/net"] for r in logs_split]


def test_checkpoint_is_atomic_and_pruned(tmp_path):
    cfg = tiny_points_cfg(tmp_path, steps=50, ckpt_every=10, keep_ckpts=2)
    Trainer(cfg).run()
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in ckpts] == ["ckpt-00000040.pt", "ckpt-00000050.pt"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    state = load_checkpoint(ckpts[-1])
    assert state["step"] == 50 and state["role"] == "teacher" and state["method"] == "edm"
    assert (tmp_path / "config.json").exists()


class _NaNAfter:
    """Wraps a method's loss so it turns NaN from a given step on."""

    def __init__(self, method, step):
        self.method, self.step, self.orig = method, step, method.loss

    def __call__(self, phase, batch, step):
        loss, logs = self.orig(phase, batch, step)
        return (loss * float("nan") if step >= self.step else loss), logs


def test_nan_loss_stops_with_step_and_checkpoint(tmp_path):
    tr = Trainer(tiny_points_cfg(tmp_path, steps=30, ckpt_every=10))
    tr.method.loss = _NaNAfter(tr.method, 15)
    with pytest.raises(DivergenceError, match=r"non-finite loss in phase 'net' at step 15.*ckpt-00000010\.pt"):
        tr.run()
    # the last checkpoint is intact and holds finite parameters
    state = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert all(torch.isfinite(v).all() for v in state["sample_net"].values())


def test_nan_loss_skip_policy_leaves_params_untouched(tmp_path, capsys):
    tr = Trainer(tiny_points_cfg(tmp_path, steps=20, nan_policy="skip"))
    tr.method.loss = _NaNAfter(tr.method, 10)
    tr.run()
    assert "WARNING: non-finite loss" in capsys.readouterr().out
    assert all(torch.isfinite(p).all() for p in tr.method.nets["net"].parameters())


def test_2d_teacher_reaches_the_data(ring8_teacher):
    """The session's ring8 MLP teacher (trained by this trainer in conftest: 800 iterations at batch 512; every 2-D
    distillation test starts from it) sampled with Heun at 35 NFE lies within sliced-W2 0.08 of fresh data."""
    from diffdistill.data import dataset_from_config as load_dataset
    from diffdistill.eval.evaluate import evaluate_net
    from diffdistill.io import load_for_sampling
    from diffdistill.eval.metrics import sliced_w2
    net, state = load_for_sampling(ring8_teacher.path)
    assert state["method"] == "edm" and state["role"] == "teacher"
    m = evaluate_net(net, {"sampler": "heun", "nfe": 35}, ring8_teacher.data_cfg, 2000, seed=1)
    # Scale: two independent 2,000-point draws of ring8 differ by this much.
    d = load_dataset(dict(ring8_teacher.data_cfg, n=2000, seed=5)).x
    e = load_dataset(dict(ring8_teacher.data_cfg, n=2000, seed=6)).x
    noise_floor = float(sliced_w2(d, e, seed=1))
    print("teacher sliced W2", m["sliced_w2"], "two data draws", noise_floor)
    assert m["nfe"] == 35
    assert m["sliced_w2"] < max(0.08, 3 * noise_floor)
    assert m["modes_covered"] == 1.0 and m["high_quality_fraction"] > 0.9


TORCHRUN_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_points_cfg
from diffdistill.train.trainer import Trainer
from diffdistill.train import distributed as dist
torch.set_num_threads(1)
tr = Trainer(tiny_points_cfg({out!r}, steps=8))
tr.run()
torch.save(tr.method.nets["net"].state_dict(), {out!r} + f"/params-rank{{dist.rank()}}.pt")
print("rank", dist.rank(), "of", dist.world_size())
dist.destroy()
"""


@pytest.mark.timeout(180)
def test_torchrun_two_ranks_agree(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                        str(script)], capture_output=True, text=True, env=env, timeout=170)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(tmp_path / "params-rank0.pt")
    b = torch.load(tmp_path / "params-rank1.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    state = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert state["world_size"] == 2 and state["step"] == 8
    # ranks drew different data: the averaged run differs from a single-process run
    single = Trainer(tiny_points_cfg(tmp_path / "single", steps=8))
    single.run()
    assert any(not torch.equal(a[k], v) for k, v in single.method.nets["net"].state_dict().items())


def _rates_used(trainer):
    """The learning rate each optimizer step of the trainer's 'net' phase actually used, in order."""
    used = []
    trainer.method.optimizers["net"].register_step_pre_hook(lambda opt, *a: used.append(opt.param_groups[0]["lr"]))
    return used


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_run_lr_decay_scales_the_methods_schedule(tmp_path, kind):
    """run.lr_decay multiplies the rate the method's own schedule (here the teacher's warm-up) gives, from 1 up to
    run.lr_decay_start to 0 at run.steps, and leaves the scheduled rate in the optimizer for its checkpoint."""
    import math
    plain = Trainer(tiny_points_cfg(tmp_path / "plain", steps=20))
    ref = _rates_used(plain)
    plain.run()
    t = Trainer(tiny_points_cfg(tmp_path / "decay", steps=20, lr_decay=kind, lr_decay_start=10))
    used = _rates_used(t)
    t.run()
    x = [max(0, s - 10) / 10 for s in range(20)]
    factor = [1 - v if kind == "linear" else 0.5 * (1 + math.cos(math.pi * v)) for v in x]
    assert len(used) == len(ref) == 20
    assert used[:11] == ref[:11]
    assert used[-1] < 0.2 * ref[-1]
    for u, r, f in zip(used, ref, factor):
        assert u == pytest.approx(r * f, rel=1e-12)
    assert t.method.optimizers["net"].param_groups[0]["lr"] == plain.method.optimizers["net"].param_groups[0]["lr"]
    logs = [json.loads(l) for l in (tmp_path / "decay" / "log.jsonl").read_text().splitlines()]
    assert logs[-1]["lr_decay"] == pytest.approx(factor[-1])


def test_run_lr_decay_follows_the_time_budget(tmp_path):
    """Under --budget-minutes the decay's progress is the training time over the budget when that is further
    than the iterations: half the budget spent, half-way down a linear decay that began at step 0."""
    t = Trainer(tiny_points_cfg(tmp_path, steps=10 ** 9, lr_decay="linear", max_minutes=2.0))
    assert t.lr_decay_factor() == 1.0
    t.step, t.train_seconds = 5, 60.0
    assert t.lr_decay_factor() == pytest.approx(0.5)
    t.train_seconds = 120.0
    assert t.lr_decay_factor() == 0.0


def test_run_lr_decay_resumes_exactly(tmp_path):
    """An 80-step decaying run stopped at step 50 (after its decay began at 30) and resumed equals the
    uninterrupted run, bitwise."""
    import signal
    kw = dict(steps=80, lr_decay="linear", lr_decay_start=30, log_every=20)
    full = Trainer(tiny_points_cfg(tmp_path / "full", **kw))
    full.run()
    stop = lambda tr: setattr(tr, "_stop_signal", signal.SIGTERM) if tr.step == 50 else None
    first = Trainer(tiny_points_cfg(tmp_path / "split", **kw))
    first.run(on_step=stop)
    assert first.step == 50 and first.lr_decay_from == pytest.approx(30 / 80)
    resumed = Trainer(tiny_points_cfg(tmp_path / "split", resume="auto", **kw))
    resumed.run()
    assert resumed.step == 80
    a, b = _params(full), _params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
