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
