"""The in-memory `Dataset` every loader returns.

Conventions (shared by trainers, teachers and the evaluator):

* images: ``x`` is float32 ``[N, C, H, W]`` in ``[-1, 1]`` with ``C`` in {1, 3};
* points: ``x`` is float32 ``[N, 2]``, standardised to a per-coordinate std of about 0.5 (EDM's σ_data) by fixed,
  documented constants of each generator (see :mod:`diffdistill.data.toy2d`), not by the sample's own statistics;
* latents: float32 ``[N, C, ...]`` of any channel count and range (a VAE's encodings, ``kind='latents'``);
* labels: optional int64 ``[N]`` in ``[0, num_classes)``; ``num_classes`` is 0 for unlabelled data;
* conditions: optional `Condition` of N rows (each sample's encoded prompt), instead of labels.

``ds[i]`` returns ``(x_i, y_i)`` with ``y_i`` the float32 one-hot label of size ``num_classes`` (an empty tensor when
unlabelled), so the default ``DataLoader`` collate gives ``([B, ...], [B, num_classes])`` either way.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from diffdistill.diffusion.condition import Condition
from diffdistill.errors import UserError

_RANGE_TOL = 1e-4


class Dataset(torch.utils.data.Dataset):
    """Samples ``x`` (images or 2-D points) with optional integer class labels, all held in memory.

    ``class_names`` (optional, e.g. the folder names of an image folder) maps label k to ``class_names[k]``.
    """

    def __init__(self, x, labels=None, num_classes: Optional[int] = None, kind: Optional[str] = None,
                 name: str = "dataset", class_names: Optional[Sequence[str]] = None,
                 conditions: Optional[Condition] = None):
        x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(torch.float32).contiguous()
        kind = kind or {2: "points", 4: "images"}.get(x.ndim)
        if kind not in ("points", "images", "latents"):
            raise UserError(f"{name}: data of shape {tuple(x.shape)} is neither points [N, 2] nor images [N, C, H, W]; "
                            "reshape it to one of these layouts")
        if len(x) == 0:
            raise UserError(f"{name}: the dataset is empty; provide at least one sample")
        if conditions is not None:
            if labels is not None:
                raise UserError(f"{name}: give class labels or prompt embeddings, not both")
            if len(conditions) != len(x):
                raise UserError(f"{name}: {len(conditions)} prompt embeddings for {len(x)} samples; give one per "
                                f"sample")
        if kind == "latents":
            if x.ndim < 3:
                raise UserError(f"{name}: latents must have shape [N, C, H, W] (or [N, C, F, H, W]), got "
                                f"{tuple(x.shape)}")
            if not torch.isfinite(x).all():
                raise UserError(f"{name}: the latents hold NaN or inf values; re-encode them")
        elif kind == "images":
            if x.ndim != 4:
                raise UserError(f"{name}: images must have shape [N, C, H, W], got {tuple(x.shape)}; add the missing axes")
            if x.shape[1] not in (1, 3):
                raise UserError(f"{name}: images have {x.shape[1]} channels; only 1 (greyscale) or 3 (RGB) are supported, "
                                "convert them first")
            lo, hi = float(x.min()), float(x.max())
            if lo < -1 - _RANGE_TOL or hi > 1 + _RANGE_TOL:
                raise UserError(f"{name}: image values span [{lo:.4g}, {hi:.4g}], outside [-1, 1]; rescale them "
                                "(e.g. x / 127.5 - 1 for 0..255 pixels)")
        elif x.ndim != 2:
            raise UserError(f"{name}: points must have shape [N, D], got {tuple(x.shape)}")
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
            if labels.is_floating_point() and not torch.equal(labels, labels.round()):
                raise UserError(f"{name}: labels must be integers, got non-integer values; map them to 0..K-1")
            labels = labels.to(torch.int64).reshape(-1)
            if len(labels) != len(x):
                raise UserError(f"{name}: {len(labels)} labels for {len(x)} samples; give exactly one label per sample")
            lo, hi = int(labels.min()), int(labels.max())
            num_classes = hi + 1 if num_classes is None else int(num_classes)
            if lo < 0 or hi >= num_classes:
                raise UserError(f"{name}: labels out of range: found {lo}..{hi}, expected 0..{num_classes - 1}; "
                                "renumber them as 0..K-1")
        self.x, self.labels, self.kind, self.name = x, labels, kind, name
        self.num_classes = int(num_classes) if labels is not None else 0
        self.class_names = list(class_names) if class_names is not None and labels is not None else None
        self.conditions = conditions

    # ---- basic protocol -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        if self.labels is None:
            return self.x[i], torch.zeros(0)
        return self.x[i], F.one_hot(self.labels[i], self.num_classes).to(torch.float32)

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, kind={self.kind!r}, n={len(self)}, sample_shape={self.sample_shape}, "
                f"num_classes={self.num_classes}, prompts={self.conditions is not None})")

    @property
    def sample_shape(self) -> Tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def channels(self) -> int:
        """Image channels (C); for points, the dimension D."""
        return self.sample_shape[0]

    @property
    def resolution(self) -> int:
        """Image side length for square images (0 for points); raises for non-square images."""
        if self.kind == "points":
            return 0
        if len(self.sample_shape) != 3:
            raise UserError(f"{self.name}: samples of shape {self.sample_shape} have no single resolution")
        h, w = self.sample_shape[1:]
        if h != w:
            raise UserError(f"{self.name}: images are {h}x{w}, not square; crop or resize them to a square size")
        return h

    # ---- batches and subsets -------------------------------------------------------------------------------------
    def onehot(self, idx=None) -> torch.Tensor:
        """Float32 one-hot labels ``[n, num_classes]`` (``[n, 0]`` when unlabelled) for ``idx`` (all if None)."""
        n = len(self) if idx is None else len(torch.as_tensor(idx).reshape(-1))
        if self.labels is None:
            return torch.zeros(n, 0)
        lab = self.labels if idx is None else self.labels[torch.as_tensor(idx).reshape(-1)]
        return F.one_hot(lab, self.num_classes).to(torch.float32)

    def batch(self, idx) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(x[idx], onehot[idx])`` without going through a DataLoader."""
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        return self.x[idx], self.onehot(idx)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """A random batch of ``n`` samples drawn with replacement."""
        return self.batch(torch.randint(len(self), (n,), generator=generator))

    def subset(self, idx: Union[Sequence[int], torch.Tensor], name: Optional[str] = None) -> "Dataset":
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        return Dataset(self.x[idx], None if self.labels is None else self.labels[idx],
                       num_classes=self.num_classes if self.labels is not None else None, kind=self.kind,
                       name=name or self.name, class_names=self.class_names,
                       conditions=None if self.conditions is None else self.conditions.rows(idx))

    def split(self, frac_or_n: Union[float, int], seed: int = 0) -> Tuple["Dataset", "Dataset"]:
        """Deterministic random split into ``(train, heldout)``.

        ``frac_or_n`` sizes the held-out part: a float in (0, 1) is a fraction of the data (rounded), an int a count.
        The same ``seed`` always gives the same split; both parts keep the original order of their samples.
        """
        n = len(self)
        if isinstance(frac_or_n, float):
            if not 0 < frac_or_n < 1:
                raise UserError(f"{self.name}: held-out fraction must lie in (0, 1), got {frac_or_n}; "
                                "pass a fraction like 0.1 or an integer count")
            k = int(round(frac_or_n * n))
        else:
            k = int(frac_or_n)
        if not 0 < k < n:
            raise UserError(f"{self.name}: cannot hold out {k} of {n} samples; choose between 1 and {n - 1}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        held, train = perm[:k].sort().values, perm[k:].sort().values
        return self.subset(train, f"{self.name}[train]"), self.subset(held, f"{self.name}[heldout]")
