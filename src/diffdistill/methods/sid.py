"""SiD — Score identity Distillation (Zhou, Zheng, Wang, Yin & Huang, "Score identity Distillation: Exponentially
Fast Distillation of Pretrained Diffusion Models for One-Step Generation", ICML 2024, arXiv 2404.04057), and SiDA
(Zhou et al., "Adversarial Score identity Distillation", arXiv 2410.14919) with ``sida=true``.

Data-free. A one-step generator x_g = G_θ(σ_init·z; σ_init) (σ_init = 2.5, the same at sampling) and a fake score
net f_ψ are both initialised from the frozen teacher f_φ. Every iteration, on two fresh batches of z:

1. fake-score step (ψ): the EDM denoising loss on detached generator samples (paper §4, Algorithm 1),
       L_ψ = Σ_pix λ(σ)·(f_ψ(x_g + σn) − x_g)² / B,   ln σ ~ N(−1.2, 1.2²),  λ(σ) = (σ² + σ_d²)/(σσ_d)²;
2. generator step (θ): the α-weighted score-identity loss (paper §4 and Algorithm 1, in the official code's form),
       x_t = x_g + σn,  Δ = f_φ(x_t) − f_ψ(x_t),  w = sg(mean_pix |x_g − f_φ(x_t)|) ∨ 1e-5,
       L_G = (100/B)·Σ_b Σ_pix Δ ⊙ [(f_φ − x_g) − α·Δ] / w_b
           = (100/B)·Σ_b [(1 − α)‖Δ‖² + Δᵀ(f_ψ − x_g)] / w_b,
   with t ~ U[0, t_max/1000], t_max = 800, σ = (σ_max^{1/ρ} + (1 − t)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ
   ∈ [0.002, 24.41]. The graph runs through x_t into both nets (their parameters are constants here, f_ψ in eval
   mode);
3. EMA of G (the trainer's, EDM's rule with n_img before the step as in the official loop), half-life 500 kimg;
   samples come from the EMA.

Official (mingyuanzhou/SiD ``sid_train.py``, ``training/sid_training_loop.py``, ``training/sid_loss.py``; the
defaults of ``SiDOptions`` cite the lines): samples with NaN outputs are dropped from both losses, and the gradients
of both nets pass through nan_to_num(nan → 0, ±inf → ±1e5) before the optimizer step (here: tensor hooks on the
parameters, since the trainer owns the step). Conditional generators get the real batch's labels when the trainer
loaded data (as the official loop, which reads them from the data set), random one-hot labels otherwise.
Not reproduced: the official CIFAR-10 run uses dropout 0.13 in G and f_ψ and augmentation p = 0.12 on the
fake-score input; this project's nets use whatever the teacher has, and no augmentation.

SiDA (official branch ``sida``: ``sida_train.py``, ``sida_training/sida_training_loop.py``, ``sida_loss.py``)
adds a GAN on real data with the fake-score network as the discriminator: its logits are the channel mean of f_ψ's
encoder output (a patch map for a UNet, one logit per sample for the MLP: the mean of its last hidden layer). With
ONE noise n and σ for both the generated and the real images, and the real batch's labels for both, the critic adds
    L_D = mean_b(λ(σ_b))·½[BCE(D(x_real + σn), 1) + BCE(D(x_g + σn), 0)],
each BCE a mean over every logit of the batch, read from the same f_ψ pass as L_ψ; its gradients are value-clipped
at 1 (after nan_to_num). The generator adds, from the same eval-mode f_ψ pass as Δ,
    L_adv = 0.01·(1/B)·Σ_b BCE(clamp(D(x_t), ±10), 1)·CHW / w_b   (the 100/B scale is the SiD term's alone),
and L_G = ½L_SiD + ½L_adv once more than ``sida_gan_start_kimg`` images are seen (200 k officially); there is no
generator step until more than ``sida_g_start_kimg`` (100 k). The official SiDA scripts run α = 1.0. SiDA reads
real data, so the trainer then builds a loader. No code is copied from the official repository.

SiD-LSG (mingyuanzhou/SiD-LSG, preset ``sd15-lsg``) runs on a DDPM teacher's own timesteps: ``noise_grid=teacher``
draws t ~ U{tmin..tmax−1} and uses σ_t of the teacher's scheduler for the generator loss, ``fake_sigma=generator``
draws the fake-score loss's σ the same way, and ``init_timestep`` sets σ_init = σ_t (its loop,
training/sid_training_loop.py:413, :484; sid_train.py:125-131).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..diffusion.guidance import GuidedDenoiser, guided_denoise
from ..diffusion.precond import conditioned_sigma_max, teacher_timestep_sigmas
from ..diffusion.losses import WEIGHTINGS, edm_loss, edm_loss_weight, loss_weight
from ..diffusion.schedules import karras_sigma, sample_lognormal_sigma
from ..errors import UserError
from ..options import option
from ..train import distributed as dist
from ..train.ema import EMAOptions
from .registry import register
from .base import GainMatchedLROptions, lr_factor
from .score_distill import FAKE_SCORE_WEIGHTING_DOC, FakeScoreMethod, GuidanceOptions, frozen

W_MIN = 1e-5            # lower clip of the per-sample normaliser w (training/sid_loss.py:54)


@dataclass
class SiDOptions(GuidanceOptions, EMAOptions, GainMatchedLROptions):
    """SiD / SiDA options; defaults = mingyuanzhou/SiD (``sid_train.py`` on main, ``sida_train.py`` on ``sida``).
    Guidance: SiD-LSG's four scales (mingyuanzhou/SiD-LSG ``run_sid.sh``: κ1 = ``guidance_fake_train``, κ2 = κ3 =
    ``guidance_fake``, κ4 = ``guidance_real``; all 2 in its SD1.5 / SD2.1 recipes, 1 in sid_train.py's defaults)."""

    guidance_fake_train: float = option(1.0, "SiD-LSG κ1 (--cfg_train_fake): the fake score is trained through its "
                                             "CFG-combined output at this scale (1: plain denoising loss)")

    lr: float = option(1e-5, "generator Adam lr (sid_train.py:102 --glr 1e-5)", gt=0)
    lr_critic: Optional[float] = option(None, "fake-score Adam lr; null: lr (sid_train.py:101 --lr 1e-5)", gt=0)
    betas: tuple[float, float] = option((0.0, 0.999), "Adam β1, β2 of both nets (sid_train.py:152-153; --g_beta1 0 "
                                                      "at :103)", ge=0, lt=1)
    eps: float = option(1e-8, "Adam ε (sid_train.py:152-153, fp32)", gt=0)
    alpha: float = option(1.2, "α of L_G = L2 − α·L1 (sid_train.py:99; the SiDA scripts run_sida.sh use 1.0)")
    sigma_init: float = option(2.5, "generator input noise level, training and sampling (sid_train.py:95)", gt=0)
    tmax: float = option(800.0, "generator-loss noise: t ~ U[tmin/1000, tmax/1000] (sid_train.py:100); with "
                                "noise_grid=teacher the teacher's timesteps U{tmin..tmax−1}", ge=0, le=1000)
    tmin: float = option(0.0, "lower end of the generator-loss t (official SiD: 0; SiD-LSG sid_train.py:131 "
                              "--tmin 20)", ge=0, le=1000)
    noise_grid: str = option("karras", "the generator loss's σ(t): 'karras' = SiD's continuous Karras map on the "
                                       "teacher's [σ_min, σ_max] (training/sid_loss.py:32-33); 'teacher' = the "
                                       "teacher's own DDPM training timesteps, t ~ U{tmin..tmax−1} → σ_t = "
                                       "√((1 − ᾱ_t)/ᾱ_t) (SiD-LSG sid_training_loop.py:484; DDPM-family teachers "
                                       "only)", choices=("karras", "teacher"))
    fake_sigma: str = option("lognormal", "the fake-score loss's σ: 'lognormal' = ln σ ~ N(p_mean, p_std²) (SiD); "
                                          "'generator' = drawn as the generator loss's (SiD-LSG "
                                          "sid_training_loop.py:413: the same randint(tmin, tmax))",
                             choices=("lognormal", "generator"))
    max_input_gain: Optional[float] = option(None, "lower σ_init to where the teacher's output gain |c_out| "
                                                   "reaches this (``conditioned_sigma_max``); null: σ_init as given "
                                                   "(official). A no-op for EDM, v-, x₀- and flow teachers (gain ≤ 1 "
                                                   "at σ_init 2.5); an ε-teacher's σ_init becomes this gain. Not in "
                                                   "the paper; the images preset sets 1", gt=0)
    init_timestep: Optional[int] = option(None, "the generator's input σ as a teacher timestep: σ_init = σ_t of the "
                                                "teacher's DDPM table (SiD-LSG sid_train.py:125 --init_timestep "
                                                "625); null: sigma_init", ge=0)
    p_mean: float = option(-1.2, "fake-score loss: mean of ln σ (training/sid_loss.py:18)")
    p_std: float = option(1.2, "fake-score loss: std of ln σ (training/sid_loss.py:18)", gt=0)
    fake_score_weighting: str = option("teacher", FAKE_SCORE_WEIGHTING_DOC, choices=WEIGHTINGS)
    loss_scale_g: float = option(100.0, "generator loss × this / B (sid_train.py:98 --lsg; sid_training_loop.py"
                                        ":332)", gt=0)
    ema_halflife_kimg: float = option(500.0, "EMA half-life of G in kimg (sid_train.py:70 --ema 0.5 Mimg)", gt=0)
    grad_nan_to_num: bool = option(True, "gradients through nan_to_num(0, ±1e5) before each step "
                                         "(sid_training_loop.py:313-315, :339-341)")
    student_steps: int = option(1, "generator steps at sampling time (SiD trains one-step generators only)", ge=1)
    sida: bool = option(False, "SiDA: add the adversarial term on real data (sida_train.py:151 --use_gan)")
    sida_adv_weight: float = option(0.01, "SiDA generator GAN weight (sida_train.py:149 --lsg_gan)", ge=0)
    sida_d_weight: float = option(1.0, "SiDA discriminator loss weight (sida_train.py:148 --lsd)", ge=0)
    sida_g_start_kimg: float = option(100.0, "SiDA: no generator step until more than this many kimg "
                                             "(sida_training_loop.py:425)", ge=0)
    sida_gan_start_kimg: float = option(200.0, "SiDA: L_G = ½L_SiD + ½L_adv once more than this many kimg are seen "
                                               "(sida_training_loop.py:410)", ge=0)

    def validate(self) -> None:
        if self.tmin > self.tmax or (self.noise_grid == "teacher" and self.tmin == self.tmax):
            raise UserError(f"method.tmin must be below method.tmax, got {self.tmin} and {self.tmax}")
        if self.noise_grid == "teacher" and (self.tmin % 1 or self.tmax % 1):
            raise UserError(f"method.noise_grid=teacher draws integer timesteps: give whole numbers for method.tmin "
                            f"and method.tmax, got {self.tmin} and {self.tmax}")
        if self.student_steps != 1:
            raise UserError(f"sid trains one-step generators only (got method.student_steps={self.student_steps}); "
                            f"drop --student-steps")
        if self.sida and (self.guidance_fake != 1 or self.guidance_fake_train != 1):
            raise UserError("SiDA's discriminator reads the fake score's conditional pass: with method.sida use "
                            "method.guidance_fake=1 and method.guidance_fake_train=1 (guidance_real may differ)")


