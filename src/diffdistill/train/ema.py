"""Exponential moving average of a network's weights (EDM's half-life-in-images rule, or a constant β)."""

from __future__ import annotations

import copy

import torch


def ema_beta(batch_size: int, nimg: int, halflife_kimg: float | None, rampup_ratio: float | None = 0.05,
             constant_beta: float | None = None) -> float:
    """EDM (Karras et al. 2022, training_loop.py): β = 0.5^(B / h) with h = min(halflife, rampup·nimg) images.

    ``constant_beta`` overrides the rule (β fixed, e.g. 0.999).
    """
    if constant_beta is not None:
        return float(constant_beta)
    h = halflife_kimg * 1000.0
    if rampup_ratio is not None:
        h = min(h, rampup_ratio * nimg)
    return 0.5 ** (batch_size / max(h, 1e-8))


class EMA:
    """A frozen copy of ``net`` updated as ema ← β·ema + (1 − β)·net; buffers are copied."""

    def __init__(self, net: torch.nn.Module):
        self.net = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net: torch.nn.Module, beta: float) -> None:
        for p_ema, p in zip(self.net.parameters(), net.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - beta)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)
