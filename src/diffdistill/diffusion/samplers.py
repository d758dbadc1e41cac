"""Samplers as pure functions with one signature.

    sampler(denoiser, noise, sigmas, labels=None, generator=None) -> (x, nfe)

``noise`` is a standard-normal tensor (the sampler scales it by ``sigmas[0]``); ``sigmas`` is a decreasing list
of noise levels, usually ending in 0. ``nfe`` is the exact number of denoiser calls made. The ODE samplers (Euler,
Heun, stochastic, DDIM) run in float32, or in float64 when ``noise`` is float64.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..errors import UserError
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


def randn_like(x: torch.Tensor, generator=None, dtype=None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``. ``generator`` may be one torch.Generator or a list with one per
    sample, so that a sample's noise depends on its own seed only (not on batch size or rank). ``dtype``: the dtype
    of the draw (default float32): on the CPU a float64 draw of 16 or more numbers is not the float32 one rounded."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=dtype)
                            for g in generator]).to(x.device, x.dtype)
    return torch.randn(x.shape, generator=generator, dtype=dtype).to(x.device, x.dtype)


def _start(noise: torch.Tensor, sigma0: float) -> torch.Tensor:
    """x_0 = σ_0·noise, in float32, or in float64 when ``noise`` is float64 (exact references; EDM's generate.py
    runs its sampler loop in float64)."""
    return noise.to(torch.float64 if noise.dtype == torch.float64 else torch.float32) * sigma0


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
    x = _start(noise, s[0])
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


# EDM generate.py's defaults (its --S_churn/--S_min/--S_max/--S_noise): no churn, i.e. the Heun sampler.
CHURN_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}


def churn_settings(options: dict | None = None) -> dict:
    """The stochastic sampler's settings: ``options`` (any of s_churn, s_tmin, s_tmax, s_noise) completed with
    ``CHURN_DEFAULTS`` and checked. UserError on an unknown name or a value out of range."""
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(CHURN_DEFAULTS))
    if unknown:
        raise UserError(f"unknown stochastic sampler option(s) {', '.join(unknown)}; known: "
                        f"{', '.join(CHURN_DEFAULTS)}")
    v = {}
    for k, default in CHURN_DEFAULTS.items():
        try:
            v[k] = float(opts.get(k, default))
        except (TypeError, ValueError):
            raise UserError(f"{k} (--{k.replace('_', '-')}) must be a number, got {opts[k]!r}") from None
    if not (0 <= v["s_churn"] < math.inf):
        raise UserError(f"s_churn (--s-churn) must be a finite number >= 0, got {v['s_churn']}")
    if not (0 <= v["s_tmin"] < math.inf):
        raise UserError(f"s_tmin (--s-tmin) must be a finite number >= 0, got {v['s_tmin']}")
    if not v["s_tmax"] >= v["s_tmin"]:  # also refuses NaN
        raise UserError(f"s_tmax (--s-tmax) must be >= s_tmin ({v['s_tmin']}), got {v['s_tmax']}")
    if not (0 < v["s_noise"] < math.inf):
        raise UserError(f"s_noise (--s-noise) must be a finite number > 0, got {v['s_noise']}")
    return v


@torch.no_grad()
def stochastic_sampler(denoiser, noise, sigmas, labels=None, generator=None, s_churn: float = 0.0,
                       s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0):
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2). At each step σ_i → σ_{i+1} of the N = len(sigmas)
    − 1 steps: if S_tmin ≤ σ_i ≤ S_tmax, raise the noise level to σ̂ = σ_i + γσ_i, γ = min(S_churn/N, √2 − 1), by
    adding fresh noise, x̂ = x + √(σ̂² − σ_i²)·S_noise·ε; then one Heun step from σ̂ to σ_{i+1} (``heun_step``; plain
    Euler into σ = 0). NFE as Heun's (2N − 1 with a trailing 0). S_churn = 0 (the default) is exactly
    ``heun_sampler``.

    One ε is drawn per step whether it is used or not, in float64, per sample from ``generator``: the draws EDM's
    ``generate.py`` makes (``StackedRandomGenerator.randn_like`` on its float64 iterate), so a seed's noise stream
    is EDM's on the CPU and depends on that seed only. σ̂ is used as computed: EDM's ``round_sigma`` is the identity
    for the EDM/VP/VE preconditionings this project loads.
    """
    c = churn_settings({"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise})
    D = NFECounter(denoiser)
    s = _as_list(sigmas)
    x = _start(noise, s[0])
    gamma_on = min(c["s_churn"] / max(len(s) - 1, 1), math.sqrt(2) - 1)
    for cur, nxt in zip(s[:-1], s[1:]):
        eps = randn_like(x, generator, dtype=torch.float64)
        gamma = gamma_on if c["s_tmin"] <= cur <= c["s_tmax"] else 0.0
        sigma_hat = cur + gamma * cur
        if gamma > 0:  # γ = 0 leaves x untouched (not x + 0·ε), so that S_churn = 0 is bit-identical to Heun
            x = x + math.sqrt(sigma_hat ** 2 - cur ** 2) * c["s_noise"] * eps
        x = heun_step(D, x, sigma_hat, nxt, labels)
    return x, D.nfe


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
    "stochastic": stochastic_sampler,
    "ddim": ddim_sampler,
    "multistep": multistep_sampler,
    "consistency": consistency_sampler,
}

# Samplers that run at any step count: sampler name → (num_steps, sigma_min, sigma_max) → σ list, so that
# ``sample``/``eval --steps k`` can redraw a student's schedule.
STEP_SCHEDULES: dict[str, Callable] = {
    "consistency": consistency_sigmas,
}


# Samplers that take keyword options (a sampling spec's 'sampler_options'): name → checker that completes them.
SAMPLER_OPTIONS: dict[str, Callable] = {
    "stochastic": churn_settings,
}

# Teacher samplers on the Karras grid: name → order, i.e. denoiser calls per step (2: Heun steps, NFE = 2N − 1
# because the last step, into σ = 0, is one Euler call).
TEACHER_SAMPLERS: dict[str, int] = {"heun": 2, "stochastic": 2, "euler": 1, "ddim": 1}


def _order(sampler: str) -> int:
    if sampler not in TEACHER_SAMPLERS:
        raise ValueError(f"unknown teacher sampler {sampler!r}; choose one of: {', '.join(TEACHER_SAMPLERS)}")
    return TEACHER_SAMPLERS[sampler]


def teacher_nfe(sampler: str, steps: int) -> int:
    """Denoiser calls of ``steps`` Karras steps of a teacher sampler (2N − 1 for Heun-type samplers, N else)."""
    return 2 * steps - 1 if _order(sampler) == 2 else steps


def teacher_steps(sampler: str, nfe: int) -> int:
    """The step count N that gives ``nfe`` for a teacher sampler (the inverse of ``teacher_nfe``)."""
    return (nfe + 1) // 2 if _order(sampler) == 2 else nfe


def teacher_sigmas(sampler: str, nfe: int, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> torch.Tensor:
    """The Karras grid that gives exactly ``nfe`` evaluations for ``sampler`` (Heun-type samplers need odd NFE =
    2N − 1)."""
    if nfe < 1:
        raise ValueError(f"NFE must be >= 1, got {nfe}")
    if _order(sampler) == 2 and nfe % 2 == 0:
        raise ValueError(f"{sampler} uses 2N-1 evaluations, so NFE must be odd; got {nfe}")
    return karras_sigmas(teacher_steps(sampler, nfe), sigma_min, sigma_max, rho)


def sampler_options(sampler: str, options: dict | None) -> dict:
    """``options`` checked for ``sampler`` and completed with its defaults; {} for a sampler that takes none
    (UserError if options were given to it)."""
    check = SAMPLER_OPTIONS.get(sampler)
    if check is None:
        if options:
            raise UserError(f"sampler {sampler!r} takes no options (got {', '.join(sorted(options))}); they are "
                            f"for --sampler {' / '.join(SAMPLER_OPTIONS)}")
        return {}
    return check(options)


def sample(denoiser, noise, sampler: str = "heun", sigmas=None, nfe: Optional[int] = None, labels=None,
           generator=None, clip: Optional[bool] = None, options: dict | None = None):
    """Dispatch by sampler name; ``sigmas`` wins over ``nfe``. ``clip=False`` turns off the consistency sampler's
    clamp (to see a student's raw scale); the other samplers never clamp. ``options``: the sampler's keyword
    options (a spec's 'sampler_options', e.g. the stochastic sampler's s_churn), checked by ``sampler_options``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if sigmas is None:
        sigmas = teacher_sigmas(sampler, nfe or 35, denoiser.sigma_min, denoiser.sigma_max)
    extra = {"clip_denoised": clip} if SAMPLERS[sampler] is consistency_sampler else {}
    extra.update(sampler_options(sampler, options))
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
