"""Consistency distillation (Song, Dhariwal, Chen & Sutskever, "Consistency Models", ICML 2023, arXiv 2303.01469;
CD is the paper's Algorithm 2).

The student is a consistency function f_θ(x, σ) that maps any point of a teacher PF-ODE trajectory to its origin.
It shares the teacher's raw network and swaps EDM's outer coefficients for boundary-condition ones (paper App. C):

    f_θ(x, σ) = c_skip(σ)·x + c_out(σ)·F_θ(c_in·x, c_noise),
    c_skip = σ_d²/((σ − ε)² + σ_d²),  c_out = σ_d(σ − ε)/√(σ² + σ_d²),  ε = σ_min = 0.002,

so f_θ(x, ε) = x exactly (``diffusion.precond.consistency_function``). Per iteration, on a real batch x:

* i ~ U{0..N−2} on the N-point Karras grid t_0 = T > … > t_{N−1} = ε; t = t_i, t' = t_{i+1}; x_t = x + t·z;
* one Heun step of the frozen teacher from t to t' (no grad): x̂ = x_t + (t' − t)·(d + d')/2;
* L = mean_b λ·d(f_θ(x_t, t), sg f_θ⁻(x̂, t')), λ ≡ 1, the same dropout masks in both calls;
* after the step: target θ⁻ ← μθ⁻ + (1 − μ)θ, then the evaluation EMA.

Sampling (Algorithm 1): x = f(T·z, T); k steps: x ← f(x + √(τ² − ε²)·z', τ) for the later τ's
(``diffusion.samplers.consistency_sampler``; the student is stored as a plain EDM denoiser, so ``sample``/``eval``
rebuild it from the checkpoint and ``--steps k`` redraws the τ list with ``consistency_sigmas``).

Official defaults (openai/consistency_models_cifar10, CIFAR-10; the formula sheet shared/design/sid_el_cd.md §2):
μ = 0 (target = sg θ), LPIPS, Heun, N = 18, RAdam lr 4e-4 with a 10 M-image linear warm-up, batch 512, no clipping,
evaluation EMA 0.9999, dropout 0 (ImageNet-64: μ = 0.95, N = 40, lr 8e-6). Deviations: LPIPS needs pretrained VGG
weights that cannot be fetched offline, so the distances here are L2 (the default; per-sample mean of squares), L1
and pseudo-Huber (the iCT choice, c = 0.00054·√dim). The k-step τ list is this project's rule (the paper hand-picks
its 2-step τ). No code is copied from the official repositories (their licences differ); the formulas follow the
sheet.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..diffusion.consistency import consistency_function
from ..diffusion.samplers import consistency_sigmas
from ..diffusion.schedules import karras_sigmas
from ..errors import UserError
from ..train.ema import EMA, ema_beta
from .base import Method
from .registry import register
from .score_distill import trainable_copy
from ..train.lr import warmup_lambda

DISTANCES = ("l2", "l1", "pseudo_huber")
HUBER_C_PER_SQRT_DIM = 0.00054      # iCT (Song & Dhariwal 2023): c = 0.00054·√d


# ------------------------------------------------------------------------------------------------ pieces
def consistency_grid(num_scales: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                     rho: float = 7.0) -> torch.Tensor:
    """The N discretisation points t_i = (T^{1/ρ} + i/(N−1)·(ε^{1/ρ} − T^{1/ρ}))^ρ, i = 0..N−1, decreasing from
    t_0 = T to t_{N−1} = ε (both ends included; N − 1 adjacent pairs). float64, shape [N]."""
    if int(num_scales) < 2:
        raise UserError(f"num_scales (N) must be >= 2, got {num_scales}")
    return karras_sigmas(int(num_scales), sigma_min, sigma_max, rho, append_zero=False)


@torch.no_grad()
def heun_teacher_step(teacher, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, labels=None):
    """One Heun step of the teacher's PF-ODE dx/dσ = (x − D(x; σ))/σ from t to t' (per-sample σ's, no grad):

        d = (x_t − D(x_t, t))/t,  x̃ = x_t + (t' − t)·d,  x̂ = x_t + (t' − t)·(d + (x̃ − D(x̃, t'))/t')/2."""
    b = (-1,) + (1,) * (x_t.ndim - 1)
    tb, nb = t.reshape(b), t_next.reshape(b)
    d = (x_t - teacher(x_t, t, labels)) / tb
    x_euler = x_t + (nb - tb) * d
    d_next = (x_euler - teacher(x_euler, t_next, labels)) / nb
    return x_t + (nb - tb) * (d + d_next) / 2


def pseudo_huber_c(dim: int) -> float:
    """iCT's pseudo-Huber constant c = 0.00054·√dim (≈ 0.0043 for 8×8 images, ≈ 0.00076 for 2-D points)."""
    return HUBER_C_PER_SQRT_DIM * math.sqrt(dim)


def consistency_distance(a: torch.Tensor, b: torch.Tensor, kind: str = "l2", c: float | None = None) -> torch.Tensor:
    """Per-sample distance d(a, b), shape [B]: 'l2' = mean of squares, 'l1' = mean of absolute values (the official
    metrics' per-sample means), 'pseudo_huber' = √(‖a − b‖² + c²) − c with c = 0.00054·√dim by default."""
    diff = (a - b).flatten(1)
    if kind == "l2":
        return diff.square().mean(1)
    if kind == "l1":
        return diff.abs().mean(1)
    if kind == "pseudo_huber":
        c = pseudo_huber_c(diff.shape[1]) if c is None else float(c)
        return (diff.square().sum(1) + c * c).sqrt() - c
    if kind == "lpips":
        raise UserError("distance 'lpips' needs pretrained VGG weights, which cannot be fetched offline; "
                        "use method.distance=l2, l1 or pseudo_huber")
    raise UserError(f"unknown distance {kind!r}; choose one of: {', '.join(DISTANCES)}")


def _rng_state(device: torch.device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def consistency_distillation_loss(student, target, teacher, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                                  t_next: torch.Tensor, labels=None, distance: str = "l2", c: float | None = None,
                                  sigma_min: float | None = None) -> torch.Tensor:
    """Consistency-distillation loss (Song et al. 2023, Eq. 7 / Algorithm 2, λ ≡ 1):

        L = mean_b d(f_θ(x + t·z, t), sg f_θ⁻(x̂, t')),   x̂ = one teacher Heun step from (x + t·z, t) to t',

    with f the boundary-condition consistency function of ``student`` / ``target`` (ε = ``sigma_min``, default the
    student's σ_min). The global RNG is rewound between the two f calls, so student and target draw the same
    dropout masks. No gradient reaches the target or the teacher."""
    b = (-1,) + (1,) * (x.ndim - 1)
    x_t = x + t.reshape(b) * noise
    x_hat = heun_teacher_step(teacher, x_t, t, t_next, labels)
    state = _rng_state(x.device)
    f_student = consistency_function(student, x_t, t, labels, sigma_min)
    after = _rng_state(x.device)
    _set_rng_state(state, x.device)
    with torch.no_grad():
        f_target = consistency_function(target, x_hat, t_next, labels, sigma_min)
    _set_rng_state(after, x.device)
    return consistency_distance(f_student, f_target.detach(), distance, c).mean()


# ------------------------------------------------------------------------------------------------ method
@register
class ConsistencyDistillation(Method):
    name = "cd"
    summary = "consistency distillation: boundary-condition student, teacher Heun step between adjacent σ's, " \
              "EMA target; 1 or k steps (Song et al. 2023)"
    needs_data = True
    generator_phase = "student"

    presets: ClassVar[dict] = {
        # The sheet's toy settings (N = 18, Heun, L2) with ImageNet's target rate μ = 0.95: with μ = 0 (CIFAR's) the
        # 2-D student stalled at 2-3× the teacher's sliced W2 and oscillated; μ = 0.95 converged (table below).
        # 8×8 digits (SongUNet teacher), batch 64, ≈ 0.3-0.5 s per iteration on one CPU thread: proxy-FID (1,000
        # samples, 1 step) 1088 / 240 / 19.0 / 17.4 at iterations 100 / 300 / 500 / 700 (teacher: 4.1 at 35 NFE).
        "images": {
            "run": {"steps": 1000, "batch_size": 64, "log_every": 50, "ckpt_every": 250, "sample_every": 250},
            "method": {"lr": 1e-3, "warmup_kimg": 3.2, "target_ema": 0.95, "ema_beta_const": 0.99},
        },
        # ring8 teacher (MLP 128×3, sliced W2 0.036 at 35 NFE): 1-step EMA student 0.046 / 0.039 after 750 / 1,000
        # iterations (seeds 0-2: 0.039 / 0.039 / 0.039 at 1,000); 2 steps 0.029. ≈ 30-40 s on one thread.
        "points": {
            "run": {"steps": 1000, "batch_size": 256, "log_every": 100, "ckpt_every": 500, "sample_every": 500},
            "method": {"lr": 2e-3, "warmup_kimg": 25.6, "target_ema": 0.95, "ema_beta_const": 0.99},
        },
    }

    def __init__(self, ctx, lr: float = 4e-4, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 optimizer: str = "radam", warmup_kimg: float = 10_000.0, num_scales: int = 18, rho: float = 7.0,
                 target_ema: float = 0.0, distance: str = "l2", huber_c: float | None = None,
                 ema_beta_const: float | None = 0.9999, ema_halflife_kimg: float = 500.0,
                 ema_rampup: float | None = 0.05, student_steps: int = 1, sampling_sigmas=None):
        super().__init__(ctx)
        if ctx.teacher is None:
            raise UserError("method 'cd' distils a teacher: give one with --teacher CKPT")
        if distance not in DISTANCES:
            consistency_distance(torch.zeros(1, 1), torch.zeros(1, 1), distance)   # raises the right UserError
        if not 0.0 <= float(target_ema) < 1.0:
            raise UserError(f"target_ema (μ) must lie in [0, 1), got {target_ema}")
        if int(student_steps) < 1:
            raise UserError(f"student_steps must be >= 1, got {student_steps}")
        self.teacher = ctx.teacher.eval().requires_grad_(False)
        self.student = trainable_copy(self.teacher).to(ctx.device)
        self.nets["student"] = self.student
        self.target = EMA(self.student)      # θ⁻, a frozen copy; μ = 0 makes it sg(θ) at every loss call
        self.target.net.train()              # same dropout behaviour (and masks) as the student
        self.ema = EMA(self.student)         # the evaluation EMA, which ``sample``/``eval`` use
        self.shape = tuple(self.teacher.sample_shape)
        self.label_dim = int(getattr(self.teacher, "label_dim", 0) or 0)
        self.sigma_min, self.sigma_max = float(self.teacher.sigma_min), float(self.teacher.sigma_max)
        self.grid = consistency_grid(num_scales, self.sigma_min, self.sigma_max, rho).to(torch.float32)
        self.distance, self.huber_c = distance, huber_c
        self.mu = float(target_ema)
        self.ema_beta_const = None if ema_beta_const is None else float(ema_beta_const)
        self.ema_halflife_kimg = float(ema_halflife_kimg)
        self.ema_rampup = None if ema_rampup is None else float(ema_rampup)
        self.sigmas = ([float(s) for s in sampling_sigmas] if sampling_sigmas is not None
                       else consistency_sigmas(int(student_steps), self.sigma_min, self.sigma_max, rho))
        self.rho = float(rho)
        kw = dict(lr=float(lr), betas=tuple(float(b) for b in betas), eps=float(eps), weight_decay=float(weight_decay))
        opts = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam}
        if optimizer not in opts:
            raise UserError(f"optimizer must be 'radam' (official) or 'adam', got {optimizer!r}")
        self.optimizers["student"] = opts[optimizer](self.student.parameters(), **kw)
        warmup_steps = math.ceil(float(warmup_kimg) * 1000 / (ctx.batch_size * ctx.world_size))
        self.schedulers["student"] = torch.optim.lr_scheduler.LambdaLR(self.optimizers["student"],
                                                                       warmup_lambda(warmup_steps))

    def phases(self, step):
        return ["student"]

    def labels_of(self, batch):
        if not self.label_dim:
            return None
        if batch is None or batch[1] is None:
            raise UserError("this teacher is class-conditional: consistency distillation needs labelled data")
        return batch[1].to(self.ctx.device)

    def loss(self, phase, batch, step):
        if phase != "student":
            raise ValueError(f"unknown phase {phase!r}")
        if batch is None:
            raise UserError("consistency distillation trains on real data: give --data (default: the teacher's)")
        x = batch[0].to(self.ctx.device)
        n = x.shape[0]
        i = torch.randint(len(self.grid) - 1, (n,), generator=self.ctx.generator)
        t, t_next = self.grid[i].to(x.device), self.grid[i + 1].to(x.device)
        noise = torch.randn(x.shape, generator=self.ctx.generator).to(x.device)
        loss = consistency_distillation_loss(self.student, self.target.net, self.teacher, x, noise, t, t_next,
                                             self.labels_of(batch), self.distance, self.huber_c, self.sigma_min)
        return loss, {"cd/distance": float(loss.detach())}

    def generated_batch(self, batch, step):
        """A one-step sample f_θ(T·z, T) with grad into θ (fresh z), labels from the real batch: what a supplement
        such as the embedding loss compares with real data (the formula sheet's choice for CD)."""
        n = self.ctx.batch_size if batch is None else len(batch[0])
        labels = self.labels_of(batch) if self.label_dim else None
        z = torch.randn((n,) + self.shape, generator=self.ctx.generator).to(self.ctx.device)
        x = consistency_function(self.student, z * self.sigma_max, self.sigma_max, labels, self.sigma_min)
        return x, labels

    def after_step(self, step, nimg):
        if self.mu == 0.0:
            self.target.net.load_state_dict(self.student.state_dict())
        else:
            self.target.update(self.student, self.mu)
        beta = ema_beta(self.ctx.batch_size * self.ctx.world_size, nimg, self.ema_halflife_kimg, self.ema_rampup,
                        self.ema_beta_const)
        self.ema.update(self.student, beta)

    # ---------------------------------------------------------------------------------------------- sampling
    def sampling_net(self):
        return self.ema.net

    def sampling_spec(self):
        return {"sampler": "consistency", "sigmas": list(self.sigmas)}

    def sampling_variants(self):
        """1, 2 and 4 steps (the default τ rule) next to the trained recipe."""
        out = {k: {"sampler": "consistency", "sigmas": consistency_sigmas(k, self.sigma_min, self.sigma_max, self.rho)}
               for k in (1, 2, 4)}
        out[len(self.sigmas)] = self.sampling_spec()
        return dict(sorted(out.items()))

    def extra_state(self):
        return {"target": self.target.net.state_dict(), "ema": self.ema.net.state_dict()}

    def load_extra_state(self, state):
        self.target.net.load_state_dict(state["target"])
        self.ema.net.load_state_dict(state["ema"])
