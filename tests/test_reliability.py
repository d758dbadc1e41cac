"""Reliability: checkpoint manifests, resume auto past corrupt checkpoints, the divergence guard and health log,
out-of-memory answers, --dry-run, signals, and exact resume of every registered method."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_points_cfg
from diffdistill.cli import main
from diffdistill.errors import UserError
from diffdistill.io.checkpoint import (atomic_write, find_resume_checkpoint, list_checkpoints, load_checkpoint,
                                          manifest_path, prune_checkpoints, remove_stale_files, save_checkpoint,
                                          verify_checkpoint)
from diffdistill.train.health import HealthMonitor
from diffdistill.train.trainer import DivergenceError, Trainer
from helpers.kill_resume import differences, final_state, make_teacher, run_in_process


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("rel_teacher"))


def _state(trainer):
    return {"method_state": trainer.method.state_dict(), "step": trainer.step, "nimg": trainer.nimg,
            "rng": trainer.gen.get_state()}


# ------------------------------------------------------------------------------------------------ manifests
def test_manifest_detects_truncation_and_bit_flips(tmp_path):
    path = tmp_path / "ckpt-00000010.pt"
    save_checkpoint({"step": 10, "method": "edm", "w": torch.arange(1000.0)}, path)
    manifest = json.loads(manifest_path(path).read_text())
    assert manifest["bytes"] == path.stat().st_size and len(manifest["sha256"]) == 64 and manifest["step"] == 10
    assert verify_checkpoint(path) == (True, "sha256 matches its manifest")
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(1000.0))
    data = path.read_bytes()

    path.write_bytes(data[:-100])
    ok, why = verify_checkpoint(path)
    assert ok is False and "truncated" in why
    with pytest.raises(UserError, match="is corrupted: .*truncated"):
        load_checkpoint(path)

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01  # one bit inside the tensor data: torch.load alone would not notice
    path.write_bytes(bytes(flipped))
    assert verify_checkpoint(path)[0] is False
    with pytest.raises(UserError, match="sha256 differs from its manifest"):
        load_checkpoint(path)

    path.write_bytes(data)
    manifest_path(path).unlink()  # a checkpoint copied without its manifest still loads
    assert verify_checkpoint(path) == (None, "no manifest")
    assert load_checkpoint(path)["step"] == 10


def test_a_killed_save_leaves_nothing_that_resume_could_pick(tmp_path):
    for step in (10, 20):
        save_checkpoint({"step": step}, tmp_path / f"ckpt-{step:08d}.pt")
    # what a SIGKILL during save can leave: a half-written temp file, or a manifest whose checkpoint was never renamed
    (tmp_path / ".ckpt-00000030.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "ckpt-00000030.pt.json").write_text(json.dumps({"bytes": 1, "sha256": "0"}))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000010.pt", "ckpt-00000020.pt"]
    assert find_resume_checkpoint(tmp_path)[0].name == "ckpt-00000020.pt"
    removed = sorted(p.name for p in remove_stale_files(tmp_path))
    assert removed == [".ckpt-00000030.pt.x1y2.tmp", "ckpt-00000030.pt.json"]
    prune_checkpoints(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000020.pt", "ckpt-00000020.pt.json"]


def _disk_fills_on_save(monkeypatch, nth: int, code: int = errno.ENOSPC):
    """torch.save writes half its bytes, then fails as a full disk does, from its ``nth`` call on."""
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(f)
        real_save(obj, f, *a, **k)
        if len(calls) >= nth:
            with open(f, "r+b") as fh:
                fh.truncate(Path(f).stat().st_size // 2)
            raise OSError(code, os.strerror(code))
    monkeypatch.setattr(torch, "save", save)


def test_full_disk_during_a_checkpoint_write_names_the_space_and_resume_continues(teacher, tmp_path, monkeypatch):
    """ENOSPC while distill writes its 3rd checkpoint: exit 2, one line with the space needed (the previous
    checkpoint's size), the space free and the way on; no temp file left, the earlier checkpoints load, and following
    the advice (space freed, --resume auto) ends bit-identical to an uninterrupted run."""
    argv = ["distill", "--method", "dmd2", "--teacher", str(teacher), "--iters", "20", "--batch-size", "16",
            "--no-progress", "--set", "run.ckpt_every=5", "--set", "run.sample_every=0"]
    _disk_fills_on_save(monkeypatch, nth=3)
    rc, _, err = run_in_process(argv + ["--out", str(tmp_path / "run")])
    monkeypatch.undo()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpts = list_checkpoints(ckpt_dir)
    assert [p.name for p in ckpts] == ["ckpt-00000005.pt", "ckpt-00000010.pt"]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted([p.name for p in ckpts] +
                                                                [manifest_path(p).name for p in ckpts])
    assert all(load_checkpoint(p)["step"] == s for p, s in zip(ckpts, (5, 10)))
    line = lines[0]
    assert re.match(r"diffdistill: error: no space left on device \(\d+\.\d [MG]iB free on that filesystem\) ", line)
    assert f"writing checkpoint {ckpt_dir / 'ckpt-00000015.pt'} at step 15" in line
    assert f"needs about {ckpts[-1].stat().st_size / 2**20:.1f} MiB (the size of ckpt-00000010.pt)" in line
    assert f"the previous checkpoints are intact (newest: {ckpts[-1]})" in line
    assert "free space there, then run the same command plus --resume auto" in line
    rc, out, err = run_in_process(argv + ["--out", str(tmp_path / "run"), "--resume", "auto"])
    assert rc == 0 and "ckpt-00000010.pt at step 10" in out, err
    rc, _, err = run_in_process(argv + ["--out", str(tmp_path / "straight")])
    assert rc == 0, err
    assert differences(final_state(tmp_path / "straight"), final_state(tmp_path / "run")) == []


def test_full_disk_on_the_first_checkpoint_or_a_quota(tmp_path, monkeypatch):
    """With no earlier checkpoint the size needed comes from the state's tensors (≈ the file torch.save writes); a
    quota (EDQUOT) is named as such; atomic_write (exports, DMD's pairs, logs) answers in one line too."""
    state = {"step": 3, "w": torch.zeros(50_000), "view": torch.zeros(50_000)[:10], "opt": [torch.ones(25_000)]}
    save_checkpoint(state, tmp_path / "size" / "ckpt-00000003.pt")
    written = (tmp_path / "size" / "ckpt-00000003.pt").stat().st_size
    _disk_fills_on_save(monkeypatch, nth=1)
    with pytest.raises(UserError) as e:
        save_checkpoint(state, tmp_path / "run" / "ckpt-00000003.pt")
    needed = float(str(e.value).split("needs at least ")[1].split(" MiB")[0])
    assert abs(needed - written / 2**20) < 0.05, (needed, written)
    assert "there is no earlier checkpoint of this run: free space there, then run the command again" in str(e.value)
    assert not any((tmp_path / "run").iterdir())
    monkeypatch.undo()
    _disk_fills_on_save(monkeypatch, nth=1, code=errno.EDQUOT)
    with pytest.raises(UserError, match=r"^disk quota exceeded \(\d+\.\d [MG]iB free on that filesystem; your quota"):
        save_checkpoint(state, tmp_path / "run" / "ckpt-00000003.pt")
    monkeypatch.undo()

    def full(tmp):
        Path(tmp).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    target = tmp_path / "out" / "w.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"old")
    with pytest.raises(UserError, match="^no space left on device .* writing .*w.safetensors; it was left as it was"):
        atomic_write(target, full)
    assert sorted(p.name for p in target.parent.iterdir()) == ["w.safetensors"] and target.read_bytes() == b"old"


def test_resume_auto_skips_corrupt_newest_loudly_and_stays_exact(tmp_path, capsys):
    straight = Trainer(tiny_points_cfg(tmp_path / "straight", steps=40))
    straight.run()
    Trainer(tiny_points_cfg(tmp_path / "run", steps=30, ckpt_every=10, log_every=1)).run()
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpts] == ["ckpt-00000010.pt", "ckpt-00000020.pt", "ckpt-00000030.pt"]
    ckpts[2].write_bytes(ckpts[2].read_bytes()[:500])            # truncated
    data = bytearray(ckpts[1].read_bytes())
    data[-2000] ^= 0xFF                                           # one damaged byte
    ckpts[1].write_bytes(bytes(data))
    capsys.readouterr()
    resumed = Trainer(tiny_points_cfg(tmp_path / "run", steps=40, log_every=1, resume="auto"))
    resumed.run()
    out = capsys.readouterr().out
    assert "WARNING: resume auto: skipping ckpt-00000030.pt" in out and "truncated" in out
    assert "WARNING: resume auto: skipping ckpt-00000020.pt" in out and "sha256" in out
    assert "resumed from" in out and "ckpt-00000010.pt at step 10: the newest valid checkpoint" in out
    assert differences(_state(straight), _state(resumed)) == []
    # the log reads as one run: the records the first run wrote after step 10 were replaced, none duplicated
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))


