"""A frozen network stored in bf16 (``run.teacher_dtype=bf16``): half the memory of its weights, fp32 at the
Denoiser boundary.

Every parameter with two or more dimensions (convolution and linear weights, embedding tables: nearly all of the
bytes) is cast to bf16; vectors (biases, normalisation scales) and buffers (resampling filters, Fourier
frequencies, σ tables) stay fp32 — a Fourier embedding's frequencies in bf16 would shift its phases by radians, and
a normalisation layer given fp32 input may not take bf16 parameters. The forward pass runs under bf16 autocast, as
``run.precision=bf16`` runs the losses (matrix products and convolutions in bf16, the rest in the dtype autocast
picks), and every floating-point output is returned as fp32.
"""

from __future__ import annotations

import torch
from torch import nn

_MARK = "_diffdistill_bf16_storage"


def _device_type(module: nn.Module, args) -> str:
    for a in args:
        if torch.is_tensor(a):
            return a.device.type
    p = next(module.parameters(), None)
    return p.device.type if p is not None else "cpu"


def _to_fp32(out):
    if torch.is_tensor(out):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, tuple):
        return tuple(_to_fp32(o) for o in out)
    if isinstance(out, list):
        return [_to_fp32(o) for o in out]
    return out


def store_in_bf16(net: nn.Module) -> nn.Module:
    """Cast the frozen ``net``'s ≥2-D parameters to bf16 in place and make its forward run under bf16 autocast with
    fp32 outputs (forward hooks, so its class, parameter names and state-dict keys do not change). Refuses a
    network with trainable parameters: an optimizer step on bf16 weights would round every update. Calling it
    again on the same network does nothing. Returns ``net``."""
    if getattr(net, _MARK, False):
        return net
    if any(p.requires_grad for p in net.parameters()):
        raise ValueError("store_in_bf16 is for frozen networks: this one has parameters that require grad")
    for p in net.parameters():
        if p.ndim >= 2 and p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)
    contexts = []   # a stack: a forward may call the network again (nested calls exit in reverse order)

    def enter(module, args):
        ctx = torch.autocast(device_type=_device_type(module, args), dtype=torch.bfloat16)
        ctx.__enter__()
        contexts.append(ctx)

    def leave(module, args, output):
        contexts.pop().__exit__(None, None, None)
        return _to_fp32(output)

    net.register_forward_pre_hook(enter)
    net.register_forward_hook(leave, always_call=True)   # also on an exception, so autocast never stays on
    setattr(net, _MARK, True)
    return net


def stored_in_bf16(net: nn.Module) -> bool:
    return bool(getattr(net, _MARK, False))
