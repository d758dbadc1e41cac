"""The digits feature extractor: a deterministic, cached `DigitsClassifier` for proxy-FID / KID on 8×8 digits.

Split: the project's canonical digits split, `diffdistill.data.digits.digits_split(heldout, seed=0)` (sklearn
`load_digits()`, N = 1797, pixels x/8 − 1 ∈ [−1, 1]; held out = the first `heldout` (default 297) indices of
`torch.randperm(N, Generator().manual_seed(0))`, the remaining 1500 train). The classifier thus never sees the images
the evaluator uses as its held-out real-data floor. (A "last 297" split would hold out unseen writers — the stored
order is grouped by writer — and is much harder: an RBF-SVM scores 93% there vs 99% on a random split.)

Training is bitwise reproducible on CPU: seeded RNGs (global RNG forked, so the caller's is untouched), one intra-op
thread while training (reduction order fixed), fixed batch order and augmentation draws. (Across CPU instruction sets
the kernels, hence the weights, may differ in the last bits; the cache key covers the recipe, not the machine.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.digits import digits_split
from ..nets.classifier import DigitsClassifier


#: Bump when anything that changes the trained weights changes (architecture, optimiser, augmentation, split).
RECIPE_VERSION = 1
DEFAULT_EPOCHS = 10
_LR, _BATCH, _WD = 3e-3, 32, 1e-4


def default_cache_dir() -> Path:
    """`$DIFFDISTILL_CACHE` if set, else `~/.cache/diffdistill`."""
    env = os.environ.get("DIFFDISTILL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "diffdistill"


def _split(heldout: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_heldout, y_heldout) of the canonical split; x float32 [n,1,8,8] in [−1,1], y int64."""

    train, held = digits_split(heldout, seed=0)
    return train.x, train.labels, held.x, held.labels


def _shift_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random integer shift by (dx, dy) ∈ {−1,0,1}² per image; vacated pixels take the background value −1."""
    b = x.shape[0]
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    s = torch.randint(0, 3, (b, 2), generator=g)
    out = torch.empty_like(x)
    for dy in range(3):
        for dx in range(3):
            m = (s[:, 0] == dy) & (s[:, 1] == dx)
            out[m] = pad[m, :, dy:dy + 8, dx:dx + 8]
    return out


@contextmanager
def _deterministic_cpu(seed: int):
    """Fork the global RNG, seed it, and pin torch to one intra-op thread; restore both on exit."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _recipe(seed: int, epochs: int, heldout: int) -> dict:
    return {"name": "digits_classifier", "version": RECIPE_VERSION, "seed": seed, "epochs": epochs,
            "heldout": heldout, "split": "data.digits_split(seed=0)", "lr": _LR, "batch": _BATCH, "weight_decay": _WD,
            "aug": "shift1"}


@torch.no_grad()
def digits_heldout_accuracy(model: DigitsClassifier, heldout: int = 297) -> float:
    """Top-1 accuracy on the held-out digits of the canonical split."""
    _, _, x, y = _split(heldout)
    p = next(model.parameters())
    return (model(x.to(p.device, p.dtype)).argmax(1).cpu() == y).float().mean().item()


def train_digits_classifier(seed: int = 0, epochs: int = DEFAULT_EPOCHS, heldout: int = 297) -> DigitsClassifier:
    """Train `DigitsClassifier` on CPU, bitwise-deterministically (see module docstring). Returns it in eval mode.

    AdamW (lr 3e-3, wd 1e-4), cosine decay to 0 over `epochs`, batch 32, ±1-pixel shift augmentation, cross-entropy.
    """
    x, y, _, _ = _split(heldout)
    with _deterministic_cpu(seed):
        g = torch.Generator().manual_seed(seed)
        model = DigitsClassifier()
        opt = torch.optim.AdamW(model.parameters(), lr=_LR, weight_decay=_WD)
        steps = epochs * -(-len(y) // _BATCH)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=g)
            for idx in perm.split(_BATCH):
                loss = F.cross_entropy(model(_shift_augment(x[idx], g)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval().requires_grad_(False)


def load_or_train_digits_classifier(cache_dir: str | os.PathLike | None = None, seed: int = 0,
                                    epochs: int = DEFAULT_EPOCHS, heldout: int = 297) -> DigitsClassifier:
    """The trained digits classifier (eval mode, frozen), from `cache_dir` or trained and cached there.

    File: `<cache_dir>/digits_classifier-<sha256(recipe)[:16]>.safetensors`, written atomically (temp file in the same
    directory, then os.replace), metadata = recipe JSON + held-out accuracy. `cache_dir` defaults to
    `default_cache_dir()`.
    """
    from safetensors.torch import load_file, save_file

    recipe = _recipe(seed, epochs, heldout)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / f"digits_classifier-{key}.safetensors"
    model = DigitsClassifier()
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval().requires_grad_(False)
    model = train_digits_classifier(seed=seed, epochs=epochs, heldout=heldout)
    root.mkdir(parents=True, exist_ok=True)
    meta = {"recipe": json.dumps(recipe, sort_keys=True),
            "heldout_accuracy": f"{digits_heldout_accuracy(model, heldout):.6f}"}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=root)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return model
