"""Consistency distillation (Song, Dhariwal, Chen & Sutskever, "Consistency Models", ICML 2023, arXiv 2303.01469;
CD is the paper's Algorithm 2).

The student is a consistency function f_θ(x, σ) that maps any point of a teacher PF-ODE trajectory to its origin.
It shares the teacher's raw network and swaps EDM's outer coefficients for boundary-condition ones (paper App. C):

    f_θ(x, σ) = c_skip(σ)·x + c_out(σ)·F_θ(c_in·x, c_noise),
    c_skip = σ_d²/((σ − ε)² + σ_d²),  c_out = σ_d(σ − ε)/√(σ² + σ_d²),  ε = σ_min = 0.002,

so f_θ(x, ε) = x exactly (``diffusion.consistency.consistency_function``). Per iteration, on a real batch x:

* i ~ U{0..N−2} on the N-point Karras grid t_0 = T > … > t_{N−1} = ε; t = t_i, t' = t_{i+1}; x_t = x + t·z;
* one Heun step of the frozen teacher from t to t' (no grad): x̂ = x_t + (t' − t)·(d + d')/2;
* L = mean_b λ·d(f_θ(x_t, t), sg f_θ⁻(x̂, t')), λ ≡ 1, the same dropout masks in both calls;
* after the optimizer step (the trainer's EMA update): target θ⁻ ← μθ⁻ + (1 − μ)θ and the evaluation EMA.

Sampling (Algorithm 1): x = f(T·z, T); k steps: x ← f(x + √(τ² − ε²)·z', τ) for the later τ's
(``diffusion.samplers.consistency_sampler``; the student is stored as a plain EDM denoiser, so ``sample``/``eval``
rebuild it from the checkpoint and ``--steps k`` redraws the τ list with ``consistency_sigmas``).

Official defaults (``CDOptions``): the CIFAR-10 recipe of openai/consistency_models_cifar10
(``configs/cifar10_ve_cd.py``, ``jcm/losses.py``): N = 18, Heun teacher step, μ = 0 (the consistency loss uses the
current parameters as θ⁻ under stop-gradient, ``jcm/losses.py:305-306, 334-335``), uniform λ, RAdam lr 4e-4
(β = 0.9, 0.999, ε = 1e-8, no weight decay) with no warm-up (the RAdam branch of ``get_optimizer``,
``jcm/losses.py:72-82``, never reads ``optim.warmup``), batch 512, no clipping, evaluation EMA 0.9999, student
dropout 0. μ = 0 is the default because it belongs to that recipe (N = 18, lr 4e-4); the PyTorch repository's
ImageNet-64 / LSUN recipe (openai/consistency_models ``scripts/launch.sh:22-31``) is μ = 0.95 with N = 40 and lr
8e-6 / 1e-5 — set ``target_ema``, ``num_scales`` and ``lr`` together for it. Both repositories update the EMA and
the target after every optimizer step with a constant rate (``cm/train_util.py:388-394``,
``jcm/losses.py:1028-1039``), so both are trainer-owned EMAs here (β = 0.9999 and β = μ; μ = 0 copies exactly).
Deviations: LPIPS needs pretrained VGG weights that cannot be fetched offline, so the distances here are L2 (the
default; per-sample mean of squares, the official ``l2`` norm), L1 and pseudo-Huber (the iCT choice,
c = 0.00054·√dim). The k-step τ list is this project's rule (the paper hand-picks its 2-step τ). No code is copied
from the official repositories (their licences differ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..diffusion.consistency import consistency_function
from ..diffusion.precond import conditioned_sigma_max
from ..diffusion.samplers import consistency_sigmas, heun_step
from ..diffusion.schedules import karras_sigmas
from ..diffusion import condition as cond
from ..errors import UserError
from ..options import option
from ..train.ema import EMAOptions
from ..train.lr import warmup_lambda
from .base import GainMatchedLROptions, Method, lr_factor
from .registry import register

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
    """One Heun step of the teacher's PF-ODE from t to t' (per-sample σ's, no grad; official
    ``karras_diffusion.py:142-160``): d = (x_t − D(x_t, t))/t, x̃ = x_t + (t' − t)·d,
    x̂ = x_t + (t' − t)·(d + (x̃ − D(x̃, t'))/t')/2 — the shared ``heun_step``."""
    return heun_step(teacher, x_t, t, t_next, labels)


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