def test_resume_with_a_changed_config_warns(tmp_path, capsys):
    Trainer(tiny_points_cfg(tmp_path, steps=10, ckpt_every=5)).run()
    cfg = tiny_points_cfg(tmp_path, steps=12, resume="auto")
    cfg["method"]["lr"] = 5e-3
    capsys.readouterr()
    Trainer(cfg).run()
    assert "WARNING: the configuration differs from the checkpoint's" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ divergence
class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _nan_grad_from(trainer, step):
    orig = trainer.method.loss

    def loss(phase, batch, s):
        value, logs = orig(phase, batch, s)
        return (_NaNGrad.apply(value) if s >= step else value), logs
    trainer.method.loss = loss


def test_nan_gradient_stops_naming_step_phase_and_last_good_checkpoint(tmp_path):
    tr = Trainer(tiny_points_cfg(tmp_path, steps=30, ckpt_every=10))
    _nan_grad_from(tr, 17)
    with pytest.raises(DivergenceError, match=r"non-finite gradient norm in phase 'net' at step 17 .*"
                                              r"Last good checkpoint: .*ckpt-00000010\.pt"):
        tr.run()
    events = [json.loads(line) for line in (tmp_path / "health.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "nonfinite_gradient norm" and events[-1]["step"] == 17


def test_nan_gradient_skip_policy_warns_and_keeps_params(tmp_path, capsys):
    tr = Trainer(tiny_points_cfg(tmp_path, steps=20, nan_policy="skip"))
    _nan_grad_from(tr, 12)
    before = {k: v.clone() for k, v in tr.method.nets["net"].state_dict().items()}
    tr.run()
    assert capsys.readouterr().out.count("WARNING: non-finite gradient norm") == 8
    # steps 12..19 were skipped: the weights are those after step 11, all finite
    after = tr.method.nets["net"].state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    reference = Trainer(tiny_points_cfg(tmp_path / "ref", steps=12))  # steps 0..11 trained, 12..19 skipped
    reference.run()
    assert differences(after, reference.method.nets["net"].state_dict()) == []


def test_cli_divergence_names_the_loss_and_exits_3(teacher, tmp_path, monkeypatch, capsys):
    """A NaN in DMD2's distribution-matching term: exit 3, one line with the step, phase, the NaN loss's name and the
    last good checkpoint (the one before the newest, which went on to diverge)."""
    from diffdistill.methods.dmd2 import DMD2
    orig, calls = DMD2.distribution_matching_loss, []

    def nan_dm(self, x, labels=None):  # the generator phase's DM loss turns NaN on its third call
        l_dm, g, t = orig(self, x, labels)
        calls.append(1)
        return (l_dm * float("nan") if len(calls) >= 3 else l_dm), g, t
    monkeypatch.setattr(DMD2, "distribution_matching_loss", nan_dm)
    capsys.readouterr()
    rc = main(["distill", "--method", "dmd2", "--teacher", str(teacher), "--iters", "40", "--batch-size", "16",
               "--out", str(tmp_path / "run"), "--no-progress", "--set", "run.ckpt_every=5",
               "--set", "run.sample_every=0"])
    err = capsys.readouterr().err.strip()
    assert rc == 3 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    # generator phases run at steps 0, 5, 10 (TTUR ratio 5): the third one is step 10
    assert err.startswith("diffdistill: diverged: non-finite loss in phase 'generator' at step 10"), err
    # the newest checkpoint (step 10) is the state that produced the NaN: the one before it is named
    assert "dmd2/dm=nan" in err and "Last good checkpoint:" in err and "ckpt-00000005.pt" in err, err
    assert "ckpt-00000010.pt" not in err, err


# ------------------------------------------------------------------------------------------------ health
def test_spike_monitor_logs_spikes_once_per_window(tmp_path):
    said = []
    h = HealthMonitor(tmp_path / "health.jsonl", factor=10, window=50, min_count=20, say=said.append)
    for s in range(30):
        h.observe(s, {"loss/g": 1.0 + 0.01 * (s % 3), "grad_norm/g": 2.0, "other": 1e9})
    assert not said
    h.observe(30, {"loss/g": 25.0, "grad_norm/g": 2.0})   # 25× the median
    h.observe(31, {"loss/g": 30.0, "grad_norm/g": 500.0})
    events = [json.loads(line) for line in (tmp_path / "health.jsonl").read_text().splitlines()]
    assert [(e["step"], e["key"]) for e in events] == [(30, "loss/g"), (31, "loss/g"), (31, "grad_norm/g")]
    assert abs(events[0]["ratio"] - 25.0 / 1.01) < 1e-6
    assert len(said) == 2 and "loss/g = 25 at step 30" in said[0]   # one warning per key per window
    assert h.pop_interval_max() == {"grad_norm_max/g": 500.0}
    h2 = HealthMonitor(None)
    h2.load_state_dict(h.state_dict())
    assert list(h2.history["loss/g"]) == list(h.history["loss/g"])


def test_recurring_spikes_of_a_healthy_run_are_logged_not_printed(tmp_path):
    """Healthy GAN / TTUR gradient norms reach 10-20× their median every few hundred steps: such a value is a
    logged spike event, but a warning needs it to exceed 3× the window's largest value too (SPIKE_OVER_MAX)."""
    said = []
    h = HealthMonitor(tmp_path / "health.jsonl", factor=10, window=100, min_count=20, say=said.append)
    for s in range(300):
        h.observe(s, {"grad_norm/critic": 18.0 if s % 50 == 5 else 1.0 + 0.1 * (s % 5)})
    events = [json.loads(line) for line in (tmp_path / "health.jsonl").read_text().splitlines()]
    assert len(events) == 5 and not said           # steps 55, 105, …: 18× the median, not past 3 × 18
    h.observe(300, {"grad_norm/critic": 80.0})     # a value past 3 × the window's largest is printed
    assert len(said) == 1 and "grad_norm/critic = 80 at step 300" in said[0]


def test_log_has_interval_max_grad_norm(tmp_path):
    Trainer(tiny_points_cfg(tmp_path, steps=20, log_every=10)).run()
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(r["grad_norm_max/net"] >= r["grad_norm/net"] > 0 for r in recs)


# ------------------------------------------------------------------------------------------------ out of memory
@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                                "21474836480 bytes")], ids=["cuda", "cpu"])
def test_out_of_memory_is_one_line_with_the_knobs(error, tmp_path, monkeypatch, capsys):
    from diffdistill.methods.teacher import EDMTeacher
    orig = EDMTeacher.loss

    def loss(self, phase, batch, step):
        if step >= 12:
            raise error
        return orig(self, phase, batch, step)
    monkeypatch.setattr(EDMTeacher, "loss", loss)
    capsys.readouterr()
    rc = main(["train-teacher", "--preset", "ring8", "--iters", "30", "--batch-size", "16", "--out",
               str(tmp_path), "--no-progress", "--set", "net.kwargs.hidden=16", "--set", "run.ckpt_every=5",
               "--set", "run.sample_every=0"])
    err = capsys.readouterr().err.strip()
    assert rc == 4 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("diffdistill: out of memory at step 12, phase 'net', batch 16 per process"), err
    for knob in ("--batch-size", "torchrun", "run.global_batch_size", "--dry-run", "ckpt-00000010.pt",
                 "--resume auto"):
        assert knob in err, (knob, err)


