"""Atomic checkpoints: write to a temp file in the same folder, fsync, then rename over the target.

A checkpoint is one ``torch.save`` dict of tensors and plain Python values (loadable with ``weights_only=True``,
so opening one never runs code). Exported weights for users go to safetensors (``export_safetensors``).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import UserError

FORMAT = "diffdistill-checkpoint-v1"


def atomic_write(path: Path, write_fn) -> None:
    """Call ``write_fn(tmp_path)``, fsync the file, then ``os.replace`` it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(state: dict, path: Path) -> None:
    state = dict(state, format=FORMAT)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path} (give the path of a .pt file written by diffdistill)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupted or foreign file
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}; the file is corrupted or not a "
                        f"diffdistill checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a diffdistill checkpoint (missing format tag {FORMAT!r})")
    return state


_STEP_RE = re.compile(r"^ckpt-(\d+)\.pt$")


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints in ``ckpt_dir``, oldest first, by the step in their name."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"ckpt-{step:08d}.pt"


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for p in list_checkpoints(ckpt_dir)[:-keep]:
        p.unlink(missing_ok=True)


def export_safetensors(state_dict: dict, path: Path, metadata: dict) -> None:
    """Weights as safetensors; metadata values are JSON-encoded (the header holds strings only)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    meta = {k: json.dumps(v) for k, v in metadata.items()}  # every value JSON, so readers json.loads all
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
