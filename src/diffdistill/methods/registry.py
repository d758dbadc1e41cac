"""Method registry: ``@register`` on a Method subclass makes it available by name to the CLI and the trainer."""

from __future__ import annotations

import importlib

from ..errors import UserError

METHODS: dict[str, type] = {}

# Modules that define methods; importing them fills METHODS. Adding a method = one file + one name here.
_MODULES = ["teacher", "flow_teacher", "dmd", "dmd2", "diff_instruct", "sid", "cd", "pd", "cfd", "rdd"]


def register(cls):
    METHODS[cls.name] = cls
    return cls


def _load_all():
    for m in _MODULES:
        importlib.import_module(f"{__package__}.{m}")


def get_method(name: str):
    _load_all()
    name = name.replace("-", "_")
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def list_methods(role: str | None = None) -> dict[str, str]:
    """name → one-line summary, optionally only methods of one role ('teacher' or 'student')."""
    _load_all()
    return {k: v.summary for k, v in sorted(METHODS.items()) if role is None or v.role == role}


def lora_methods() -> list[str]:
    """Methods whose trained copies of the teacher can be LoRA adapters (``Method.supports_lora``)."""
    _load_all()
    return sorted(k for k, v in METHODS.items() if v.supports_lora)
