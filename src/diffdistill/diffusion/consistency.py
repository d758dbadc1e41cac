"""The consistency-model parameterisation (Song et al. 2023, "Consistency Models", Appendix C): boundary-condition
coefficients with ε = σ_min, applied to any denoiser through the EDM raw-network output it implies."""

from __future__ import annotations

import torch


def consistency_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002):
    """(c_skip, c_out) of a consistency model (Song et al. 2023, Appendix C, the EDM-style parameterisation that
    enforces the boundary condition f(x, ε) = x):

        c_skip = σ_d² / ((σ − ε)² + σ_d²),   c_out = σ_d·(σ − ε) / √(σ² + σ_d²),   ε = σ_min,

    so c_skip(ε) = 1 and c_out(ε) = 0 exactly; c_in and c_noise stay EDM's."""
    d2 = sigma_data ** 2
    c_skip = d2 / ((sigma - sigma_min) ** 2 + d2)
    c_out = sigma_data * (sigma - sigma_min) / (sigma ** 2 + d2).sqrt()
    return c_skip, c_out


def consistency_function(denoiser, x: torch.Tensor, sigma, labels=None, sigma_min: float | None = None,
                         sigma_data: float | None = None) -> torch.Tensor:
    """f(x, σ) = c_skip^CM·x + c_out^CM·F(c_in·x, c_noise): the consistency model that shares its raw network F with
    the EDM denoiser ``denoiser`` (a student initialised from the teacher keeps F and swaps the outer coefficients,
    as the paper does). F is read off the denoiser's output, F = (D − c_skip^EDM·x)/c_out^EDM, so

        f = (c_skip^CM − (1 − ε/σ)·c_skip^EDM)·x + (1 − ε/σ)·D(x; σ),   since c_out^CM/c_out^EDM = 1 − ε/σ,

    which is a function of D alone (for an EDM-preconditioned network it is exactly the paper's f_θ). At σ = ε it
    is 1·x + 0·D = x exactly. ``sigma_min`` (ε) and ``sigma_data`` default to the denoiser's; σ ≥ ε."""
    eps = float(denoiser.sigma_min if sigma_min is None else sigma_min)
    sd = float(getattr(denoiser, "sigma_data", 0.5) if sigma_data is None else sigma_data)
    x = x.to(torch.float32)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(x.shape[0])
    c_skip_cm, _ = consistency_coefficients(sigma, sd, eps)
    c_skip_edm = sd ** 2 / (sigma ** 2 + sd ** 2)
    ratio = 1 - eps / sigma
    bshape = (-1,) + (1,) * (x.ndim - 1)
    a, b = (c_skip_cm - ratio * c_skip_edm).reshape(bshape), ratio.reshape(bshape)
    return a * x + b * denoiser(x, sigma, labels)
