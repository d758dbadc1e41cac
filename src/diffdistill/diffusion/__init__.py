"""EDM basis: preconditioning, σ schedules and samplers (pure functions)."""

from .precond import EDMPrecond, VEPrecond, VPPrecond, Precond, Denoiser, edm_coefficients
from .schedules import karras_sigmas, sample_lognormal_sigma
from .samplers import (SAMPLERS, NFECounter, euler_sampler, heun_sampler, stochastic_sampler, ddim_sampler,
                       multistep_sampler, sample)

__all__ = [
    "EDMPrecond", "VPPrecond", "VEPrecond", "Precond", "Denoiser", "edm_coefficients", "karras_sigmas", "sample_lognormal_sigma", "SAMPLERS",
    "NFECounter", "euler_sampler", "heun_sampler", "stochastic_sampler", "ddim_sampler", "multistep_sampler", "sample",
]
