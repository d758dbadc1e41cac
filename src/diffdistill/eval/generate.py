"""Sample generation where each sample depends on its seed only (not on batch size or rank)."""

from __future__ import annotations

import time

import torch

from ..diffusion.samplers import sample


def seeded_generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def seed_labels(seeds, num_classes: int) -> torch.Tensor | None:
    """Class label of a seed: seed mod num_classes (balanced, reproducible), one-hot."""
    if not num_classes:
        return None
    idx = torch.tensor([int(s) % num_classes for s in seeds])
    return torch.nn.functional.one_hot(idx, num_classes).float()


@torch.no_grad()
def generate(denoiser, seeds, spec: dict, batch_size: int = 256, device="cpu", class_labels=None):
    """Generate one sample per seed with ``spec`` (``{'sampler', 'nfe'}`` or ``{'sampler', 'sigmas'}``).

    Returns ``(samples [N, ...] float32 on CPU, labels one-hot or None, info)`` with ``info`` holding ``nfe`` (per
    sample), ``seconds`` and ``images_per_second``.
    """
    seeds = list(seeds)
    shape = tuple(denoiser.sample_shape)
    L = getattr(denoiser, "label_dim", 0)
    labels_all = class_labels if class_labels is not None else seed_labels(seeds, L)
    out, nfe, t0 = [], 0, time.perf_counter()
    was_training = denoiser.training
    denoiser.eval()
    for i in range(0, len(seeds), batch_size):
        chunk = seeds[i:i + batch_size]
        gens = seeded_generators(chunk)
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        labels = None if labels_all is None else labels_all[i:i + batch_size].to(device)
        x, nfe = sample(denoiser, noise, spec["sampler"], sigmas=spec.get("sigmas"), nfe=spec.get("nfe"),
                        labels=labels, generator=gens)
        out.append(x.float().cpu())
    denoiser.train(was_training)
    secs = time.perf_counter() - t0
    info = {"nfe": nfe, "seconds": secs, "images_per_second": len(seeds) / max(secs, 1e-9)}
    return torch.cat(out), labels_all, info
