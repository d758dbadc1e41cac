"""Sampling throughput at a fixed batch: the network passes of a sampler and nothing else (no per-seed noise
generation, no feature extraction), so student-vs-teacher ratios measure what distillation changes."""

from __future__ import annotations

import time

import torch

from ..diffusion.samplers import sample


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def sampling_throughput(net, spec: dict, batch_size: int = 256, repeats: int = 3, device="cpu",
                        min_seconds: float = 0.5) -> dict:
    """Images per second of ``sample(net, noise, **spec)`` at ``batch_size``: one warm-up batch, then at least
    ``repeats`` timed batches and at least ``min_seconds``. Returns images_per_second, seconds_per_batch, nfe."""
    shape = (batch_size,) + tuple(net.sample_shape)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(shape, generator=g).to(device)
    L = getattr(net, "label_dim", 0)
    labels = (torch.nn.functional.one_hot(torch.arange(batch_size) % L, L).float().to(device) if L else None)
    was_training = net.training
    net.eval()

    def once():
        return sample(net, noise, spec["sampler"], sigmas=spec.get("sigmas"), nfe=spec.get("nfe"), labels=labels,
                      generator=g, options=spec.get("sampler_options"))[1]

    nfe = once()
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while n < repeats or time.perf_counter() - t0 < min_seconds:
        once()
        n += 1
    _sync(device)
    secs = (time.perf_counter() - t0) / n
    net.train(was_training)
    return {"images_per_second": batch_size / secs, "seconds_per_batch": secs, "nfe": nfe, "batch_size": batch_size}
