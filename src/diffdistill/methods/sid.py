"""SiD — Score identity Distillation (Zhou, Zheng, Wang, Yin & Huang, "Score identity Distillation: Exponentially
Fast Distillation of Pretrained Diffusion Models for One-Step Generation", ICML 2024, arXiv 2404.04057).

Data-free. A one-step generator x_g = G_θ(σ_init·z; σ_init) (σ_init = 2.5, the same at sampling) and a fake score
net f_ψ are both initialised from the frozen teacher f_φ. Every iteration, on two fresh batches of z:

1. fake-score step (ψ): the EDM denoising loss on detached generator samples (paper §4, Algorithm 1),
       L_ψ = Σ_pix λ(σ)·(f_ψ(x_g + σn; σ) − x_g)² / B,   ln σ ~ N(−1.2, 1.2²),  λ(σ) = (σ² + σ_d²)/(σσ_d)²;
2. generator step (θ): the α-weighted score-identity loss (paper §4 and Algorithm 1, in the official code's form),
       x_t = x_g + σn,  Δ = f_φ(x_t) − f_ψ(x_t),  w = sg(mean_pix |x_g − f_φ(x_t)|) ∨ 1e-5,
       L_G = (100/B)·Σ_b Σ_pix Δ ⊙ [(f_φ − x_g) − α·Δ] / w_b
           = (100/B)·Σ_b [(1 − α)‖Δ‖² + Δᵀ(f_ψ − x_g)] / w_b,
   with t ~ U[0, t_max/1000], t_max = 800, σ = (σ_max^{1/ρ} + (1 − t)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ
   ∈ [0.002, 24.41]. The graph runs through x_t into both nets (their parameters are constants here);
3. EMA of G: β = 0.5^{B / min(h, 0.05·n_img)}, h = 500 kimg; samples come from the EMA.

Official defaults (mingyuanzhou/SiD, CIFAR-10): α = 1.2, batch 256, Adam β = (0, 0.999), ε = 1e-8, lr 1e-5 for both
nets, no clipping / weight decay / lr schedule, fp32, EMA half-life 500 kimg with ramp-up 0.05; samples with NaN
outputs are dropped from both losses, and the gradients of both nets pass through nan_to_num(nan → 0, ±inf → ±1e5)
before the optimizer step (here: tensor hooks on the parameters, since the trainer owns the step).
Not reproduced: the official CIFAR-10 run uses dropout 0.13 and augmentation p = 0.12 on the fake-score input; this
project's nets use whatever the teacher has and no augmentation (the toy scale-down turns both off). The official
EMA update uses n_img *before* the step (β = 0 at step 0); the project's trainer passes n_img after it, so the
first β is 0.5^20 ≈ 1e-6 instead of 0 — the same to six digits.

SiDA (``sida=True``; Zhou et al., "Adversarial Score identity Distillation", arXiv 2410.14919, official ``sida``
branch) adds a GAN on real data with the fake-score network as the discriminator: its logits are the channel mean
of f_ψ's encoder bottleneck map (a patch map for a UNet, one logit for the MLP). The critic adds
λ(σ)·½[BCE(D(x_real + σn), 1) + BCE(D(x_g + σn), 0)] at the fake-score loss's σ (weight 1) and its gradients are
value-clipped at 1; the generator adds 0.01·(100/B)·Σ_b BCE(clamp(D(x_t), ±10), 1)·CHW / w_b at the SiD loss's
x_t, and L_G = ½L_SiD + ½L_adv once ``sida_gan_start_kimg`` images are seen (200 k officially); there is no
generator step before ``sida_g_start_kimg`` (100 k). Official SiDA uses α = 1.0. Per sample the BCE is the mean over
the logit map (our reading; the sheet does not say). SiDA reads real data, so the trainer then builds a loader.

The formulas follow the project's formula sheet (shared/design/sid_el_cd.md §1); no code is copied from the official
repository.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ..diffusion.schedules import sample_lognormal_sigma
from ..errors import UserError
from ..train.ema import EMA
from .registry import register
from .score_distill import EMAGenerator, ScoreDistillMethod, frozen
from ..diffusion.losses import edm_loss

SIGMA_INIT = 2.5        # generator input noise level (official ``init_sigma``)
T_MAX = 800             # generator-loss noise levels: t ~ U[0, T_MAX/1000]
LOSS_SCALE_G = 100.0    # official ``loss_scaling_G``
W_MIN = 1e-5            # lower clip of the per-sample normaliser w


# ------------------------------------------------------------------------------------------------ σ schedule
def sid_sigma(t: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """SiD's generator-loss noise level (official code; Karras et al. 2022 Eq. 5 read as a continuous map):

        σ(t) = (σ_max^{1/ρ} + (1 − t)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,

    so t = 0 → σ_min and t = 1 → σ_max; t_max = 0.8 gives σ ≈ 24.41. Computed in float64, returned as float32
    (t = 0 gives exactly float32(0.002))."""
    t = torch.as_tensor(t, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return ((hi + (1.0 - t) * (lo - hi)) ** rho).to(torch.float32)


def sample_sid_sigma(n: int, generator: torch.Generator, tmax: float = T_MAX, sigma_min: float = 0.002,
                     sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """n noise levels σ(t), t ~ U[0, tmax/1000] continuous (official SiD); σ^{1/ρ} is then uniform on
    [σ_min^{1/ρ}, σ(tmax/1000)^{1/ρ}]. float32, shape [n]."""
    t = torch.rand(n, generator=generator, dtype=torch.float64) * (tmax / 1000.0)
    return sid_sigma(t, sigma_min, sigma_max, rho)


# ------------------------------------------------------------------------------------------------ losses
def _nan_free_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """[B] bool: samples with no NaN in any of the tensors (the official code drops NaN samples, not inf ones)."""
    bad = torch.zeros(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        bad |= torch.isnan(t.detach()).flatten(1).any(1)
    return ~bad


def sid_weight(x: torch.Tensor, d_real: torch.Tensor, w_min: float = W_MIN) -> torch.Tensor:
    """SiD's per-sample normaliser (official code; the same form as DMD's):
    w_b = sg(mean_pix |x_b − f_φ(x_t)_b|) clipped at ≥ 1e-5. Shape [B], no grad."""
    with torch.no_grad():
        return (x.detach() - d_real.detach()).abs().flatten(1).mean(1).clamp(min=w_min)


def sid_generator_loss(x: torch.Tensor, d_real: torch.Tensor, d_fake: torch.Tensor, alpha: float = 1.2,
                       weight: torch.Tensor | None = None, scale: float = LOSS_SCALE_G) -> torch.Tensor:
    """SiD generator loss (Zhou et al. 2024, ICML, "Score identity Distillation", §4: the α-weighted combination of
    the two score-identity losses, Algorithm 1, written as in the official code; defaults α = 1.2, scale 100):

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
                        labels=None) -> torch.Tensor:
    """SiD fake-score loss (Zhou et al. 2024, ICML, "Score identity Distillation", §4 / Algorithm 1: denoising score
    matching on the generator's detached samples, in the EDM form of Karras et al. 2022 Eq. 2 with λ(σ); official
    defaults ln σ ~ N(−1.2, 1.2²), σ_d = 0.5):

        L_ψ = (1/B)·Σ_b λ(σ_b)·Σ_pix (f_ψ(x_b + σ_b n_b; σ_b) − x_b)²,   λ(σ) = (σ² + σ_d²)/(σσ_d)².

    Samples whose loss is NaN are dropped (B stays the full batch size)."""
    x = x.detach()
    per_sample = edm_loss(fake, x, sigma, noise, labels, getattr(fake, "sigma_data", 0.5))
    keep = ~torch.isnan(per_sample.detach())
    if not bool(keep.all()):
        per_sample = per_sample[keep]
    return per_sample.sum() / x.shape[0]


