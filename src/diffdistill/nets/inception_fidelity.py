"""Inception-v3 of TensorFlow's ``inception-2015-12-05`` graph in the parameter layout of torch-fidelity's
``FeatureExtractorInceptionV3``, so its weights file (``weights-inception-2015-12-05-6726825d.pth``, a plain state
dict) loads with every key and shape checked. Independent implementation; torch-fidelity is not needed.

Facts taken from torch-fidelity (toshas/torch-fidelity, Apache-2.0, ``feature_extractor_inceptionv3.py``,
``interpolate_compat_tensorflow.py``, ``utils/util_convert_inception_weights.py``):

- Input uint8 RGB [B, 3, H, W] at any size → float32 → resized to 299×299 with TensorFlow 1.x's bilinear resize
  (``align_corners=False``: source coordinate i·(in/out) in float32, no half-pixel offset, no antialiasing) →
  (x − 128)/128, i.e. [−1, 0.9921875].
- Units: conv (no bias) → BatchNorm (eps 1e-3, running statistics) → ReLU. Keys ``<unit>.conv.weight``,
  ``<unit>.bn.{weight,bias,running_mean,running_var}``. The converted file has no ``num_batches_tracked`` buffers
  (they are accepted when present: a ``state_dict()`` of the module has them; they do not change eval outputs).
- Stem ``Conv2d_1a_3x3`` (3→32, s2) ``Conv2d_2a_3x3`` (32→32) ``Conv2d_2b_3x3`` (32→64, pad 1) max-pool 3/2
  ``Conv2d_3b_1x1`` (64→80) ``Conv2d_4a_3x3`` (80→192) max-pool 3/2; blocks ``Mixed_5b…5d`` (A), ``Mixed_6a`` (B),
  ``Mixed_6b…6e`` (C, 7×7 width 128/160/160/192), ``Mixed_7a`` (D), ``Mixed_7b``/``Mixed_7c`` (E); TF patches: the
  average-pool branches exclude the zero padding from the mean, and ``Mixed_7c``'s pool branch is a max-pool.
- Taps: '64' / '192' (spatial means after the two stem max-pools), '768' (after ``Mixed_6e``), '2048' (global
  average pool after ``Mixed_7c``: the FID / KID / precision-recall features), 'logits_unbiased' (pool · fcᵀ, the
  Inception-Score input), 'logits' (+ fc bias); ``fc`` is 2048 → 1008 (the TF graph's 1008 classes). All float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 299
LAYERS = ("64", "192", "768", "2048", "logits_unbiased", "logits")


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TensorFlow 1.x ``resize_bilinear(align_corners=False)`` of float [B, C, H, W] to ``size`` (as torch-fidelity).

    Output pixel i reads source coordinate s = i·(in/out) (scale and product in float32, like TF's kernel):
    lo = ⌊s⌋, hi = min(lo + 1, in − 1), w = s − lo; columns are blended first, then rows, each as a + (b − a)·w.
    Unlike ``F.interpolate(mode='bilinear')`` there is no half-pixel centre offset and no antialiasing; at equal
    sizes it is the identity."""
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"resize_bilinear_tf1 needs a float [B, C, H, W] tensor, got {x.dtype} {tuple(x.shape)}")

    def taps(n_in: int, n_out: int):
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        s = torch.arange(n_out, dtype=x.dtype, device=x.device) * scale.to(x.device)
        lo = s.long()  # s ≥ 0: truncation is floor
        return lo, (lo + 1).clamp_max(n_in - 1), s - lo.to(s.dtype)

    (y0, y1, wy), (x0, x1, wx) = taps(x.shape[2], size[0]), taps(x.shape[3], size[1])
    top, bottom = x[:, :, y0], x[:, :, y1]
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * wx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * wx
    return top + (bottom - top) * wy[:, None]


