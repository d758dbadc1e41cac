"""The denoising loss (Karras et al. 2022, Eq. 2 and §5 "loss weighting"), the one copy every method uses:
teacher training, and the fake-score / critic networks of DMD, DMD2, Diff-Instruct and SiD.

    L = E_{σ, x, n} [ λ(σ) · ‖D(x + σn; σ) − x‖² ],  EDM: λ(σ) = (σ² + σ_d²) / (σ·σ_d)²

A fake score is trained in its teacher's own weighting by default (``WEIGHTINGS``): λ = 1/c_out(σ)² of the
teacher's preconditioning, which is EDM's λ for an EDM teacher (the official setting of every method here) and the
ε-MSE for an ε-prediction teacher (as DMD2's Stable Diffusion code path trains its fake UNet). EDM's λ on an
ε-network weights the error of ε̂ by 1 + σ²/σ_d², 1 … 25,600 across [0.002, 80]: the high-σ end dominates.
"""

from __future__ import annotations

import torch


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²)/(σ·σ_d)² = 1/σ² + 1/σ_d²."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


WEIGHTINGS = ("teacher", "edm")


def loss_weight(denoiser, sigma: torch.Tensor, weighting: str = "teacher") -> torch.Tensor:
    """λ(σ) for training ``denoiser``: 'teacher' — its preconditioning's own (``Precond.loss_weight``, 1/c_out²);
    'edm' — EDM's λ with its σ_d whatever the parameterisation."""
    if weighting == "teacher" and hasattr(denoiser, "loss_weight"):
        return denoiser.loss_weight(sigma)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return edm_loss_weight(sigma, getattr(denoiser, "sigma_data", 0.5))


def edm_loss(denoiser, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, labels=None,
             sigma_data: float = 0.5, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss λ(σ)·Σ_pixels (D(x + σn; σ) − x)², shape [B] (EDM sums over pixels; callers average over
    the batch, or also over pixels). λ = ``weight`` when given, else EDM's with ``sigma_data``."""
    bshape = (-1,) + (1,) * (x.ndim - 1)
    D = denoiser(x + sigma.reshape(bshape) * noise, sigma, labels)
    lam = edm_loss_weight(sigma, sigma_data) if weight is None else weight
    return lam * (D - x).square().flatten(1).sum(1)