# ------------------------------------------------------------------------------------------------ options
@dataclass
class CDOptions(EMAOptions, GainMatchedLROptions):
    """Consistency distillation (Song et al. 2023, Algorithm 2); defaults: the official CIFAR-10 recipe
    (openai/consistency_models_cifar10 ``configs/cifar10_ve_cd.py``), see the module docstring."""

    lr: float = option(4e-4, "RAdam learning rate (cifar10_ve_cd.py: 4e-4; ImageNet-64 launch.sh: 8e-6)", gt=0)
    betas: tuple[float, float] = option((0.9, 0.999), "optimizer β1, β2 (official: 0.9, 0.999)", ge=0, lt=1)
    eps: float = option(1e-8, "optimizer ε (official 1e-8)", gt=0)
    weight_decay: float = option(0.0, "weight decay (official 0)", ge=0)
    optimizer: str = option("radam", "radam (official: cm/train_util.py:82, jcm/losses.py:72) or adam",
                            choices=("radam", "adam"))
    warmup_kimg: float = option(0.0, "linear lr warm-up in kimg (official RAdam: none; jcm/losses.py:72-82 never "
                                     "reads optim.warmup)", ge=0)
    num_scales: int = option(18, "N, points of the Karras grid (CIFAR-10: 18; ImageNet-64: 40)", ge=2)
    rho: float = option(7.0, "Karras grid exponent ρ (official 7)", gt=0)
    sigma_max: Optional[float] = option(None, "T, the top of the grid and the one-step input σ; null: the teacher's "
                                              "σ_max (official), or below it where the teacher's output gain |c_out| "
                                              "exceeds 2.5 (ε-prediction: T = 2.5)", gt=0)
    target_ema: float = option(0.0, "μ, target EMA rate, θ⁻ = sg θ at 0 (CIFAR-10: 0; ImageNet-64: 0.95)",
                               ge=0, lt=1)
    distance: str = option("l2", "d(·,·): l2 / l1 (official norms), pseudo_huber (iCT); official lpips needs VGG "
                                 "weights, refused offline", choices=("l2", "l1", "pseudo_huber", "lpips"))
    huber_c: Optional[float] = option(None, "pseudo-Huber c (null: 0.00054·√dim, iCT)", gt=0)
    ema_beta_const: Optional[float] = option(0.9999, "evaluation EMA rate (official 0.9999, constant)", ge=0, lt=1)
    student_steps: int = option(1, "sampling steps of the saved recipe (official: 1, onestep)", ge=1)
    sampling_sigmas: Optional[list[float]] = option(None, "explicit τ list for sampling (null: consistency_sigmas)",
                                                    gt=0)

    def validate(self):
        if self.distance == "lpips":
            consistency_distance(torch.zeros(1, 1), torch.zeros(1, 1), "lpips")   # raises the offline UserError
        if not self.ema_enabled():
            raise UserError("CD samples from its evaluation EMA: set method.ema_beta_const (official 0.9999) or "
                            "method.ema_halflife_kimg")


