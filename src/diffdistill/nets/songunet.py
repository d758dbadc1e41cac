"""DDPM++ U-Net (Song et al. 2021) with parameter and buffer names laid out like NVlabs/edm's ``SongUNet``.

Module tree, state-dict keys, initialisation (including the order in which the global RNG is consumed) and
forward math follow the EDM reimplementation, so an EDM ``SongUNet`` state dict loads with ``strict=True``.
Independent implementation. Encoders: 'standard' (DDPM++), 'residual' (NCSN++) and 'skip'; decoders: 'standard'
and 'skip' (EDM's options).

Naming notes: ``Conv2d.resample_filter`` is an ordinary (persistent) buffer that exists only on up/down-sampling
convs (for the others it is registered as ``None`` and therefore absent from the state dict).
``GroupNorm`` uses min(32, C // 4) groups.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpointing import ActivationCheckpointing
from .prompt_embedding import PromptEmbedding


def weight_init(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random tensor for the named init scheme (uniform draws are scaled from U(-1, 1), normal from N(0, 1))."""
    if mode == 'xavier_uniform':
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}")


class Linear(nn.Module):
    """Fully-connected layer: y = x Wᵀ + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = 'kaiming_normal',
                 init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kw = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **kw) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **kw) * init_bias) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """k×k convolution (k = 0: none) with optional 2× FIR up- or down-sampling applied before it; with
    ``fused_resample`` the upsampling comes before and the downsampling after the convolution, with the padding
    split between the two (NCSN++'s resampling convs)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False,
                 init_mode: str = 'kaiming_normal', init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        super().__init__()
        self.in_channels, self.out_channels, self.up, self.down = in_channels, out_channels, up, down
        self.fused_resample = fused_resample
        kw = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **kw) * init_weight) \
            if kernel else None
        self.bias = nn.Parameter(weight_init([out_channels], **kw) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum() ** 2  # separable, normalised 2-D filter [1, 1, k, k]
        self.register_buffer('resample_filter', f if up or down else None)

    def resample_input(self, x):
        """``x`` after this layer's FIR up- or down-sampling, i.e. what its convolution sees (``x`` itself for a layer
        without resampling). Not defined for fused resampling, where the convolution sits between the two."""
        f = self.resample_filter
        if f is None:
            return x
        if self.fused_resample and self.weight is not None:
            raise ValueError("a fused-resampling Conv2d has no separate resampled input")
        f = f.to(x.dtype)
        pad, C = (f.shape[-1] - 1) // 2, self.in_channels
        if self.up:
            return F.conv_transpose2d(x, (4 * f).tile(C, 1, 1, 1), groups=C, stride=2, padding=pad)
        return F.conv2d(x, f.tile(C, 1, 1, 1), groups=C, stride=2, padding=pad)

    def forward(self, x):
        f = self.resample_filter
        w = None if self.weight is None else self.weight.to(x.dtype)
        if f is not None and self.fused_resample and w is not None:
            f = f.to(x.dtype)
            f_pad, w_pad = (f.shape[-1] - 1) // 2, w.shape[-1] // 2
            if self.up:
                x = F.conv_transpose2d(x, (4 * f).tile(self.in_channels, 1, 1, 1), groups=self.in_channels,
                                       stride=2, padding=max(f_pad - w_pad, 0))
                x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
            else:
                x = F.conv2d(x, w, padding=w_pad + f_pad)
                x = F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
            return x if self.bias is None else x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        x = self.resample_input(x)
        if w is not None:
            x = F.conv2d(x, w, padding=w.shape[-1] // 2)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with min(num_groups, C // min_channels_per_group) groups."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """Residual block: GN-SiLU-conv, embedding injection, GN-SiLU-dropout-conv, skip; then optional self-attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: Optional[int] = None, channels_per_head: int = 64,
                 dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5, resample_filter=(1, 1),
                 resample_proj: bool = False, adaptive_scale: bool = True, init: dict = None,
                 init_zero: dict = None, init_attn: Optional[dict] = None):
        super().__init__()
        init = {} if init is None else init
        init_zero = dict(init_weight=0) if init_zero is None else init_zero
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = 0 if not attention else out_channels // channels_per_head if num_heads is None else num_heads
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        rs = dict(resample_filter=resample_filter)

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, **rs, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            k = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, k, up=up, down=down, **rs, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        p = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = p.chunk(2, dim=1)
            h = F.silu(self.norm1(h) * (scale + 1) + shift)
        else:
            h = F.silu(self.norm1(h + p))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        if self.num_heads:
            B, C, H, W = x.shape
            # channel layout of qkv: (head, channel-in-head, {q,k,v}) -- fixed by the checkpoint format
            q, k, v = self.qkv(self.norm2(x)).reshape(B * self.num_heads, C // self.num_heads, 3, H * W).unbind(2)
            w = torch.einsum('ncq,nck->nqk', q.float(), k.float() / math.sqrt(k.shape[1])).softmax(dim=2)
            a = torch.einsum('nqk,nck->ncq', w.to(v.dtype), v).reshape(B, C, H, W)
            x = (self.proj(a) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding [cos(x·ω_i), sin(x·ω_i)], ω_i = max_positions^(−i/(n/2 − endpoint))."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        x = torch.outer(x, ((1 / self.max_positions) ** freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2π x f_i), sin(2π x f_i)], f_i ~ N(0, scale²) (buffer ``freqs``)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class SongUNet(ActivationCheckpointing, nn.Module):
    """DDPM++ U-Net F(x, c_noise, class_labels) with EDM's ``SongUNet`` layout (``enc``/``dec`` ModuleDicts keyed
    ``{res}x{res}_{conv,down,block<i>,in0,in1,up,aux_norm,aux_conv}``, mapping network ``map_*``).

    ``forward(..., return_bottleneck=True)`` returns ``(out, bottleneck)``, where ``bottleneck`` is the activation
    after the last encoder block (``[B, model_channels·channel_mult[-1], R/2^(L-1), R/2^(L-1)]``), e.g. for a GAN head;
    ``bottleneck_only=True`` returns the bottleneck alone and skips the decoder. With
    ``set_activation_checkpointing()`` every encoder and decoder `UNetBlock` is checkpointed (a decoder block
    together with its skip concatenation, so the concatenated tensor is recomputed rather than kept).
    """

    block_types = (UNetBlock,)

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0, embedding_type: str = 'positional',
                 channel_mult_noise: int = 1, encoder_type: str = 'standard', decoder_type: str = 'standard',
                 resample_filter: Sequence[int] = (1, 1), embed_dim: int = 0, pooled_dim: int = 0,
                 guidance_embed: bool = False):
        if embedding_type not in ('positional', 'fourier'):
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {embedding_type!r}")
        if encoder_type not in ('standard', 'skip', 'residual') or decoder_type not in ('standard', 'skip'):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual' and decoder_type 'standard' or "
                             f"'skip', got encoder_type={encoder_type!r}, decoder_type={decoder_type!r}")
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1}")
        super().__init__()
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.label_dropout = label_dim, label_dropout
        emb_channels, noise_channels = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=math.sqrt(0.2))
        blk = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                   resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                   init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network: noise (+ label, + augment) embedding -> emb_channels.
        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == 'positional' \
            else FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        # embed_dim > 0: conditioned on prompt embeddings instead (this project's addition, not EDM's)
        self.map_prompt = PromptEmbedding(embed_dim, noise_channels, pooled_dim,
                                          guidance_embed) if embed_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. 'skip'/'residual' add an auxiliary path from the input image, resampled to every level.
        self.enc = nn.ModuleDict()
        c = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f'{res}x{res}_conv'] = Conv2d(c, model_channels, 3, **init)
                c = model_channels
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(c, c, down=True, **blk)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(caux, caux, 0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(caux, c, 1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(caux, c, 3, down=True, resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = c
            for i in range(num_blocks):
                self.enc[f'{res}x{res}_block{i}'] = UNetBlock(c, model_channels * mult,
                                                              attention=res in attn_resolutions, **blk)
                c = model_channels * mult
        skips = [m.out_channels for name, m in self.enc.items() if 'aux' not in name]

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
                self.dec[f'{res}x{res}_block{i}'] = UNetBlock(
                    c + skips.pop(), model_channels * mult, attention=i == num_blocks and res in attn_resolutions,
                    **blk)
                c = model_channels * mult
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(out_channels, out_channels, 0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(c, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(c, out_channels, 3, **init_zero)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, return_bottleneck: bool = False,
                bottleneck_only: bool = False):
        # Mapping.
        emb = self.map_noise(noise_labels)
        emb = torch.cat(emb.chunk(2, dim=1)[::-1], dim=1)  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError(f"this SongUNet is class-conditional (label_dim={self.label_dim}): pass "
                                 f"class_labels, one-hot of shape [B, {self.label_dim}]")
            y = class_labels.to(emb.dtype)
            if self.training and self.label_dropout:
                y = y * (torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout).to(y.dtype)
            emb = emb + self.map_label(y * math.sqrt(self.map_label.in_features))
        if self.map_prompt is not None:
            emb = emb + self.map_prompt(class_labels, emb.dtype)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        # Encoder: every output (including the stem conv and the down blocks) is kept for a skip connection; the
        # auxiliary image path replaces the last kept output in place.
        skips, aux = [], x
        for name, m in self.enc.items():
            if 'aux_down' in name:
                aux = m(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + m(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + m(aux)) / math.sqrt(2)
            else:
                x = m(x) if name.endswith('_conv') else self.run_block(m, x, emb)
                skips.append(x)
        bottleneck = x
        if bottleneck_only:  # e.g. a GAN head on a fake-score net: the decoder's work would be thrown away
            return bottleneck

        # Decoder: `block<i>` modules take the concatenation with the matching encoder output; the output is the
        # sum of the aux_conv heads ('skip': one per level, upsampled along; 'standard': level 0 only).
        out = h = None
        for name, m in self.dec.items():
            if name.endswith('aux_up'):
                out = m(out)
            elif name.endswith('aux_norm'):
                h = m(x)
            elif name.endswith('aux_conv'):
                h = m(F.silu(h))
                out = h if out is None else h + out
            elif '_block' in name:
                x = self.run_block(m, x, skips.pop(), emb, fn=_cat_block)
            else:
                x = self.run_block(m, x, emb)
        return (out, bottleneck) if return_bottleneck else out


def _cat_block(block, x, skip, emb):
    """A decoder block on the concatenation with its encoder skip (one function, so a checkpoint recomputes the
    concatenation instead of keeping it)."""
    return block(torch.cat([x, skip], dim=1), emb)


def digits_unet_config() -> dict:
    """Default SongUNet kwargs for 8×8×1 digits: 427,361 parameters (+ 352 with ``label_dim=10``).

    Constant width (channel_mult (1, 1)): with (1, 2) the same depth would have ~1.03 M parameters.
    """
    return dict(img_resolution=8, in_channels=1, out_channels=1, model_channels=32, channel_mult=(1, 1),
                channel_mult_emb=4, num_blocks=2, attn_resolutions=(4,), dropout=0.0)
