"""Kill -9 / resume harness shared by tests/test_kill_resume.py and benchmarks/kill_resume.py.

One repetition: start ``python -m diffdistill.cli distill`` as a subprocess, SIGKILL it once the log shows a randomly
drawn step past the first checkpoint (the kill may land mid-step or mid-checkpoint write), optionally damage the
newest checkpoint it left, resume with the same command plus ``--resume auto`` (in-process, ``cli.main``), and
compare every tensor of the final state with an uninterrupted run's: nets, optimizers, schedulers, the method's
extra state (EMA copies, stage counters), the supplements' state (EL's scale), the health windows, RNG states, step
and image count. Runs are named by configuration (``CONFIGS``: a method plus its extra flags, e.g. SiDA = sid with
``method.sida=true``, DMD2 + EL = dmd2 with ``--el-weight``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

# The configurations: name -> (method, extra distill arguments), small so that a run takes seconds (adding one =
# one entry here). Batch 32 = 0.032 kimg per step: SiDA's generator first updates at step 5 and its adversarial
# term first counts at step 17 (of 70), so resumes start before and after the GAN switches on. EL refreshes its
# gradient-norm ratio every 10 steps, so its checkpointed scale changes across the kill.
HALVING = ["--set", "method.start_steps=8", "--set", "method.iters_per_halving=20"]
CONFIGS = {
    "dmd": ("dmd", ["--set", "method.num_pairs=64"]),
    "dmd2": ("dmd2", []),
    "diff_instruct": ("diff_instruct", []),
    "sid": ("sid", []),
    "sida": ("sid", ["--set", "method.sida=true", "--set", "method.sida_g_start_kimg=0.1",
                     "--set", "method.sida_gan_start_kimg=0.5"]),
    "cd": ("cd", []),
    "pd": ("pd", HALVING),
    "cfd": ("cfd", HALVING),
    "rdd": ("rdd", HALVING),
    "dmd2+el": ("dmd2", ["--el-weight", "3", "--set", "el.ratio_every=10"]),
}
ITERS = {"pd": 60, "cfd": 60, "rdd": 60}  # PD-like methods: three halvings of 20 updates, so the kill crosses stages
COMPARED = ("step", "nimg", "method_state", "supplement_state", "health", "rng", "rng_ranks", "sample_net",
            "sampling")


def registered(config: str) -> bool:
    """Whether the configuration's method is registered."""
    from diffdistill.methods.registry import list_methods
    return CONFIGS[config][0] in list_methods(role="student")


def make_teacher(root: Path, steps: int = 40) -> Path:
    """A tiny ring8 MLP teacher (32×2), trained in-process in about a second; quality does not matter here."""
    from diffdistill.config import resolve
    from diffdistill.io.checkpoint import list_checkpoints
    from diffdistill.train.trainer import Trainer
    cfg = resolve("ring8", flags={"run": {"out": str(root), "steps": steps, "batch_size": 64, "log_every": 10,
                                          "ckpt_every": 0, "sample_every": 0, "progress": False},
                                  "net": {"kwargs": {"hidden": 32, "depth": 2}}, "data": {"n": 2000}})
    Trainer(cfg).run()
    return list_checkpoints(Path(root) / "checkpoints")[-1]


def distill_argv(config: str, teacher: Path, out: Path, iters: int | None = None, ckpt_every: int = 7,
                 batch_size: int = 32) -> list[str]:
    method, extra = CONFIGS[config]
    return ["distill", "--method", method, "--teacher", str(teacher), "--iters", str(iters or ITERS.get(config, 70)),
            "--out", str(out), "--batch-size", str(batch_size), "--no-progress",
            "--set", f"run.ckpt_every={ckpt_every}", "--set", "run.log_every=1", "--set", "run.sample_every=0",
            "--set", "run.keep_ckpts=3", *extra]


