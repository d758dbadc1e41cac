"""Classifier-free guidance (Ho & Salimans 2022) in denoiser space, and the null condition it needs.

    D_w(x; σ, c) = D(x; σ, ∅) + w·(D(x; σ, c) − D(x; σ, ∅))

w = 1 is the conditional denoiser, w = 0 the unconditional one, w < 0 "anti" guidance. Papers write CFG on the
network's own output (ε in DMD2's SD code and in SiD-LSG, velocity for flow models, x₀ for EDM nets); all these
forms are the same D_w, because for fixed (x, σ) every parameterisation is an affine map of D with the same
coefficients for both branches (e.g. D = x − σ·ε̂). Some re-implementations write ``cond + w·(cond − uncond)``;
that is D_{w+1} here.

The null condition of a class-conditional net is the all-zero label vector: EDM's label dropout multiplies the
one-hot label by a Bernoulli mask (NVlabs/edm training/networks.py, ``class_labels * (rand >= label_dropout)``), so a
net trained with dropout has learned the zero vector as "no class". An embedding-conditioned (text-to-image) net's
null is the encoded empty or negative prompt that its `Condition` carries (``condition.null_of``).
"""

from __future__ import annotations

import torch
from torch import nn

from . import condition as cond


def null_labels(labels):
    """The null condition of a batch: all-zero one-hot labels, or the negative prompt of a `Condition`."""
    return cond.null_of(labels)


def drop_labels(labels, p: float, generator: torch.Generator | None = None, uniform: torch.Tensor | None = None):
    """Label dropout for CFG-able training: each sample's label replaced by the null condition with probability
    ``p`` (EDM's rule: labels × [u ≥ p], u ~ U[0, 1) per sample, drawn from ``generator`` as ``rand([B, 1])`` or
    given as ``uniform``). Draws nothing when p = 0 or the batch is unconditional, so such runs keep their RNG
    stream."""
    if labels is None or p <= 0:
        return labels
    u = torch.rand(cond.batch_len(labels), 1, generator=generator) if uniform is None else uniform.reshape(-1, 1)
    return cond.drop(labels, (u >= p).reshape(-1))


def guided_denoise(net, x: torch.Tensor, sigma: torch.Tensor, labels, scale: float) -> torch.Tensor:
    """D_w(x; σ, c) with w = ``scale``. w = 1 (or an unconditional batch) is one plain call; otherwise the
    conditional and null branches run as one batch of 2B (as the official codes do) and are combined."""
    if labels is None or scale == 1:
        return net(x, sigma, labels)
    if scale == 0:
        return net(x, sigma, null_labels(labels))
    sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
    d_null, d_cond = net(torch.cat([x, x]), torch.cat([sigma, sigma]),
                         cond.cat([null_labels(labels), labels])).chunk(2)
    return d_null + scale * (d_cond - d_null)


class GuidedDenoiser(nn.Module):
    """A class-conditional Denoiser sampled with CFG scale ``scale`` (the sampler sees an ordinary Denoiser)."""

    def __init__(self, net: nn.Module, scale: float):
        super().__init__()
        self.net, self.scale = net, float(scale)

    def __getattr__(self, name):   # the wrapped Denoiser's attributes (σ range, shapes, label_dim, …)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["net"], name)

    def forward(self, x, sigma, labels=None):
        return guided_denoise(self.net, x, sigma, labels, self.scale)
