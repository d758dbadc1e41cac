"""The frozen classifiers CFD and RDD read features from, and how a run picks one (method option ``classifier``).

* ``auto`` (default): ``digits`` for 1×8×8 data, ``ring8`` for the ring8 mixture; anything else is a UserError
  asking for an explicit classifier.
* ``digits``: ``DigitsFeatureCNN`` trained on the 1,500 training digits of the canonical split, deterministically on
  CPU (seed 1, SGD), cached under ``$DIFFDISTILL_CACHE`` like the proxy-FID classifier (eval/features.py) but a
  different network, seed and recipe, so the distillation cannot tune to the metric's feature space. Never
  downloaded; ≈ 10 s to train on one CPU thread.
* ``ring8``: ``PointsComponentMLP`` predicting which of the 8 Gaussians a point came from, trained in about a
  second on fresh draws of the exact mixture (not cached).
* ``package.module:factory``: any importable callable returning an ``nn.Module`` with ``forward_features`` (and
  ``forward_head`` for CFD's dataset loss), already trained; the module is frozen and put in eval mode.

Official recipe scaled down (zju-SWJ/RCFD classifier/train.py: CIFAR-10 DenseNet-201 / ResNet-18, SGD 0.1 (:30,
:104), momentum 0.9, wd 5e-4, ÷10 at 1/2 and 3/4 of 300 epochs (:110), crop + flip + AutoAugment + Cutout (:70),
trained on mean/std-normalised inputs (:65) but fed raw [−1, 1] images during distillation, diffusion.py:242). Here: SGD 0.05, momentum 0.9, wd 5e-4, cosine decay, ±1-pixel shifts, and trained on the same
[−1, 1] pixels the distillation feeds it (no normalisation quirk).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.digits import digits_split
from ..data.toy2d import ring8_gmm
from ..errors import UserError
from ..eval.features import _deterministic_cpu, _shift_augment, default_cache_dir
from ..nets.feature_classifier import DigitsFeatureCNN, PointsComponentMLP

DIGITS_RECIPE = {"name": "cfd_digits_feature_cnn", "version": 1, "seed": 1, "epochs": 20, "batch": 64, "lr": 0.05,
                 "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine", "aug": "shift1", "heldout": 297}
RING8_RECIPE = {"seed": 1, "steps": 400, "batch": 512, "lr": 3e-3}


# ------------------------------------------------------------------------------------------------ outputs
def classifier_outputs(clf: nn.Module, x: torch.Tensor):
    """(map [B, C, H, W], pooled [B, C], logits [B, K] or None) of a CFD/RDD classifier on ``x``; flat features
    become a 1×1 map. Gradients flow to ``x`` (the classifier's own parameters are frozen)."""
    fmap = clf.forward_features(x) if hasattr(clf, "forward_features") else clf(x)
    if fmap.ndim == 2:
        fmap = fmap[:, :, None, None]
    if fmap.ndim != 4:
        raise UserError(f"the CFD/RDD classifier must return [B, C, H, W] or [B, C] features, got {tuple(fmap.shape)}")
    pooled = fmap.mean(dim=(2, 3))
    logits = clf.forward_head(pooled) if hasattr(clf, "forward_head") else None
    return fmap, pooled, logits


def freeze(clf: nn.Module) -> nn.Module:
    return clf.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ digits
def _digits_cache_path(cache_dir=None) -> Path:
    key = hashlib.sha256(json.dumps(DIGITS_RECIPE, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"cfd_digits_feature_cnn-{key}.safetensors"


def train_digits_feature_cnn() -> DigitsFeatureCNN:
    """Train ``DigitsFeatureCNN`` on the 1,500 training digits, bitwise-reproducibly on CPU (seeded RNGs, the
    global RNG forked, one thread while training). Returns it frozen, in eval mode."""
    r = DIGITS_RECIPE
    train, _ = digits_split(r["heldout"], seed=0)
    x, y = train.x, train.labels
    with _deterministic_cpu(r["seed"]):
        g = torch.Generator().manual_seed(r["seed"])
        model = DigitsFeatureCNN()
        opt = torch.optim.SGD(model.parameters(), lr=r["lr"], momentum=r["momentum"], weight_decay=r["weight_decay"])
        steps = r["epochs"] * -(-len(y) // r["batch"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
        model.train()
        for _ in range(r["epochs"]):
            for idx in torch.randperm(len(y), generator=g).split(r["batch"]):
                if len(idx) < 2:     # BatchNorm needs two samples
                    continue
                loss = F.cross_entropy(model(_shift_augment(x[idx], g)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return freeze(model)


def load_or_train_digits_feature_cnn(cache_dir=None) -> DigitsFeatureCNN:
    """The CFD/RDD digits classifier from the cache, or trained and cached (atomic write, safetensors)."""
    from safetensors.torch import load_file, save_file
    path = _digits_cache_path(cache_dir)
    model = DigitsFeatureCNN()
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return freeze(model)
    model = train_digits_feature_cnn()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp,
                  metadata={"recipe": json.dumps(DIGITS_RECIPE, sort_keys=True)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return model


# ------------------------------------------------------------------------------------------------ ring8
def train_ring8_component_mlp() -> PointsComponentMLP:
    """``PointsComponentMLP`` trained to tell which of ring8's 8 Gaussians a point came from (fresh draws of the
    exact mixture each step; Adam; deterministic on CPU). Frozen, eval mode."""
    r = RING8_RECIPE
    gmm = ring8_gmm()
    with _deterministic_cpu(r["seed"]):
        g = torch.Generator().manual_seed(r["seed"])
        model = PointsComponentMLP(num_classes=len(gmm.means))
        opt = torch.optim.Adam(model.parameters(), lr=r["lr"])
        for _ in range(r["steps"]):
            k = torch.randint(len(gmm.means), (r["batch"],), generator=g)
            x = gmm.means[k] + gmm.std * torch.randn(r["batch"], 2, generator=g)
            loss = F.cross_entropy(model(x), k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return freeze(model)


# ------------------------------------------------------------------------------------------------ choice
def _import_factory(spec: str) -> nn.Module:
    mod_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot load classifier {spec!r} ({type(e).__name__}: {e}); give package.module:factory, "
                        f"a callable returning a trained nn.Module") from None
    clf = factory()
    if not isinstance(clf, nn.Module):
        raise UserError(f"classifier factory {spec!r} returned {type(clf).__name__}, not an nn.Module")
    return clf


def load_feature_classifier(spec: str, sample_shape: tuple, data_name: str | None = None) -> nn.Module:
    """The frozen classifier named by ``spec`` (see the module docstring) for samples of ``sample_shape``."""
    if spec == "auto":
        if tuple(sample_shape) == (1, 8, 8):
            spec = "digits"
        elif tuple(sample_shape) == (2,) and data_name == "ring8":
            spec = "ring8"
        else:
            raise UserError(f"CFD/RDD need a classifier for this data (samples {tuple(sample_shape)}, data "
                            f"{data_name or '?'}): built-in ones exist for digits and ring8; otherwise set "
                            f"method.classifier=package.module:factory (a trained nn.Module with forward_features)")
    if spec == "digits":
        if tuple(sample_shape) != (1, 8, 8):
            raise UserError(f"the digits classifier takes 1x8x8 images, but the samples are {tuple(sample_shape)}")
        return load_or_train_digits_feature_cnn()
    if spec == "ring8":
        if tuple(sample_shape) != (2,):
            raise UserError(f"the ring8 classifier takes 2-D points, but the samples are {tuple(sample_shape)}")
        return train_ring8_component_mlp()
    if ":" in spec:
        return freeze(_import_factory(spec))
    raise UserError(f"unknown classifier {spec!r}: use auto, digits, ring8 or package.module:factory")
