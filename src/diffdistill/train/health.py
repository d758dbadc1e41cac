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
                 say=print, collapse_steps: int = 50):
        self.path, self.factor, self.window, self.min_count, self.say = path, float(factor or 0), int(window), \
            int(min_count), say
        self.collapse_steps = int(collapse_steps or 0)
        self.zero_run = 0                   # consecutive steps whose every loss and gradient norm was exactly 0
        self.frozen: dict[str, list] = {}   # key → [last value, consecutive repeats]
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

    def collapse(self, logs: dict) -> str | None:
        """A collapsed run — every loss and gradient norm exactly 0, or a loss frozen at one value — for
        ``collapse_steps`` steps in a row: the reason, else None. (Noise draws change every step, so a healthy
        loss never repeats exactly; 0 disables the check.)"""
        if not self.collapse_steps:
            return None
        watched = {k: float(v) for k, v in logs.items() if k.startswith(WATCHED)}
        if not watched:
            return None
        self.zero_run = self.zero_run + 1 if all(v == 0 for v in watched.values()) else 0
        if self.zero_run >= self.collapse_steps:
            return f"every loss and gradient norm has been exactly 0 for {self.zero_run} steps"
        for k, v in watched.items():
            if not k.startswith("loss/"):
                continue
            last = self.frozen.get(k)
            self.frozen[k] = [v, last[1] + 1] if last and last[0] == v else [v, 1]
            if self.frozen[k][1] >= self.collapse_steps and v != 0:
                return f"{k} has been exactly {v:.6g} for {self.frozen[k][1]} steps"
        return None

    def pop_interval_max(self) -> dict:
        out, self.interval_max = self.interval_max, {}
        return out

    # ---------------------------------------------------------------- checkpointed, so a resumed run logs alike
    def state_dict(self) -> dict:
        return {"history": {k: list(v) for k, v in self.history.items()}, "last_warned": dict(self.last_warned),
                "interval_max": dict(self.interval_max), "zero_run": self.zero_run,
                "frozen": {k: list(v) for k, v in self.frozen.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history = {k: deque(v, maxlen=self.window) for k, v in state.get("history", {}).items()}
        self.last_warned = dict(state.get("last_warned", {}))
        self.interval_max = dict(state.get("interval_max", {}))
        self.zero_run = int(state.get("zero_run", 0))
        self.frozen = {k: list(v) for k, v in state.get("frozen", {}).items()}


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
