"""Samplers as pure functions with one signature.

    sampler(denoiser, noise, sigmas, labels=None, generator=None) -> (x, nfe)

``noise`` is a standard-normal tensor (the sampler scales it by ``sigmas[0]``); ``sigmas`` is a decreasing list
of noise levels, usually ending in 0. ``nfe`` is the exact number of denoiser calls made.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .consistency import consistency_function
from .schedules import karras_sigmas


class NFECounter:
    """Wrap a denoiser and count its evaluations (one per call, whatever the batch size)."""

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.nfe = 0

    def __call__(self, x, sigma, labels=None):
        self.nfe += 1
        return self.denoiser(x, sigma, labels)


def randn_like(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``. ``generator`` may be one torch.Generator or a list with one per
    sample, so that a sample's noise depends on its own seed only (not on batch size or rank)."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator]).to(x.device, x.dtype)
    return torch.randn(x.shape, generator=generator).to(x.device, x.dtype)


def _as_list(sigmas):
    return [float(s) for s in (sigmas.tolist() if torch.is_tensor(sigmas) else sigmas)]


def _level(v, x: torch.Tensor):
    """σ as a Python float (one level for the batch) or a per-sample tensor [B] broadcast over x."""
    return v.reshape((-1,) + (1,) * (x.ndim - 1)) if torch.is_tensor(v) else v


def _denoise(D, x: torch.Tensor, sigma, labels):
    return D(x, sigma if torch.is_tensor(sigma) else torch.full((x.shape[0],), sigma, dtype=torch.float32,
                                                                device=x.device), labels)


def euler_step(D, x: torch.Tensor, sigma, sigma_next, labels=None) -> torch.Tensor:
    """One Euler step of the probability-flow ODE dx/dσ = (x − D(x; σ))/σ from σ to σ'."""
    cur, nxt = _level(sigma, x), _level(sigma_next, x)
    return x + (nxt - cur) * ((x - _denoise(D, x, sigma, labels)) / cur)


def heun_step(D, x: torch.Tensor, sigma, sigma_next, labels=None) -> torch.Tensor:
    """One step of EDM Algorithm 1 on dx/dσ = (x − D(x; σ))/σ from σ to σ' (2nd-order Heun; a plain Euler step
    when σ' = 0). σ, σ' are Python floats (one level for the batch) or per-sample tensors [B]."""
    cur, nxt = _level(sigma, x), _level(sigma_next, x)
    d = (x - _denoise(D, x, sigma, labels)) / cur
    x_next = x + (nxt - cur) * d
    if torch.is_tensor(sigma_next) or sigma_next > 0:
        d_next = (x_next - _denoise(D, x_next, sigma_next, labels)) / nxt
        x_next = x + (nxt - cur) * (0.5 * d + 0.5 * d_next)
    return x_next


def _ode_sampler(step, denoiser, noise, sigmas, labels):
    """x_0 = σ_0·noise, then ``step`` from each σ to the next; returns (x, NFE)."""
    D = NFECounter(denoiser)
    s = _as_list(sigmas)
    x = noise.to(torch.float32) * s[0]
    for cur, nxt in zip(s[:-1], s[1:]):
        x = step(D, x, cur, nxt, labels)
    return x, D.nfe


@torch.no_grad()
def euler_sampler(denoiser, noise, sigmas, labels=None, generator=None):
    """First-order Euler on the probability-flow ODE dx/dσ = (x − D(x; σ))/σ. NFE = number of steps."""
    return _ode_sampler(euler_step, denoiser, noise, sigmas, labels)


@torch.no_grad()
def heun_sampler(denoiser, noise, sigmas, labels=None, generator=None):
    """EDM Algorithm 1 (deterministic Heun, 2nd order). With N σ's > 0 and a trailing 0: NFE = 2N − 1,
    because the last step (to σ = 0) is a plain Euler step."""
    return _ode_sampler(heun_step, denoiser, noise, sigmas, labels)


@torch.no_grad()
def ddim_sampler(denoiser, noise, sigmas, labels=None, generator=None):
    """Deterministic DDIM (η = 0) written in σ-space: x_next = D + (σ_next/σ)·(x − D).

    In the variance-exploding σ-parameterisation this is algebraically the Euler step (Karras et al. 2022, §3);
    it is kept as its own function because its form (keep the predicted noise, move the clean estimate) is the
    one users know. NFE = number of steps.
    """
    return _ode_sampler(ddim_step, denoiser, noise, sigmas, labels)


@torch.no_grad()
def multistep_sampler(denoiser, noise, sigmas, labels=None, generator=None):
    """Few-step student sampling (consistency / DMD2 style): at each σ_k denoise, x̂ = G(x; σ_k), then re-noise
    with fresh Gaussian noise to the next σ, x = x̂ + σ_{k+1}·ε. A trailing 0 (or none) ends on x̂.

    ``sigmas`` lists the student's σ's (e.g. [80] for one step, [80, 17.5, 2.5, 0.168] for DMD2's four); NFE = the
    number of positive σ's. Fresh noise comes from ``generator`` so the result depends on the seed only.
    """
    D = NFECounter(denoiser)
    s = [v for v in _as_list(sigmas) if v > 0]
    x = noise.to(torch.float32) * s[0]
    x0 = x
    for k, cur in enumerate(s):
        x0 = _denoise(D, x, cur, labels)
        if k + 1 < len(s):
            eps = randn_like(x, generator)
            x = x0 + s[k + 1] * eps
    return x0, D.nfe


