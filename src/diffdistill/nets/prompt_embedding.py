"""Conditioning this project's own networks (MLP, SongUNet) on prompt embeddings (a `Condition`), the way their
class-label input works: the embedding is mapped to a vector added to the noise embedding. It pools the token
sequence (mean over the tokens the attention mask keeps) instead of attending to it — enough for small teachers
trained here (toy prompts, digits described by a few tokens), not a text-to-image architecture; the diffusers
adapters (``diffusers_cond.py``) bring cross-attention models.

``guidance_embed`` (a w-conditioned student, ``method.guidance_student``): the condition's ``extra.guidance`` [B]
— the guidance scale w the student is asked for — also enters, through `GuidanceEmbedding` (Fourier features of w,
a small MLP whose output layer starts at zero, so the net starts as the same net without it, for every w)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion.condition import Condition


def _xavier(layer: nn.Linear) -> nn.Linear:
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class GuidanceEmbedding(nn.Module):
    """[B, out] from the guidance scale w [B]: features (w/4, sin(f_k·w), cos(f_k·w)) with f_k = π·2^k/8, k = 0..5
    (periods 16 … 0.5 in w), then Linear → SiLU → Linear; the last layer is zero-initialised (output 0 at init)."""

    FREQS = 6

    def __init__(self, out_features: int):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(self.FREQS, dtype=torch.float32) / 8,
                             persistent=False)
        self.fc0 = _xavier(nn.Linear(1 + 2 * self.FREQS, out_features))
        self.fc1 = nn.Linear(out_features, out_features)
        nn.init.zeros_(self.fc1.weight)
        nn.init.zeros_(self.fc1.bias)

    def forward(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        w = w.to(dtype).reshape(-1, 1)
        a = w * self.freqs.to(dtype)
        return self.fc1(F.silu(self.fc0(torch.cat([w / 4, a.sin(), a.cos()], dim=1))))


class PromptEmbedding(nn.Module):
    """[B, out] = W_e·mean_mask(embeds) (+ W_p·pooled); xavier-uniform weights and zero biases (EDM's init of its
    label map), so a teacher trained on embeddings starts like one trained on labels."""

    def __init__(self, embed_dim: int, out_features: int, pooled_dim: int = 0, guidance_embed: bool = False):
        super().__init__()
        self.embed_dim, self.pooled_dim = int(embed_dim), int(pooled_dim)
        self.map_embeds = _xavier(nn.Linear(embed_dim, out_features))
        self.map_pooled = _xavier(nn.Linear(pooled_dim, out_features)) if pooled_dim else None
        self.map_guidance = GuidanceEmbedding(out_features) if guidance_embed else None

    def add_guidance_embedding(self) -> None:
        """Start taking ``extra.guidance`` (a zero-initialised `GuidanceEmbedding` on this module's device and dtype):
        the net's output is unchanged until it is trained."""
        if self.map_guidance is None:
            p = self.map_embeds.weight
            self.map_guidance = GuidanceEmbedding(self.map_embeds.out_features).to(p.device, p.dtype)

    def signature(self, tokens: int) -> dict:
        sig = {"embeds": (tokens, self.embed_dim)}
        if self.pooled_dim:
            sig["pooled"] = (self.pooled_dim,)
        if self.map_guidance is not None:
            sig["extra.guidance"] = ()
        return sig

    def forward(self, c: Condition, dtype: torch.dtype) -> torch.Tensor:
        if not isinstance(c, Condition):
            raise ValueError("this network is conditioned on prompt embeddings: pass a Condition")
        e = c.embeds.to(dtype)
        if c.mask is None:
            pooled_tokens = e.mean(1)
        else:
            m = c.mask.to(dtype).unsqueeze(-1)
            pooled_tokens = (e * m).sum(1) / m.sum(1).clamp_min(1)
        out = self.map_embeds(pooled_tokens)
        if self.map_pooled is not None:
            if c.pooled is None:
                raise ValueError("this network also takes a pooled prompt vector: the Condition has none")
            out = out + self.map_pooled(c.pooled.to(dtype))
        if self.map_guidance is not None:
            if "guidance" not in c.extra:
                raise ValueError("this network is conditioned on the guidance scale (guidance_embed): the Condition "
                                 "needs extra.guidance [B]")
            out = out + self.map_guidance(c.extra["guidance"], dtype)
        return out
