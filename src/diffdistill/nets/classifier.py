"""Small CNN on 1×8×8 digits: the feature extractor behind the digits proxy-FID / KID."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DigitsClassifier(nn.Module):
    """conv3×3(1→32) → conv3×3(32→64) → avgpool 8×8→4×4 → conv3×3(64→64) → flatten(64·4·4) → Linear(1024→64) → SiLU
    = 64-d penultimate feature; Linear(64→10) = logits. Flattening (not global pooling) keeps stroke positions, which
    carry most of the class information at 8×8. SiLU everywhere (no dead units, so the feature covariance stays
    full-rank); no normalisation layers, so train and eval modes compute the same function.

    Input: images in [-1, 1], shape [B, 1, 8, 8].
    """

    num_features = 64

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, [B, 64]."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"DigitsClassifier expects [B, 1, 8, 8] images, got {tuple(x.shape)}")
        h = F.silu(self.conv1(x))
        h = F.avg_pool2d(F.silu(self.conv2(h)), 2)
        h = F.silu(self.conv3(h)).flatten(1)
        return F.silu(self.fc(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, [B, 10]."""
        return self.head(self.features(x))