# ------------------------------------------------------------------------------------------------ dry run
def test_dry_run_lists_every_network_and_writes_nothing(teacher, tmp_path, monkeypatch):
    from diffdistill.nets.factory import count_params
    from diffdistill.distill import load_teacher
    monkeypatch.chdir(tmp_path)
    n = count_params(load_teacher(teacher)[0])
    rc, out, err = run_in_process(["distill", "--method", "sid", "--teacher", str(teacher), "--dry-run",
                                   "--batch-size", "64"])
    assert rc == 0, err
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()
            if line and line.split()[0] in ("generator", "fake_score", "teacher", "ema.generator")}
    assert rows == {k: f"{n:,d}" for k in ("generator", "fake_score", "teacher", "ema.generator")}, out
    assert "frozen" in out and "peak ≈" in out and "at batch 64" in out
    rc, out_el, err = run_in_process(["distill", "--method", "sid", "--teacher", str(teacher), "--dry-run",
                                      "--el-weight", "1"])  # the supplement's random feature nets appear too
    count = lambda text: int(text.split("total (distinct)")[1].split()[0].replace(",", ""))  # noqa: E731
    assert rc == 0 and count(out_el) > count(out) == 4 * n, err
    rc, out, err = run_in_process(["distill", "--method", "dmd2", "--teacher", str(teacher), "--dry-run",
                                   "--set", "method.gan_weight=0.003"])
    assert rc == 0 and "gan_head" in out and "optimizer critic" in out, err
    rc, out, err = run_in_process(["train-teacher", "--preset", "ring8", "--dry-run", "--out", str(tmp_path / "t")])
    assert rc == 0 and "ema.net" in out and "net " in out, err
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())


