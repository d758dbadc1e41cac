"""Run health: loss and gradient-norm spikes, and out-of-memory errors turned into advice.

Cheap and generic (it sees only the trainer's per-phase ``loss/<phase>`` and ``grad_norm/<phase>`` scalars): each
key keeps a window of its last ``window`` values; a finite value whose magnitude exceeds ``factor`` × the window's
median magnitude is a *spike*. Spikes, skipped non-finite steps and divergence stops are events, one JSON object a
line in ``RUN/health.jsonl``; a spike that also exceeds ``SPIKE_OVER_MAX`` × the window's largest magnitude prints
a warning (at most one per key per window). The per-interval
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
SPIKE_OVER_MAX = 3.0   # a printed spike also exceeds this × the largest value of its window


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
                    # Printed only past SPIKE_OVER_MAX × the window's largest value too: healthy GAN / TTUR runs
                    # have gradient norms 10-20× their median every few hundred steps, never far beyond the window's
                    # own maximum.
                    beyond = abs(value) > SPIKE_OVER_MAX * max(abs(v) for v in hist)
                    if beyond and step - self.last_warned.get(key, -10 ** 9) >= self.window:
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
             "run.global_batch_size, to keep the global batch)",
             ("keep the batch and compute it as k micro-batches (--set run.grad_accum=k: the same result, the "
              "activations of B/k samples)")]
    if "precision" in RUN_DEFAULTS:
        knobs.append("use bf16 autocast (--set run.precision=bf16)")
    knobs.append("recompute the trained networks' activations in backward (--set "
                 "run.activation_checkpointing=[NAME,...] with the trained networks '--dry-run' lists, e.g. "
                 "generator,fake_score)")
    knobs.append("store the frozen teacher in bf16 (--set run.teacher_dtype=bf16)")
    knobs.append("train LoRA adapters on one shared frozen base instead of full copies of the teacher (--set "
                 "lora.rank=8, for the methods that train copies of a teacher)")
    knobs.append("shard the networks over the torchrun processes instead of replicating them (--set run.fsdp=true, "
                 "and run.fsdp_teacher=shard for the teacher)")
    knobs.append("use a smaller network (--set net.kwargs...); '--dry-run' prints the networks and a peak-memory "
                 "estimate for a batch")
    return ", ".join(knobs[:-1]) + " or " + knobs[-1]


def out_of_memory_message(e: BaseException, where: str = "") -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return f"out of memory{(' ' + where) if where else ''} ({first}): {memory_knobs()}"


# ---------------------------------------------------------------- start of a distillation run
# The student's initial samples are "off scale" when their spread exceeds the reference's by this factor. The EDM
# teachers' one-step outputs sit inside the data's range (a blurred mean at σ_max); an ε-teacher's one-step output
# at σ_max = 80 spans ~20× the data's range.
OFF_SCALE = 3.0


def spread(x: torch.Tensor, center: torch.Tensor | None = None) -> tuple[float, float]:
    """(std, 99.9 % quantile of |x − center|) over every value: the scale and the range of a batch of samples."""
    x = x.detach().float().flatten(1)
    center = x.mean(0) if center is None else center
    dev = (x - center).abs().flatten()
    dev = dev[torch.randperm(dev.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    return float(x.std()), float(torch.quantile(dev, 0.999))


def initial_output_check(student_x: torch.Tensor, reference_x: torch.Tensor, what: str, hint: str) -> str | None:
    """A one-line warning when the student's initial samples are far off the reference's scale (std or range more
    than ``OFF_SCALE``× the reference's, or not finite), else None. ``what`` names the reference, ``hint`` the fix."""
    ref = reference_x.detach().float().flatten(1)
    center = ref.mean(0)
    s_std, s_range = spread(student_x, center) if torch.isfinite(student_x).all() else (float("inf"),) * 2
    r_std, r_range = spread(ref, center)
    ratio = max(s_std / max(r_std, 1e-12), s_range / max(r_range, 1e-12))
    if ratio <= OFF_SCALE:
        return None
    return (f"health check: the student's initial samples have std {s_std:.3g} and range ±{s_range:.3g} around "
            f"the {what}'s mean, {ratio:.0f}× the {what}'s (std {r_std:.3g}, ±{r_range:.3g}); training starts far "
            f"off the data's scale and may never recover. {hint}")
