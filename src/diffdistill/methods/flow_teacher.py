"""Teacher training with the flow-matching (rectified-flow) objective (Lipman et al. 2023; Liu et al. 2023; the
SD3 recipe of Esser et al. 2024), written in σ-space so the teacher is a Denoiser like any other.

    x_t = (1 − t)·x₀ + t·ε,   L = E_{t, x₀, ε} ‖v̂(x_t, t) − (ε − x₀)‖²   (mean over elements, as SD3/diffusers)

With σ = t/(1 − t) and x_σ = x_t/(1 − t) = x₀ + σε (``FlowPrecond``), D − x₀ = c_out(σ)·(v̂ − v), so the velocity
loss is the denoising loss with weight 1/c_out² = ((1 + σ)/σ)² (``Precond.loss_weight``): the same ``edm_loss``
call as the EDM teacher with the flow network's own weighting.

Time sampling: SD3's logit-normal t (Eq. 19; its best setting "rf/lognorm(0.00, 1.00)") is exactly a log-normal
σ, because logit(t) = ln(t/(1 − t)) = ln σ; its time shift t′ = s·t/(1 + (s − 1)t) is σ′ = s·σ (``shift_sigma``).
So σ = shift · exp(m + s·z), z ~ N(0, 1), with m = ``logit_mean``, s = ``logit_std``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..diffusion.losses import edm_loss
from ..diffusion.precond import shift_sigma
from ..diffusion.schedules import sample_lognormal_sigma
from ..errors import UserError
from ..options import option
from .registry import register
from .teacher import EDMTeacher, TeacherOptions


@dataclass
class FlowOptions(TeacherOptions):
    logit_mean: float = option(0.0, "logit-normal t: mean of logit t = ln σ (SD3 rf/lognorm(0.00, 1.00))")
    logit_std: float = option(1.0, "logit-normal t: std of logit t (SD3: 1.0)", gt=0)
    shift: float = option(1.0, "time shift s of the training t: σ → s·σ (SD3 Eq. 23; 1: none)", gt=0)


@register
class FlowTeacher(EDMTeacher):
    name = "flow"
    summary = "train a flow-matching (rectified-flow, velocity) teacher: logit-normal t, time shift, EMA"
    Options = FlowOptions

    def __init__(self, ctx, opts=None, **overrides):
        if ctx.net_config.get("precond") != "flow":
            raise UserError(f"the flow objective trains a flow-matching network: the net section needs precond: "
                            f"flow (got {ctx.net_config.get('precond', 'edm')!r}); train-teacher --objective flow "
                            f"sets it")
        super().__init__(ctx, opts, **overrides)

    def loss(self, phase, batch, step):
        x, labels = batch
        draws, o, net = self.ctx.draws, self.opts, self.nets["net"]
        sigma = shift_sigma(draws.per_sample(x.shape[0], lambda m, g: sample_lognormal_sigma(
            m, o.logit_mean, o.logit_std, generator=g)), o.shift).to(x.device)
        noise = draws.randn(x.shape).to(x.device)
        per_sample = edm_loss(net, x, sigma, noise, self.training_labels(labels), weight=net.loss_weight(sigma))
        return per_sample.mean() / x[0].numel(), {}