def test_activation_estimate_matches_a_direct_measurement(teacher):
    """The estimate extrapolated from batches 2 and 4 equals the saved-for-backward bytes measured at the batch."""
    from diffdistill.distill import distill
    from diffdistill.nets.saved_tensors import storage_key
    from diffdistill.train.memory import _saved_activation_bytes, estimate_memory, find_networks
    tr = distill("sid", teacher, flags={"run": {"out": "/nonexistent/dry", "batch_size": 96}}, dry_run=True)
    est = estimate_memory(tr)
    infos, _ = find_networks(tr.method)
    params = {storage_key(t) for i in infos for t in i.module.parameters()}
    for phase, step in (("critic", 0), ("generator", 0)):
        direct = _saved_activation_bytes(tr, phase, step, 96, params)
        assert abs(est["activations"][phase] - direct) <= 0.02 * direct, (phase, est["activations"][phase], direct)
    assert est["peak"] > est["weights"] + est["optimizer_state"] > 0


# ------------------------------------------------------------------------------------------------ signals
def test_sigint_in_training_writes_a_checkpoint_and_exits_130(tmp_path, monkeypatch, capsys):
    from diffdistill.methods.teacher import EDMTeacher
    orig = EDMTeacher.after_step

    def after_step(self, step, nimg):
        orig(self, step, nimg)
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would; the trainer's handler only sets a flag
    monkeypatch.setattr(EDMTeacher, "after_step", after_step)
    before = signal.getsignal(signal.SIGINT)
    rc = main(["train-teacher", "--preset", "ring8", "--iters", "50", "--batch-size", "16", "--out", str(tmp_path),
               "--no-progress", "--set", "net.kwargs.hidden=16", "--set", "run.sample_every=0"])
    err = capsys.readouterr().err
    assert rc == 130 and "stopped by SIGINT at step 7" in err and "Traceback" not in err, err
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["ckpt-00000007.pt"]
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored after training


