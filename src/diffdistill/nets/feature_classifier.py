"""Frozen classifiers whose features CFD and RDD match (not the proxy-FID network, so the distillation cannot tune
to the metric).

A CFD/RDD classifier is any ``nn.Module`` with

* ``forward_features(x) -> [B, C, H, W]`` — the final spatial feature map (post-activation, as DenseNet's final
  BN + ReLU), or ``[B, C]`` for flat features (treated as a 1×1 map);
* optionally ``forward_head(pooled [B, C]) -> logits [B, K]`` — needed only by CFD's dataset-oriented loss (β > 0).

The pooled feature vector is the spatial mean of the map (global average pooling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DigitsFeatureCNN(nn.Module):
    """CFD/RDD feature classifier for 1×8×8 digits, a small DenseNet-/ResNet-style CNN with BatchNorm and ReLU:

    conv3×3(1→32)·BN·ReLU → conv3×3(32→32)·BN·ReLU → avgpool 8→4 → conv3×3(32→64)·BN·ReLU → conv3×3(64→64)·BN·ReLU
    = final map [B, 64, 4, 4] (post-ReLU, like DenseNet-201's 1920×4×4 at 32 px) → global average pool → 64-d feature
    → Linear(64→10) logits.

    Deliberately unlike the proxy-FID ``DigitsClassifier`` (SiLU, no normalisation, flattened 64-d features): other
    layers, other non-linearity, pooled features, and another training seed/optimiser. Input in [−1, 1].
    """

    num_features = 64

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.conv1, self.bn1 = nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.conv2, self.bn2 = nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.conv3, self.bn3 = nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w)
        self.conv4, self.bn4 = nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w)
        self.fc = nn.Linear(2 * w, num_classes)
        self.num_features = 2 * w

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final feature map [B, 64, 4, 4] (post-ReLU)."""
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.avg_pool2d(F.relu(self.bn2(self.conv2(h))), 2)
        h = F.relu(self.bn3(self.conv3(h)))
        return F.relu(self.bn4(self.conv4(h)))

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x).mean(dim=(2, 3)))


class PointsComponentMLP(nn.Module):
    """CFD/RDD feature classifier for 2-D mixtures: an MLP predicting the mixture component,
    Linear(2→64)·ReLU → Linear(64→64)·ReLU = 64-d feature (a 1×1 "map") → Linear(64→K) logits."""

    def __init__(self, num_classes: int = 8, hidden: int = 64, dim: int = 2):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, num_classes)
        self.num_features = hidden

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(x))))

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
