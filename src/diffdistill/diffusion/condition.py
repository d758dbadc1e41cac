"""What a denoiser is conditioned on, as one batch object: nothing, class labels, or embedding tensors.

Three kinds travel through the same ``labels`` argument of every Denoiser, loss, sampler and method:

* ``None`` — an unconditional model;
* a float tensor ``[B, K]`` of one-hot class labels (EDM's convention; the null class is the all-zero row);
* a :class:`Condition` — text-to-image style conditioning: per-sample sequence embeddings ``embeds [B, L, D]``
  with an optional attention ``mask [B, L]`` (1 = token) and ``pooled [B, P]`` vector, plus named extra per-sample
  inputs (``extra``: e.g. SDXL's ``time_ids [B, 6]``, FLUX's embedded ``guidance [B]``). Its null (negative)
  condition is not zeros but the encoder's output for the empty or negative prompt, so a Condition carries it:
  ``null`` is a one-row Condition (or None when the model was not trained for CFG).

Methods never look inside: they select rows (``rows``), join batches (``cat``), ask for the null condition of a
batch (``null_of``), drop conditions for CFG training (``drop``), move them (``to_device``) and count them
(``batch_len``) through the functions below, which accept all three kinds, so a method written for class labels
works unchanged on text embeddings. Only the network adapter reads the fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Union

import torch

from ..errors import UserError


@dataclass(frozen=True, eq=False)
class Condition:
    """A batch of B embedding conditions (module docstring). Every tensor's first dimension is B."""

    embeds: torch.Tensor
    mask: Optional[torch.Tensor] = None
    pooled: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)
    null: Optional["Condition"] = None      # one row: the negative / empty-prompt condition (CFG's ∅)

    def __post_init__(self):
        if not torch.is_tensor(self.embeds) or self.embeds.ndim != 3:
            raise UserError(f"condition embeddings must be a [B, L, D] tensor, got "
                            f"{tuple(self.embeds.shape) if torch.is_tensor(self.embeds) else type(self.embeds).__name__}")
        B = self.embeds.shape[0]
        for name, t in self.tensors().items():
            if t.shape[0] != B:
                raise UserError(f"condition field {name!r} has {t.shape[0]} rows for {B} embeddings")
        if self.mask is not None and tuple(self.mask.shape) != tuple(self.embeds.shape[:2]):
            raise UserError(f"condition mask has shape {tuple(self.mask.shape)}, expected "
                            f"{tuple(self.embeds.shape[:2])} (one entry per token)")
        if self.null is not None and len(self.null) != 1:
            raise UserError(f"a condition's null (negative prompt) must be one row, got {len(self.null)}")

    # ---- the fields ------------------------------------------------------------------------------------------
    def tensors(self) -> dict:
        """The per-sample tensors by name (``extra.*`` for the extra inputs)."""
        out = {"embeds": self.embeds}
        if self.mask is not None:
            out["mask"] = self.mask
        if self.pooled is not None:
            out["pooled"] = self.pooled
        out.update({f"extra.{k}": v for k, v in self.extra.items()})
        return out

    def _map(self, fn, null=True) -> "Condition":
        return Condition(fn(self.embeds), None if self.mask is None else fn(self.mask),
                         None if self.pooled is None else fn(self.pooled), {k: fn(v) for k, v in self.extra.items()},
                         (self.null._map(fn, null=False) if null and self.null is not None else self.null))

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    @property
    def signature(self) -> dict:
        """Per-sample shapes of the fields: what a network adapter checks against its config."""
        return {k: tuple(v.shape[1:]) for k, v in self.tensors().items()}

    # ---- batch operations --------------------------------------------------------------------------------------
    def rows(self, idx) -> "Condition":
        """Rows ``idx`` (an index tensor, list or slice); the null row is kept."""
        if not isinstance(idx, slice):
            idx = torch.as_tensor(idx, dtype=torch.int64, device=self.embeds.device).reshape(-1)
        return self._map(lambda t: t[idx], null=False)

    def __getitem__(self, idx) -> "Condition":
        """``c[idx]`` = ``c.rows(idx)``: a batch is sliced like a tensor's first dimension."""
        return self.rows(idx)

    def to(self, device=None, dtype=None) -> "Condition":
        """Moved to ``device``; floating fields cast to ``dtype`` (the mask and integer ids keep theirs)."""
        def move(t):
            t = t.to(device) if device is not None else t
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return self._map(move)

    def null_batch(self) -> "Condition":
        """B copies of the null condition (the negative prompt; ``extra`` inputs such as an embedded guidance
        scale or SDXL's size ids are the batch's own: only what the prompt encodes is replaced)."""
        if self.null is None:
            raise UserError("this condition has no null (negative-prompt) embedding, which classifier-free guidance "
                            "and condition dropout need: give the dataset a null_embeds entry (the encoded empty "
                            "prompt)")
        n, B = self.null, len(self)
        rep = lambda t: t.expand((B,) + tuple(t.shape[1:])).to(self.embeds.device)   # noqa: E731
        if (n.mask is None) != (self.mask is None) or (n.pooled is None) != (self.pooled is None):
            raise UserError("the null condition's fields (mask, pooled) differ from the batch's")
        return Condition(rep(n.embeds), None if n.mask is None else rep(n.mask),
                         None if n.pooled is None else rep(n.pooled), dict(self.extra), n)

    def where(self, keep: torch.Tensor) -> "Condition":
        """Row b is this batch's where ``keep[b]`` and the null condition elsewhere."""
        nul = self.null_batch()
        keep = keep.reshape(-1).to(torch.bool).to(self.embeds.device)

        def pick(a, b):
            return torch.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
        return Condition(pick(self.embeds, nul.embeds), None if self.mask is None else pick(self.mask, nul.mask),
                         None if self.pooled is None else pick(self.pooled, nul.pooled), dict(self.extra), self.null)

    @staticmethod
    def cat(conds: Sequence["Condition"]) -> "Condition":
        first = conds[0]
        if any(c.signature != first.signature for c in conds):
            raise UserError("cannot join conditions with different fields or shapes: "
                            + "; ".join(str(c.signature) for c in conds))
        j = lambda get: torch.cat([get(c) for c in conds])   # noqa: E731
        return Condition(j(lambda c: c.embeds), None if first.mask is None else j(lambda c: c.mask),
                         None if first.pooled is None else j(lambda c: c.pooled),
                         {k: j(lambda c, k=k: c.extra[k]) for k in first.extra}, first.null)

    def with_extra(self, **values) -> "Condition":
        """The same batch with extra inputs set (a float is broadcast to every row)."""
        extra = dict(self.extra)
        for k, v in values.items():
            v = torch.as_tensor(v, dtype=torch.float32, device=self.embeds.device)
            extra[k] = v.expand(len(self)).clone() if v.ndim == 0 else v
        return replace(self, extra=extra)

    # ---- storage -------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        """Flat ``{name: tensor}`` (null fields as ``null.*``): for safetensors / npz files."""
        out = dict(self.tensors())
        if self.null is not None:
            out.update({f"null.{k}": v for k, v in self.null.tensors().items()})
        return out

    @classmethod
    def from_state(cls, state: dict) -> "Condition":
        state = {k: torch.as_tensor(v) for k, v in state.items()}
        for k, v in state.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise UserError(f"the prompt embeddings' {k!r} hold NaN or inf values; re-encode them")

        def build(prefix):
            extra = {k[len(prefix) + 6:]: torch.as_tensor(v) for k, v in state.items()
                     if k.startswith(prefix + "extra.")}
            get = lambda k: None if prefix + k not in state else torch.as_tensor(state[prefix + k])  # noqa: E731
            return get("embeds"), get("mask"), get("pooled"), extra
        e, m, p, x = build("")
        if e is None:
            raise UserError("a condition needs 'embeds' ([N, L, D] sequence embeddings)")
        ne, nm, npool, nx = build("null.")
        null = None if ne is None else cls(ne.to(torch.float32), nm, None if npool is None else npool.float(), nx)
        return cls(e.to(torch.float32), m, None if p is None else p.to(torch.float32),
                   {k: v.to(torch.float32) for k, v in x.items()}, null)


