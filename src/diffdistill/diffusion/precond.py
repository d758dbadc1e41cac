"""EDM preconditioning (Karras et al. 2022, Table 1, "Ours" column).

    D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ))
    c_skip = σ_d² / (σ² + σ_d²),  c_out = σ·σ_d / √(σ² + σ_d²),  c_in = 1 / √(σ² + σ_d²),  c_noise = ¼·ln σ

A *Denoiser* is any module ``D(x, sigma, labels=None) -> x0_hat`` (fp32 at the boundary) that also carries
``img_channels``, ``img_resolution``, ``label_dim``, ``sigma_min`` and ``sigma_max``. Teachers, students and fake
score networks are all Denoisers.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Denoiser(Protocol):
    img_channels: int
    img_resolution: int
    label_dim: int
    sigma_min: float
    sigma_max: float

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        ...


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5):
    """Return (c_skip, c_out, c_in, c_noise) of EDM for a tensor of noise levels."""
    s2, d2 = sigma ** 2, sigma_data ** 2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1 / (s2 + d2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """Wrap a raw network ``F(x_in, c_noise, class_labels)`` into the EDM denoiser D(x; σ).

    The raw network is stored as ``self.model`` so state-dict keys match NVlabs/edm's ``EDMPrecond``
    (``model.enc.8x8_conv.weight`` ...). ``img_resolution`` is 0 for flat (2-D point) data.
    """

    def __init__(self, model: nn.Module, img_channels: int, img_resolution: int = 0, label_dim: int = 0,
                 sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.model = model
        self.img_channels = img_channels
        self.img_resolution = img_resolution
        self.label_dim = label_dim
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    @property
    def sample_shape(self) -> tuple:
        """Shape of one sample: (C, H, W) for images, (C,) for flat data."""
        if self.img_resolution:
            return (self.img_channels, self.img_resolution, self.img_resolution)
        return (self.img_channels,)

    def forward(self, x: torch.Tensor, sigma, labels: Optional[torch.Tensor] = None,
                return_bottleneck: bool = False, bottleneck_only: bool = False):
        """D(x; σ). With ``return_bottleneck=True`` returns ``(D, features)``, where ``features`` are the raw
        network's bottleneck activations (SongUNet: the last encoder output; MLP: the last hidden layer), e.g. for
        a GAN discriminator head on a fake-score network (DMD2); ``bottleneck_only=True`` returns the features
        alone (the same values) without computing D."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        if self.label_dim:
            if labels is None:
                raise ValueError("this denoiser is class-conditional: pass labels (one-hot, shape [B, label_dim])")
            labels = labels.to(torch.float32).reshape(-1, self.label_dim)
        else:
            labels = None
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        bshape = (-1,) + (1,) * (x.ndim - 1)
        if bottleneck_only:
            return self.model(c_in.reshape(bshape) * x, c_noise, labels, bottleneck_only=True)
        if return_bottleneck:
            F_x, feats = self.model(c_in.reshape(bshape) * x, c_noise, labels, return_bottleneck=True)
        else:
            F_x = self.model(c_in.reshape(bshape) * x, c_noise, labels)
        D = c_skip.reshape(bshape) * x + c_out.reshape(bshape) * F_x.to(torch.float32)
        return (D, feats) if return_bottleneck else D