def sida_logits(fake, x_t: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
    """SiDA discriminator: the channel mean of the fake-score network's encoder bottleneck, [B, r, r] for a UNet
    ([B, C, r, r] features), [B] for an MLP ([B, H] features)."""
    return fake(x_t, sigma, labels, bottleneck_only=True).mean(1)


def sida_critic_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, sigma: torch.Tensor,
                     sigma_data: float = 0.5) -> torch.Tensor:
    """SiDA discriminator loss (Zhou et al. 2024b, "Adversarial Score identity Distillation"; official weight 1,
    added to L_ψ): (1/B)·Σ_b λ(σ_b)·½[BCE(l_real,b, 1) + BCE(l_fake,b, 0)], λ(σ) = (σ² + σ_d²)/(σσ_d)², BCE
    averaged over a sample's logit map. Real and fake samples share σ_b."""
    lam = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    real = F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real), reduction="none")
    fake = F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake), reduction="none")
    per_sample = 0.5 * (real.reshape(len(lam), -1).mean(1) + fake.reshape(len(lam), -1).mean(1))
    return (lam * per_sample).sum() / len(lam)


def sida_generator_loss(logits: torch.Tensor, weight: torch.Tensor, num_pixels: int, adv_weight: float = 0.01,
                        scale: float = LOSS_SCALE_G) -> torch.Tensor:
    """SiDA generator adversarial term (official weight 0.01, the SiD loss's 100/B scale and normaliser w):
    adv_weight·(scale/B)·Σ_b BCE(clamp(l_b, −10, 10), 1)·CHW / w_b, BCE averaged over a sample's logit map."""
    B = len(weight)
    bce = F.binary_cross_entropy_with_logits(logits.clamp(-10, 10), torch.ones_like(logits), reduction="none")
    per_sample = bce.reshape(B, -1).mean(1) * num_pixels / weight.detach()
    return adv_weight * per_sample.sum() * (scale / B)


