"""Exponential moving averages of networks, owned by the trainer: EDM's half-life-in-images rule with ramp-up, or a
constant β. A method names which of its networks get an EMA copy (``Method.track_ema``) and with which rule; the
trainer updates every copy once per iteration, after the optimizer steps, and checkpoints them."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from ..options import Options, option


def ema_beta(batch_size: int, nimg: int, halflife_kimg: float | None, rampup_ratio: float | None = 0.05,
             constant_beta: float | None = None) -> float:
    """β = 0.5^(B / h) with h = min(half-life, ramp-up·n_img) images, B the global batch and n_img the images seen
    *before* this iteration's batch (NVlabs/edm ``training/training_loop.py``: the EMA update uses ``cur_nimg``
    before ``cur_nimg += batch_size``; so the first update gives β = 0, a copy of the trained net).
    ``constant_beta`` replaces the rule (β fixed, e.g. 0.999)."""
    if constant_beta is not None:
        return float(constant_beta)
    h = halflife_kimg * 1000.0
    if rampup_ratio is not None:
        h = min(h, rampup_ratio * nimg)
    return 0.5 ** (batch_size / max(h, 1e-8))


@dataclass
class EMAOptions(Options):
    """The EMA block of a method's options (flat keys ``ema_halflife_kimg``, ``ema_rampup``, ``ema_beta_const``).
    Methods inherit it and restate only the defaults their official code uses."""

    ema_halflife_kimg: Optional[float] = option(None, "EMA half-life in thousands of images (EDM's rule); null "
                                                      "with ema_beta_const null: no EMA", gt=0)
    ema_rampup: Optional[float] = option(0.05, "EMA ramp-up: half-life <= ratio × images seen (EDM); null: none",
                                         gt=0)
    ema_beta_const: Optional[float] = option(None, "constant EMA decay β instead of the half-life rule",
                                             ge=0, lt=1)

    def ema_enabled(self) -> bool:
        return self.ema_halflife_kimg is not None or self.ema_beta_const is not None


class EMA:
    """A frozen copy of a network, updated as ema ← β·ema + (1 − β)·net (buffers copied). ``source`` names the
    method network it follows; ``rule`` is its EMAOptions; ``last_beta`` the β of the latest update."""

    def __init__(self, net: torch.nn.Module, source: str | None = None, rule: EMAOptions | None = None):
        self.net = copy.deepcopy(net).eval().requires_grad_(False)
        self.source, self.rule, self.last_beta = source, rule, None

    def beta(self, global_batch: int, nimg_before: int) -> float:
        r = self.rule
        return ema_beta(global_batch, nimg_before, r.ema_halflife_kimg, r.ema_rampup, r.ema_beta_const)

    @torch.no_grad()
    def update(self, net: torch.nn.Module, beta: float) -> None:
        for p_ema, p in zip(self.net.parameters(), net.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - beta)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)
        self.last_beta = beta
