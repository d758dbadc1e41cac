"""Diff-Instruct (Luo et al., "Diff-Instruct: A Universal Approach for Transferring Knowledge From Pre-trained
Diffusion Models", NeurIPS 2023).

The generator minimises the Integral KL divergence between its diffused distribution q_t and the teacher's p_t,
D_IKL = ∫ w(t)·KL(q_t‖p_t) dt, whose gradient (the paper's IKL gradient theorem) is
∫ w(t)·E[(s_q(x_t) − s_p(x_t))ᵀ ∂x_t/∂θ] dt, with s_q from an online fake-score network. With w(σ) = σ² and
s = (D − x)/σ² this is the denoiser difference, so the generator loss is the "IKL pseudo-loss"

    L_G = mean_b Σ_CHW sg(D_fake(x_t) − D_real(x_t))·x,   x = G(z),  x_t = x + σε,  ln σ ~ N(−1.2, 1.2²)

(∂L_G/∂x_b = (D_fake − D_real)_b / B; no per-sample normaliser, unlike DMD). The generator is
G(z) = D_G(σ_init·z; σ_init) with σ_init = 1.0, initialised from the teacher. Per iteration: one fake-score step
(EDM loss: log-normal σ, λ(σ), sum over pixels, mean over batch) on a fresh no-grad sample drawn with G in eval
mode, then one generator step on another fresh sample (G in train mode), then the EMA update (by the trainer, β from
the images seen before the iteration, as ``di_training_loop.py`` uses ``cur_nimg`` before adding the batch).
Dropout: for the generator's loss the teacher and the fake score both run in train mode with the RNG rewound
between them, so they share dropout masks (``training/di_loss.py``). Data-free.

Official defaults (``DiffInstructOptions``; pkulwj1994/diff_instruct, CIFAR-10 README command): Adam (not AdamW)
β = (0, 0.999), ε = 1e-8, lr 1e-5 for both, batch 128, fp32, no lr warm-up; EMA of G with half-life 500 kimg and
ramp-up 0.05; FID on the EMA.
Not reproduced: the official code passes gradients through nan_to_num(±1e5) instead of clipping — the trainer has
no per-method gradient hook, so its NaN guard (and ``run.grad_clip`` if set) applies instead; and the official CLI
keeps dropout 0.13 / augmentation p = 0.12 for the fake score, while this project's nets use what the teacher has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..diffusion.schedules import sample_lognormal_sigma
from ..errors import UserError
from ..options import option
from ..train.ema import EMAOptions
from .registry import register
from .base import lr_factor
from .score_distill import FakeScoreMethod, ScoreDistillOptions, fake_score_loss, in_mode, paired_denoise


def ikl_loss(x: torch.Tensor, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Diff-Instruct generator pseudo-loss with w(σ) = σ²: L = mean_b Σ_CHW sg(D_fake − D_real)_b · x_b.
    ∂L/∂x_b = (D_fake − D_real)_b / B. The value itself is not a divergence, only a monitor."""
    diff = (d_fake - d_real).detach()
    return (diff * x).flatten(1).sum(1).mean()


@dataclass
class DiffInstructOptions(ScoreDistillOptions, EMAOptions):
    """The official CIFAR-10 recipe (pkulwj1994/diff_instruct README command; ``di_train.py``,
    ``training/di_training_loop.py``)."""

    lr: float = option(1e-5, "generator learning rate (README: --glr 0.00001)", gt=0)
    betas: tuple[float, float] = option((0.0, 0.999), "Adam β1, β2 (di_train.py: both optimizers)", ge=0, lt=1)
    critic_reduction: str = option("sum", "fake-score loss: EDM's sum over pixels, mean over the batch "
                                          "(di_loss.py)", choices=("mean", "sum"))
    eps: float = option(1e-8, "Adam ε (di_train.py)", gt=0)
    sigma_init: float = option(1.0, "the generator's input noise level, G(z) = D_G(σ_init·z; σ_init) (README: "
                                    "--init_sigma 1.0)", gt=0)
    p_mean: float = option(-1.2, "log-normal σ of both losses: mean of ln σ (di_loss.py P_mean)")
    p_std: float = option(1.2, "log-normal σ: std of ln σ (di_loss.py P_std)", gt=0)
    ema_halflife_kimg: Optional[float] = option(500.0, "EMA half-life of G in kimg (di_train.py --ema 0.5 Mimg)",
                                                gt=0)

    def validate(self):
        if self.student_steps != 1:
            raise UserError(f"diff_instruct trains one-step generators only (got method.student_steps="
                            f"{self.student_steps})")
        if not self.ema_enabled():
            raise UserError("diff_instruct samples from its generator EMA: set method.ema_halflife_kimg or "
                            "method.ema_beta_const")


