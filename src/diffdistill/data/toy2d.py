"""Seeded 2-D toy distributions, scaled to a per-coordinate std of about 0.5 (EDM's σ_data).

Scales are fixed analytic constants of each *population*, not statistics of the drawn sample, so every ``n`` and
``seed`` samples the same distribution:

* ``ring8``: 8 equal-weight isotropic Gaussians with means at angles 2πk/8 on a circle of radius
  ``RING8_RADIUS = 0.5 / sqrt(0.5 + 0.08²) ≈ 0.7026`` and std ``RING8_STD = 0.08 · RING8_RADIUS ≈ 0.0562``; the
  per-coordinate variance R²/2 + s² is exactly 0.25. Adjacent means are ≈ 9.6 stds apart.
* ``checkerboard``: the 8-square board of FFJORD on [-2, 2]² (uniform marginals, variance 4/3), scaled by
  ``sqrt(3)/4`` so it lies in [-0.866, 0.866]² with std exactly 0.5 per coordinate.
* ``two_moons``: sklearn-style moons (t ~ U[0, π]; upper arc (cos t, sin t), lower arc (1 − cos t, 0.5 − sin t);
  Gaussian noise 0.05), centred at (0.5, 0.25) and scaled per coordinate by 0.5 / sqrt(var), with the population
  variances 0.75 + 0.05² (x) and 0.625 − 1/π − 1/16 + 0.05² (y).

The exact ring8 mixture is available (`ring8_gmm`) together with its analytic denoiser (`gmm_denoiser`), which is
the ideal teacher for tests and for sanity-checking distillation.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import numpy as np
import torch

from diffdistill.data.base import Dataset
from diffdistill.errors import UserError

RING8_RADIUS = 0.5 / math.sqrt(0.5 + 0.08 ** 2)
RING8_STD = 0.08 * RING8_RADIUS
CHECKERBOARD_SCALE = math.sqrt(3) / 4
MOONS_NOISE = 0.05
MOONS_MEAN = (0.5, 0.25)
MOONS_STD = (math.sqrt(0.75 + MOONS_NOISE ** 2), math.sqrt(0.625 - 1 / math.pi - 1 / 16 + MOONS_NOISE ** 2))
TOY2D_NAMES = ("ring8", "checkerboard", "two_moons")


class GMM(NamedTuple):
    """An isotropic Gaussian mixture: means ``[K, D]``, std (float, shared), weights ``[K]`` summing to 1."""
    means: torch.Tensor
    std: float
    weights: torch.Tensor


def ring8_modes() -> torch.Tensor:
    """The 8 ring8 means, float32 ``[8, 2]``, mode k at angle 2πk/8."""
    ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    return (RING8_RADIUS * torch.stack([ang.cos(), ang.sin()], 1)).to(torch.float32)


def ring8_gmm() -> GMM:
    """Exact parameters of the ring8 distribution: ``GMM(means [8, 2], std, weights [8])``."""
    return GMM(ring8_modes(), RING8_STD, torch.full((8,), 1 / 8))


def _ring8(rng, n):
    k = rng.integers(0, 8, size=n)
    return ring8_modes().numpy().astype(np.float64)[k] + RING8_STD * rng.standard_normal((n, 2))


def _checkerboard(rng, n):
    x1 = rng.uniform(-2, 2, n)
    x2 = rng.uniform(0, 1, n) - 2 * rng.integers(0, 2, n) + np.floor(x1) % 2
    return CHECKERBOARD_SCALE * np.stack([x1, x2], 1)


def _two_moons(rng, n):
    t = rng.uniform(0, math.pi, n)
    lower = rng.integers(0, 2, n).astype(bool)
    x = np.where(lower, 1 - np.cos(t), np.cos(t))
    y = np.where(lower, 0.5 - np.sin(t), np.sin(t))
    pts = np.stack([x, y], 1) + MOONS_NOISE * rng.standard_normal((n, 2))
    return (pts - np.array(MOONS_MEAN)) * (0.5 / np.array(MOONS_STD))


_GENERATORS = {"ring8": _ring8, "checkerboard": _checkerboard, "two_moons": _two_moons}


def make_toy2d(name: str, n: int = 10000, seed: int = 0) -> Dataset:
    """Draw ``n`` points of toy distribution ``name`` (ring8, checkerboard, two_moons) with numpy seed ``seed``."""
    if name not in _GENERATORS:
        raise UserError(f"unknown 2-D dataset {name!r}; use one of {', '.join(TOY2D_NAMES)}")
    if int(n) < 1:
        raise UserError(f"{name}: n must be a positive number of points, got {n}")
    pts = _GENERATORS[name](np.random.default_rng(int(seed)), int(n))
    return Dataset(torch.from_numpy(pts.astype(np.float32)), kind="points", name=name)


def gmm_denoiser(x: torch.Tensor, sigma: Union[float, torch.Tensor], means: torch.Tensor,
                 std: Union[float, torch.Tensor], weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact denoiser E[x0 | x] of an isotropic GMM under noise σ (the ideal D(x; σ) an EDM network learns).

    D(x; σ) = Σ_k w_k(x) (μ_k + s_k²/(s_k²+σ²) (x − μ_k)),  w_k ∝ π_k N(x; μ_k, (s_k²+σ²) I), with the weights from
    a softmax of the log-densities (stable for any σ). ``x``: ``[N, D]`` (or ``[N, ...]``, flattened to D);
    ``sigma``: float or tensor of ``N`` levels (any shape with N elements); ``means``: ``[K, D]``; ``std``: float or
    ``[K]``; ``weights``: ``[K]`` (uniform if None). Computed in float64, returned in ``x``'s dtype and shape.
    """
    shape, dtype = x.shape, x.dtype
    xf = x.reshape(len(x), -1).to(torch.float64)
    mu = torch.as_tensor(means, dtype=torch.float64, device=x.device).reshape(-1, xf.shape[1])
    k, d = mu.shape
    s2 = torch.as_tensor(std, dtype=torch.float64, device=x.device).reshape(-1).expand(k) ** 2          # [K]
    sig = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
    sig2 = (sig.expand(len(xf)) if sig.numel() == 1 else sig).reshape(-1, 1) ** 2                      # [N, 1]
    pi = (torch.full((k,), 1 / k, dtype=torch.float64, device=x.device) if weights is None
          else torch.as_tensor(weights, dtype=torch.float64, device=x.device).reshape(k))
    var = s2 + sig2                                                                                     # [N, K]
    diff = xf[:, None, :] - mu[None]                                                                    # [N, K, D]
    logw = pi.log() - 0.5 * (diff ** 2).sum(-1) / var - 0.5 * d * var.log()
    w = torch.softmax(logw, dim=1)                                                                      # [N, K]
    comp = mu[None] + (s2 / var)[..., None] * diff                                                      # [N, K, D]
    return (w[..., None] * comp).sum(1).to(dtype).reshape(shape)


def mode_assignments(points: torch.Tensor, means: torch.Tensor, std: float, max_stds: float = 3.0) -> torch.Tensor:
    """Index of the nearest mean for each point, or −1 when it lies more than ``max_stds · std`` from every mean.

    With ring8: ``(a >= 0).float().mean()`` is the high-quality fraction and ``a[a >= 0].unique().numel()`` the
    number of modes covered.
    """
    p = torch.as_tensor(points, dtype=torch.float64).reshape(len(points), -1)
    dist = torch.cdist(p, torch.as_tensor(means, dtype=torch.float64).reshape(-1, p.shape[1]))
    dmin, idx = dist.min(1)
    return torch.where(dmin <= max_stds * float(std), idx, torch.full_like(idx, -1))
