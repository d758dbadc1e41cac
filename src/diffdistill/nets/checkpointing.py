"""Activation checkpointing of a network's blocks (``run.activation_checkpointing``).

A checkpointed block keeps only its inputs for backward and recomputes its activations when the gradient reaches it
(``torch.utils.checkpoint.checkpoint`` in non-reentrant mode): memory for activations drops to the block inputs
plus one block's activations at a time, for one extra forward of the blocks. The non-reentrant checkpoint stashes
the global CPU RNG state (and that of the inputs' CUDA device) before the block and restores it for the
recomputation, so dropout draws the same masks and the gradients equal those of the plain network.

This package's networks (SongUNet, DhariwalUNet: every encoder and decoder block; the MLP denoiser: every residual
block) carry the ``ActivationCheckpointing`` mixin; a diffusers model uses diffusers' own
``enable_gradient_checkpointing()`` (its ResNet blocks, non-reentrant).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .saved_tensors import count_saved


def _set_state(params, grads, modules, modes) -> tuple:
    """Give ``params`` the ``requires_grad`` flags ``grads`` and ``modules`` the train/eval ``modes``; returns the
    previous flags and modes."""
    before = [p.requires_grad for p in params], [m.training for m in modules]
    for p, g, b in zip(params, grads, before[0]):
        if g != b:
            p.requires_grad_(g)
    for m, t, b in zip(modules, modes, before[1]):
        if t != b:
            m.training = t
    return before


_probe: list | None = None   # set by ``recomputation_probe``: receives each checkpointed block's saved bytes


@contextlib.contextmanager
def recomputation_probe():
    """For memory estimates (``--dry-run``): inside the block, every checkpointed block's forward is first run once
    more under a counting saved-tensors hook (the RNG state restored after), and the yielded list receives the
    bytes it saved beyond its parameters and inputs: what backward holds again while it recomputes that block. The
    checkpointed forward that follows is the real one, so an outer saved-tensors hook sees what checkpointing
    keeps."""
    global _probe
    previous, _probe = _probe, []
    try:
        yield _probe
    finally:
        _probe = previous


def _count_saved(block: nn.Module, fn, args) -> int:
    cuda = sorted({a.device for a in args if torch.is_tensor(a) and a.device.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=cuda), count_saved(list(block.parameters()) + list(args)) as seen:
        fn(*args)
    return sum(seen.values())


def _adapter_state(modules) -> list:
    """(layer, active adapters, disabled) of every peft adapter layer among ``modules`` (LoRA roles on a shared base
    switch these between their forwards, so a recomputation must see the forward's)."""
    return [(m, list(m.active_adapters), bool(m.disable_adapters)) for m in modules
            if hasattr(m, "merged_adapters") and hasattr(m, "set_adapter") and hasattr(m, "enable_adapters")]


def _set_adapter_state(state) -> None:
    for m, active, disabled in state:
        m.set_adapter(active)
        m.enable_adapters(not disabled)


def checkpoint_block(block: nn.Module, fn, *args):
    """``checkpoint(fn, *args)`` (non-reentrant) for ``fn`` running ``block``, whose recomputation in backward sees
    the block as the forward saw it: the methods change a network's state between its forward and the backward —
    ``frozen()`` turns ``requires_grad`` off for a pass whose gradient only reaches the input (autograd then saves
    other tensors), SiD runs the fake score in eval mode (no dropout), LoRA roles on a shared base switch the active
    adapter — and the recomputation has to save the same tensors with the same values, so it replays the forward's
    ``requires_grad`` flags, train/eval modes and active adapters."""
    if _probe is not None:
        _probe.append(_count_saved(block, fn, args))
    params, modules = list(block.parameters()), list(block.modules())
    grads, modes = [p.requires_grad for p in params], [m.training for m in modules]
    adapters = _adapter_state(modules)

    def replay(*a):
        flags, active = [p.requires_grad for p in params], _adapter_state(modules)
        _set_adapter_state(adapters)   # before the flags: peft's switch sets requires_grad itself
        before = _set_state(params, grads, modules, modes)
        try:
            return fn(*a)
        finally:
            _set_adapter_state(active)
            _set_state(params, flags, modules, before[1])

    return checkpoint(replay, *args, use_reentrant=False)


class ActivationCheckpointing:
    """Mixin for a network whose forward runs its blocks through ``self.run_block``; ``block_types`` names the
    classes of those blocks (``blocks`` finds them, e.g. for FSDP2's per-block sharding)."""

    activation_checkpointing: bool = False   # a class default, so networks pickled before it existed still load
    block_types: tuple = ()

    def set_activation_checkpointing(self, on: bool = True):
        self.activation_checkpointing = bool(on)
        return self

    def run_block(self, block: nn.Module, *args, fn=None):
        """``block(*args)`` (or ``fn(block, *args)``), checkpointed when enabled and a graph is being recorded
        (no-grad passes, such as the frozen teacher's or sampling, save nothing, so there is nothing to spare)."""
        fn = block if fn is None else functools.partial(fn, block)
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint_block(block, fn, *args)
        return fn(*args)


def _is_diffusers_model(m: nn.Module) -> bool:
    return bool(getattr(m, "_supports_gradient_checkpointing", False)) and hasattr(m, "enable_gradient_checkpointing")


def checkpointable(net: nn.Module) -> bool:
    """Whether ``net`` contains a network whose blocks can be checkpointed."""
    return any(isinstance(m, ActivationCheckpointing) or _is_diffusers_model(m) for m in net.modules())


def set_activation_checkpointing(net: nn.Module, on: bool = True) -> int:
    """Turn block checkpointing on (or off) in every network inside ``net`` (e.g. the raw network inside a
    preconditioner); returns how many networks were switched (0: nothing in ``net`` supports it)."""
    n = 0
    for m in net.modules():
        if isinstance(m, ActivationCheckpointing):
            m.set_activation_checkpointing(on)
            n += 1
        elif _is_diffusers_model(m):
            if on:   # diffusers' own switch (its ResNet blocks), with the replaying checkpoint above
                m.enable_gradient_checkpointing(lambda block, *args: checkpoint_block(block, block.__call__, *args))
            else:
                m.disable_gradient_checkpointing()
            n += 1
    return n


# diffusers' own units for device maps and FSDP (``_no_split_modules``), for models that do not state them
_DIFFUSERS_BLOCKS = ("ResnetBlock2D", "Attention", "BasicTransformerBlock", "Transformer2DModel")


def blocks(net: nn.Module) -> list[nn.Module]:
    """The blocks of every network inside ``net``, outermost first-level ones only: the modules this package's
    networks run through ``run_block`` (their ``block_types``: residual and attention blocks, what activation
    checkpointing recomputes one at a time), or a diffusers model's ``_no_split_modules`` (its ResNet / attention /
    transformer blocks). FSDP2 shards each of them as one unit (``run.fsdp``). [] when ``net`` has none."""
    named = dict(net.named_modules())
    found = []
    for name, m in named.items():
        if isinstance(m, ActivationCheckpointing) and m.block_types:
            found += [f"{name}.{n}" if name else n for n, sub in m.named_modules() if isinstance(sub, m.block_types)]
        elif _is_diffusers_model(m):
            kinds = tuple(getattr(m, "_no_split_modules", None) or _DIFFUSERS_BLOCKS)
            found += [f"{name}.{n}" if name else n for n, sub in m.named_modules()
                      if type(sub).__name__ in kinds]
    found = list(dict.fromkeys(found))
    outer = [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]
    return [named[n] for n in outer]