@register
class DiffInstruct(FakeScoreMethod):
    name = "diff_instruct"
    summary = "Diff-Instruct: integral-KL gradient from an online fake score, 1 step, EMA, data-free (Luo et al. 2023)"
    needs_data = False
    Options = DiffInstructOptions
    input_sigma_option = "sigma_init"

    def __init__(self, ctx, opts=None, **overrides):
        super().__init__(ctx, opts, **overrides)
        o = self.opts
        self.sigma_init = o.sigma_init
        # di_loss.py runs the teacher and the fake score both in train mode for the generator's loss, with the
        # RNG restored between the calls (same dropout masks).
        self.paired_training = True
        self.ema = self.track_ema("generator", o)
        adam = dict(betas=o.betas, eps=o.eps)
        f = lr_factor(self.name, o, self.teacher, self.sigma_init)
        self.optimizers["critic"] = torch.optim.Adam(self.fake.parameters(), lr=o.critic_lr() * f, **adam)
        self.optimizers["generator"] = torch.optim.Adam(self.G.parameters(), lr=o.lr * f, **adam)

    def phases(self, step):
        return ["critic", "generator"]

    def generate(self, with_grad: bool, batch=None):
        """(x, labels): a fresh batch x = G(σ_init·z; σ_init); labels random, or the real batch's when there is one.
        Without grad (the fake score's samples) G runs in eval mode, as di_training_loop.py draws them."""
        n = self.ctx.micro_batch_size
        labels = self.labels_for(batch, n)
        z = self.randn(n)
        with torch.set_grad_enabled(with_grad), in_mode(None if with_grad else False, self.G):
            x = self.G(z * self.sigma_init, torch.full((n,), self.sigma_init, device=z.device), labels)
        return x, labels

    def noise_levels(self) -> dict:
        return {"loss σ": f"log-normal({self.opts.p_mean:g}, {self.opts.p_std:g})"}

    def lognormal_sigma(self, n: int) -> torch.Tensor:
        p_mean, p_std = self.opts.p_mean, self.opts.p_std
        return self.ctx.draws.per_sample(n, lambda m, g: sample_lognormal_sigma(m, p_mean, p_std, generator=g)).to(
            self.ctx.device)

    def loss(self, phase, batch, step):
        if phase == "critic":
            x, labels = self.generate(with_grad=False)
            l_fake = fake_score_loss(self.fake, x, self.lognormal_sigma(len(x)), self.randn_like(x), labels,
                                     self.opts.critic_reduction, self.opts.fake_score_weighting)
            return l_fake, {"di/fake_score": float(l_fake.detach())}
        if phase == "generator":
            x, labels = self.generate(with_grad=True, batch=batch)
            self.generated, self.generated_labels = x, labels
            sigma = self.lognormal_sigma(len(x))
            x_t = x.detach() + self.bview(sigma, x) * self.randn_like(x)
            d_fake, d_real = paired_denoise(self.fake, self.real_score, x_t, sigma, labels, self.paired_training,
                                            self.opts.guidance_fake)
            l_g = ikl_loss(x, d_real, d_fake)
            return l_g, {"di/ikl": float(l_g.detach())}
        raise ValueError(f"unknown phase {phase!r}")

    def sampling_net(self):
        return self.ema.net

    def sampling_spec(self):
        return {"sampler": "multistep", "sigmas": [self.sigma_init]}
