"""Learning-rate factors for ``torch.optim.lr_scheduler.LambdaLR`` (the trainer steps a phase's scheduler each
time the phase's optimizer steps)."""

from __future__ import annotations

import math


def warmup_lambda(warmup_steps: int, decay_steps: int | None = None):
    """LR factor at scheduler step s: linear warm-up min(1, (s+1)/warmup_steps), then constant, or, with
    ``decay_steps`` D, times the cosine ½(1 + cos(π·min(s, D)/D)), which reaches 0 at s = D."""
    def factor(step):
        f = min(1.0, (step + 1) / max(warmup_steps, 1))
        if decay_steps:
            f *= 0.5 * (1.0 + math.cos(math.pi * min(step, decay_steps) / decay_steps))
        return f
    return factor


def run_decay_factor(kind: str, progress: float, start: float) -> float:
    """The factor of ``run.lr_decay`` at run ``progress`` p ∈ [0, 1] for a decay that began at progress ``start``:
    with x = (p − start) / (1 − start), 1 − x (linear) or ½(1 + cos πx) (cosine); 1 for ``none``. Linear to 0 over
    the budget is the schedule that Li, Yumer & Ramanan (ICLR 2020, "Budgeted training") find best when the
    run's length is a budget."""
    if kind == "none":
        return 1.0
    x = min(max((progress - start) / max(1.0 - start, 1e-12), 0.0), 1.0)
    return 1.0 - x if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * x))
