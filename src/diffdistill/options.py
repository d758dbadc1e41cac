"""Typed option schemas: every configurable value is a dataclass field with its type, default, valid range and a
one-line doc. Method options, run options and shared blocks (EMA, optimizer) are all declared this way, so the
defaults live in one place and bad values are refused before any work starts, with one line naming the fix.

    @dataclass
    class DMD2Options(ScoreDistillOptions):
        gan_weight: float = option(3e-3, "generator GAN weight (official train_edm.py)", ge=0)

``Options.from_dict(values, where="method")`` refuses unknown keys (suggesting the nearest valid name), wrong types
and out-of-range values; ``to_dict()`` is the JSON/YAML form saved in ``config.json`` and in checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields

from .errors import UserError

# run.steps of a run that a time budget ends (--budget-minutes without --iters): no fixed length.
UNBOUNDED_STEPS = 10 ** 9


def option(default, doc: str, *, ge=None, gt=None, le=None, lt=None, choices=None, flag: str | None = None):
    """A dataclass field with its doc and valid range: ``ge``/``gt``/``le``/``lt`` bound numbers (and every element
    of a sequence), ``choices`` lists the allowed values, ``flag`` names the command-line flag that sets it."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "flag": flag}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def nearest(name: str, valid) -> str:
    """' (did you mean X?)' for the closest valid name, or ''."""
    hit = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.6)
    return f" (did you mean {hit[0]!r}?)" if hit else ""


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" | null" if type(None) in args else "")
    if origin in (tuple, list):
        inner = [_type_name(a) for a in args if a is not Ellipsis]
        return f"list of {inner[0]}" + (f" ({len(args)} values)" if Ellipsis not in args and origin is tuple else "")
    return {bool: "true/false", int: "integer", float: "number", str: "string", dict: "mapping"}.get(tp, str(tp))


class _Bad(Exception):
    pass


def _coerce(tp, v):
    """``v`` as type ``tp`` (ints accepted for floats, integral floats for ints, lists for tuples); _Bad if not."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return v
    if origin is typing.Literal:
        if v in args:
            return v
        raise _Bad
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, v)
            except _Bad:
                pass
        raise _Bad
    if origin in (tuple, list):
        if not isinstance(v, (list, tuple)):
            v = [v] if origin is list else v
            if not isinstance(v, list):
                raise _Bad
        if origin is tuple and Ellipsis not in args and len(v) != len(args):
            raise _Bad
        elem = [a for a in args if a is not Ellipsis]
        out = [_coerce(elem[i] if origin is tuple and Ellipsis not in args else elem[0], x) for i, x in enumerate(v)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise _Bad
    if tp is int:
        if isinstance(v, bool):
            raise _Bad
        if isinstance(v, int):
            return v
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            return int(v)
        raise _Bad
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _Bad
        if not math.isfinite(float(v)):
            raise _Bad
        return float(v)
    if tp is str:
        if isinstance(v, str):
            return v
        raise _Bad
    if tp is dict:
        if isinstance(v, dict):
            return v
        raise _Bad
    raise TypeError(f"unsupported option type {tp!r}")


def _range_text(meta) -> str:
    parts = [f"{op} {meta[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if meta.get(k)
             is not None]
    return " and ".join(parts)


def _in_range(v, meta) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_in_range(x, meta) for x in v)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return True
    return not ((meta.get("ge") is not None and v < meta["ge"]) or (meta.get("gt") is not None and v <= meta["gt"])
                or (meta.get("le") is not None and v > meta["le"]) or (meta.get("lt") is not None and v >= meta["lt"]))


@dataclass
class Options:
    """Base of every option schema. Construction (direct or ``from_dict``) validates every field."""

    # the config section the fields live in (error messages say e.g. ``method.lr``)
    section: typing.ClassVar[str] = "method"

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            setattr(self, f.name, self._check(f, hints[f.name], getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Checks that involve several fields; raise UserError naming them."""

    @classmethod
    def _check(cls, f, tp, v):
        where = f"{cls.section}.{f.name}" + (f" ({f.metadata['flag']})" if f.metadata.get("flag") else "")
        try:
            v = _coerce(tp, v)
        except _Bad:
            raise UserError(f"{where} must be {_type_name(tp)}"
                            + (f" {_range_text(f.metadata)}" if _range_text(f.metadata) else "")
                            + f", got {v!r}") from None
        choices = f.metadata.get("choices")
        if choices is not None and v is not None and v not in choices:
            raise UserError(f"{where} must be one of {', '.join(repr(c) for c in choices)}, got {v!r}"
                            + nearest(v, [str(c) for c in choices]))
        if v is not None and not _in_range(v, f.metadata):
            raise UserError(f"{where} must be {_range_text(f.metadata)}, got {v!r}")
        return v

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict | None, owner: str | None = None):
        """Build from a config section, refusing unknown keys with the nearest valid name."""
        values = dict(values or {})
        valid = cls.names()
        for k in values:
            if k not in valid:
                who = f" of {owner}" if owner else ""
                raise UserError(f"{cls.section}.{k} is not an option{who}{nearest(k, valid)}; valid: "
                                f"{', '.join(valid)} (diffdistill options {owner or 'METHOD'} lists them)")
        return cls(**values)

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def defaults(cls) -> dict:
        """Every field's default (the official recipe for a method's options)."""
        return cls().to_dict()

    @classmethod
    def describe(cls) -> str:
        """A table of every option: name, type, default, doc."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()
            rng = _range_text(f.metadata)
            if f.metadata.get("choices"):
                rng = "one of " + ", ".join(repr(c) for c in f.metadata["choices"])
            rows.append((f.name, _type_name(hints[f.name]) + (f" {rng}" if rng else ""), repr(_plain(default)),
                         f.metadata.get("doc", "")))
        w = [max(len(r[i]) for r in rows) for i in range(3)] if rows else [0, 0, 0]
        return "\n".join(f"  {a:{w[0]}}  {b:{w[1]}}  {c:{w[2]}}  {d}" for a, b, c, d in rows)


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v