Cond = Union[None, torch.Tensor, Condition]


def conditioning_of(net) -> str:
    """'embeddings', 'labels' or 'none': what a Denoiser is conditioned on."""
    if getattr(net, "embedding_signature", None) is not None:
        return "embeddings"
    return "labels" if int(getattr(net, "label_dim", 0) or 0) else "none"


def signature_fits(want: dict, got: dict) -> bool:
    """Whether a Condition's per-sample field shapes ``got`` fit a network's ``want``: the same fields (an attention
    mask may be given to a network that does not read one) and sizes, None in ``want`` matching any size (the
    token count: transformers take prompts of any length)."""
    got = {k: v for k, v in got.items() if k != "mask" or "mask" in want}
    if set(want) != set(got):
        return False
    return all(len(w) == len(g) and all(a is None or a == b for a, b in zip(w, g))
               for w, g in ((tuple(want[k]), tuple(got[k])) for k in want))


def check_bank(net, bank: Optional[Condition], what: str) -> None:
    """Refuse, before any work, an embedding-conditioned ``net`` without a condition bank (or with one whose
    fields do not fit it)."""
    if conditioning_of(net) != "embeddings":
        return
    if bank is None:
        raise UserError(f"{what} is conditioned on text embeddings: give the encoded prompts with --prompts FILE "
                        f"(.npz / .safetensors with 'embeds' [N, L, D], optional 'mask', 'pooled', 'extra.*', and "
                        f"'null.*' for the negative prompt), or a dataset that carries them")
    want = {k: tuple(v) for k, v in dict(net.embedding_signature).items()}
    if not signature_fits(want, bank.signature):
        raise UserError(f"the prompts' fields {bank.signature} do not fit {what}, which takes {want}: encode them with "
                        f"the teacher's own text encoder(s)")


