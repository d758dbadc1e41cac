"""Divergence handling tells the truth: the checkpoint it names is the one before the state that diverged, its
advice (resume from it with a lower learning rate) works — the new rate is applied — and a collapsed run (all losses
exactly zero, or frozen) stops as diverged instead of finishing with exit 0."""

import re

import torch

from diffdistill.cli import EXIT_DIVERGED, main
from diffdistill.io.checkpoint import list_checkpoints, load_checkpoint

TINY = ["train-teacher", "--preset", "ring8", "--batch-size", "16", "--no-progress", "--set", "net.kwargs.hidden=16",
        "--set", "net.kwargs.depth=1", "--set", "run.sample_every=0", "--set", "run.log_every=1"]


def test_diverge_then_follow_the_advice_and_continue(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(TINY + ["--out", str(out), "--iters", "300", "--set", "run.ckpt_every=2", "--set", "method.lr=1e5",
                      "--set", "method.warmup_steps=100"])
    err = capsys.readouterr().err
    assert rc == EXIT_DIVERGED, err
    step = int(re.search(r"at step (\d+)", err).group(1))
    named = re.search(r"--resume (\S+)", err).group(1)
    ckpts = list_checkpoints(out / "checkpoints")
    assert len(ckpts) >= 2 and named == str(ckpts[-2]), (named, ckpts)   # the one before the newest state
    assert load_checkpoint(named)["step"] < load_checkpoint(ckpts[-1])["step"] < step
    # follow the advice: resume from it with a lower learning rate; the new rate is applied, and the run finishes
    rc = main(TINY + ["--out", str(out), "--iters", "40", "--resume", named, "--set", "method.lr=1e-3",
                      "--set", "run.ckpt_every=0", "--set", "method.warmup_steps=100"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "changed optimizer settings applied on resume: net lr 1e+05 → 0.001" in printed.out
    final = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    group = final["method_state"]["optimizers"]["net"]["param_groups"][0]
    assert final["step"] == 40 and group["initial_lr"] == 1e-3 and group["lr"] <= 1e-3
    assert all(torch.isfinite(v).all() for v in final["sample_net"].values())


def test_a_collapsed_run_stops_as_diverged(tmp_path, capsys):
    """SiD at lr 1e9 collapses to all-zero losses and gradients (which used to end with exit 0): after
    run.collapse_steps such steps the run stops as diverged (exit 3) and says why."""
    assert main(TINY + ["--out", str(tmp_path / "t"), "--iters", "30"]) == 0
    teacher = list_checkpoints(tmp_path / "t" / "checkpoints")[-1]
    capsys.readouterr()
    rc = main(["distill", "--method", "sid", "--teacher", str(teacher), "--out", str(tmp_path / "s"), "--iters", "300",
               "--batch-size", "32", "--no-progress", "--set", "method.lr=1e9", "--set", "run.sample_every=0",
               "--set", "run.collapse_steps=10"])
    err = capsys.readouterr().err.strip()
    assert rc == EXIT_DIVERGED and len(err.splitlines()) == 1, err
    assert "training collapsed at step" in err and "exactly 0 for 10 steps" in err and "collapse_steps=0" in err


def test_collapse_rule():
    from diffdistill.train.health import HealthMonitor
    h = HealthMonitor(None, collapse_steps=5)
    reasons = [h.collapse({"loss/generator": 0.0, "grad_norm/generator": 0.0, "loss/critic": 0.0}) for _ in range(5)]
    assert reasons[:4] == [None] * 4 and "exactly 0 for 5 steps" in reasons[4]
    h = HealthMonitor(None, collapse_steps=3)
    reasons = [h.collapse({"loss/critic": 0.25, "grad_norm/critic": 1.0 + i}) for i in range(3)]
    assert reasons[:2] == [None, None] and "loss/critic has been exactly 0.25 for 3 steps" in reasons[2]
    h = HealthMonitor(None, collapse_steps=3)
    assert all(h.collapse({"loss/critic": 0.25 + 1e-7 * i}) is None for i in range(10))