# ------------------------------------------------------------------------------------------------ σ schedule
def sid_sigma(t: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """SiD's generator-loss noise level (official training/sid_loss.py:32-33; Karras et al. 2022 Eq. 5 read as a
    continuous map):

        σ(t) = (σ_max^{1/ρ} + (1 − t)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,

    so t = 0 → σ_min and t = 1 → σ_max; t_max = 0.8 gives σ ≈ 24.41. Computed in float64, returned as float32
    (t = 0 gives exactly float32(0.002))."""
    return karras_sigma(1.0 - torch.as_tensor(t, dtype=torch.float64), sigma_min, sigma_max, rho).to(torch.float32)


def sample_sid_sigma(n: int, generator: torch.Generator, tmax: float = 800.0, sigma_min: float = 0.002,
                     sigma_max: float = 80.0, rho: float = 7.0, tmin: float = 0.0) -> torch.Tensor:
    """n noise levels σ(t), t ~ U[tmin/1000, tmax/1000] continuous (official SiD: tmin = 0); σ^{1/ρ} is then
    uniform on [σ(tmin/1000)^{1/ρ}, σ(tmax/1000)^{1/ρ}]. float32, shape [n]."""
    t = torch.rand(n, generator=generator, dtype=torch.float64) * ((tmax - tmin) / 1000.0) + tmin / 1000.0
    return sid_sigma(t, sigma_min, sigma_max, rho)


def sample_timestep_sigma(n: int, generator: torch.Generator, table: torch.Tensor, tmin: int, tmax: int) -> torch.Tensor:
    """n noise levels σ_t of a teacher's timestep table, t ~ U{tmin..tmax−1} (SiD-LSG: ``torch.randint(tmin,
    tmax)``, sid_training_loop.py:413, :484). float32, shape [n]."""
    t = torch.randint(int(tmin), int(tmax), (n,), generator=generator)
    return table[t].to(torch.float32)


# ------------------------------------------------------------------------------------------------ losses
def _nan_free_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """[B] bool: samples with no NaN in any of the tensors (the official code drops NaN samples, not inf ones)."""
    bad = torch.zeros(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        bad |= torch.isnan(t.detach()).reshape(len(t), -1).any(1)
    return ~bad


def sid_weight(x: torch.Tensor, d_real: torch.Tensor, w_min: float = W_MIN) -> torch.Tensor:
    """SiD's per-sample normaliser (official training/sid_loss.py:54; the same form as DMD's):
    w_b = sg(mean_pix |x_b − f_φ(x_t)_b|) clipped at ≥ 1e-5. Shape [B], no grad."""
    with torch.no_grad():
        return (x.detach() - d_real.detach()).abs().flatten(1).mean(1).clamp(min=w_min)


def sid_generator_loss(x: torch.Tensor, d_real: torch.Tensor, d_fake: torch.Tensor, alpha: float = 1.2,
                       weight: torch.Tensor | None = None, scale: float = 100.0) -> torch.Tensor:
    """SiD generator loss (Zhou et al. 2024, ICML, "Score identity Distillation", §4: the α-weighted combination of
    the two score-identity losses, Algorithm 1, written as in official training/sid_loss.py:55 reduced as in
    sid_training_loop.py:332; defaults α = 1.2, scale 100):

        L_G = (scale/B)·Σ_b Σ_pix Δ_b ⊙ [(f_φ − x)_b − α·Δ_b] / w_b,   Δ = f_φ(x_t) − f_ψ(x_t),

    with x = x_g (with grad), d_real = f_φ(x_t) and d_fake = f_ψ(x_t) *with* their graphs through x_t, and
    w = ``weight`` or ``sid_weight(x, d_real)`` (detached either way). α = 1 leaves Δᵀ(f_ψ − x)/w, α = 0
    Δᵀ(f_φ − x)/w. Samples with a NaN in x, f_φ or f_ψ are dropped; B stays the full batch size."""
    B = x.shape[0]
    keep = _nan_free_rows(x, d_real, d_fake)
    if not bool(keep.all()):
        x, d_real, d_fake = x[keep], d_real[keep], d_fake[keep]
        weight = None if weight is None else weight[keep]
    w = sid_weight(x, d_real) if weight is None else weight.detach()
    delta = d_real - d_fake
    per_sample = (delta * ((d_real - x) - alpha * delta)).flatten(1).sum(1) / w.reshape(-1)
    return per_sample.sum() * (scale / B)


def sid_fake_score_loss(fake, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                        labels=None, weighting: str = "teacher") -> torch.Tensor:
    """SiD fake-score loss (Zhou et al. 2024, ICML, "Score identity Distillation", §4 / Algorithm 1: denoising score
    matching on the generator's detached samples, in the EDM form of Karras et al. 2022 Eq. 2 with λ(σ); official
    training/sid_loss.py:58-73 reduced as in sid_training_loop.py:306; ln σ ~ N(−1.2, 1.2²), σ_d = 0.5):

        L_ψ = (1/B)·Σ_b λ(σ_b)·Σ_pix (f_ψ(x_b + σ_b n_b; σ_b) − x_b)²,   λ(σ) = (σ² + σ_d²)/(σσ_d)².

    Samples whose loss is NaN are dropped (B stays the full batch size). λ is the teacher's own weighting
    (``weighting='teacher'``: EDM's λ above for EDM teachers, as the official code; ε-MSE for ε-teachers) or EDM's."""
    x = x.detach()
    per_sample = edm_loss(fake, x, sigma, noise, labels, weight=loss_weight(fake, sigma, weighting))
    keep = ~torch.isnan(per_sample.detach())
    if not bool(keep.all()):
        per_sample = per_sample[keep]
    return per_sample.sum() / x.shape[0]


def sida_logits(features: torch.Tensor) -> torch.Tensor:
    """SiDA discriminator logits from the fake-score network's encoder output (official sida_networks.py: the
    channel mean): [B, r, r] for a UNet ([B, C, r, r] features), [B] for an MLP ([B, H] features)."""
    return features.mean(1)


class WithLogits:
    """The fake-score network called once for both its denoiser output and its SiDA logits (the official loss reads
    both from one ``encoder_decoder`` pass, sida_loss.py:44, :88); ``logits`` holds the latest pass's."""

    def __init__(self, net):
        self.net, self.sigma_data, self.logits = net, getattr(net, "sigma_data", 0.5), None

    def __call__(self, x_t, sigma, labels=None):
        d, features = self.net(x_t, sigma, labels, return_bottleneck=True)
        self.logits = sida_logits(features)
        return d


def sida_critic_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, sigma: torch.Tensor,
                     sigma_data: float = 0.5) -> torch.Tensor:
    """SiDA discriminator loss (official sida_loss.py:118-123 reduced as in sida_training_loop.py:365):
    mean_b(λ(σ_b))·½[BCE(l_real, 1) + BCE(l_fake, 0)], each BCE a mean over every logit of the batch; λ the EDM
    weight. Real and generated samples share σ_b. Samples with a NaN logit are dropped (B stays the batch size)."""
    B = len(sigma)
    keep = _nan_free_rows(logits_real, logits_fake)
    lr, lf, lam = logits_real[keep], logits_fake[keep], edm_loss_weight(sigma[keep], sigma_data)
    bce = (F.binary_cross_entropy_with_logits(lr, torch.ones_like(lr))
           + F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf)))
    return lam.sum() * 0.5 * bce / B