def is_embedding(c: Cond) -> bool:
    return isinstance(c, Condition)


def batch_len(c: Cond) -> int:
    return len(c) if isinstance(c, Condition) else int(c.shape[0])


def rows(c: Cond, idx) -> Cond:
    """Rows ``idx`` of a condition batch (None stays None)."""
    if c is None:
        return None
    if isinstance(c, Condition):
        return c.rows(idx)
    return c[idx] if isinstance(idx, slice) else c[torch.as_tensor(idx, dtype=torch.int64, device=c.device)]


def cat(conds: Sequence[Cond]) -> Cond:
    """One batch from several (all None, all label tensors, or all Conditions)."""
    if all(c is None for c in conds):
        return None
    if any(c is None for c in conds):
        raise ValueError("cannot join a conditional batch with an unconditional one")
    if isinstance(conds[0], Condition):
        return Condition.cat(conds)
    return torch.cat(list(conds))


def null_of(c: Cond) -> Cond:
    """The null condition for a batch: all-zero labels (EDM's label dropout), or the negative-prompt embedding."""
    if c is None:
        return None
    return c.null_batch() if isinstance(c, Condition) else torch.zeros_like(c)


def drop(c: Cond, keep: torch.Tensor) -> Cond:
    """Rows with ``keep`` false replaced by the null condition (``keep``: [B] of 0/1)."""
    if c is None:
        return None
    if isinstance(c, Condition):
        return c.where(keep)
    return c * keep.reshape(-1, 1).to(c.device, c.dtype)   # EDM's rule, bit for bit: labels × [u ≥ p]


def to_device(c: Cond, device) -> Cond:
    return None if c is None else c.to(device)


def load_conditions(path) -> Condition:
    """Encoded prompts from a file: ``.npz`` or ``.safetensors`` with the keys of `Condition.state` (``embeds``
    [N, L, D]; optional ``mask``, ``pooled``, ``extra.*``; ``null.*`` = the negative prompt, one row)."""
    from pathlib import Path
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts file not found: {str(p)!r}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(p))
        elif p.suffix == ".npz":
            import numpy as np
            with np.load(p, allow_pickle=False) as data:
                state = {k: data[k] for k in data.files}
        else:
            raise UserError(f"prompts file {str(p)!r}: use .npz or .safetensors")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read the prompts file {str(p)!r}: {type(e).__name__}: {str(e)[:120]}") from None
    return Condition.from_state(state)
