"""Progressive Distillation (Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models",
ICLR 2022), written in EDM's σ-parameterisation (as the openai/consistency_models port does).

A student initialised from the teacher learns to do in one deterministic (DDIM) step what the teacher does in two.
When a halving ends the student becomes the next teacher and the step count halves: N₀ → N₀/2 → … → 1.

σ-space form. With x_s = x + s·ε (EDM: s = σ/α, SNR = 1/s²) a DDIM (η = 0) step from s to u given x̂ is
x_u = x̂ + (u/s)(x_s − x̂) (``diffusion.samplers.ddim_step``). For a student with N steps on the Karras grid
s(k/N), k = 0..N (``diffusion.schedules.karras_sigmas``), per example:

    i ~ U{0..N−1},  s = s(i/N),  s′ = s((i+½)/N),  s″ = s((i+1)/N)        (the teacher's 2N-step grid nests)
    x_s″ = two teacher DDIM steps s → s′ → s″ from x_s
    x̃ = (x_s″ − r·x_s)/(1 − r),  r = s″/s          (the x̂ whose single DDIM step s → s″ lands on x_s″)
    L = mean_b w(s_b)·mean_CHW (D_S(x_s; s) − x̃)²,  w = max(SNR, 1) = max(1/s², 1)  ("truncated SNR")

(Salimans & Ho 2022, Algorithm 2 and §4.) The walk ends at s_min (0.002), not at 0; a student samples with DDIM on
its own grid [s(0), s(1/N), …, s(1)].

The defaults of ``PDOptions`` are the official CIFAR-10 recipe (google-research/google-research
``diffusion_distillation/diffusion_distillation/config/cifar_distill.py``): 8192 → 1 steps, 50 000 updates per halving,
Adam lr 5e-5 with no warm-up and a linear decay to 0 within each halving, a fresh optimizer per halving, no weight
decay / EMA, a student without dropout, x-prediction, truncated-SNR weighting; batch 128 and grad clip 1 are run
settings (``configs/pd/official.yaml``).

The halving schedule lives in this method, not in the trainer: at the start of every iteration the trainer calls
``before_step(step)``, which enters stage ⌊step/K⌋ (K = iterations per halving) by copying the student into the
teacher and building a fresh optimizer (``enter_stage``); ``phases`` has no side effects. The stage and the current
teacher's weights are part of the method's state, so a checkpoint taken mid-schedule resumes exactly; a checkpoint
taken at a stage boundary (step = k·K) holds the finished stage-k student with its own σ grid (the next stage is
entered by the next iteration).

CFD (cfd.py) and RDD (rdd.py) are this method with other losses on the same target x̃: they override
``distill_loss``. No code is copied from the official repositories.
"""

from __future__ import annotations

import copy
import math
from dataclasses import MISSING, dataclass, fields
from typing import Optional

import torch

from ..diffusion.samplers import ddim_step
from ..diffusion.schedules import karras_sigmas
from ..diffusion import condition as cond
from ..errors import UserError
from ..options import Options, option
from ..train.lr import warmup_lambda
from .base import Method
from .registry import register
from .score_distill import set_dropout

WEIGHTINGS = ("truncated_snr", "snr_plus_one", "snr", "x", "karras")
GRIDS = ("karras", "cosine")
LR_SCHEDULES = ("linear", "cosine", "constant")
GR = "google-research diffusion_distillation config/cifar_distill.py"


def restate(base: type, name: str, default, doc: str):
    """A subclass's copy of the option ``name`` of ``base`` with another default (same type, range and choices):
    the one line an option family needs to change a default."""
    f = next(f for f in fields(base) if f.name == name)
    meta = {k: f.metadata.get(k) for k in ("ge", "gt", "le", "lt", "choices")}
    return option(default, doc, **meta)


