"""Conditioning this project's own networks (MLP, SongUNet) on prompt embeddings (a `Condition`), the way their
class-label input works: the embedding is mapped to a vector added to the noise embedding. It pools the token
sequence (mean over the tokens the attention mask keeps) instead of attending to it — enough for small teachers
trained here (toy prompts, digits described by a few tokens), not a text-to-image architecture; the diffusers
adapters (``diffusers_cond.py``) bring cross-attention models."""

from __future__ import annotations

import torch
from torch import nn

from ..diffusion.condition import Condition


def _xavier(layer: nn.Linear) -> nn.Linear:
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class PromptEmbedding(nn.Module):
    """[B, out] = W_e·mean_mask(embeds) (+ W_p·pooled); xavier-uniform weights and zero biases (EDM's init of its
    label map), so a teacher trained on embeddings starts like one trained on labels."""

    def __init__(self, embed_dim: int, out_features: int, pooled_dim: int = 0):
        super().__init__()
        self.embed_dim, self.pooled_dim = int(embed_dim), int(pooled_dim)
        self.map_embeds = _xavier(nn.Linear(embed_dim, out_features))
        self.map_pooled = _xavier(nn.Linear(pooled_dim, out_features)) if pooled_dim else None

    def signature(self, tokens: int) -> dict:
        sig = {"embeds": (tokens, self.embed_dim)}
        if self.pooled_dim:
            sig["pooled"] = (self.pooled_dim,)
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
        return out