def clip_grad_value_1(grad: torch.Tensor) -> torch.Tensor:
    """SiDA's fake-score gradient guard: each gradient entry clipped to [−1, 1]."""
    return grad.clamp(-1.0, 1.0)


def nan_to_num_grad(grad: torch.Tensor) -> torch.Tensor:
    """Official SiD's gradient guard: nan → 0, +inf → 1e5, −inf → −1e5 (a tensor hook on each parameter)."""
    return torch.nan_to_num(grad, nan=0.0, posinf=1e5, neginf=-1e5)


# ------------------------------------------------------------------------------------------------ method
@register
class SiD(EMAGenerator, ScoreDistillMethod):
    name = "sid"
    summary = "SiD: α-weighted score-identity loss with an online fake score, 1 step from σ=2.5, EMA, " \
              "data-free (Zhou et al. 2024)"
    needs_data = False

    # Toy scale-down (formula sheet §1): α, t_max, σ_init, the fake-score noise, Adam β1 = 0 and the 100/B scale
    # are kept; lr 1e-4–3e-4, batch 128–256 (points: 512, see below), EMA half-life ≈ 5–10 % of the images seen,
    # dropout/augment off.
    presets: ClassVar[dict] = {
        # The official CIFAR-10 settings: batch 256, Adam 1e-5 β (0, 0.999), α 1.2, σ_init 2.5, EMA half-life 500 kimg.
        "official": {"run": {"batch_size": 256},
                     "method": {"lr": 1e-5, "betas": [0.0, 0.999], "alpha": 1.2, "sigma_init": 2.5,
                                "ema_halflife_kimg": 500.0}},
        # 8×8 digits (SongUNet teacher): 800 × 128 = 102 k images, half-life 6 kimg (≈ 6 %); 0.6–0.8 s per
        # iteration on one CPU thread (≈ 10 min). With the shipped teacher: proxy-FID 7.8 (2000 samples; n297 19.1,
        # real-data floor 29.4); the teacher is at 4.1 (n297 17.1) with 35 NFE, the step-0 student at 483.
        "images": {
            "run": {"steps": 800, "batch_size": 128, "log_every": 50, "ckpt_every": 200, "sample_every": 200},
            "method": {"lr": 1e-4, "ema_halflife_kimg": 6.0, "ema_rampup": 0.05},
        },
        # 2-D mixtures (MLP teacher). On the ring8 teacher (MLP 128×3, 800 steps; sliced W2 0.034 at 35 NFE,
        # 5000 samples) the one-step EMA student after 800 × 512 images, over run seeds 0–3, ends at 1.21 / 1.02 /
        # 1.02 / 1.00 × the teacher's with lr 2e-4; 1.21 / 1.28 / 1.10 / 0.93 × with 1e-4; batch 256 wanders
        # more from step to step. Half-life 20 kimg ≈ 5 % of the 410 k images; ≈ 45 s on one CPU thread.
        "points": {
            "run": {"steps": 800, "batch_size": 512, "log_every": 100, "ckpt_every": 400, "sample_every": 400},
            "method": {"lr": 2e-4, "ema_halflife_kimg": 20.0, "ema_rampup": 0.05},
        },
    }

    def __init__(self, ctx, lr: float = 1e-5, lr_critic: float | None = None, betas=(0.0, 0.999),
                 eps: float = 1e-8, alpha: float = 1.2, sigma_init: float = SIGMA_INIT, tmax: float = T_MAX,
                 p_mean: float = -1.2, p_std: float = 1.2, loss_scale_g: float = LOSS_SCALE_G,
                 ema_halflife_kimg: float = 500.0, ema_rampup: float | None = 0.05, ema_beta_const=None,
                 grad_nan_to_num: bool = True, student_steps: int = 1, sida: bool = False,
                 sida_adv_weight: float = 0.01, sida_g_start_kimg: float = 100.0,
                 sida_gan_start_kimg: float = 200.0):
        super().__init__(ctx)
        if int(student_steps) != 1:
            raise UserError(f"sid trains one-step generators only (got student_steps={student_steps})")
        self.sida = bool(sida)
        self.sida_adv_weight = float(sida_adv_weight)
        self.sida_g_start, self.sida_gan_start = 1000.0 * float(sida_g_start_kimg), 1000.0 * float(sida_gan_start_kimg)
        self.alpha = float(alpha)
        self.sigma_init = float(sigma_init)
        if self.sigma_init <= 0:
            raise UserError(f"sigma_init must be positive, got {sigma_init}")
        self.tmax = float(tmax)
        if not 0 <= self.tmax <= 1000:
            raise UserError(f"tmax must lie in [0, 1000], got {tmax}")
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.loss_scale_g = float(loss_scale_g)
        self.ema_halflife_kimg = float(ema_halflife_kimg)
        self.ema_rampup = None if ema_rampup is None else float(ema_rampup)
        self.ema_beta_const = None if ema_beta_const is None else float(ema_beta_const)
        self.ema = EMA(self.G)
        adam = dict(betas=tuple(float(b) for b in betas), eps=float(eps))
        self.optimizers["critic"] = torch.optim.Adam(self.fake.parameters(),
                                                     lr=float(lr if lr_critic is None else lr_critic), **adam)
        self.optimizers["generator"] = torch.optim.Adam(self.G.parameters(), lr=float(lr), **adam)
        self.grad_nan_to_num = bool(grad_nan_to_num)
        if self.grad_nan_to_num:   # after the EMA copy, so the EMA's parameters carry no hooks
            for p in list(self.G.parameters()) + list(self.fake.parameters()):
                p.register_hook(nan_to_num_grad)
        if self.sida:  # registered after nan_to_num, so it clips the cleaned gradient
            for p in self.fake.parameters():
                p.register_hook(clip_grad_value_1)
        self.last_beta = None

    @classmethod
    def uses_data(cls, options):
        return bool(options.get("sida", False))  # SiD is data-free; SiDA's GAN reads real images

    def images_seen(self, step: int) -> int:
        return step * self.ctx.batch_size * self.ctx.world_size

    def phases(self, step):
        if self.sida and self.images_seen(step) < self.sida_g_start:
            return ["critic"]  # SiDA: the discriminator / fake score warms up before the first generator step
        return ["critic", "generator"]

    def real_batch(self, batch):
        if batch is None:
            raise UserError("SiDA (sida=true) needs real data: give --data (or the teacher's data), or set sida=false")
        return batch[0].to(self.ctx.device)

    # ---------------------------------------------------------------- pieces
    def generate(self, with_grad: bool, batch=None):
        """(x_g, labels): a fresh batch x_g = G(σ_init·z; σ_init) with random one-hot labels when conditional (the
        real batch's labels when a supplement made the trainer load data). Without grad G runs in eval mode (as the
        official fake-score step does), with grad in train mode."""
        n = self.ctx.batch_size
        labels = self.labels_for(batch, n)
        z = self.randn(n)
        self.G.train(with_grad)
        with torch.set_grad_enabled(with_grad):
            x = self.G(z * self.sigma_init, torch.full((n,), self.sigma_init, device=z.device), labels)
        self.G.train()
        return x, labels

    def sample_sigma(self, n: int) -> torch.Tensor:
        """Generator-loss noise levels σ(t), t ~ U[0, t_max/1000]."""
        return sample_sid_sigma(n, self.ctx.generator, self.tmax, self.teacher.sigma_min,
                                self.teacher.sigma_max).to(self.ctx.device)

    def lognormal_sigma(self, n: int) -> torch.Tensor:
        return sample_lognormal_sigma(n, self.p_mean, self.p_std, generator=self.ctx.generator).to(self.ctx.device)

    def denoise_pair(self, x_t: torch.Tensor, sigma: torch.Tensor, labels=None):
        """(f_φ(x_t), f_ψ(x_t)) with the graph through x_t but none into either net's parameters; f_ψ in eval mode.

        Each net reads its own view of x_t, so autograd first sums each net's input gradient and then adds the two:
        when f_ψ equals f_φ the two sums are exact negatives and ∇_θ L_G is exactly 0 (fed x_t directly, the
        nets' c_skip and c_in branches would be accumulated in an interleaved order and leave rounding residue)."""
        was_training = self.fake.training
        self.fake.eval()
        try:
            with frozen(self.teacher, self.fake):
                return (self.teacher(x_t.view_as(x_t), sigma, labels),
                        self.fake(x_t.view_as(x_t), sigma, labels))
        finally:
            self.fake.train(was_training)

    # ---------------------------------------------------------------- Method interface
    def loss(self, phase, batch, step):
        if phase == "critic":
            x, labels = self.generate(with_grad=False)
            self.fake.train()
            sigma = self.lognormal_sigma(len(x))
            noise = self.randn_like(x)
            l_fake = sid_fake_score_loss(self.fake, x, sigma, noise, labels)
            logs = {"sid/fake_score": float(l_fake.detach())}
            if self.sida:
                real = self.real_batch(batch)[:len(x)]
                real_labels = labels if labels is None else batch[1].to(x.device)[:len(x)]
                s_ = sigma[:len(real)]
                l_real = sida_logits(self.fake, real + self.bview(s_, real) * self.randn_like(real), s_, real_labels)
                l_gen = sida_logits(self.fake, (x + self.bview(sigma, x) * noise)[:len(real)], s_,
                                    None if labels is None else labels[:len(real)])
                l_d = sida_critic_loss(l_real, l_gen, s_, getattr(self.fake, "sigma_data", 0.5))
                l_fake = l_fake + l_d
                logs.update({"sida/d": float(l_d.detach()), "sida/d_real_acc": float((l_real > 0).float().mean()),
                             "sida/d_fake_acc": float((l_gen < 0).float().mean())})
            return l_fake, logs
        if phase == "generator":
            x, labels = self.generate(with_grad=True, batch=batch)
            self.generated, self.generated_labels = x, labels
            sigma = self.sample_sigma(len(x))
            x_t = x + self.bview(sigma, x) * self.randn_like(x)
            d_real, d_fake = self.denoise_pair(x_t, sigma, labels)
            l_g = sid_generator_loss(x, d_real, d_fake, self.alpha, scale=self.loss_scale_g)
            logs = {"sid/generator": float(l_g.detach())}
            if self.sida and self.images_seen(step) >= self.sida_gan_start:
                with frozen(self.fake):
                    logits = sida_logits(self.fake, x_t, sigma, labels)
                l_adv = sida_generator_loss(logits, sid_weight(x, d_real), x[0].numel(), self.sida_adv_weight,
                                            self.loss_scale_g)
                logs["sida/g_adv"] = float(l_adv.detach())
                l_g = 0.5 * l_g + 0.5 * l_adv
            return l_g, logs
        raise ValueError(f"unknown phase {phase!r}")