@dataclass
class PDOptions(Options):
    start_steps: int = option(8192, f"teacher's steps at the start, N₀ ({GR}:23 start_num_steps)", ge=2)
    student_steps: int = option(1, f"the final student's steps ({GR}:22 end_num_steps)", ge=1)
    iters_per_halving: int = option(50_000, f"updates per halving, K ({GR}:24 distill_steps_per_iter)", ge=1)
    final_stage_iters: Optional[int] = option(
        None, "length of the last halving when --iters exceeds the schedule (set by the schedule; null = K)", ge=1)
    lr: float = option(5e-5, f"Adam learning rate ({GR}:82)", gt=0)
    betas: tuple[float, float] = option((0.9, 0.999), "Adam β1, β2 (diffusion_distillation model.py "
                                        "make_optimizer_def: flax Adam 0.9, 0.999)", ge=0, lt=1)
    eps: float = option(1e-8, "Adam ε (flax.optim.Adam default)", gt=0)
    weight_decay: float = option(0.0, f"Adam weight decay ({GR}:86)", ge=0)
    lr_schedule: str = option("linear", f"LR within each halving: linear decay to 0 ({GR}:83-85, no warm-up), "
                              f"cosine (RCFD/RDD) or constant", choices=LR_SCHEDULES)
    weighting: str = option("truncated_snr", f"x-MSE weight: max(SNR, 1) ({GR}:67 snr_trunc), snr_plus_one "
                            f"(v-MSE), snr (ε-MSE), x, karras (EDM λ)", choices=WEIGHTINGS)
    grid: str = option("karras", "σ grid: karras (EDM port) or cosine (the official log-SNR schedule, "
                       f"{GR}:72)", choices=GRIDS)
    rho: float = option(7.0, "Karras grid ρ (Karras et al. 2022 Eq. 5)", gt=0)
    student_dropout: Optional[float] = option(
        0.0, f"the student's dropout ({GR}:52,61 and imagenet64_distill.py:63: 0); null = keep the teacher's",
        ge=0, lt=1)

    def validate(self) -> None:
        halving_stages(self.start_steps, self.student_steps)


# ------------------------------------------------------------------------------------------------ σ grid
def cosine_sigma(u, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    """The official PD log-SNR schedule λ = −2 log tan(a·t + b) (Salimans & Ho 2022 App. / ``schedules.py``
    cosine) in EDM form, s = tan(a·t + b) with t = 1 − u, restricted to [σ_min, σ_max] (the official range is
    [e^−10, e^10]); u ∈ [0, 1] (u = 0 → σ_max). float64."""
    u = torch.as_tensor(u, dtype=torch.float64)
    b = math.atan(sigma_min)
    a = math.atan(sigma_max) - b
    return torch.tan(a * (1.0 - u) + b)


def pd_student_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                      grid: str = "karras") -> list[float]:
    """The N + 1 noise levels of an N-step student, s(i/N) for i = 0..N (σ_max first, σ_min last): the Karras grid
    with N + 1 points (``karras_sigmas``, no trailing 0) or the cosine schedule. A 2N-step teacher's grid contains
    every one of them (the grids nest across halvings)."""
    if grid == "karras":
        return [float(v) for v in karras_sigmas(num_steps + 1, sigma_min, sigma_max, rho, append_zero=False)]
    if grid == "cosine":
        return [float(v) for v in cosine_sigma(torch.arange(num_steps + 1, dtype=torch.float64) / num_steps,
                                               sigma_min, sigma_max)]
    raise UserError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")