@pytest.mark.timeout(120)
def test_sigterm_subprocess_checkpoints_exits_143_and_resumes_exactly(tmp_path):
    argv = ["train-teacher", "--preset", "ring8", "--out", str(tmp_path / "run"), "--batch-size", "32",
            "--no-progress", "--set", "net.kwargs.hidden=32", "--set", "net.kwargs.depth=2", "--set",
            "run.sample_every=0", "--set", "run.ckpt_every=0", "--set", "run.log_every=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "diffdistill.cli", *argv, "--iters", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = tmp_path / "run" / "log.jsonl"
    t0 = time.time()
    while time.time() - t0 < 90 and not (log.exists() and len(log.read_text().splitlines()) >= 15):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, (proc.returncode, stderr[-2000:])
    assert "Traceback" not in stderr and "stopped by SIGTERM" in stderr, stderr
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(ckpts) == 1 and verify_checkpoint(ckpts[0])[0] is True
    stopped = load_checkpoint(ckpts[0])["step"]
    assert stopped >= 15 and json.loads(log.read_text().splitlines()[-1])["step"] == stopped
    # resume to stopped + 10 steps == a straight run of that length
    rc, _, err = run_in_process(argv + ["--iters", str(stopped + 10), "--resume", "auto"])
    assert rc == 0, err
    straight = tmp_path / "straight"
    rc, _, err = run_in_process([a if a != str(tmp_path / "run") else str(straight) for a in argv]
                                + ["--iters", str(stopped + 10)])
    assert rc == 0, err
    assert differences(final_state(straight), final_state(tmp_path / "run")) == []


# ------------------------------------------------------------------------------------------------ every method
def _student_methods():
    from diffdistill.methods.registry import list_methods
    return sorted(list_methods(role="student"))


# PD-like methods: 8 → 4 → 2 → 1 in three halvings of 4 updates = the 12 steps, so the cut at 6 is mid-stage
SMALL = {"dmd": ["method.num_pairs=64"], "pd": ["method.start_steps=8", "method.iters_per_halving=4"],
         "cfd": ["method.start_steps=8", "method.iters_per_halving=4"],
         "rdd": ["method.start_steps=8", "method.iters_per_halving=4"]}


@pytest.mark.parametrize("method", _student_methods())
def test_every_method_resumes_exactly(method, teacher, tmp_path):
    """12 steps straight == the same run stopped by SIGINT after step 6, then --resume auto: every net, optimizer,
    scheduler, the method's extra state (EMA copies, stage counters, banks) and the RNG, bit for bit; the TTUR /
    halving schedules cross the cut. (The same command both times: PD-like methods derive their schedule from the
    run length.)"""
    from diffdistill.distill import distill
    flags = lambda out, **run: {"run": {"out": str(out), "steps": 12, "batch_size": 16,  # noqa: E731
                                        "progress": False, "ckpt_every": 0, "sample_every": 0, **run}}

    def interrupt_at_6(trainer):
        if trainer.step == 6:
            os.kill(os.getpid(), signal.SIGINT)
    a = distill(method, teacher, flags=flags(tmp_path / "straight"), overrides=SMALL.get(method, []))
    cut = distill(method, teacher, flags=flags(tmp_path / "split"), overrides=SMALL.get(method, []),
                  on_step=interrupt_at_6)
    assert cut.stopped_by_signal == signal.SIGINT and cut.step == 6
    b = distill(method, teacher, flags=flags(tmp_path / "split", resume="auto"), overrides=SMALL.get(method, []))
    assert b.step == 12
    assert differences(_state(a), _state(b)) == []
    assert differences(final_state(tmp_path / "straight"), final_state(tmp_path / "split")) == []


KILL_DURING_SAVE = r"""
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from conftest import tiny_points_cfg
from diffdistill.train.trainer import Trainer
where, out = sys.argv[1], sys.argv[2]
real_save, real_replace, saves = torch.save, os.replace, []

def save(obj, f, *a, **k):  # the 2nd checkpoint: half written, then SIGKILL
    saves.append(f)
    real_save(obj, f, *a, **k)
    if where == "save" and len(saves) == 2:
        with open(f, "r+b") as fh:
            fh.truncate(100)
        os.kill(os.getpid(), signal.SIGKILL)

def replace(src, dst):      # the 2nd checkpoint: complete and with its manifest, SIGKILL before the rename
    if where == "rename" and str(dst).endswith("ckpt-00000020.pt"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)

torch.save, os.replace = save, replace
Trainer(tiny_points_cfg(out, steps=30, ckpt_every=10)).run()
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["save", "rename"])
def test_sigkill_inside_a_checkpoint_write(where, tmp_path):
    """SIGKILL while the 2nd checkpoint is being written (mid torch.save, or after its manifest but before the
    rename): the 1st checkpoint stays the newest valid one, resume continues exactly, the leftovers are removed."""
    script = tmp_path / "kill_during_save.py"
    script.write_text(KILL_DURING_SAVE.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(script), where, str(out)], capture_output=True, text=True, timeout=110,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    ckpt_dir = out / "checkpoints"
    left = sorted(p.name for p in ckpt_dir.iterdir())
    assert "ckpt-00000010.pt" in left and "ckpt-00000020.pt" not in left, left
    assert any(n.startswith(".ckpt-00000020.pt.") and n.endswith(".tmp") for n in left), left
    assert ("ckpt-00000020.pt.json" in left) == (where == "rename"), left
    resumed = Trainer(tiny_points_cfg(out, steps=30, ckpt_every=10, resume="auto"))
    resumed.run()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [
        f"ckpt-000000{s}.pt{x}" for s in (10, 20, 30) for x in ("", ".json")]
    straight = Trainer(tiny_points_cfg(tmp_path / "straight", steps=30))
    straight.run()
    assert differences(_state(straight), _state(resumed)) == []


TWO_RANKS = r"""
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from conftest import tiny_points_cfg
from diffdistill.train.trainer import Trainer
from diffdistill.train import distributed as dist
out, steps, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tr = Trainer(tiny_points_cfg(out, steps=steps, resume=None if resume == "none" else resume))
tr.run()
torch.save({{"net": tr.method.nets["net"].state_dict(), "gen": tr.gen.get_state(), "torch": torch.get_rng_state()}},
           f"{{out}}/final-rank{{dist.rank()}}.pt")
dist.destroy()
"""


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_rank_resume_restores_each_ranks_rng(tmp_path):
    """torchrun, 2 ranks: 8 steps straight == 4 steps + --resume auto + 4 steps on every rank (each rank gets its
    own RNG state back from the checkpoint, not rank 0's)."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def launch(out, steps, resume="none"):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            f"--master_port={_free_port()}", str(script), str(out), str(steps), resume],
                           capture_output=True, text=True, env=env, timeout=250)
        assert r.returncode == 0, r.stderr[-3000:]
    launch(tmp_path / "straight", 8)
    launch(tmp_path / "split", 4)
    state = load_checkpoint(list_checkpoints(tmp_path / "split" / "checkpoints")[-1])
    assert len(state["rng_ranks"]) == 2
    assert not torch.equal(state["rng_ranks"][0]["method"], state["rng_ranks"][1]["method"])
    launch(tmp_path / "split", 8, "auto")
    for rank in (0, 1):
        a = torch.load(tmp_path / "straight" / f"final-rank{rank}.pt")
        b = torch.load(tmp_path / "split" / f"final-rank{rank}.pt")
        assert differences(a, b) == [], rank
