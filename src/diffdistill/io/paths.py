"""Output paths checked before any work starts: a file path must not name a folder or sit below a file, a run
folder must not be a file or sit below one, and both must be writable."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError


def _nearest_existing(p: Path) -> Path:
    return next((q for q in [p, *p.parents] if q.exists()), Path("."))


def check_output_file(path, flag: str) -> Path:
    """Refuse an output file path that names a folder, sits below a file, or cannot be written."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p} is a folder: give a file path (e.g. {p / 'out'}{p.suffix or ''})")
    parent = _nearest_existing(p.parent)
    if not parent.is_dir():
        raise UserError(f"{flag} {p}: {parent} is a file, not a folder; choose another output path")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {p}: {parent} is not writable; choose another output path")
    return p


def check_output_dir(path, flag: str = "--out") -> Path:
    """Refuse a run folder that is a file, sits below a file, or cannot be written."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} is a file, not a folder: give a new or existing run directory")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise UserError(f"{flag} {p}: {base} is a file, not a folder; choose another run directory")
    if not os.access(base, os.W_OK):
        raise UserError(f"{flag} {p}: {base} is not writable; choose another run directory")
    return p