def sida_generator_loss(logits: torch.Tensor, weight: torch.Tensor, num_pixels: int, adv_weight: float = 0.01,
                        batch_size: int | None = None) -> torch.Tensor:
    """SiDA generator adversarial term (official sida_loss.py:72 reduced as in sida_training_loop.py:403-404):
    adv_weight·(1/B)·Σ_b BCE(clamp(l, −10, 10), 1)·CHW / w_b, the BCE a mean over every logit given, w the SiD
    normaliser (detached), B = ``batch_size`` (default len(weight); the full batch when NaN samples were dropped)."""
    bce = F.binary_cross_entropy_with_logits(logits.clamp(-10, 10), torch.ones_like(logits))
    return adv_weight * (bce * num_pixels / weight.detach()).sum() / (batch_size or len(weight))


def clip_grad_value_1(grad: torch.Tensor) -> torch.Tensor:
    """SiDA's fake-score gradient guard: each gradient entry clipped to [−1, 1] (sida_training_loop.py:381)."""
    return grad.clamp(-1.0, 1.0)


def nan_to_num_grad(grad: torch.Tensor) -> torch.Tensor:
    """Official SiD's gradient guard: nan → 0, +inf → 1e5, −inf → −1e5 (a tensor hook on each parameter)."""
    return torch.nan_to_num(grad, nan=0.0, posinf=1e5, neginf=-1e5)


