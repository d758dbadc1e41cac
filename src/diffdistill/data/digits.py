"""scikit-learn's handwritten digits (ships with sklearn, no download): 1,797 greyscale 8×8 images, labels 0–9.

Pixels are 17 grey levels 0..16, mapped to [-1, 1] by x/8 − 1; images are float32 ``[N, 1, 8, 8]``.
"""

from __future__ import annotations

from typing import Tuple

import torch

from diffdistill.data.base import Dataset

DIGITS_HELDOUT = 297  # default held-out size: leaves a round 1,500 training images


def load_digits_dataset() -> Dataset:
    """All 1,797 digits as a labelled Dataset (``num_classes=10``, ``name='digits'``)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8 - 1
    return Dataset(x, torch.as_tensor(bunch.target, dtype=torch.int64), num_classes=10, kind="images", name="digits")


def digits_split(heldout: int = DIGITS_HELDOUT, seed: int = 0) -> Tuple[Dataset, Dataset]:
    """Deterministic ``(train, heldout)`` split of the digits (default 1,500 / 297)."""
    return load_digits_dataset().split(heldout, seed=seed)