class ConvBN(nn.Module):
    """conv (no bias) → BatchNorm(eps 1e-3) → ReLU; "same" padding for stride 1 unless ``padding`` is given."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=None):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        if padding is None:
            padding = (kh // 2, kw // 2) if stride == 1 else 0
        self.conv = nn.Conv2d(cin, cout, (kh, kw), stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class Mixed(nn.Module):
    """One Inception block from a spec. ``towers``: chains of (name, channels, kernel, stride) units run in sequence,
    optionally ending in a ``fork`` of two units applied to the same input and concatenated (the E blocks' 1×3 /
    3×1 split); ``pool``: 'avg' (3×3, stride 1, padding excluded from the mean), 'max' (3×3, stride 1) or 'max/2'
    (3×3, stride 2, no projection); ``pool_proj``: channels of the 1×1 ``branch_pool`` unit after the pool.
    Output: towers in order, then the pool branch, concatenated on channels."""

    def __init__(self, cin: int, towers: list, pool: str, pool_proj: int | None = None):
        super().__init__()
        self.towers, self.pool = [], pool
        for chain, fork in towers:
            c, names = cin, []
            for name, cout, k, s in chain:
                self.add_module(name, ConvBN(c, cout, k, s))
                names.append(name)
                c = cout
            fork_names = []
            for name, cout, k in fork or ():
                self.add_module(name, ConvBN(c, cout, k))
                fork_names.append(name)
            self.towers.append((names, fork_names))
        self.branch_pool = ConvBN(cin, pool_proj, 1) if pool_proj else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for names, fork in self.towers:
            h = x
            for name in names:
                h = getattr(self, name)(h)
            out.append(torch.cat([getattr(self, n)(h) for n in fork], 1) if fork else h)
        if self.pool == "avg":
            p = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        elif self.pool == "max":
            p = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            p = F.max_pool2d(x, 3, stride=2)
        out.append(self.branch_pool(p) if self.branch_pool is not None else p)
        return torch.cat(out, 1)


def block_a(cin: int, pool_features: int) -> Mixed:  # 35×35: 64 + 64 + 96 + pool_features channels
    return Mixed(cin, [([("branch1x1", 64, 1, 1)], None),
                       ([("branch5x5_1", 48, 1, 1), ("branch5x5_2", 64, 5, 1)], None),
                       ([("branch3x3dbl_1", 64, 1, 1), ("branch3x3dbl_2", 96, 3, 1), ("branch3x3dbl_3", 96, 3, 1)],
                        None)], "avg", pool_features)


def block_b(cin: int) -> Mixed:  # 35 → 17: 384 + 96 + cin
    return Mixed(cin, [([("branch3x3", 384, 3, 2)], None),
                       ([("branch3x3dbl_1", 64, 1, 1), ("branch3x3dbl_2", 96, 3, 1), ("branch3x3dbl_3", 96, 3, 2)],
                        None)], "max/2")


def block_c(cin: int, c7: int) -> Mixed:  # 17×17: 4 × 192; factorised 7×7 convolutions of width c7
    return Mixed(cin, [([("branch1x1", 192, 1, 1)], None),
                       ([("branch7x7_1", c7, 1, 1), ("branch7x7_2", c7, (1, 7), 1), ("branch7x7_3", 192, (7, 1), 1)],
                        None),
                       ([("branch7x7dbl_1", c7, 1, 1), ("branch7x7dbl_2", c7, (7, 1), 1),
                         ("branch7x7dbl_3", c7, (1, 7), 1), ("branch7x7dbl_4", c7, (7, 1), 1),
                         ("branch7x7dbl_5", 192, (1, 7), 1)], None)], "avg", 192)


def block_d(cin: int) -> Mixed:  # 17 → 8: 320 + 192 + cin
    return Mixed(cin, [([("branch3x3_1", 192, 1, 1), ("branch3x3_2", 320, 3, 2)], None),
                       ([("branch7x7x3_1", 192, 1, 1), ("branch7x7x3_2", 192, (1, 7), 1),
                         ("branch7x7x3_3", 192, (7, 1), 1), ("branch7x7x3_4", 192, 3, 2)], None)], "max/2")


def block_e(cin: int, pool: str) -> Mixed:  # 8×8: 320 + 768 + 768 + 192 = 2048
    split = lambda p: [(f"{p}a", 384, (1, 3)), (f"{p}b", 384, (3, 1))]  # noqa: E731
    return Mixed(cin, [([("branch1x1", 320, 1, 1)], None),
                       ([("branch3x3_1", 384, 1, 1)], split("branch3x3_2")),
                       ([("branch3x3dbl_1", 448, 1, 1), ("branch3x3dbl_2", 384, 3, 1)], split("branch3x3dbl_3"))],
                 pool, 192)


class InceptionV3Fidelity(nn.Module):
    """torch-fidelity's InceptionV3: ``forward(uint8 [B, 3, H, W], layers)`` → {layer: float32 [B, D]} for the
    requested taps of `LAYERS` (stops after the deepest one); ``features(x)`` = the 2048-d pool features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3, padding=0)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3, padding=0)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = block_a(192, 32), block_a(256, 64), block_a(288, 64)
        self.Mixed_6a = block_b(288)
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (block_c(768, c) for c in (128, 160, 160, 192))
        self.Mixed_7a = block_d(768)
        self.Mixed_7b, self.Mixed_7c = block_e(1280, "avg"), block_e(2048, "max")
        self.fc = nn.Linear(2048, 1008)
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor, layers=("2048",)) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionV3Fidelity takes uint8 [B, 3, H, W] images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        unknown = set(layers) - set(LAYERS)
        if unknown or not layers:
            raise ValueError(f"layers must be among {LAYERS}, got {tuple(layers)}")
        last = max(LAYERS.index(n) for n in layers)
        taps, gap = {}, lambda h: h.mean(dim=(2, 3))  # noqa: E731  global average pool

        x = resize_bilinear_tf1(images.to(torch.float32), (INPUT_SIZE, INPUT_SIZE))
        x = (x - 128) / 128
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, stride=2)  # 64×73×73
        taps["64"] = gap(x)
        if last > 0:
            x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # 192×35×35
            taps["192"] = gap(x)
        if last > 1:
            for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                          self.Mixed_6d, self.Mixed_6e):
                x = block(x)
            taps["768"] = gap(x)  # 768×17×17
        if last > 2:
            x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # 2048×8×8
            taps["2048"] = gap(x)
        if last > 3:
            taps["logits_unbiased"] = taps["2048"] @ self.fc.weight.T
            taps["logits"] = taps["logits_unbiased"] + self.fc.bias
        return {n: taps[n].float() for n in layers}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """2048-d pool features [B, 2048] (torch-fidelity's default layer for FID, KID and precision/recall)."""
        return self(images, ("2048",))["2048"]


def fidelity_state_dict_problems(net: nn.Module, state: dict) -> list[str]:
    """Differences between a state dict and ``net``'s own (missing keys, unexpected keys, shape mismatches), each
    as a short phrase, in key order; ``num_batches_tracked`` buffers may be absent or present."""
    want = {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    have = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    problems = [f"missing {k}" for k in want if k not in have]
    problems += [f"unexpected {k}" for k in have if k not in want]
    for k, shape in want.items():
        v = have.get(k)
        if v is None:
            continue
        if not isinstance(v, torch.Tensor):
            problems.append(f"{k} is a {type(v).__name__}, not a tensor")
        elif v.shape != shape:
            problems.append(f"{k} has shape {list(v.shape)}, expected {list(shape)}")
    return problems


def load_fidelity_weights(net: "InceptionV3Fidelity", state: dict) -> None:
    """Copy a checked state dict (see `fidelity_state_dict_problems`) into ``net``; BatchNorm counters stay."""
    full = net.state_dict()
    full.update({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")})
    net.load_state_dict(full, strict=True)
