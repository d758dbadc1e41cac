"""DMD2 (Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis", NeurIPS 2024).

DMD without the regression loss, made stable by a two-time-scale update rule (the critic — fake score plus GAN
head — steps every iteration, the generator every ``dfake_gen_update_ratio``-th), plus a diffusion-GAN loss on
the fake-score network's bottleneck features against real data, and multi-step students trained with backward
simulation (the generator's inputs are produced by the generator itself, as at inference).

Per iteration (step s, as the trainer runs it):

* phases = ['generator', 'critic'] if s % ratio == 0 else ['critic'];
* generator: x = G(x_k; σ_k) with grad (backward simulation, k ~ U{0..K−1} shared by the batch);
  L_G = L_DM + gan_weight·L_G,gan; the critic's parameters are frozen during this forward;
* critic: on the *same detached (pre-update) x* when the generator ran this step, else on a fresh no-grad x:
  L_critic = L_fake + gan_critic_weight·L_D (real and fake noised independently at σ = grid[U{0..999}]).

Official defaults (``DMD2Options``; ImageNet-64, tianweiy/DMD2 ``main/edm/train_edm.py`` and
``experiments/imagenet/*genloss3e-3*lr2e-6*.sh``): AdamW lr 2e-6 for both, β = (0.9, 0.999), wd 0.01, 500-step
warm-up then constant, grad-norm clip 10, batch 280 (40 × 7 GPUs), ratio 5, GAN weights 3e-3 (G) and 1e-2 (critic),
no EMA, dropout 0 in every net (``edm_network.py``), uniform random class labels for the generator. K = 4 steps at
grid indices [999, 749, 499, 249] (SDXL code; the EDM port is this project's choice). The official run uses fp16;
this project trains in fp32. The images/points presets scale the recipe down (``configs/dmd2/*.yaml``; the
measurements behind them are in ``benchmarks/notes/dmd2.md``). The text-to-image recipes (``sd15``, ``sdxl``,
``flow-t2i``; README "Recipes") use ``noise_grid=teacher``: grid indices and student steps are then the DDPM
timesteps of the teacher's own scheduler, as DMD2's SD code draws them (``main/sd_guidance.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import condition as cond
from ..errors import UserError
from ..options import UNBOUNDED_STEPS, option
from ..train.ema import EMAOptions
from ..train.lr import warmup_lambda
from .base import lr_factor
from .draws import as_draws
from .registry import register
from .score_distill import (CRITIC_T_MAX, CRITIC_T_MIN, DM_T_MAX, DM_T_MIN, GRID_SIZE, DMDFamilyOptions,
                            DistributionMatchingMethod, dmd_sigma_grid, frozen, set_dropout, shared_randint)


# ------------------------------------------------------------------------------------------------ schedule
def student_sigma_indices(num_steps: int, n: int = GRID_SIZE) -> list[int]:
    """Grid indices of a K-step student: j_i = (n−1) − ⌊i·n/K⌋ for i = 0..K−1. K = 4 gives DMD2's
    [999, 749, 499, 249]; K = 1 gives [999] (σ_max); K = 2 gives [999, 499]."""
    if num_steps < 1 or num_steps > n:
        raise UserError(f"student_steps must be in 1..{n}, got {num_steps}")
    return [n - 1 - (i * n) // num_steps for i in range(num_steps)]


def student_sigmas(num_steps: int, grid: torch.Tensor) -> list[float]:
    """σ's of a K-step student on the reversed 1000-point Karras grid (decreasing; σ_0 = σ_max)."""
    return [float(grid[j]) for j in student_sigma_indices(num_steps, len(grid))]


def backward_simulation_input(G, z: torch.Tensor, sigmas: list[float], k: int, generator, labels=None) -> torch.Tensor:
    """DMD2's backward simulation (multi-step section of the paper): the input of student step k as the student itself would produce it at
    inference. x = σ_0·z; then k times, without grad: x̂ = G(x; σ_j), x = x̂ + σ_{j+1}·ε with fresh ε. At k = 0 the
    result is exactly σ_0·z; for a generator that returns a constant x₀ it is x₀ + σ_k·ε. ``generator``: a
    ``torch.Generator`` or the method's ``Draws``."""
    draws = as_draws(generator)
    x = z * sigmas[0]
    with torch.no_grad():
        for j in range(k):
            x_hat = G(x, torch.full((x.shape[0],), sigmas[j], device=x.device), labels)
            x = x_hat + sigmas[j + 1] * draws.randn(x.shape).to(x.device)
    return x


