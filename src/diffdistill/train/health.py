"""Run health: loss and gradient-norm spikes, and out-of-memory errors turned into advice.

Cheap and generic (it sees only the trainer's per-phase ``loss/<phase>`` and ``grad_norm/<phase>`` scalars): each
key keeps a window of its last ``window`` values; a finite value whose magnitude exceeds ``factor`` × the window's
median magnitude is a *spike*. Spikes, skipped non-finite steps and divergence stops are events, one JSON object a
line in ``RUN/health.jsonl``; spikes also print a warning (at most one per key per window). The per-interval
maximum gradient norm of every phase goes into ``log.jsonl`` as ``grad_norm_max/<phase>``.
"""

from __future__ import annotations

import json
import statistics
from collections import deque
from pathlib import Path

import torch

from ..config import RUN_DEFAULTS

WATCHED = ("loss/", "grad_norm/")


class HealthMonitor:
    def __init__(self, path: Path | None, factor: float = 10.0, window: int = 100, min_count: int = 20,
                 say=print):
        self.path, self.factor, self.window, self.min_count, self.say = path, float(factor or 0), int(window), \
            int(min_count), say
        self.history: dict[str, deque] = {}
        self.last_warned: dict[str, int] = {}
        self.interval_max: dict[str, float] = {}

    # ---------------------------------------------------------------- events
    def event(self, step: int, kind: str, **fields) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "event": kind, **fields}) + "\n")

    def observe(self, step: int, logs: dict) -> list[dict]:
        """Record this step's watched scalars; returns the spike events it found (already logged)."""
        spikes = []
        for key, value in logs.items():
            if not key.startswith(WATCHED):
                continue
            value = float(value)
            if key.startswith("grad_norm/"):
                name = "grad_norm_max/" + key.split("/", 1)[1]
                self.interval_max[name] = max(self.interval_max.get(name, value), value)
            hist = self.history.setdefault(key, deque(maxlen=self.window))
            if self.factor > 0 and len(hist) >= self.min_count:
                median = statistics.median(abs(v) for v in hist)
                if median > 0 and abs(value) > self.factor * median:
                    ev = {"key": key, "value": value, "median": median, "ratio": abs(value) / median}
                    spikes.append(ev)
                    self.event(step, "spike", **ev)
                    if step - self.last_warned.get(key, -10 ** 9) >= self.window:
                        self.last_warned[key] = step
                        self.say(f"WARNING: {key} = {value:.4g} at step {step} is {abs(value) / median:.0f}× its "
                                 f"running median {median:.3g} (more in health.jsonl)")
            hist.append(value)
        return spikes

    def pop_interval_max(self) -> dict:
        out, self.interval_max = self.interval_max, {}
        return out

    # ---------------------------------------------------------------- checkpointed, so a resumed run logs alike
    def state_dict(self) -> dict:
        return {"history": {k: list(v) for k, v in self.history.items()}, "last_warned": dict(self.last_warned),
                "interval_max": dict(self.interval_max)}

    def load_state_dict(self, state: dict) -> None:
        self.history = {k: deque(v, maxlen=self.window) for k, v in state.get("history", {}).items()}
        self.last_warned = dict(state.get("last_warned", {}))
        self.interval_max = dict(state.get("interval_max", {}))


# ------------------------------------------------------------------------------------------------ out of memory
def is_out_of_memory(e: BaseException) -> bool:
    """A CUDA/MPS out-of-memory error or a failed CPU allocation."""
    if isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    msg = str(e).lower()
    return isinstance(e, (RuntimeError, MemoryError)) and (
        isinstance(e, MemoryError) or "out of memory" in msg or "can't allocate memory" in msg
        or "cannot allocate memory" in msg)


def memory_knobs() -> str:
    """The options that lower memory, as they exist in this version (bf16 only once ``run.precision`` exists)."""
    knobs = ["lower --batch-size (it is per process; run more processes with torchrun, or set "
             "run.global_batch_size, to keep the global batch)"]
    if "precision" in RUN_DEFAULTS:
        knobs.append("use bf16 autocast (--set run.precision=bf16)")
    knobs.append("use a smaller network (--set net.kwargs...); '--dry-run' prints the networks and a peak-memory "
                 "estimate for a batch")
    return ", ".join(knobs[:-1]) + " or " + knobs[-1]


def out_of_memory_message(e: BaseException, where: str = "") -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return f"out of memory{(' ' + where) if where else ''} ({first}): {memory_knobs()}"
