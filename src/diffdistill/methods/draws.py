"""Every random draw a method's loss makes, through one object, so gradient accumulation (``run.grad_accum``) is
exact: k micro-batches of B/k see exactly the noise, σ's and labels that the corresponding rows of one batch of B
would see.

``torch.randn(8)`` twice is not ``torch.randn(16)``, so a micro-batch cannot simply draw its own share. Instead, in
an accumulated phase the first micro-batch draws every tensor at the *full* batch's size (k × its own rows, in the
order and with the calls the single-batch code makes, so the generator's stream is the one a batch of B would
consume) and keeps it; micro-batch j is handed rows [j·n, (j+1)·n) of each (a *tape*, replayed in call order).
Draws shared by the whole batch (DMD2's backward-simulation step) are drawn once and replayed. Outside an
accumulated phase — and always with ``run.grad_accum=1`` — every call is the plain ``torch`` call on the
generator, bit for bit what the code drew before this object existed.

A method draws per-sample values with ``per_sample(n, draw)`` (``draw(m, generator)`` returns a tensor with m
rows; ``n`` is the rows of *this* (micro-)batch) or the shortcuts ``randn`` / ``randn_like`` / ``randint``, and
batch-shared values with ``shared(draw)``. ``share(n)`` is a full-batch count's share of one micro-batch (the
samples a data-free method generates per loss call). Nothing else about the accumulation reaches a method.

The same mechanism makes a multi-process run draw like one process (``run.draws=global``): every rank's generator
starts from the same seed, every per-sample draw is made at the *global* batch's size (world × the per-process
rows) and rank r takes block r — so a run on W processes sees exactly the noise, σ's and labels of one process with
the W-times batch, and with the trainer's data order (rank r reads rows r·B..(r+1)·B of the global batch) computes
the same losses and updates up to the round-off of the gradient reduction. With accumulation the global batch is
W·k blocks and rank r's micro-batch j is block r·k + j.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..diffusion.condition import Condition, batch_len
from ..errors import UserError


class Draws:
    """The random draws of a method's losses (see the module docstring). ``generator``: the trainer's checkpointed
    RNG; ``accumulation``: ``run.grad_accum`` (k), used to check counts that must split into k parts."""

    def __init__(self, generator: torch.Generator, accumulation: int = 1, world: int = 1, rank: int = 0):
        """``world`` > 1 (``run.draws=global``): ``generator`` is seeded alike on every rank and each per-sample draw
        is made for the world's global batch, of which this ``rank`` takes its block (module docstring)."""
        self.generator = generator
        self.accumulation = int(accumulation)
        self.world, self.rank = int(world), int(rank)
        self.parts, self.part = 1, 0        # k and j of the micro-batch being computed (1, 0: a whole batch)
        self._tape: list | None = None      # [(kind, rows per part, groups, full value)] of this phase
        self._recording = False
        self._cursor = 0

    # -------------------------------------------------------------------------------- the trainer's side
    def begin(self, parts: int) -> None:
        """Start a phase computed as ``parts`` micro-batches (1: a plain pass-through phase)."""
        self.parts, self.part, self._tape, self._recording, self._cursor = int(parts), 0, None, False, 0

    def micro(self, j: int) -> None:
        """Micro-batch ``j`` starts. The phase's first micro-batch records the tape; every later one (including a
        second pass over the same micro-batches) replays it and must make the same calls."""
        self._check_consumed()
        if self._tape is None:
            if j != 0:
                raise RuntimeError("the first micro-batch of a phase must be micro-batch 0")
            self._tape, self._recording = [], True
        else:
            self._recording = False
        self.part, self._cursor = int(j), 0

    def end(self) -> None:
        """The phase is done: back to plain draws."""
        try:
            self._check_consumed()
        finally:
            self.begin(1)

    def _check_consumed(self) -> None:
        if self._tape is not None and not self._recording and self._cursor != len(self._tape):
            raise RuntimeError(f"micro-batch {self.part} made {self._cursor} random draws, the first made "
                               f"{len(self._tape)}: a method's draws must not depend on the micro-batch")

    # -------------------------------------------------------------------------------- the method's side
    def share(self, n: int, what: str = "the batch") -> int:
        """``n`` (a count for the whole batch) divided among the micro-batches: the rows one loss call computes."""
        if n % self.parts:
            raise UserError(f"{what} ({n}) is not divisible by run.grad_accum={self.parts}")
        return n // self.parts

    def check_divisible(self, n: int, what: str) -> None:
        """Refuse (before any work) a count of ``what`` that ``run.grad_accum`` micro-batches cannot split."""
        if n % self.accumulation:
            raise UserError(f"{what}={n} is not divisible by run.grad_accum={self.accumulation}: use a multiple of "
                            f"{self.accumulation} or another run.grad_accum")

    def _next(self, kind: str, rows: int, groups: int):
        if self._cursor >= len(self._tape):
            raise RuntimeError(f"micro-batch {self.part} made more random draws than the first micro-batch")
        entry = self._tape[self._cursor]
        if entry[:3] != (kind, rows, groups):
            raise RuntimeError(f"random draw {self._cursor} of micro-batch {self.part} is {(kind, rows, groups)}, "
                               f"the first micro-batch's was {entry[:3]}")
        self._cursor += 1
        return entry[3]

    def per_sample(self, n: int, draw: Callable[[int, torch.Generator], torch.Tensor], groups: int = 1):
        """A per-sample draw for this (micro-)batch's ``n`` rows: ``draw(m, generator)`` must return a tensor whose
        first dimension is m. ``groups`` > 1: the rows are that many consecutive blocks of the batch (DMD2's
        discriminator draws for cat([real, generated])); a micro-batch then gets its share of every block."""
        parts = self.parts * self.world          # blocks of the draw: micro-batches of every rank
        if parts == 1:
            return draw(n, self.generator)
        if self.parts == 1:                       # a whole per-process batch (global draws): nothing to replay
            full = draw(n * parts, self.generator)
        elif self._recording:
            full = draw(n * parts, self.generator)
            self._tape.append(("rows", n, groups, full))
        else:
            full = self._next("rows", n, groups)
        if batch_len(full) != n * parts:
            raise RuntimeError(f"a per-sample draw returned {batch_len(full)} rows for {n * parts}")
        if n % groups:
            raise RuntimeError(f"{n} rows do not split into {groups} groups")
        per, block = n // groups, self.rank * self.parts + self.part
        if isinstance(full, Condition):   # embedding conditions: the same rows, by index
            starts = torch.arange(groups) * (per * parts) + block * per
            return full.rows((starts[:, None] + torch.arange(per)[None]).reshape(-1))
        blocks = full.reshape((groups, per * parts) + tuple(full.shape[1:]))
        rows = blocks[:, block * per:(block + 1) * per]
        return rows.reshape((n,) + tuple(full.shape[1:]))

    def shared(self, draw: Callable[[torch.Generator], Any]):
        """A value shared by the whole batch (e.g. one step index): drawn once per phase, replayed to every
        micro-batch."""
        if self.parts == 1:
            return draw(self.generator)
        if self._recording:
            value = draw(self.generator)
            self._tape.append(("shared", 0, 1, value))
            return value
        return self._next("shared", 0, 1)

    # shortcuts (each the exact ``torch`` call the methods made before)
    def randn(self, shape, dtype=None) -> torch.Tensor:
        """Standard normal [n, ...] for this batch's n = shape[0] samples (on the CPU, as the generator)."""
        shape = tuple(shape)
        rest = shape[1:]
        if dtype is None:
            return self.per_sample(shape[0], lambda m, g: torch.randn((m,) + rest, generator=g))
        return self.per_sample(shape[0], lambda m, g: torch.randn((m,) + rest, generator=g, dtype=dtype))

    def randn_like(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """Standard normal shaped like ``x``, on ``x``'s device."""
        rest = tuple(x.shape[1:])
        return self.per_sample(x.shape[0], lambda m, g: torch.randn((m,) + rest, generator=g), groups).to(x.device)

    def randint(self, high: int, n: int, low: int | None = None, groups: int = 1) -> torch.Tensor:
        """n integers uniform on {low..high−1} (low 0 when not given)."""
        if low is None:
            return self.per_sample(n, lambda m, g: torch.randint(high, (m,), generator=g), groups)
        return self.per_sample(n, lambda m, g: torch.randint(low, high, (m,), generator=g), groups)


def as_draws(source) -> Draws:
    """``source`` as a Draws: itself, or a plain (pass-through) Draws around a ``torch.Generator``."""
    return source if isinstance(source, Draws) else Draws(source)
