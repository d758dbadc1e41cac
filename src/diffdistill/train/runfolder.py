"""One run per run folder: a new run refuses a folder that holds another run's files (unless it resumes, or the
user asks to overwrite), and a lock file keeps two live runs from writing the same folder at once."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

from ..errors import UserError

LOCK = ".diffdistill.lock"
RUN_FILES = ("config.json", "log.jsonl", "health.jsonl")
RUN_DIRS = ("checkpoints", "samples", "tb")


def previous_run_files(out: Path) -> list[Path]:
    """The files of an earlier run in ``out`` (checkpoints, logs, config)."""
    found = [out / f for f in RUN_FILES if (out / f).exists()]
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        found.append(ckpts)
    return found


def claim(out: Path, resume, overwrite: bool) -> None:
    """Refuse a used folder for a new run; with ``overwrite`` remove the earlier run's files first."""
    used = previous_run_files(out)
    if not used or resume:
        return
    if not overwrite:
        names = ", ".join(p.name for p in used)
        raise UserError(f"--out {out} holds another run ({names}): continue it with --resume auto, start over "
                        f"with --overwrite (deletes that run's checkpoints and logs), or choose another --out")
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``OUT/.diffdistill.lock`` holding this process's host and pid, for the life of a run. A lock whose process
    is gone (killed, crashed, another machine's stale file of this host) is taken over with a warning."""

    def __init__(self, out: Path, say=print):
        self.path, self.say, self.held = Path(out) / LOCK, say, False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    other = {}
                if other.get("host") == me["host"] and isinstance(other.get("pid"), int) \
                        and not _alive(other["pid"]):
                    self.say(f"WARNING: removing a stale lock of process {other['pid']} (no longer running) in "
                             f"{self.path.parent}")
                    self.path.unlink(missing_ok=True)
                    continue
                raise UserError(f"another run (process {other.get('pid', '?')} on {other.get('host', '?')}) is "
                                f"writing {self.path.parent}: wait for it to finish or choose another --out (if "
                                f"that process is gone, delete {self.path})") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
