"""What the benchmark scripts share: each step runs the CLI as a subprocess with one thread, its output in a log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], log: Path) -> str:
    """Run ``cmd`` from the repository root with one thread and offline, output to ``log``; its text, or exit with
    the log's tail when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    text = log.read_text()
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}\n{text[-2000:]}")
    return text


def cli(*args: str) -> list[str]:
    """The ``diffdistill`` command line of this interpreter."""
    return [sys.executable, "-m", "diffdistill.cli", *args]