# ------------------------------------------------------------------------------------------------ GAN
class ImageGANHead(nn.Module):
    """Discriminator head on a U-Net bottleneck or a transformer's token grid [B, C, h, w]: conv3×3 → GroupNorm →
    SiLU → global average pool → linear → one logit. (A scaled-down form of DMD2's 3-conv head on ADM's 8×8×768
    encoder output.) Video features [B, C, F, h, w] are scored frame by frame and the logits averaged."""

    def __init__(self, channels: int):
        super().__init__()
        groups = max(g for g in range(1, min(32, max(1, channels // 4)) + 1) if channels % g == 0)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(groups, channels)
        self.fc = nn.Linear(channels, 1)

    def forward(self, feats):
        frames = None
        if feats.ndim == 5:
            B, C, frames = feats.shape[:3]
            feats = feats.transpose(1, 2).reshape((B * frames, C) + tuple(feats.shape[3:]))
        h = F.silu(self.norm(self.conv(feats)))
        logits = self.fc(h.mean(dim=(2, 3))).reshape(-1)
        return logits if frames is None else logits.reshape(-1, frames).mean(1)


class PointGANHead(nn.Module):
    """Discriminator head on an MLP denoiser's last hidden layer [B, H]: linear → SiLU → linear → one logit."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc0 = nn.Linear(channels, channels)
        self.fc1 = nn.Linear(channels, 1)

    def forward(self, feats):
        return self.fc1(F.silu(self.fc0(feats))).reshape(-1)


def gan_critic_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating discriminator loss (DMD2's GAN term, critic side): L_D = mean softplus(l_fake) +
    mean softplus(−l_real), i.e. −log(1 − σ(l_fake)) − log σ(l_real). Zero logits give 2·ln 2."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss (DMD2's GAN term, generator side): L_G,gan = mean softplus(−l(G(z))) =
    −log σ(l). Zero logits give ln 2; ∂/∂l = −sigmoid(−l)."""
    return F.softplus(-logits_fake).mean()


def build_gan_head(fake, sample_shape: tuple, label_dim: int, example_condition=None) -> nn.Module:
    """A head that fits the fake-score network's bottleneck (probed with one dummy forward; an
    embedding-conditioned net is probed with ``example_condition``, one row of its prompts)."""
    param = next(fake.parameters())
    x = torch.zeros((1,) + tuple(sample_shape), device=param.device)
    y = torch.zeros(1, label_dim, device=param.device) if label_dim else None
    if example_condition is not None:
        y = example_condition.rows([0]).to(param.device)
    with torch.no_grad():
        feats = fake(x, torch.ones(1, device=param.device), y, bottleneck_only=True)
    head = ImageGANHead(feats.shape[1]) if feats.ndim in (4, 5) else PointGANHead(feats.shape[1])
    return head.to(param.device)


# ------------------------------------------------------------------------------------------------ options
_GRID = dict(ge=CRITIC_T_MIN, le=CRITIC_T_MAX)


@dataclass
class DMD2Options(DMDFamilyOptions, EMAOptions):
    """DMD2's ImageNet-64 recipe (tianweiy/DMD2 ``main/edm/train_edm.py`` and
    ``experiments/imagenet/imagenet_gan_classifier_genloss3e-3_diffusion1000_lr2e-6_scratch.sh``); no generator EMA
    (the official code has none)."""

    dfake_gen_update_ratio: int = option(5, "critic iterations per generator update (DMD2 --dfake_gen_update_ratio)",
                                         ge=1)
    gan_weight: float = option(3e-3, "generator GAN weight (DMD2 --gen_cls_loss_weight; 0: no GAN, data-free)", ge=0)
    gan_critic_weight: float = option(1e-2, "critic GAN weight (DMD2 --cls_loss_weight)", ge=0)
    warmup_per_process: bool = option(False, "count the warm-up per process as accelerate does (DMD2 train_edm.py: "
                                             "full rate after warmup_steps / processes iterations)")
    sigmas: Optional[list[float]] = option(None, "the student's σ's, one per step, decreasing; null: DMD2's grid "
                                                 "indices [999, 749, 499, 249][:K]", gt=0)
    gan_t_min: int = option(CRITIC_T_MIN, "lowest grid index of the GAN's noise (official 0)", **_GRID)
    gan_t_max: int = option(CRITIC_T_MAX, "highest grid index of the GAN's noise (official 999, "
                                          "--diffusion_gan_max_timestep 1000)", **_GRID)
    dm_t_min: int = option(DM_T_MIN, "lowest grid index of the DM gradient (official 20: --min_step_percent 0.02)",
                           **_GRID)
    dm_t_max: int = option(DM_T_MAX, "highest grid index of the DM gradient (official 980: --max_step_percent 0.98)",
                           **_GRID)
    critic_t_min: int = option(CRITIC_T_MIN, "lowest grid index of the fake-score loss (official 0)", **_GRID)
    critic_t_max: int = option(CRITIC_T_MAX, "highest grid index of the fake-score loss (official 999)", **_GRID)
    lr_decay_steps: Optional[int] = option(None, "cosine decay of both rates to 0 at this iteration ('run': the "
                                                 "run's length; not in the official code); null: constant", ge=1)

    def validate(self):
        for name in ("gan_t", "dm_t", "critic_t"):
            lo, hi = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            if lo > hi:
                raise UserError(f"method.{name}_min must be <= method.{name}_max, got {lo} > {hi}")
        if self.sigmas is not None and (len(self.sigmas) != self.student_steps
                                        or self.sigmas != sorted(self.sigmas, reverse=True)
                                        or len(set(self.sigmas)) != len(self.sigmas)):
            raise UserError(f"method.sigmas must list {self.student_steps} decreasing noise levels (one per student "
                            f"step), got {self.sigmas!r}")


# ------------------------------------------------------------------------------------------------ method
@register
class DMD2(DistributionMatchingMethod):
    name = "dmd2"
    summary = "DMD2: distribution matching + two-time-scale critic + diffusion-GAN; 1 or K steps (Yin et al. 2024)"
    needs_data = True  # the GAN term reads real data; without it (gan_weight = 0) DMD2 is data-free
    Options = DMD2Options
    input_sigma_option = "student_sigma_max"

    @classmethod
    def resolve_schedule(cls, run: dict, method: dict, given: set) -> None:
        """``lr_decay_steps: run`` decays the learning rates over the run's own length (run.steps, after --iters;
        with --iters and a time budget the decay ends at --iters). A run that only a time budget ends has no length
        to decay over: refused, naming the fix."""
        if method.get("lr_decay_steps") == "run":
            if (run.get("steps") or 0) >= UNBOUNDED_STEPS:
                raise UserError("method.lr_decay_steps=run decays over the run's length, but this run has none "
                                "(--budget-minutes without --iters): give --iters N too, or lr_decay_steps=N")
            method["lr_decay_steps"] = run.get("steps")

    @classmethod
    def uses_data(cls, opts):
        return opts.gan_weight > 0

    def __init__(self, ctx, opts=None, **overrides):
        super().__init__(ctx, opts, **overrides)
        o = self.opts
        self.ratio = o.dfake_gen_update_ratio
        self.gan_weight, self.gan_critic_weight = o.gan_weight, o.gan_critic_weight
        if o.dropout is not None:   # edm_network.py: every net without dropout (the teacher runs in eval)
            set_dropout(self.G, o.dropout)
            set_dropout(self.fake, o.dropout)
        # The student's σ's: DMD2's grid indices by default; ``sigmas`` sets them explicitly — e.g. a 1-step
        # generator fed σ = 2.5·z as SiD does, instead of σ_max·z. Below the teacher's σ_max, the student's noise
        # ceiling (``self.student_sigma_max``: explicit, or lowered for an ε-teacher) puts its K σ's on the same
        # grid indices of a grid that ends there (K = 1: the input is student_sigma_max·z, as Diff-Instruct's
        # σ_init). The DM and critic noise levels keep the teacher's grid.
        student_grid = self.grid
        if o.noise_grid == "karras" and self.student_sigma_max < self.teacher.sigma_max:
            student_grid = dmd_sigma_grid(self.teacher.sigma_min, self.student_sigma_max)
        self.sigmas = list(o.sigmas) if o.sigmas is not None else student_sigmas(o.student_steps, student_grid)
        # Noise levels as grid[U{lo..hi}]: the GAN's (a lower cap keeps the discriminator on noise levels where a
        # small image still carries evidence), the DM gradient's and the fake-score loss's.
        self.gan_t_range = (o.gan_t_min, o.gan_t_max)
        self.dm_t_range = (o.dm_t_min, o.dm_t_max)
        self.critic_t_range = (o.critic_t_min, o.critic_t_max)
        self.head = None
        if self.gan_weight > 0:
            self.head = build_gan_head(self.fake, self.shape, self.label_dim,
                                       self.example_condition() if self.conditioning == "embeddings" else None)
            self.nets["gan_head"] = self.head
        critic_params = list(self.fake.parameters()) + (list(self.head.parameters()) if self.head else [])
        adamw = dict(betas=o.betas, weight_decay=o.weight_decay)
        f = lr_factor(self.name, o, self.teacher, self.sigmas[0])
        self.optimizers["generator"] = torch.optim.AdamW(self.G.parameters(), lr=o.lr * f, **adamw)
        self.optimizers["critic"] = torch.optim.AdamW(critic_params, lr=o.critic_lr() * f, **adamw)
        # Both learning rates warm up over ``warmup_steps`` iterations, then stay constant. The official code
        # steps its schedulers through accelerate, which steps them once per process each iteration, so the
        # released 7-GPU run reached the full rate after ~72 iterations (train_edm.py's comment at the scheduler);
        # ``warmup_per_process`` reproduces that (a warm-up of warmup_steps / processes iterations). The default
        # counts iterations, so a run's schedule does not change with its number of processes (and equals the
        # official one on one GPU). The trainer steps a phase's scheduler only when the phase runs, so the
        # generator's schedule is counted in generator updates (÷ ratio). ``lr_decay_steps`` (not in the official
        # code) adds a cosine decay of both to 0 at that iteration, so a long run ends on a settled generator
        # instead of wherever the oscillation stops.
        warm = o.warmup_steps / ctx.world_size if o.warmup_per_process else o.warmup_steps
        warm_g = warm / self.ratio if o.warmup_per_process else math.ceil(warm / self.ratio)
        decay = o.lr_decay_steps
        self.schedulers["generator"] = torch.optim.lr_scheduler.LambdaLR(
            self.optimizers["generator"], warmup_lambda(warm_g, decay and math.ceil(decay / self.ratio)))
        self.schedulers["critic"] = torch.optim.lr_scheduler.LambdaLR(self.optimizers["critic"],
                                                                      warmup_lambda(warm, decay))
        # (step, micro-batch) → (detached x, labels) of this step's generator phase, for the critic phase (None: none)
        self._cache = None
        # Optional generator EMA (not in the official DMD2 code; FastGen's reproduction samples from one). Off by
        # default; on a small problem it smooths the generator's step-to-step oscillation under the TTUR.
        self.ema = self.track_ema("generator", o) if o.ema_enabled() else None

    # ---------------------------------------------------------------------------------------------- pieces
    def phases(self, step):
        return ["generator", "critic"] if step % self.ratio == 0 else ["critic"]

    def generate(self, batch, with_grad: bool):
        """(x, labels, k): a batch of student outputs at a backward-simulated step k (k = 0 for 1-step)."""
        n = self.ctx.micro_batch_size
        labels = self.random_labels(n)   # uniform, whatever the real batch's (train_edm.py draws them so)
        z = self.randn(n)
        K = len(self.sigmas)
        k = self.ctx.draws.shared(lambda g: shared_randint(K, g)) if K > 1 else 0
        x_in = backward_simulation_input(self.G, z, self.sigmas, k, self.ctx.draws, labels)
        sigma = torch.full((n,), self.sigmas[k], device=x_in.device)
        with torch.set_grad_enabled(with_grad):
            x = self.G(x_in, sigma, labels)
        return x, labels, k

    def gan_logits(self, x: torch.Tensor, labels=None, groups: int = 1) -> torch.Tensor:
        """Diffusion-GAN logits: noise x at σ = grid[U{gan_t_min..gan_t_max}] (fresh per sample; official 0..999),
        run the fake-score network and the head on its bottleneck features. Gradients reach x when x has them.
        ``groups``: x is that many batches concatenated (the critic's [real; generated])."""
        _, sigma = self.grid_sigma(x.shape[0], *self.gan_t_range, self.grid, groups)
        x_t = x + self.bview(sigma, x) * self.randn_like(x, groups)
        return self.head(self.fake(x_t, sigma, labels, bottleneck_only=True))

    # ---------------------------------------------------------------------------------------------- losses
    def loss(self, phase, batch, step):
        if phase == "generator":
            return self._generator_loss(batch, step)
        if phase == "critic":
            return self._critic_loss(batch, step)
        raise ValueError(f"unknown phase {phase!r}")

    def _generator_loss(self, batch, step):
        x, labels, k = self.generate(batch, with_grad=True)
        self._cache = {key: v for key, v in (self._cache or {}).items() if key[0] == step}
        self._cache[step, self.ctx.draws.part] = (x.detach(), labels)
        self.generated, self.generated_labels = x, labels
        l_dm, g, _ = self.distribution_matching_loss(x, labels)
        loss = l_dm
        logs = {"dmd2/dm": float(l_dm.detach()), "dmd2/k": float(k),
                "dmd2/dm_grad_norm": float(g.flatten(1).norm(dim=1).mean())}  # per-sample ‖g‖, batch mean
        if self.head is not None:
            with frozen(self.fake, self.head):
                l_gan = gan_generator_loss(self.gan_logits(x, labels))
            loss = loss + self.gan_weight * l_gan
            logs["dmd2/g_gan"] = float(l_gan.detach())
        return loss, logs

    def _critic_loss(self, batch, step):
        cached = (self._cache or {}).pop((step, self.ctx.draws.part), None)
        self._cache = self._cache or None   # None: nothing cached
        if cached is not None:
            x, labels = cached
        else:
            x, labels, _ = self.generate(batch, with_grad=False)
        x = x.detach()
        l_fake = self.critic_denoising_loss(x, labels, self.opts.critic_reduction)
        loss = l_fake
        logs = {"dmd2/fake_score": float(l_fake.detach())}
        if self.head is not None:
            if batch is None:
                raise UserError("DMD2's GAN term needs real data: give --data, or set method.gan_weight=0")
            real, real_labels = batch[0].to(x.device), None
            if self.conditioning != "none":
                if batch[1] is None:
                    raise UserError("DMD2's GAN term on a conditional teacher needs the real images' conditions: "
                                    "give data that carries them, or set method.gan_weight=0")
                real_labels = self.with_student_guidance(cond.to_device(batch[1], x.device), like=labels)
            both = torch.cat([real, x])
            both_labels = None if labels is None else cond.cat([real_labels, labels])
            logits = self.gan_logits(both, both_labels, groups=2)
            l_d = gan_critic_loss(logits[:len(real)], logits[len(real):])
            loss = loss + self.gan_critic_weight * l_d
            logs.update({"dmd2/d_gan": float(l_d.detach()),
                         "dmd2/d_real_logit": float(logits[:len(real)].detach().mean()),
                         "dmd2/d_fake_logit": float(logits[len(real):].detach().mean()),
                         "dmd2/d_real_acc": float((logits[:len(real)] > 0).float().mean()),
                         "dmd2/d_fake_acc": float((logits[len(real):] < 0).float().mean())})
        return loss, logs

    # ---------------------------------------------------------------------------------------------- sampling
    def sampling_net(self):
        return self.G if self.ema is None else self.ema.net

    def sampling_spec(self):
        return {"sampler": "multistep", "sigmas": list(self.sigmas)}
