"""Teacher training with the EDM denoising objective (Karras et al. 2022, Eq. 2 and §5 "loss weighting").

    L = E_{σ, x, n} [ λ(σ) · ‖D(x + σn; σ) − x‖² ],  ln σ ~ N(P_mean, P_std²),  λ(σ) = (σ² + σ_d²) / (σ·σ_d)²

Official defaults: P_mean = −1.2, P_std = 1.2, σ_d = 0.5; Adam β = (0.9, 0.999), ε = 1e-8, linear lr warm-up
(10 Mimg on CIFAR-10; scaled down here), EMA half-life 500 kimg with ramp-up ratio 0.05. The per-sample loss is a
sum over pixels; the batch loss is its mean (EDM reduces the same way).
"""

from __future__ import annotations

import math

import torch

from ..diffusion.schedules import sample_lognormal_sigma
from ..nets.factory import build_denoiser
from ..train.ema import EMA, ema_beta
from .base import Method, MethodContext
from .registry import register


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²)/(σ·σ_d)² = 1/σ² + 1/σ_d²."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def edm_loss(denoiser, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, labels=None,
             sigma_data: float = 0.5) -> torch.Tensor:
    """Per-sample EDM loss λ(σ)·Σ_pixels (D(x + σn; σ) − x)², shape [B]. Reused by fake-score critics."""
    bshape = (-1,) + (1,) * (x.ndim - 1)
    D = denoiser(x + sigma.reshape(bshape) * noise, sigma, labels)
    return edm_loss_weight(sigma, sigma_data) * (D - x).square().flatten(1).sum(1)


def warmup_lambda(warmup_steps: int, decay_steps: int | None = None):
    """LR factor at scheduler step s: linear warm-up min(1, (s+1)/warmup_steps), then constant, or, with
    ``decay_steps`` D, times the cosine ½(1 + cos(π·min(s, D)/D)), which reaches 0 at s = D."""
    def factor(step):
        f = min(1.0, (step + 1) / max(warmup_steps, 1))
        if decay_steps:
            f *= 0.5 * (1.0 + math.cos(math.pi * min(step, decay_steps) / decay_steps))
        return f
    return factor


@register
class EDMTeacher(Method):
    name = "edm"
    summary = "train a teacher denoiser with the EDM loss (log-normal σ, λ(σ) weighting, EMA)"
    role = "teacher"

    def __init__(self, ctx: MethodContext, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 warmup_steps: int = 200, p_mean: float = -1.2, p_std: float = 1.2, ema_halflife_kimg: float = 50.0,
                 ema_rampup: float = 0.05, ema_beta_const=None, sampler: str = "heun", nfe: int = 35):
        super().__init__(ctx)
        self.p_mean, self.p_std = p_mean, p_std
        self.ema_halflife_kimg, self.ema_rampup, self.ema_beta_const = ema_halflife_kimg, ema_rampup, ema_beta_const
        self.spec = {"sampler": sampler, "nfe": int(nfe)}
        net = build_denoiser(ctx.net_config).to(ctx.device).train()
        self.nets["net"] = net
        self.ema = EMA(net)
        self.optimizers["net"] = torch.optim.Adam(net.parameters(), lr=lr, betas=tuple(betas), eps=eps)
        self.schedulers["net"] = torch.optim.lr_scheduler.LambdaLR(self.optimizers["net"], warmup_lambda(warmup_steps))

    def phases(self, step):
        return ["net"]

    def loss(self, phase, batch, step):
        x, labels = batch
        g = self.ctx.generator
        sigma = sample_lognormal_sigma(x.shape[0], self.p_mean, self.p_std, generator=g).to(x.device)
        noise = torch.randn(x.shape, generator=g).to(x.device)
        net = self.nets["net"]
        loss = edm_loss(net, x, sigma, noise, labels if net.label_dim else None, net.sigma_data).mean()
        return loss, {}

    def after_step(self, step, nimg):
        beta = ema_beta(self.ctx.batch_size * self.ctx.world_size, nimg, self.ema_halflife_kimg, self.ema_rampup,
                        self.ema_beta_const)
        self.ema.update(self.nets["net"], beta)

    def sampling_net(self):
        return self.ema.net

    def sampling_spec(self):
        return dict(self.spec)

    def extra_state(self):
        return {"ema": self.ema.net.state_dict()}

    def load_extra_state(self, state):
        self.ema.net.load_state_dict(state["ema"])