def run_in_process(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``diffdistill.cli.main(argv)``."""
    from diffdistill.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def final_state(out: Path) -> dict:
    from diffdistill.io.checkpoint import list_checkpoints, load_checkpoint
    state = load_checkpoint(list_checkpoints(Path(out) / "checkpoints")[-1])
    return {k: state.get(k) for k in COMPARED}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def differences(a, b, path: str = "") -> list[str]:
    """Paths where two nested states differ (tensors: dtype, shape and every bit)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.dtype != b.dtype or a.shape != b.shape:
            return [path]
        return [] if torch.equal(_bits(a), _bits(b)) else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}{{keys}}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}[len]"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def _last_logged_step(log: Path) -> int:
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a half-written line
    return 0


def kill_and_resume(config: str, teacher: Path, out: Path, rng: random.Random, reference: dict | None = None,
                    corrupt_newest: bool = False, iters: int | None = None, ckpt_every: int = 7,
                    timeout: float = 120.0) -> dict:
    """One repetition; returns what happened (kill step, checkpoints left, resume step, differences)."""
    from diffdistill.io.checkpoint import list_checkpoints
    argv = distill_argv(config, teacher, out, iters, ckpt_every)
    total = int(argv[argv.index("--iters") + 1])
    first = (2 if corrupt_newest else 1) * ckpt_every
    target = rng.randint(first + 1, max(first + 1, (2 * total) // 3))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    err_file = Path(out).parent / f"{Path(out).name}.stderr"
    t0 = time.perf_counter()
    with open(err_file, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "diffdistill.cli", *argv], stdout=subprocess.DEVNULL,
                                stderr=err, env=env)
        killed_at = None
        try:
            while time.perf_counter() - t0 < timeout:
                step = _last_logged_step(Path(out) / "log.jsonl")
                # with corrupt_newest an older checkpoint must exist too, for resume to fall back on
                if step >= target and len(list_checkpoints(Path(out) / "checkpoints")) >= (2 if corrupt_newest else 1):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_at = step
                    break
                if proc.poll() is not None:
                    break
                time.sleep(0.002)
        finally:
            if proc.poll() is None and killed_at is None:
                proc.kill()
            proc.wait()
    info = {"config": config, "target": target, "killed_at": killed_at, "rc_killed": proc.returncode,
            "stale_files": sorted(p.name for p in (Path(out) / "checkpoints").glob(".*.tmp")),
            "checkpoints_left": [p.name for p in list_checkpoints(Path(out) / "checkpoints")],
            "stderr_killed": err_file.read_text()[-2000:]}
    if killed_at is None:
        info["error"] = "the run ended before the kill" if proc.returncode == 0 else "the run failed before the kill"
        return info
    if corrupt_newest:
        newest = list_checkpoints(Path(out) / "checkpoints")[-1]
        data = newest.read_bytes()
        newest.write_bytes(data[: len(data) // 2])  # a truncated copy, as a full disk or a bad sync leaves one
        info["corrupted"] = newest.name
    rc, stdout, stderr = run_in_process(argv + ["--resume", "auto"])
    info["rc_resume"] = rc
    m = re.search(r"resumed from \S*?ckpt-(\d+)\.pt at step (\d+)", stdout)
    info["resumed_from"] = int(m.group(2)) if m else None
    info["skipped_warning"] = "WARNING: resume auto: skipping" in stdout
    info["stderr_resume"] = stderr[-2000:]
    info["seconds"] = round(time.perf_counter() - t0, 2)
    if rc == 0 and reference is not None:
        info["differences"] = differences(reference, final_state(out))
    return info


def reference_run(config: str, teacher: Path, out: Path, iters: int | None = None, ckpt_every: int = 7) -> dict:
    """The uninterrupted run (in-process) whose final state every repetition must match bit for bit."""
    rc, _, err = run_in_process(distill_argv(config, teacher, out, iters, ckpt_every))
    assert rc == 0, err
    return final_state(out)