# ------------------------------------------------------------------------------------------------ target
def _bview(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


@torch.no_grad()
def pd_target(teacher, x_s: torch.Tensor, sigma: torch.Tensor, sigma_mid: torch.Tensor, sigma_next: torch.Tensor,
              labels=None) -> torch.Tensor:
    """Progressive-distillation target (Salimans & Ho 2022, Algorithm 2, the x̃ of §3, in σ-space): two teacher
    DDIM steps σ → σ′ → σ″ from x_s (two calls of ``ddim_step``), then the x̃ for which one DDIM step σ → σ″ lands
    on the same point,

        x̃ = (x_s″ − r·x_s)/(1 − r),  r = σ″/σ   (= x_s″ when σ″ = 0).

    The teacher runs in float32; the two steps and the final combination are done in float64 (the last one cancels
    terms of size σ·ε), and x̃ is returned in the dtype of ``x_s``. No grad."""
    dt = torch.float64
    xs = x_s.to(dt)
    s, sm, sn = sigma.to(dt), sigma_mid.to(dt), sigma_next.to(dt)
    x_next = ddim_step(teacher, ddim_step(teacher, xs, s, sm, labels), sm, sn, labels)
    r = _bview(sn / s, xs)
    return ((x_next - r * xs) / (1.0 - r)).to(x_s.dtype)


# ------------------------------------------------------------------------------------------------ loss
def pd_loss_weight(sigma: torch.Tensor, weighting: str = "truncated_snr", sigma_data: float = 0.5) -> torch.Tensor:
    """Per-sample weight on the x-space MSE e = mean_CHW (x̂ − x̃)² (Salimans & Ho 2022 §4 "loss weighting"). With
    SNR = 1/σ² the ε-MSE equals SNR·e, so

    ``truncated_snr`` (official default, "snr_trunc"): max(e, ε-MSE) = max(SNR, 1)·e;
    ``snr_plus_one``: the v-MSE, (1 + SNR)·e;  ``snr``: the ε-MSE, SNR·e;  ``x``: e;
    ``karras``: EDM's λ(σ) = 1/σ² + 1/σ_d² (the consistency_models code's option)."""
    snr = 1.0 / sigma.square()
    if weighting == "truncated_snr":
        return snr.clamp(min=1.0)
    if weighting == "snr_plus_one":
        return snr + 1.0
    if weighting == "snr":
        return snr
    if weighting == "x":
        return torch.ones_like(sigma)
    if weighting == "karras":
        return snr + 1.0 / sigma_data ** 2
    raise UserError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")


def pd_loss(x_hat: torch.Tensor, x_target: torch.Tensor, sigma: torch.Tensor, weighting: str = "truncated_snr",
            sigma_data: float = 0.5) -> torch.Tensor:
    """Progressive-distillation loss (Salimans & Ho 2022, Algorithm 2 with the §4 weighting): the mean over the
    batch of w(σ_b)·mean_CHW (x̂_b − x̃_b)², default w = max(1/σ², 1) (truncated SNR). x̃ carries no grad."""
    e = (x_hat - x_target.detach()).square().flatten(1).mean(1)
    return (pd_loss_weight(sigma, weighting, sigma_data).to(e.dtype) * e).mean()


def halving_stages(start_steps: int, end_steps: int = 1) -> list[tuple[int, int]]:
    """(teacher steps, student steps) of each halving: N₀ → N₀/2 → … → end_steps, log₂(N₀/end) stages."""
    start_steps, end_steps = int(start_steps), int(end_steps)
    if end_steps < 1 or start_steps <= end_steps or start_steps % end_steps \
            or (start_steps // end_steps) & (start_steps // end_steps - 1):
        raise UserError(f"start_steps must be a power-of-two multiple of the final student's steps (>= 2x): got "
                        f"start_steps={start_steps}, student_steps={end_steps}; e.g. --start-steps 8 --steps 1")
    out, n = [], start_steps
    while n > end_steps:
        out.append((n, n // 2))
        n //= 2
    return out


def _lr_lambda(kind: str, iters: int):
    if kind == "linear":     # official PD: no warm-up, linear decay to 0 over the halving
        return lambda k: max(0.0, 1.0 - k / iters)
    if kind == "cosine":     # RCFD / RDD: CosineAnnealingLR over the stage
        return warmup_lambda(0, iters)
    return lambda k: 1.0     # constant


# ------------------------------------------------------------------------------------------------ method
@register
class ProgressiveDistillation(Method):
    name = "pd"
    summary = "Progressive Distillation: the student learns two teacher DDIM steps in one; halve N0 -> 1 " \
              "(Salimans & Ho 2022)"
    needs_data = True
    Options = PDOptions

    def __init__(self, ctx, opts=None, **overrides):
        super().__init__(ctx, opts, **overrides)
        o = self.opts
        if ctx.teacher is None:
            raise UserError(f"method {self.name!r} distils a teacher: give one with --teacher CKPT")
        self.stages = halving_stages(o.start_steps, o.student_steps)
        self.iters_per_halving = o.iters_per_halving
        # The last halving may run longer than the others (more --iters than the schedule): its LR horizon.
        self.final_stage_iters = max(o.iters_per_halving, o.final_stage_iters or 0)
        teacher = ctx.teacher
        self.sigma_min, self.sigma_max = float(teacher.sigma_min), float(teacher.sigma_max)
        self.sigma_data = float(getattr(teacher, "sigma_data", 0.5))
        self.shape = tuple(teacher.sample_shape)
        self.label_dim = int(getattr(teacher, "label_dim", 0) or 0)
        # nets: the student (trained) and the current stage's teacher (frozen; a copy of the original at stage 0,
        # then of the previous stage's student). Both are checkpointed, so the stage resumes exactly.
        self.student = copy.deepcopy(teacher).to(ctx.device).train().requires_grad_(True)
        if o.student_dropout is not None:
            set_dropout(self.student, o.student_dropout)
        self.teacher = copy.deepcopy(teacher).to(ctx.device).eval().requires_grad_(False)
        self.nets["student"] = self.student
        self.nets["teacher"] = self.teacher
        self.stage = 0
        self._new_optimizer()

    # ---------------------------------------------------------------------------------------------- schedule
    @classmethod
    def _schedule_options(cls, method: dict) -> dict:
        """The raw method section over the schema's defaults (before validation: values may still be bad)."""
        d = {f.name: (f.default if f.default is not MISSING else f.default_factory()) for f in fields(cls.Options)}
        return {**d, **{k: v for k, v in method.items() if k in d}}

    @classmethod
    def planned_steps(cls, options: dict) -> int:
        """Iterations of the whole schedule: halvings × iterations per halving."""
        o = cls._schedule_options(options)
        return len(halving_stages(o["start_steps"], o["student_steps"])) * int(o["iters_per_halving"])

    @classmethod
    def resolve_schedule(cls, run: dict, method: dict, given: set) -> None:
        """Make run.steps and iters_per_halving agree (called by ``distill_config``; ``given`` = explicit keys):

        * no --iters: run.steps = halvings × iters_per_halving;
        * --iters and --iters-per-halving: fewer iterations than the schedule stop early (resume later with more);
          more extend the last halving (final_stage_iters, so its LR schedule spans them);
        * --iters only: the iterations are spread evenly, iters_per_halving = ⌊iters / halvings⌋ (run.steps
          rounded down to a multiple) — except under a time budget (run.max_minutes), where run.steps is only a cap
          and the preset's schedule is kept (the budget may end it early).

        Unless run.ckpt_every is given, it becomes the largest divisor of iters_per_halving not above its configured
        value, so every halving boundary (the finished student of each stage) is checkpointed. Bad values are left
        for the schema to name."""
        o = cls._schedule_options(method)
        try:
            halvings = len(halving_stages(o["start_steps"], o["student_steps"]))
            K = int(o["iters_per_halving"])
        except (UserError, TypeError, ValueError):
            return
        if K < 1:
            return
        planned = halvings * K
        if "run.ckpt_every" not in given and run.get("ckpt_every"):
            cls._align_checkpoints(run, K)
        if "run.steps" not in given:
            run["steps"] = planned
            return
        steps = run.get("steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
            return      # validate_run names the problem
        if "method.iters_per_halving" in given:
            if steps > planned:
                method["final_stage_iters"] = steps - (halvings - 1) * K
        elif run.get("max_minutes") and steps > planned:
            run["steps"] = planned
        else:
            if steps < halvings:
                raise UserError(f"method {cls.name!r} needs at least one iteration per halving ({halvings}); "
                                f"got --iters {steps}")
            method["iters_per_halving"] = steps // halvings
            run["steps"] = halvings * method["iters_per_halving"]
            if "run.ckpt_every" not in given and run.get("ckpt_every"):
                cls._align_checkpoints(run, method["iters_per_halving"])

    @staticmethod
    def _align_checkpoints(run: dict, K: int) -> None:
        c = int(run["ckpt_every"])
        run["ckpt_every"] = max(d for d in range(1, min(c, K) + 1) if K % d == 0)

    @property
    def teacher_steps(self) -> int:
        return self.stages[self.stage][0]

    @property
    def student_steps(self) -> int:
        return self.stages[self.stage][1]

    def _new_optimizer(self) -> None:
        """A fresh Adam and LR schedule for the current halving (official PD: no state carries over)."""
        o = self.opts
        opt = torch.optim.Adam(self.student.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                               weight_decay=o.weight_decay)
        self.optimizers["student"] = opt
        last = self.stage == len(self.stages) - 1
        self.schedulers["student"] = torch.optim.lr_scheduler.LambdaLR(
            opt, _lr_lambda(o.lr_schedule, self.final_stage_iters if last else self.iters_per_halving))

    def teacher_networks(self):
        """The given teacher and this method's stage teacher (a frozen copy, overwritten with the student at each
        halving)."""
        return super().teacher_networks() + [self.teacher]

    def advance_stage(self) -> None:
        """End the current halving: the student becomes the teacher, N halves, the optimizer starts afresh."""
        if self.stage + 1 >= len(self.stages):
            raise RuntimeError("already at the last halving")
        self.teacher.load_state_dict(self.student.state_dict())
        self.stage += 1
        self._new_optimizer()

    def enter_stage(self, step: int) -> None:
        """Advance to the stage that iteration ``step`` (0-based) belongs to: ⌊step/K⌋, capped at the last one."""
        target = min(step // self.iters_per_halving, len(self.stages) - 1)
        while self.stage < target:
            self.advance_stage()

    def before_step(self, step: int) -> None:
        """The trainer's start-of-iteration hook: enter this iteration's halving stage."""
        self.enter_stage(step)

    def phases(self, step):
        return ["student"]

    def stage_sigmas(self, n: int):
        """(σ, σ′, σ″) for n examples of the current stage: i ~ U{0..N−1} per example; σ = g[2i], σ′ = g[2i+1],
        σ″ = g[2i+2] on the teacher's 2N-step grid g (which holds the student's N-step grid at the even points)."""
        N = self.student_steps
        grid = torch.tensor(pd_student_sigmas(2 * N, self.sigma_min, self.sigma_max, self.opts.rho, self.opts.grid),
                            dtype=torch.float64)
        i = self.ctx.draws.randint(N, n)
        dev = self.ctx.device
        return tuple(grid[2 * i + d].to(dev, torch.float32) for d in (0, 1, 2))

    # ---------------------------------------------------------------------------------------------- loss
    def loss(self, phase, batch, step):
        if phase != "student":
            raise ValueError(f"unknown phase {phase!r}")
        if batch is None:
            raise UserError(f"method {self.name!r} trains on real data: give --data (default: the teacher's data)")
        x = batch[0].to(self.ctx.device)
        labels = (cond.to_device(batch[1], self.ctx.device)
                  if cond.conditioning_of(self.teacher) != "none" and batch[1] is not None else None)
        sigma, sigma_mid, sigma_next = self.stage_sigmas(len(x))
        noise = self.ctx.draws.randn(x.shape).to(x.device)
        x_s = x + _bview(sigma, x) * noise
        x_target = pd_target(self.teacher, x_s, sigma, sigma_mid, sigma_next, labels)
        x_hat = self.student(x_s, sigma, labels)
        loss, logs = self.distill_loss(x_hat, x_target, sigma, step)
        logs = {f"{self.name}/stage": float(self.stage), f"{self.name}/student_steps": float(self.student_steps),
                **logs}
        return loss, logs

    def distill_loss(self, x_hat, x_target, sigma, step):
        """The loss between the student's x̂ and the target x̃ at the student's σ (CFD/RDD override this)."""
        loss = pd_loss(x_hat, x_target, sigma, self.opts.weighting, self.sigma_data)
        return loss, {"pd/mse": float(loss.detach())}

    # ---------------------------------------------------------------------------------------------- sampling
    def sampling_net(self):
        return self.student

    def sampling_spec(self):
        """Deterministic DDIM on the current student's own grid (N steps, σ_max → σ_min)."""
        return {"sampler": "ddim", "sigmas": pd_student_sigmas(self.student_steps, self.sigma_min, self.sigma_max,
                                                               self.opts.rho, self.opts.grid)}

    def sampling_variants(self):
        return {self.student_steps: self.sampling_spec()}

    def extra_state(self):
        return {"stage": self.stage}

    def load_state_dict(self, state):
        """Enter the checkpoint's stage first (its optimizer and LR horizon), then load every state."""
        stage = int(state.get("extra", {}).get("stage", 0))
        if not 0 <= stage < len(self.stages):
            raise UserError(f"checkpoint is at halving stage {stage}, but this run has {len(self.stages)} stages: "
                            f"resume with the same --start-steps and --steps")
        if stage != self.stage:
            self.stage = stage
            self._new_optimizer()
        super().load_state_dict(state)
