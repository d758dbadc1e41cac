"""Teacher training with the EDM denoising objective (Karras et al. 2022, Eq. 2 and §5 "loss weighting").

    L = E_{σ, x, n} [ λ(σ) · ‖D(x + σn; σ) − x‖² ],  ln σ ~ N(P_mean, P_std²),  λ(σ) = (σ² + σ_d²) / (σ·σ_d)²

Official (NVlabs/edm ``train.py``, CIFAR-10): P_mean = −1.2, P_std = 1.2, σ_d = 0.5; Adam lr 1e-3, β = (0.9, 0.999),
ε = 1e-8; EMA half-life 500 kimg with ramp-up 0.05; a linear lr ramp over 10 Mimg (here ``warmup_steps``
iterations, 200 by default: small problems train for a few thousand iterations). The per-sample loss is a sum over
pixels; the batch loss is its mean (EDM reduces the same way).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..diffusion.condition import conditioning_of
from ..diffusion.guidance import drop_labels
from ..diffusion.losses import edm_loss
from ..diffusion.schedules import sample_lognormal_sigma
from ..nets.factory import build_denoiser
from ..options import option
from ..train.ema import EMAOptions
from ..train.lr import warmup_lambda
from .base import Method
from .registry import register


@dataclass
class TeacherOptions(EMAOptions):
    """What every teacher objective shares: Adam, a linear warm-up, the EMA and the default sampler."""

    lr: float = option(1e-3, "Adam learning rate (EDM CIFAR-10: 1e-3)", gt=0)
    betas: tuple[float, float] = option((0.9, 0.999), "Adam β1, β2", ge=0, lt=1)
    eps: float = option(1e-8, "Adam ε", gt=0)
    warmup_steps: int = option(200, "linear lr warm-up in iterations (EDM: 10 Mimg)", ge=0)
    ema_halflife_kimg: float = option(500.0, "EMA half-life in kimg (EDM)", gt=0)
    sampler: str = option("heun", "how the teacher is sampled by default", choices=("heun", "euler", "ddim"))
    nfe: int = option(35, "network evaluations per sample by default (EDM: 35, Heun with 18 steps)", ge=1)
    label_dropout: float = option(0.0, "probability of training a sample with the null (all-zero) label, so the "
                                  "teacher can be sampled with classifier-free guidance (EDM's label_dropout; "
                                  "off in EDM's recipes)", ge=0, lt=1)


@dataclass
class EDMOptions(TeacherOptions):
    p_mean: float = option(-1.2, "log-normal σ: mean of ln σ (EDM P_mean)")
    p_std: float = option(1.2, "log-normal σ: std of ln σ (EDM P_std)", gt=0)


@register
class EDMTeacher(Method):
    name = "edm"
    summary = "train a teacher denoiser with the EDM loss (log-normal σ, λ(σ) weighting, EMA)"
    role = "teacher"
    Options = EDMOptions

    def __init__(self, ctx, opts=None, **overrides):
        super().__init__(ctx, opts, **overrides)
        o = self.opts
        # on the meta device (a --dry-run plan) built there directly: nothing is allocated, whatever its size
        with torch.device("meta") if ctx.device.type == "meta" else contextlib.nullcontext():
            net = build_denoiser(ctx.net_config)
        net = net.to(ctx.device).train()
        self.nets["net"] = net
        self.ema = self.track_ema("net", o)
        self.optimizers["net"] = torch.optim.Adam(net.parameters(), lr=o.lr, betas=o.betas, eps=o.eps)
        self.schedulers["net"] = torch.optim.lr_scheduler.LambdaLR(self.optimizers["net"],
                                                                  warmup_lambda(o.warmup_steps))

    def phases(self, step):
        return ["net"]

    def loss(self, phase, batch, step):
        x, labels = batch
        draws, p_mean, p_std = self.ctx.draws, self.opts.p_mean, self.opts.p_std
        sigma = draws.per_sample(x.shape[0], lambda m, g: sample_lognormal_sigma(m, p_mean, p_std, generator=g))
        sigma = sigma.to(x.device)
        noise = draws.randn(x.shape).to(x.device)
        net = self.nets["net"]
        labels = self.training_labels(labels)
        loss = edm_loss(net, x, sigma, noise, labels, net.sigma_data).mean()
        return loss, {}

    def training_labels(self, labels):
        """The batch's labels with ``label_dropout`` applied (None for an unconditional net)."""
        if conditioning_of(self.nets["net"]) == "none":
            return None
        if labels is None or self.opts.label_dropout <= 0:
            return labels
        u = self.ctx.draws.per_sample(len(labels), lambda m, g: torch.rand(m, 1, generator=g))
        return drop_labels(labels, self.opts.label_dropout, uniform=u)

    def sampling_net(self):
        return self.ema.net

    def sampling_spec(self):
        return {"sampler": self.opts.sampler, "nfe": self.opts.nfe}
