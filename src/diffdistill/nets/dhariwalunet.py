"""ADM U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs") with NVlabs/edm's ``DhariwalUNet`` layout.

Parameter and buffer names, module order and the forward math follow EDM's reimplementation (EDM's ImageNet-64
teacher is ``EDMPrecond`` around this network: model_channels 192, channel_mult (1, 2, 3, 4), 3 blocks per level,
attention at 32/16/8, one-hot labels of dimension 1000), so an EDM ``DhariwalUNet`` state dict loads with
``strict=True``. Independent implementation built from this package's SongUNet layers.

Differences from SongUNet that the weights depend on: the noise embedding is positional without the sin/cos swap
and without endpoint; the label embedding (no bias) is added after ``map_layer1``; blocks use adaptive scale/shift,
GroupNorm eps 1e-5, skip scale 1, 64 channels per attention head, and the output head is ``out_norm``/``out_conv``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpointing import ActivationCheckpointing
from .songunet import Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock, _cat_block


class DhariwalUNet(ActivationCheckpointing, nn.Module):
    """ADM U-Net F(x, c_noise, class_labels) keyed like EDM (``enc``/``dec`` ModuleDicts ``{res}x{res}_{conv,down,
    block<i>,in0,in1,up}``, ``map_noise``/``map_layer0``/``map_layer1``/``map_label``/``map_augment``, ``out_norm``,
    ``out_conv``). ``return_bottleneck``/``bottleneck_only`` and ``set_activation_checkpointing()`` (every encoder and decoder
    block) as in `SongUNet`."""

    block_types = (UNetBlock,)

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0):
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1}")
        super().__init__()
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.label_dropout = label_dim, label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        blk = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Mapping network (construction order = EDM's, so seeded initialisations agree).
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal',
                                init_weight=math.sqrt(label_dim)) if label_dim else None

        # Encoder.
        self.enc = nn.ModuleDict()
        c = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f'{res}x{res}_conv'] = Conv2d(c, model_channels * mult, 3, **init)
                c = model_channels * mult
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(c, c, down=True, **blk)
            for i in range(num_blocks):
                self.enc[f'{res}x{res}_block{i}'] = UNetBlock(c, model_channels * mult,
                                                              attention=res in attn_resolutions, **blk)
                c = model_channels * mult
        skips = [m.out_channels for m in self.enc.values()]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(c, c, attention=True, **blk)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(c, c, **blk)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(c, c, up=True, **blk)
            for i in range(num_blocks + 1):
                self.dec[f'{res}x{res}_block{i}'] = UNetBlock(c + skips.pop(), model_channels * mult,
                                                              attention=res in attn_resolutions, **blk)
                c = model_channels * mult
        self.out_norm = GroupNorm(c)
        self.out_conv = Conv2d(c, out_channels, 3, **init_zero)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, return_bottleneck: bool = False,
                bottleneck_only: bool = False):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError(f"this DhariwalUNet is class-conditional (label_dim={self.label_dim}): pass "
                                 f"class_labels, one-hot of shape [B, {self.label_dim}]")
            y = class_labels.to(emb.dtype)
            if self.training and self.label_dropout:
                y = y * (torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout).to(y.dtype)
            emb = emb + self.map_label(y)
        emb = F.silu(emb)

        skips = []
        for name, m in self.enc.items():
            x = m(x) if name.endswith('_conv') else self.run_block(m, x, emb)
            skips.append(x)
        bottleneck = x
        if bottleneck_only:
            return bottleneck
        for name, m in self.dec.items():
            x = (self.run_block(m, x, skips.pop(), emb, fn=_cat_block) if "_block" in name
                 else self.run_block(m, x, emb))
        out = self.out_conv(F.silu(self.out_norm(x)))
        return (out, bottleneck) if return_bottleneck else out
