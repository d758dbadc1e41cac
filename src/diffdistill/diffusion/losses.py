"""The EDM denoising loss (Karras et al. 2022, Eq. 2 and §5 "loss weighting"), the one copy every method uses:
teacher training, and the fake-score / critic networks of DMD, DMD2, Diff-Instruct and SiD.

    L = E_{σ, x, n} [ λ(σ) · ‖D(x + σn; σ) − x‖² ],  λ(σ) = (σ² + σ_d²) / (σ·σ_d)²
"""

from __future__ import annotations

import torch


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²)/(σ·σ_d)² = 1/σ² + 1/σ_d²."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def edm_loss(denoiser, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, labels=None,
             sigma_data: float = 0.5) -> torch.Tensor:
    """Per-sample EDM loss λ(σ)·Σ_pixels (D(x + σn; σ) − x)², shape [B] (EDM sums over pixels; callers average
    over the batch, or also over pixels)."""
    bshape = (-1,) + (1,) * (x.ndim - 1)
    D = denoiser(x + sigma.reshape(bshape) * noise, sigma, labels)
    return edm_loss_weight(sigma, sigma_data) * (D - x).square().flatten(1).sum(1)
