"""Counting the tensors autograd saves for backward (the activations of a memory plan), on any device.

Tensors are told apart by their storage's identity, not its address: on the ``meta`` device every storage has data
pointer 0, and the count has to work there too, where networks too large for the machine are planned from their
shapes alone (the saved-tensors hooks fire for meta tensors as for real ones, and a meta storage knows its size).
"""

from __future__ import annotations

import contextlib

import torch


def storage_key(t: torch.Tensor) -> int:
    """The identity of ``t``'s storage (shared by its views), valid while the storage lives."""
    return t.untyped_storage()._cdata


@contextlib.contextmanager
def count_saved(exclude=(), exclude_keys=()):
    """Inside the block, every tensor autograd saves for backward is recorded once per storage (the largest size
    seen), except the storages of the tensors in ``exclude`` (parameters, the inputs) and those in ``exclude_keys``
    (``storage_key``s); yields a dict storage → bytes, filled as the forward runs. Tensors without a storage
    (nested, sparse) are not counted."""
    skip = {storage_key(t) for t in exclude if torch.is_tensor(t)} | set(exclude_keys)
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return t
        key = st._cdata
        if key not in skip:
            seen[key] = max(seen.get(key, 0), st.nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def _placeholder(t: torch.Tensor, kind: str):
    if kind == "bool" or t.dtype == torch.bool:
        return True
    if kind == "int" or not (t.is_floating_point() or t.is_complex()):
        return 1
    return 1.0


_SCALAR_READS = {torch.Tensor.item: "item", torch.Tensor.__float__: "float", torch.Tensor.__int__: "int",
                 torch.Tensor.__index__: "int", torch.Tensor.__bool__: "bool"}


class MetaForward(torch.overrides.TorchFunctionMode):
    """What a forward pass needs to run on the meta device as it would on a real one, for a memory plan:

    * numbers read from meta tensors (``float(loss)`` for a log, ``.item()``, ``if torch.isfinite(x).all()``) come
      back as 1.0 / 1 / True instead of raising — a meta tensor has no values, and the plan only needs the shapes
      the forward makes (1, not 0: a method may divide by such a number);
    * ``scaled_dot_product_attention`` runs as a fused kernel (torch's flash-attention op for the CPU, which has a
      meta implementation), as it does on CPUs and GPUs, and saves what those save for backward — the inputs, the
      output and the log-sum-exp. Without this, meta picks the unfused math path, which saves the whole
      (length × length) attention matrix of every head.

    Shapes that depend on values (``nonzero``, boolean masks) still cannot be computed on meta and raise."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = args[0] if args else kwargs.get("query")
        if isinstance(t, torch.Tensor) and t.is_meta:
            if func in _SCALAR_READS:
                return _placeholder(t, _SCALAR_READS[func])
            if func is torch.Tensor.tolist:
                out = _placeholder(t, "item")
                for n in reversed(t.shape):
                    out = [out] * n if not isinstance(out, list) else [list(out) for _ in range(n)]
                return out
            if func is torch.nn.functional.scaled_dot_product_attention:
                fused = _fused_attention(*args, **kwargs)
                if fused is not None:
                    return fused
        return func(*args, **kwargs)


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """Flash attention on meta tensors (see ``MetaForward``), or None where the CPU's flash kernel does not take
    the inputs — not 4-D (batch, heads, length, dim), grouped-query heads, head dims that differ between query, key
    and value, a boolean mask — and torch's CPU dispatch would not pick it either: the default path then runs."""
    dims = {query.shape[-1], key.shape[-1], value.shape[-1]}
    if enable_gqa or query.dim() != 4 or key.dim() != 4 or value.dim() != 4 or len(dims) != 1 or \
            key.shape[1] != query.shape[1] or (attn_mask is not None and not attn_mask.is_floating_point()):
        return None
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
