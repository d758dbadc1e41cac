"""Progressive Distillation (Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models",
ICLR 2022), written in EDM's σ-parameterisation (as the openai/consistency_models port does).

A student initialised from the teacher learns to do in one deterministic (DDIM) step what the teacher does in two.
When a halving ends the student becomes the next teacher and the step count halves: N₀ → N₀/2 → … → 1.

σ-space form (formula sheet shared/design/pd_rdd_cfd.md §0–1). With x_s = x + s·ε (EDM: s = σ/α, SNR = 1/s²) a
DDIM (η = 0) step from s to u given x̂ is x_u = x̂ + (u/s)(x_s − x̂), i.e. an Euler step of dx/ds = (x − D)/s. For a
student with N steps on the grid s(k) = (s_max^{1/ρ} + k(s_min^{1/ρ} − s_max^{1/ρ}))^ρ, per example:

    i ~ U{0..N−1},  s = s(i/N),  s′ = s((i+½)/N),  s″ = s((i+1)/N)        (the teacher's 2N-step grid nests)
    x̂₁ = D_T(x_s; s),   x_s′ = x̂₁ + (s′/s)(x_s − x̂₁)
    x̂₂ = D_T(x_s′; s′), x_s″ = x̂₂ + (s″/s′)(x_s′ − x̂₂)
    x̃ = (x_s″ − r·x_s)/(1 − r),  r = s″/s          (the x̂ whose single DDIM step s → s″ lands on x_s″)
    L = mean_b w(s_b)·mean_CHW (D_S(x_s; s) − x̃)²,  w = max(SNR, 1) = max(1/s², 1)  ("truncated SNR")

The walk ends at s_min (0.002), not at 0; a student samples with DDIM on its own grid [s(0), s(1/N), …, s(1)].

Official defaults (google-research diffusion_distillation, CIFAR-10): 8192 → 1 steps, 50 000 updates per halving,
Adam lr 5e-5 with no warm-up and a linear decay to 0 within each halving, a fresh optimizer per halving, batch 128,
no weight decay / EMA / dropout, grad clip 1.0 (``run.grad_clip``), x-prediction, truncated-SNR weighting. The
constructor defaults are those; the presets scale them down (formula sheet §4).

The halving schedule lives in this method, not in the trainer: ``phases(step)`` moves to stage ⌊step/K⌋ (K =
iterations per halving), copying the student into the teacher and building a fresh optimizer. The stage and the
current teacher's weights are part of the method's state, so a checkpoint taken mid-schedule resumes exactly; a
checkpoint taken at a stage boundary (step = k·K) holds the finished stage-k student with its own σ grid.

CFD (cfd.py) and RDD (rdd.py) are this method with other losses on the same target x̃: they override
``distill_loss``. No code is copied from the official repositories; formulas follow the project's formula sheet.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import ClassVar

import torch

from ..errors import UserError
from .base import Method
from .registry import register

WEIGHTINGS = ("truncated_snr", "snr_plus_one", "snr", "x", "karras")
GRIDS = ("karras", "cosine")
LR_SCHEDULES = ("linear", "cosine", "constant")


# ------------------------------------------------------------------------------------------------ σ grid
def pd_sigma(u, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
             grid: str = "karras") -> torch.Tensor:
    """Noise level at schedule position u ∈ [0, 1] (u = 0 → σ_max, u = 1 → σ_min), float64.

    ``karras``: s(u) = (σ_max^{1/ρ} + u(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ (Karras et al. 2022 Eq. 5 read as a continuous
    map; the grid of the EDM port of PD). ``cosine``: the official PD log-SNR schedule λ = −2 log tan(a·t + b) in
    EDM form, s = tan(a·t + b) with t = 1 − u, restricted to [σ_min, σ_max] (the official range is [e^−10, e^10])."""
    u = torch.as_tensor(u, dtype=torch.float64)
    if grid == "karras":
        lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
        return (hi + u * (lo - hi)) ** rho
    if grid == "cosine":
        b = math.atan(sigma_min)
        a = math.atan(sigma_max) - b
        return torch.tan(a * (1.0 - u) + b)
    raise UserError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")


def pd_student_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                      grid: str = "karras") -> list[float]:
    """The N + 1 noise levels of an N-step student, s(i/N) for i = 0..N (σ_max first, σ_min last). A 2N-step
    teacher's grid contains every one of them (the grids nest across halvings)."""
    u = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    return [float(v) for v in pd_sigma(u, sigma_min, sigma_max, rho, grid)]


# ------------------------------------------------------------------------------------------------ target
def _bview(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def ddim_step(x: torch.Tensor, x_hat: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (η = 0) in σ-space: x_next = x̂ + (σ_next/σ)(x − x̂) — the Euler step of
    dx/dσ = (x − D)/σ (formula sheet §0). σ's are per-sample tensors [B]."""
    return x_hat + _bview(sigma_next / sigma, x) * (x - x_hat)


@torch.no_grad()
def pd_target(teacher, x_s: torch.Tensor, sigma: torch.Tensor, sigma_mid: torch.Tensor, sigma_next: torch.Tensor,
              labels=None) -> torch.Tensor:
    """Progressive-distillation target (Salimans & Ho 2022, Algorithm 2, the x̃ of §3; EDM form of the formula
    sheet §1): two teacher DDIM steps σ → σ′ → σ″ from x_s, then the x̃ for which one DDIM step σ → σ″ lands on the
    same point,

        x̃ = (x_s″ − r·x_s)/(1 − r),  r = σ″/σ   (= x_s″ when σ″ = 0).

    The teacher runs in float32; the two steps and the final combination are done in float64 (the last one cancels
    terms of size σ·ε), and x̃ is returned in the dtype of ``x_s``. No grad."""
    dt = torch.float64
    xs = x_s.to(dt)
    s, sm, sn = sigma.to(dt), sigma_mid.to(dt), sigma_next.to(dt)
    x_hat1 = teacher(x_s, sigma, labels).to(dt)
    x_mid = ddim_step(xs, x_hat1, s, sm)
    x_hat2 = teacher(x_mid.to(x_s.dtype), sigma_mid, labels).to(dt)
    x_next = ddim_step(x_mid, x_hat2, sm, sn)
    r = _bview(sn / s, xs)
    return ((x_next - r * xs) / (1.0 - r)).to(x_s.dtype)


# ------------------------------------------------------------------------------------------------ loss
def pd_loss_weight(sigma: torch.Tensor, weighting: str = "truncated_snr", sigma_data: float = 0.5) -> torch.Tensor:
    """Per-sample weight on the x-space MSE e = mean_CHW (x̂ − x̃)² (Salimans & Ho 2022 §4 "loss weighting"; formula
    sheet §1). With SNR = 1/σ² the ε-MSE equals SNR·e, so

    ``truncated_snr`` (official default, "both"): max(e, ε-MSE) = max(SNR, 1)·e;
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
        return lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k, iters) / iters))
    if kind == "constant":
        return lambda k: 1.0
    raise UserError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {kind!r}")


# ------------------------------------------------------------------------------------------------ method
@register
class ProgressiveDistillation(Method):
    name = "pd"
    summary = "Progressive Distillation: the student learns two teacher DDIM steps in one; halve N0 -> 1 " \
              "(Salimans & Ho 2022)"
    needs_data = True

    presets: ClassVar[dict] = {
        # 8×8 digits (shipped SongUNet teacher). 8 → 4 → 2 → 1 (formula sheet §4 suggests 64 → 1; 8 keeps the
        # CPU budget and is where CFD/RDD plug in). lr 2e-4, batch 128, 500 updates per halving, clip 1.
        "images": {
            "run": {"steps": 1500, "batch_size": 128, "grad_clip": 1.0, "log_every": 50, "ckpt_every": 500,
                    "sample_every": 500},
            "method": {"start_steps": 8, "iters_per_halving": 500, "lr": 2e-4},
        },
        # 2-D mixtures (MLP teacher): 64 → 1 (6 halvings × 300 updates), lr 1e-3, batch 512 (formula sheet §4).
        "points": {
            "run": {"steps": 1800, "batch_size": 512, "grad_clip": 1.0, "log_every": 100, "ckpt_every": 300,
                    "keep_ckpts": 6, "sample_every": 0},
            "method": {"start_steps": 64, "iters_per_halving": 300, "lr": 1e-3},
        },
        # CIFAR-10 (google-research diffusion_distillation): the constructor defaults, batch 128, clip 1.
        "official": {
            "run": {"batch_size": 128, "grad_clip": 1.0},
            "method": {"start_steps": 8192, "iters_per_halving": 50_000, "lr": 5e-5, "lr_schedule": "linear",
                       "weighting": "truncated_snr"},
        },
    }

    def __init__(self, ctx, start_steps: int = 8192, iters_per_halving: int = 50_000, student_steps: int = 1,
                 lr: float = 5e-5, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 lr_schedule: str = "linear", weighting: str = "truncated_snr", grid: str = "karras",
                 rho: float = 7.0, final_stage_iters: int | None = None):
        super().__init__(ctx)
        if ctx.teacher is None:
            raise UserError(f"method {self.name!r} distils a teacher: give one with --teacher CKPT")
        self.stages = halving_stages(start_steps, student_steps)
        self.iters_per_halving = int(iters_per_halving)
        if self.iters_per_halving < 1:
            raise UserError(f"iters_per_halving must be >= 1, got {iters_per_halving}")
        # The last halving may run longer than the others (more --iters than the schedule): its LR horizon.
        self.final_stage_iters = max(self.iters_per_halving, int(final_stage_iters or 0))
        pd_loss_weight(torch.ones(1), weighting)      # validate the names early (one-line errors)
        pd_sigma(0.5, grid=grid)
        _lr_lambda(lr_schedule, 1)
        self.weighting, self.grid, self.rho, self.lr_schedule = weighting, grid, float(rho), lr_schedule
        self.opt_kwargs = dict(lr=float(lr), betas=tuple(float(b) for b in betas), eps=float(eps),
                               weight_decay=float(weight_decay))
        teacher = ctx.teacher
        self.sigma_min, self.sigma_max = float(teacher.sigma_min), float(teacher.sigma_max)
        self.sigma_data = float(getattr(teacher, "sigma_data", 0.5))
        self.shape = tuple(teacher.sample_shape)
        self.label_dim = int(getattr(teacher, "label_dim", 0) or 0)
        # nets: the student (trained) and the current stage's teacher (frozen; a copy of the original at stage 0,
        # then of the previous stage's student). Both are checkpointed, so the stage resumes exactly.
        self.student = copy.deepcopy(teacher).to(ctx.device).train().requires_grad_(True)
        self.teacher = copy.deepcopy(teacher).to(ctx.device).eval().requires_grad_(False)
        self.nets["student"] = self.student
        self.nets["teacher"] = self.teacher
        self.stage = 0
        self._new_optimizer()

    # ---------------------------------------------------------------------------------------------- schedule
    @classmethod
    def _options(cls, options: dict) -> dict:
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        return {**defaults, **{k: v for k, v in options.items() if k in defaults}}

    @classmethod
    def planned_steps(cls, options: dict) -> int:
        """Iterations of the whole schedule: halvings × iterations per halving."""
        opts = cls._options(options)
        return len(halving_stages(opts["start_steps"], opts["student_steps"])) * int(opts["iters_per_halving"])

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
        value, so every halving boundary (the finished student of each stage) is checkpointed."""
        opts = cls._options(method)
        halvings = len(halving_stages(opts["start_steps"], opts["student_steps"]))
        planned = cls.planned_steps(method)
        if "run.ckpt_every" not in given and run.get("ckpt_every"):
            cls._align_checkpoints(run, method, given, halvings)
        if "run.steps" not in given:
            run["steps"] = planned
            return
        steps = run.get("steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
            return      # validate_run names the problem
        if "method.iters_per_halving" in given:
            if steps > planned:
                method["final_stage_iters"] = steps - (halvings - 1) * int(opts["iters_per_halving"])
        elif run.get("max_minutes") and steps > planned:
            run["steps"] = planned
        else:
            if steps < halvings:
                raise UserError(f"method {cls.name!r} needs at least one iteration per halving ({halvings}); "
                                f"got --iters {steps}")
            method["iters_per_halving"] = steps // halvings
            run["steps"] = halvings * method["iters_per_halving"]
            if "run.ckpt_every" not in given and run.get("ckpt_every"):
                cls._align_checkpoints(run, method, given, halvings)

    @classmethod
    def _align_checkpoints(cls, run: dict, method: dict, given: set, halvings: int) -> None:
        K = int(cls._options(method)["iters_per_halving"])
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
        opt = torch.optim.Adam(self.student.parameters(), **self.opt_kwargs)
        self.optimizers["student"] = opt
        last = self.stage == len(self.stages) - 1
        self.schedulers["student"] = torch.optim.lr_scheduler.LambdaLR(
            opt, _lr_lambda(self.lr_schedule, self.final_stage_iters if last else self.iters_per_halving))

    def advance_stage(self) -> None:
        """End the current halving: the student becomes the teacher, N halves, the optimizer starts afresh."""
        if self.stage + 1 >= len(self.stages):
            raise RuntimeError("already at the last halving")
        self.teacher.load_state_dict(self.student.state_dict())
        self.stage += 1
        self._new_optimizer()

    def sync_stage(self, step: int) -> None:
        """Move to the stage that iteration ``step`` (0-based) belongs to: ⌊step/K⌋, capped at the last one."""
        target = min(step // self.iters_per_halving, len(self.stages) - 1)
        while self.stage < target:
            self.advance_stage()

    def phases(self, step):
        self.sync_stage(step)
        return ["student"]

    def stage_sigmas(self, n: int):
        """(σ, σ′, σ″) for n examples of the current stage: i ~ U{0..N−1} per example on the student's grid."""
        N = self.student_steps
        i = torch.randint(N, (n,), generator=self.ctx.generator).to(torch.float64)
        s, sm, sn = (pd_sigma((i + d) / N, self.sigma_min, self.sigma_max, self.rho, self.grid) for d in (0.0, 0.5, 1.0))
        dev = self.ctx.device
        return s.to(dev, torch.float32), sm.to(dev, torch.float32), sn.to(dev, torch.float32)

    # ---------------------------------------------------------------------------------------------- loss
    def loss(self, phase, batch, step):
        if phase != "student":
            raise ValueError(f"unknown phase {phase!r}")
        if batch is None:
            raise UserError(f"method {self.name!r} trains on real data: give --data (default: the teacher's data)")
        x = batch[0].to(self.ctx.device)
        labels = batch[1].to(self.ctx.device) if (self.label_dim and batch[1] is not None) else None
        sigma, sigma_mid, sigma_next = self.stage_sigmas(len(x))
        noise = torch.randn(x.shape, generator=self.ctx.generator).to(x.device)
        x_s = x + _bview(sigma, x) * noise
        x_target = pd_target(self.teacher, x_s, sigma, sigma_mid, sigma_next, labels)
        x_hat = self.student(x_s, sigma, labels)
        loss, logs = self.distill_loss(x_hat, x_target, sigma, step)
        logs = {f"{self.name}/stage": float(self.stage), f"{self.name}/student_steps": float(self.student_steps),
                **logs}
        return loss, logs

    def distill_loss(self, x_hat, x_target, sigma, step):
        """The loss between the student's x̂ and the target x̃ at the student's σ (CFD/RDD override this)."""
        loss = pd_loss(x_hat, x_target, sigma, self.weighting, self.sigma_data)
        return loss, {"pd/mse": float(loss.detach())}

    # ---------------------------------------------------------------------------------------------- sampling
    def sampling_net(self):
        return self.student

    def sampling_spec(self):
        """Deterministic DDIM on the current student's own grid (N steps, σ_max → σ_min)."""
        return {"sampler": "ddim", "sigmas": pd_student_sigmas(self.student_steps, self.sigma_min, self.sigma_max,
                                                               self.rho, self.grid)}

    def sampling_variants(self):
        return {self.student_steps: self.sampling_spec()}

    def extra_state(self):
        return {"stage": self.stage}

    def load_extra_state(self, state):
        stage = int(state.get("stage", 0))
        if not 0 <= stage < len(self.stages):
            raise UserError(f"checkpoint is at halving stage {stage}, but this run has {len(self.stages)} stages: "
                            f"resume with the same --start-steps and --steps")
        self.stage = stage