# ------------------------------------------------------------------------------------------------ method
@register
class ConsistencyDistillation(Method):
    name = "cd"
    summary = "consistency distillation: boundary-condition student, teacher Heun step between adjacent σ's, " \
              "EMA target; 1 or k steps (Song et al. 2023)"
    needs_data = True
    generator_phase = "student"
    Options = CDOptions
    input_sigma_option = "sigma_max"
    supports_lora = True   # the student, its target and its evaluation EMA are adapters on one base

    def __init__(self, ctx, opts=None, **overrides):
        super().__init__(ctx, opts, **overrides)
        o = self.opts
        if ctx.teacher is None:
            raise UserError("method 'cd' distils a teacher: give one with --teacher CKPT")
        self.teacher = ctx.teacher.eval().requires_grad_(False)
        self.student, = self.trainable_copies("student")
        self.nets["student"] = self.student
        # θ⁻: the trainer's EMA of the student with constant β = μ, updated after each optimizer step as the
        # official code does (cm/train_util.py:390-394); μ = 0 makes it an exact copy, sg(θ) at every loss call.
        self.target = self.track_ema("student", EMAOptions(ema_rampup=None, ema_beta_const=o.target_ema),
                                     key="target")
        self.target.net.train()              # same dropout behaviour (and masks) as the student
        self.ema = self.track_ema("student", o)   # the evaluation EMA, which ``sample``/``eval`` use
        self.shape = tuple(self.teacher.sample_shape)
        self.label_dim = int(getattr(self.teacher, "label_dim", 0) or 0)
        self.sigma_min = float(self.teacher.sigma_min)
        # T: an ε-teacher's consistency function at σ_max = 80 would be x − 80·ε̂, every error of ε̂ ×80
        # (``conditioned_sigma_max``), so its grid and one-step input stop lower unless T is given.
        if o.sigma_max is not None and not self.sigma_min < o.sigma_max <= self.teacher.sigma_max:
            raise UserError(f"method.sigma_max must lie in ({self.sigma_min}, {self.teacher.sigma_max}], "
                            f"got {o.sigma_max}")
        self.sigma_max = conditioned_sigma_max(self.teacher) if o.sigma_max is None else float(o.sigma_max)
        self.grid = consistency_grid(o.num_scales, self.sigma_min, self.sigma_max, o.rho).to(torch.float32)
        self.sigmas = (list(o.sampling_sigmas) if o.sampling_sigmas is not None
                       else consistency_sigmas(o.student_steps, self.sigma_min, self.sigma_max, o.rho))
        optim = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam}[o.optimizer]
        f = lr_factor(self.name, o, self.teacher, self.sigma_max)
        self.optimizers["student"] = optim(self.student.parameters(), lr=o.lr * f, betas=o.betas, eps=o.eps,
                                           weight_decay=o.weight_decay)
        warmup_steps = math.ceil(o.warmup_kimg * 1000 / (ctx.batch_size * ctx.world_size))
        self.schedulers["student"] = torch.optim.lr_scheduler.LambdaLR(self.optimizers["student"],
                                                                       warmup_lambda(warmup_steps))

    def noise_levels(self) -> dict:
        return {"consistency grid σ": [float(self.grid.min()), float(self.grid.max())],
                "grid points N": int(self.grid.numel())}

    def phases(self, step):
        return ["student"]

    def labels_of(self, batch):
        if cond.conditioning_of(self.teacher) == "none":
            return None
        if batch is None or batch[1] is None:
            raise UserError("this teacher is conditional: consistency distillation needs data that carries its "
                            "conditions (class labels or prompt embeddings)")
        return cond.to_device(batch[1], self.ctx.device)

    def loss(self, phase, batch, step):
        if phase != "student":
            raise ValueError(f"unknown phase {phase!r}")
        if batch is None:
            raise UserError("consistency distillation trains on real data: give --data (default: the teacher's)")
        x = batch[0].to(self.ctx.device)
        n = x.shape[0]
        i = self.ctx.draws.randint(len(self.grid) - 1, n)
        t, t_next = self.grid[i].to(x.device), self.grid[i + 1].to(x.device)
        noise = self.ctx.draws.randn(x.shape).to(x.device)
        loss = consistency_distillation_loss(self.student, self.target.net, self.teacher, x, noise, t, t_next,
                                             self.labels_of(batch), self.opts.distance, self.opts.huber_c,
                                             self.sigma_min)
        return loss, {"cd/distance": float(loss.detach())}

    def generated_batch(self, batch, step):
        """A one-step sample f_θ(T·z, T) with grad into θ (fresh z), labels from the real batch: what a supplement
        such as the embedding loss compares with real data (this project's choice; the paper pairs CD with none)."""
        n = self.ctx.micro_batch_size if batch is None else len(batch[0])
        labels = self.labels_of(batch)
        z = self.ctx.draws.randn((n,) + self.shape).to(self.ctx.device)
        x = consistency_function(self.student, z * self.sigma_max, self.sigma_max, labels, self.sigma_min)
        return x, labels

    # ---------------------------------------------------------------------------------------------- sampling
    def sampling_net(self):
        return self.ema.net

    def sampling_spec(self):
        return {"sampler": "consistency", "sigmas": list(self.sigmas)}

    def sampling_variants(self):
        """1, 2 and 4 steps (the default τ rule) next to the trained recipe."""
        out = {k: {"sampler": "consistency",
                   "sigmas": consistency_sigmas(k, self.sigma_min, self.sigma_max, self.opts.rho)}
               for k in (1, 2, 4)}
        out[len(self.sigmas)] = self.sampling_spec()
        return dict(sorted(out.items()))

    def load_state_dict(self, state):
        if "emas" not in state and "target" in state.get("extra", {}):   # a checkpoint from before trainer EMAs
            state = {**state, "emas": {"target": state["extra"]["target"], "student": state["extra"]["ema"]}}
        super().load_state_dict(state)
