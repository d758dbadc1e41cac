"""Small pluggable classifiers for the CFD/RDD tests (importable as ``helpers.pd_helpers:NAME``)."""

from __future__ import annotations

import torch

from diffdistill.nets.feature_classifier import DigitsFeatureCNN, PointsComponentMLP


def random_digits_cnn():
    """An untrained (seeded) DigitsFeatureCNN with width 8: final map 16×4×4, fast."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return DigitsFeatureCNN(width=8)


def random_points_mlp():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return PointsComponentMLP(num_classes=8, hidden=16)


class FeaturesOnly(torch.nn.Module):
    """A classifier without ``forward_head`` (features only): CFD's dataset loss must be refused with it."""

    def forward(self, x):
        return x.flatten(1).abs()


def features_only():
    return FeaturesOnly()