@torch.no_grad()
def consistency_sampler(denoiser, noise, sigmas, labels=None, generator=None, clip_denoised: bool | None = None):
    """Consistency-model sampling (Song et al. 2023, "Consistency Models", Algorithm 1): x̂ = f(σ_0·z, σ_0), then for
    each later τ in ``sigmas``: x̂ = f(x̂ + √(τ² − ε²)·z', τ) with fresh z'. f is ``consistency_function`` of the
    denoiser (boundary-condition coefficients with ε = the denoiser's σ_min). One σ gives the one-step sample;
    NFE = the number of positive σ's. Fresh noise comes from ``generator`` (per-sample seeds).

    ``clip_denoised``: clamp every x̂ to [−1, 1] before it is re-noised and on return, as the official sampler does
    by default (openai/consistency_models ``cm/karras_diffusion.py``: ``karras_sample(clip_denoised=True)`` clamps
    the denoiser output, lines 404-408, and the final sample, line 419). None (default): clamp for images
    (``noise`` is [N, C, H, W], pixels in [−1, 1]); not for other data such as 2-D points, whose range is not
    [−1, 1]."""
    D = NFECounter(denoiser)
    eps, sd = float(denoiser.sigma_min), float(getattr(denoiser, "sigma_data", 0.5))
    clip = noise.ndim == 4 if clip_denoised is None else bool(clip_denoised)

    def f(x, tau):
        x0 = consistency_function(D, x, tau, labels, eps, sd)
        return x0.clamp(-1, 1) if clip else x0

    s = [v for v in _as_list(sigmas) if v > 0]
    x = f(noise.to(torch.float32) * s[0], s[0])
    for tau in s[1:]:
        x = f(x + (tau ** 2 - eps ** 2) ** 0.5 * randn_like(x, generator), tau)
    return x, D.nfe


def consistency_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> list:
    """This project's default k-step consistency schedule: the first k points of the (k+1)-point Karras grid from
    σ_max to σ_min, i.e. τ_j = (σ_max^{1/ρ} + j/k·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, j = 0..k−1 — [80] for one step,
    [80, 2.51] for two. (The paper hand-picks its 2-step τ, e.g. 1.38 on ImageNet-64.)"""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return [float(v) for v in karras_sigmas(num_steps + 1, sigma_min, sigma_max, rho, append_zero=False)[:-1]]


SAMPLERS: dict[str, Callable] = {
    "euler": euler_sampler,
    "heun": heun_sampler,
    "ddim": ddim_sampler,
    "multistep": multistep_sampler,
    "consistency": consistency_sampler,
}

# Samplers that run at any step count: sampler name → (num_steps, sigma_min, sigma_max) → σ list, so that
# ``sample``/``eval --steps k`` can redraw a student's schedule.
STEP_SCHEDULES: dict[str, Callable] = {
    "consistency": consistency_sigmas,
}


def teacher_sigmas(sampler: str, nfe: int, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> torch.Tensor:
    """The Karras grid that gives exactly ``nfe`` evaluations for ``sampler`` (Heun needs odd NFE = 2N − 1)."""
    if nfe < 1:
        raise ValueError(f"NFE must be >= 1, got {nfe}")
    if sampler == "heun":
        if nfe % 2 == 0:
            raise ValueError(f"Heun uses 2N-1 evaluations, so NFE must be odd; got {nfe}")
        return karras_sigmas((nfe + 1) // 2, sigma_min, sigma_max, rho)
    if sampler in ("euler", "ddim"):
        return karras_sigmas(nfe, sigma_min, sigma_max, rho)
    raise ValueError(f"unknown teacher sampler {sampler!r}; choose heun, euler or ddim")


def sample(denoiser, noise, sampler: str = "heun", sigmas=None, nfe: Optional[int] = None, labels=None,
           generator=None, clip: Optional[bool] = None):
    """Dispatch by sampler name; ``sigmas`` wins over ``nfe``. ``clip=False`` turns off the consistency sampler's
    clamp (to see a student's raw scale); the other samplers never clamp."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if sigmas is None:
        sigmas = teacher_sigmas(sampler, nfe or 35, denoiser.sigma_min, denoiser.sigma_max)
    extra = {"clip_denoised": clip} if SAMPLERS[sampler] is consistency_sampler else {}
    return SAMPLERS[sampler](denoiser, noise, sigmas, labels=labels, generator=generator, **extra)


def ddim_step(denoiser, x: torch.Tensor, sigma_from, sigma_to, labels=None) -> torch.Tensor:
    """One deterministic DDIM (η = 0) step in σ-space (Song et al. 2021, "Denoising Diffusion Implicit Models",
    Eq. 12 with x_σ = x + σε; Karras et al. 2022 §3 — the Euler step of dx/dσ = (x − D(x; σ))/σ):

        x̂ = D(x; σ_from),   x_to = x̂ + (σ_to/σ_from)·(x − x̂).

    ``sigma_from`` / ``sigma_to``: floats or per-sample tensors [B]. The denoiser sees x and σ in float32; the step
    itself is done in the dtype of ``x`` (pass float64 for exact targets, e.g. progressive distillation's two-step
    teacher). No gradient handling: call it under ``torch.no_grad`` when the result is a target."""
    B, dt = x.shape[0], x.dtype
    s_from = torch.as_tensor(sigma_from, dtype=torch.float64, device=x.device).expand(B)
    s_to = torch.as_tensor(sigma_to, dtype=torch.float64, device=x.device).expand(B)
    x_hat = denoiser(x.to(torch.float32), s_from.to(torch.float32), labels).to(dt)
    ratio = (s_to / s_from).to(dt).reshape((-1,) + (1,) * (x.ndim - 1))
    return x_hat + ratio * (x - x_hat)
