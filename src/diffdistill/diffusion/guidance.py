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

Some networks take the scale as an input instead (FLUX.1-dev's guidance embedding, a w-conditioned student): their
Condition signature has ``extra.guidance`` and they are "guided" by writing w there — one call, no null branch.
``guide`` / ``for_sampling`` decide between the two from ``net.embedding_signature``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..errors import UserError
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


def guided_denoise(net, x: torch.Tensor, sigma: torch.Tensor, labels, scale) -> torch.Tensor:
    """D_w(x; σ, c) with w = ``scale``: a number, or a per-sample tensor [B] (a w-conditioned student's batch, each
    sample guided with its own w). w = 1 (or an unconditional batch) is one plain call; otherwise the conditional
    and null branches run as one batch of 2B (as the official codes do) and are combined."""
    if torch.is_tensor(scale) and scale.ndim > 0:
        if scale.shape != (x.shape[0],):
            raise ValueError(f"a per-sample guidance scale must have shape [{x.shape[0]}], got {tuple(scale.shape)}")
        if labels is None:
            return net(x, sigma, labels)
        scale = scale.to(x.device).reshape((-1,) + (1,) * (x.ndim - 1))
    elif labels is None or float(scale) == 1:
        return net(x, sigma, labels)
    elif float(scale) == 0:
        return net(x, sigma, null_labels(labels))
    sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
    d_null, d_cond = net(torch.cat([x, x]), torch.cat([sigma, sigma]),
                         cond.cat([null_labels(labels), labels])).chunk(2)
    if torch.is_tensor(scale):
        scale = scale.to(d_cond.dtype)
    return d_null + scale * (d_cond - d_null)


# ------------------------------------------------------------------------------------------------ scale as input
GUIDANCE_MODES = ("auto", "cfg", "input")


def takes_guidance(net) -> bool:
    """Whether ``net`` takes the guidance scale as a network input: its Condition signature has ``extra.guidance``
    (FLUX.1-dev's guidance embedding; a w-conditioned student of this package, ``guidance_embed``)."""
    sig = getattr(net, "embedding_signature", None)
    return sig is not None and "extra.guidance" in dict(sig)


def guidance_mode(net) -> str:
    """How ``net`` is guided at a scale w: 'input' (w is written into the condition's ``extra.guidance``, one call,
    no null branch) when it takes the scale as input, else 'cfg' (``guided_denoise``)."""
    return "input" if takes_guidance(net) else "cfg"


def set_guidance(net, labels, w):
    """``labels`` as ``net`` takes them with guidance scale ``w`` (a number or a per-sample [B] tensor): the
    condition's ``extra.guidance`` set to w for a net that takes the scale as input (a UserError for one that does
    not); for other nets an ``extra.guidance`` entry is dropped (it belongs to another net of the run)."""
    if not takes_guidance(net):
        raise UserError("this network does not take the guidance scale as an input (its condition has no "
                        "extra.guidance, as FLUX.1-dev's has): guide it with classifier-free guidance instead")
    if not cond.is_embedding(labels):
        raise UserError("a network that takes the guidance scale as input is conditioned on embeddings: pass a "
                        "Condition")
    return labels.with_extra(guidance=w)


def for_net(net, labels):
    """``labels`` without an ``extra.guidance`` entry when ``net`` does not take one (a w-conditioned student's
    batch given to its CFG-guided teacher)."""
    if cond.is_embedding(labels) and "guidance" in labels.extra and not takes_guidance(net):
        extra = {k: v for k, v in labels.extra.items() if k != "guidance"}
        return replace(labels, extra=extra)
    return labels


def batch_guidance(labels) -> torch.Tensor:
    """The per-sample guidance scales [B] a batch carries (``extra.guidance``: a w-conditioned student's draws)."""
    if not cond.is_embedding(labels) or "guidance" not in labels.extra:
        raise UserError("this batch carries no guidance scale (extra.guidance): the teacher is guided per sample "
                        "only for a w-conditioned student (method.guidance_student)")
    return labels.extra["guidance"]


def guide(net, x: torch.Tensor, sigma, labels, scale, mode: str = "auto") -> torch.Tensor:
    """``net`` at guidance scale ``scale`` — the one rule deciding how. ``mode`` 'auto': a net that takes the scale
    as input (``takes_guidance``) gets it as ``extra.guidance`` in one call (no null branch, no negative prompt);
    any other conditional net runs CFG (``guided_denoise``). 'cfg' / 'input' force one of the two (CFG on a
    guidance-input net keeps the batch's own extra.guidance: FLUX's "true CFG" on top of the embedded scale).
    ``scale``: a number, a per-sample tensor [B], or None = the batch's own per-sample ``extra.guidance``."""
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"guidance mode must be one of {GUIDANCE_MODES}, got {mode!r}")
    if scale is None:
        scale = batch_guidance(labels)
    if mode == "auto":
        mode = guidance_mode(net)
    if mode == "input":
        return net(x, sigma, set_guidance(net, labels, scale))
    return guided_denoise(net, x, sigma, for_net(net, labels), scale)


class GuidedDenoiser(nn.Module):
    """A conditional Denoiser at guidance scale ``scale`` (the sampler sees an ordinary Denoiser): CFG by default
    (``mode='cfg'``), or ``guide``'s other modes ('auto': as input for a net that takes the scale as input;
    'input'). ``scale`` None: each batch's own per-sample ``extra.guidance``. It takes the wrapped net's train /
    eval mode, so wrapping does not change it."""

    def __init__(self, net: nn.Module, scale, mode: str = "cfg"):
        super().__init__()
        if mode not in GUIDANCE_MODES:
            raise ValueError(f"guidance mode must be one of {GUIDANCE_MODES}, got {mode!r}")
        self.net, self.mode = net, mode
        self.scale = None if scale is None else (scale if torch.is_tensor(scale) else float(scale))
        self.training = net.training

    def __getattr__(self, name):   # the wrapped Denoiser's attributes (σ range, shapes, label_dim, …)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["net"], name)

    def forward(self, x, sigma, labels=None):
        if self.mode == "cfg" and self.scale is not None:
            return guided_denoise(self.net, x, sigma, labels, self.scale)
        return guide(self.net, x, sigma, labels, self.scale, self.mode)


def for_sampling(denoiser, w, conditions):
    """(net, conditions, network evaluations per step) to sample ``denoiser`` at guidance scale ``w`` (None: not
    given): a net that takes the scale as input gets w (or, not given, its recorded ``default_guidance``) written
    into every prompt's ``extra.guidance`` — one evaluation per step; without either, the prompts' own
    extra.guidance serves, and prompts without one are refused. Any other net: CFG at w (1 when not given), two
    evaluations per step unless w is 0 or 1."""
    if takes_guidance(denoiser):
        w = getattr(denoiser, "default_guidance", None) if w is None else w
        if w is not None and conditions is not None:
            conditions = conditions.with_extra(guidance=float(w))
        elif conditions is not None and "guidance" not in conditions.extra:
            raise UserError("this network takes the guidance scale as an input (extra.guidance) and the prompts "
                            "carry none: pass --guidance W")
        return denoiser, conditions, 1
    w = 1.0 if w is None else float(w)
    if w == 1.0:
        return denoiser, conditions, 1
    return GuidedDenoiser(denoiser, w), conditions, (1 if w == 0 else 2)