# ------------------------------------------------------------------------------------------------ method
@register
class SiD(FakeScoreMethod):
    name = "sid"
    summary = "SiD: α-weighted score-identity loss with an online fake score, 1 step from σ=2.5, EMA, " \
              "data-free (Zhou et al. 2024)"
    needs_data = False
    Options = SiDOptions
    input_sigma_option = "sigma_init"

    def __init__(self, ctx, opts=None, **overrides):
        super().__init__(ctx, opts, **overrides)
        o = self.opts
        # The teacher's timestep table where an option addresses noise levels as its timesteps (SiD-LSG).
        self.table = None
        if o.noise_grid == "teacher" or o.init_timestep is not None:
            what = "method.noise_grid=teacher" if o.noise_grid == "teacher" else "method.init_timestep"
            self.table = teacher_timestep_sigmas(self.teacher, f"{self.name}: {what}")
            last = max([int(o.tmax) - 1] * (o.noise_grid == "teacher") + [o.init_timestep or 0])
            if last >= len(self.table):
                raise UserError(f"{self.name}: the teacher has {len(self.table)} timesteps (0..{len(self.table) - 1}),"
                                f" method.tmax / method.init_timestep reach {last}: lower them")
        self.sigma_init = float(o.sigma_init if o.init_timestep is None else self.table[o.init_timestep])
        if o.max_input_gain is not None:
            capped = min(self.sigma_init, conditioned_sigma_max(self.teacher, o.max_input_gain))
            if capped < self.sigma_init and dist.rank() == 0:
                print(f"[diffdistill] {self.name}: σ_init {self.sigma_init:.3g} → {capped:.3g} (max_input_gain "
                      f"{o.max_input_gain:g}: the teacher's output gain at σ_init is "
                      f"{self.teacher.output_gain(self.sigma_init):.3g})", flush=True)
            self.sigma_init = capped
        self.ema = self.track_ema("generator", o)
        adam = dict(betas=o.betas, eps=o.eps)
        f = lr_factor(self.name, o, self.teacher, self.sigma_init)
        self.optimizers["critic"] = torch.optim.Adam(self.fake.parameters(),
                                                     lr=(o.lr if o.lr_critic is None else o.lr_critic) * f, **adam)
        self.optimizers["generator"] = torch.optim.Adam(self.G.parameters(), lr=o.lr * f, **adam)
        if o.grad_nan_to_num:   # after the EMA copy, so the EMA's parameters carry no hooks
            for p in list(self.G.parameters()) + list(self.fake.parameters()):
                p.register_hook(nan_to_num_grad)
        if o.sida:  # registered after nan_to_num, so it clips the cleaned gradient (official order, loop :376-381)
            for p in self.fake.parameters():
                p.register_hook(clip_grad_value_1)

    @classmethod
    def uses_data(cls, opts):
        return opts.sida  # SiD is data-free; SiDA's GAN reads real images

    @classmethod
    def accumulation_refusal(cls, opts):
        if opts.sida:
            return ("SiDA's GAN losses multiply batch means (mean λ(σ) × the mean BCE over every logit of the batch; "
                    "the generator's BCE mean × the mean of 1/w), which micro-batches cannot sum")
        return None

    def images_seen(self, step: int) -> int:
        """Images seen before this iteration (the official loop's ``cur_nimg``)."""
        return step * self.ctx.batch_size * self.ctx.world_size

    def phases(self, step):
        if self.opts.sida and self.images_seen(step) <= 1000.0 * self.opts.sida_g_start_kimg:
            return ["critic"]  # SiDA: the discriminator / fake score warms up before the first generator step
        return ["critic", "generator"]

    def gan_active(self, step: int) -> bool:
        return self.opts.sida and self.images_seen(step) > 1000.0 * self.opts.sida_gan_start_kimg

    def real_batch(self, batch):
        if batch is None:
            raise UserError("SiDA (sida=true) needs real data: give --data (or the teacher's data), or set sida=false")
        return batch[0].to(self.ctx.device)

    def sampling_net(self):
        return self.ema.net

    def sampling_spec(self):
        return {"sampler": "multistep", "sigmas": [self.sigma_init]}

    # ---------------------------------------------------------------- pieces
    def generate(self, with_grad: bool, batch=None):
        """(x_g, labels): a fresh batch x_g = G(σ_init·z; σ_init) with the real batch's labels when the trainer
        loaded data, random one-hot labels otherwise (None when unconditional). Without grad G runs in eval mode
        (as the official fake-score step does), with grad in train mode."""
        n = self.ctx.micro_batch_size
        labels = self.labels_for(batch, n)
        z = self.randn(n)
        s = self.sigma_init
        self.G.train(with_grad)
        with torch.set_grad_enabled(with_grad):
            x = self.G(z * s, torch.full((n,), s, device=z.device), labels)
        self.G.train()
        return x, labels

    def sample_sigma(self, n: int) -> torch.Tensor:
        """Generator-loss noise levels: σ(t), t ~ U[t_min/1000, t_max/1000] (SiD), or the teacher's σ_t at
        t ~ U{t_min..t_max−1} (``noise_grid=teacher``, SiD-LSG)."""
        o, lo, hi = self.opts, self.teacher.sigma_min, self.teacher.sigma_max
        if o.noise_grid == "teacher":
            draw = lambda m, g: sample_timestep_sigma(m, g, self.table, o.tmin, o.tmax)   # noqa: E731
        else:
            draw = lambda m, g: sample_sid_sigma(m, g, o.tmax, lo, hi, tmin=o.tmin)   # noqa: E731
        return self.ctx.draws.per_sample(n, draw).to(self.ctx.device)

    def noise_levels(self) -> dict:
        o, lo, hi = self.opts, self.teacher.sigma_min, self.teacher.sigma_max
        if o.noise_grid == "teacher":
            gen = [float(self.table[int(o.tmin)]), float(self.table[int(o.tmax) - 1])]
        else:
            gen = [float(sid_sigma(o.tmin / 1000, lo, hi)), float(sid_sigma(o.tmax / 1000, lo, hi))]
        fake = gen if o.fake_sigma == "generator" else f"log-normal({o.p_mean:g}, {o.p_std:g})"
        return {"generator loss σ": gen, "fake-score loss σ": fake}

    def lognormal_sigma(self, n: int) -> torch.Tensor:
        p_mean, p_std = self.opts.p_mean, self.opts.p_std
        return self.ctx.draws.per_sample(n, lambda m, g: sample_lognormal_sigma(m, p_mean, p_std, generator=g)).to(
            self.ctx.device)

    def denoise_pair(self, x_t: torch.Tensor, sigma: torch.Tensor, labels=None, with_logits: bool = False):
        """(f_φ(x_t), f_ψ(x_t), SiDA logits of that f_ψ pass or None), with the graph through x_t but none into
        either net's parameters; f_ψ in eval mode (official loops: sid_training_loop.py:311, sida :374).

        Each net reads its own view of x_t, so autograd first sums each net's input gradient and then adds the two:
        when f_ψ equals f_φ the two sums are exact negatives and ∇_θ L_G is exactly 0 (fed x_t directly, the
        nets' c_skip and c_in branches would be accumulated in an interleaved order and leave rounding residue)."""
        was_training = self.fake.training
        self.fake.eval()
        fake = WithLogits(self.fake) if with_logits else self.fake
        try:
            with frozen(self.teacher, self.fake):
                o = self.opts
                d_real = self.real_score(x_t.view_as(x_t), sigma, labels)   # κ4 (GuidanceOptions)
                d_fake = guided_denoise(fake, x_t.view_as(x_t), sigma, labels, o.guidance_fake)
        finally:
            self.fake.train(was_training)
        return d_real, d_fake, (fake.logits if with_logits else None)

    # ---------------------------------------------------------------- Method interface
    def loss(self, phase, batch, step):
        if phase == "critic":
            return self.critic_loss(batch)
        if phase == "generator":
            return self.generator_loss(batch, step)
        raise ValueError(f"unknown phase {phase!r}")

    def critic_loss(self, batch):
        """L_ψ, plus SiDA's L_D (weight ``sida_d_weight``) on the same σ, noise and labels for real and generated."""
        x, labels = self.generate(with_grad=False, batch=batch)
        self.fake.train()
        sigma = self.sample_sigma(len(x)) if self.opts.fake_sigma == "generator" else self.lognormal_sigma(len(x))
        noise = self.randn_like(x)
        fake = WithLogits(self.fake) if self.opts.sida else self.fake
        if self.opts.guidance_fake_train != 1:   # SiD-LSG κ1: train the fake score's guided output
            fake = GuidedDenoiser(self.fake, self.opts.guidance_fake_train)
        l_fake = sid_fake_score_loss(fake, x, sigma, noise, labels, self.opts.fake_score_weighting)
        logs = {"sid/fake_score": float(l_fake.detach())}
        if not self.opts.sida:
            return l_fake, logs
        real = self.real_batch(batch)
        if len(real) != len(x):
            raise UserError(f"SiDA needs a real batch of the run's batch size ({len(x)}), got {len(real)}")
        l_real = sida_logits(self.fake(real + self.bview(sigma, real) * noise, sigma, labels, bottleneck_only=True))
        l_gen = fake.logits
        l_d = sida_critic_loss(l_real, l_gen, sigma, getattr(self.fake, "sigma_data", 0.5))
        logs.update({"sida/d": float(l_d.detach()), "sida/d_real_acc": float((l_real > 0).float().mean()),
                     "sida/d_fake_acc": float((l_gen < 0).float().mean())})
        return l_fake + self.opts.sida_d_weight * l_d, logs

    def generator_loss(self, batch, step):
        """L_SiD, or ½L_SiD + ½L_adv once SiDA's GAN term is on."""
        o = self.opts
        x, labels = self.generate(with_grad=True, batch=batch)
        self.generated, self.generated_labels = x, labels
        sigma = self.sample_sigma(len(x))
        x_t = x + self.bview(sigma, x) * self.randn_like(x)
        gan = self.gan_active(step)
        d_real, d_fake, logits = self.denoise_pair(x_t, sigma, labels, with_logits=gan)
        l_g = sid_generator_loss(x, d_real, d_fake, o.alpha, scale=o.loss_scale_g)
        logs = {"sid/generator": float(l_g.detach())}
        if gan:
            keep = _nan_free_rows(x, d_real, d_fake)   # the SiD term's samples (official sida_loss.py:48-62)
            l_adv = sida_generator_loss(logits[keep], sid_weight(x[keep], d_real[keep]), x[0].numel(),
                                        o.sida_adv_weight, batch_size=len(x))
            logs["sida/g_adv"] = float(l_adv.detach())
            l_g = 0.5 * l_g + 0.5 * l_adv
        return l_g, logs
