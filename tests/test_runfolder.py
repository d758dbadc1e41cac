"""One run per run folder: a new run refuses a folder that holds another run, --overwrite and --resume are the two
ways in, and a lock file keeps a second live run out while the first is unaffected."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from diffdistill.cli import main
from diffdistill.io.checkpoint import list_checkpoints, load_checkpoint
from diffdistill.train.runfolder import LOCK

TINY = ["train-teacher", "--preset", "ring8", "--batch-size", "16", "--no-progress", "--set", "net.kwargs.hidden=16",
        "--set", "net.kwargs.depth=1", "--set", "run.sample_every=0", "--set", "run.log_every=1"]


def test_a_used_folder_is_refused_then_resumed_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY + ["--out", str(out), "--iters", "3"]) == 0
    first = list_checkpoints(out / "checkpoints")
    capsys.readouterr()
    assert main(TINY + ["--out", str(out), "--iters", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds another run" in err and "--resume auto" in err and "--overwrite" in err
    assert list_checkpoints(out / "checkpoints") == first, "the refused run deleted nothing"
    assert main(TINY + ["--out", str(out), "--iters", "5", "--resume", "auto"]) == 0
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert main(TINY + ["--out", str(out), "--iters", "2", "--overwrite"]) == 0
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["ckpt-00000002.pt"]
    assert not (out / LOCK).exists(), "the lock is released when the run ends"


def test_a_stale_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    (out / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    assert main(TINY + ["--out", str(out), "--iters", "2"]) == 0
    assert "stale lock" in capsys.readouterr().out


@pytest.mark.timeout(180)
def test_a_second_live_run_is_refused_and_the_first_is_unaffected(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "diffdistill.cli", *TINY, "--out", str(out), "--iters", "1000000",
                              "--set", "run.ckpt_every=50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    t0 = time.time()
    while time.time() - t0 < 120 and not list_checkpoints(out / "checkpoints"):
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "diffdistill.cli", *TINY, "--out", str(out), "--iters", "400",
                             "--resume", "auto"], capture_output=True, text=True, env=env)
    assert first.poll() is None, "the first run was still training while the second tried"
    assert second.returncode == 2, second.stderr
    err = second.stderr.strip()
    assert len(err.splitlines()) == 1 and f"another run (process {first.pid}" in err, err
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 143, stderr[-2000:]
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, steps[-1] + 1)), "the first run's log is whole and in order"
    assert load_checkpoint(list_checkpoints(out / "checkpoints")[-1])["step"] == steps[-1]
    assert not (out / LOCK).exists()
