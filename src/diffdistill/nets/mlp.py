"""Residual SiLU MLP F(x, c_noise, class_labels) for flat low-dimensional data (2-D toy distributions)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from .checkpointing import ActivationCheckpointing
from .prompt_embedding import PromptEmbedding
from .songunet import Linear, PositionalEmbedding


class MLPBlock(nn.Module):
    """Pre-norm residual block: h + fc1(silu(fc0(silu(LN(h))) + affine(emb)))."""

    def __init__(self, hidden: int, emb_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc0 = Linear(hidden, hidden)
        self.affine = Linear(emb_channels, hidden)
        self.fc1 = Linear(hidden, hidden)

    def forward(self, h, emb):
        return h + self.fc1(F.silu(self.fc0(F.silu(self.norm(h))) + self.affine(emb)))


class MLPDenoiserNet(ActivationCheckpointing, nn.Module):
    """Raw network for EDMPrecond on [B, dim] points; the output layer is zero-initialised, so F ≡ 0 at init.
    ``set_activation_checkpointing()`` checkpoints every residual block."""

    block_types = (MLPBlock,)

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 4, emb_dim: int = 64, label_dim: int = 0,
                 embed_dim: int = 0, pooled_dim: int = 0, guidance_embed: bool = False):
        """``embed_dim`` (> 0, instead of ``label_dim``): conditioned on prompt embeddings (`PromptEmbedding`);
        ``guidance_embed``: also on the guidance scale (the condition's ``extra.guidance``)."""
        super().__init__()
        self.dim, self.label_dim = dim, label_dim
        self.map_noise = PositionalEmbedding(emb_dim, endpoint=True)
        self.map_label = Linear(label_dim, emb_dim) if label_dim else None
        self.map_prompt = PromptEmbedding(embed_dim, emb_dim, pooled_dim, guidance_embed) if embed_dim else None
        self.map_layer0 = Linear(emb_dim, hidden)
        self.map_layer1 = Linear(hidden, hidden)
        self.inp = Linear(dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = Linear(hidden, dim, init_weight=0)

    def forward(self, x, noise_labels, class_labels=None, return_bottleneck: bool = False,
                bottleneck_only: bool = False):
        """F(x, c_noise, y); with ``return_bottleneck=True`` returns ``(F, features)``, ``features`` being the last
        hidden layer ``silu(LN(h))`` of shape [B, hidden] (the input of the zero-initialised output layer);
        ``bottleneck_only=True`` returns the features alone."""
        emb = self.map_noise(noise_labels)
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError(f"this MLPDenoiserNet is class-conditional (label_dim={self.label_dim}): pass "
                                 f"class_labels, one-hot of shape [B, {self.label_dim}]")
            emb = emb + self.map_label(class_labels.to(emb.dtype) * math.sqrt(self.label_dim))
        if self.map_prompt is not None:
            emb = emb + self.map_prompt(class_labels, emb.dtype)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        h = self.inp(x)
        for block in self.blocks:
            h = self.run_block(block, h, emb)
        feats = F.silu(self.out_norm(h))
        if bottleneck_only:
            return feats
        out = self.out(feats)
        return (out, feats) if return_bottleneck else out
