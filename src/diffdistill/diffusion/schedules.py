"""Noise-level schedules (k-diffusion style: small pure functions)."""

from __future__ import annotations

import torch


def karras_sigma(u, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), Eq. 5 as a continuous map of the position u ∈ [0, 1] along the schedule:
    σ(u) = (σ_max^{1/ρ} + u·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, so u = 0 → σ_max and u = 1 → σ_min. float64."""
    u = torch.as_tensor(u, dtype=torch.float64)
    inv_rho = 1.0 / rho
    return (sigma_max ** inv_rho + u * (sigma_min ** inv_rho - sigma_max ** inv_rho)) ** rho


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  append_zero: bool = True) -> torch.Tensor:
    """The N-point Karras grid σ_i = σ(i/(N−1)), i = 0..N−1 (``karras_sigma``): strictly decreasing from σ_max to
    σ_min; a trailing 0 is appended by default (σ_N = 0). float64 for exactness."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        sigmas = torch.tensor([float(sigma_max)], dtype=torch.float64)
    else:
        i = torch.arange(num_steps, dtype=torch.float64)
        sigmas = karras_sigma(i / (num_steps - 1), sigma_min, sigma_max, rho)
    if append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas


def sample_lognormal_sigma(n: int, p_mean: float = -1.2, p_std: float = 1.2, generator=None,
                           device=None) -> torch.Tensor:
    """EDM training noise levels: ln σ ~ N(P_mean, P_std²) (defaults −1.2, 1.2)."""
    z = torch.randn(n, generator=generator, device=device)
    return (p_mean + p_std * z).exp()
