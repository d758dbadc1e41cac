"""Sample generation where each sample depends on its seed only (not on batch size or rank), and the one rule that
turns images into uint8 pixels (PNG files, grids and the Inception path all use it).

Seeds follow NVlabs/edm ``generate.py``: every seed gets its own ``torch.Generator`` seeded with ``seed mod 2³²``
(``StackedRandomGenerator``, generate.py:182-196) and draws its latent first (generate.py:282). The class label of
a seed, for a class-conditional net, is chosen by a rule (``seed_labels``):

* ``edm``: EDM's, a ``randint(label_dim)`` from the same per-seed generator right after the latent
  (generate.py:284-285), so a seed gives the same latent and class as EDM's ``generate.py`` on the CPU. The default
  for NVlabs/edm snapshot teachers (their sampling recipe carries ``seed_labels: edm``).
* ``mod``: seed mod label_dim (balanced classes over consecutive seeds); the default for every other net.

The generators live on the CPU whatever the device, so a seed gives the same sample on any device (EDM builds them
on the sampling device; on a GPU its CUDA draws differ from the CPU ones).
"""

from __future__ import annotations

import time

import torch

from ..diffusion import condition as cond
from ..diffusion.guidance import for_sampling
from ..diffusion.samplers import sample
from ..errors import UserError

SEED_LABEL_RULES = ("edm", "mod")


def seeded_generators(seeds) -> list[torch.Generator]:
    """One CPU generator per seed, seeded with seed mod 2³² (EDM's ``StackedRandomGenerator``)."""
    return [torch.Generator().manual_seed(int(s) % (1 << 32)) for s in seeds]


def seed_labels(seeds, num_classes: int, rule: str = "mod", generators=None) -> torch.Tensor | None:
    """One-hot class labels of ``seeds`` [N, num_classes] (None when unconditional). ``rule``: 'mod' = seed mod
    num_classes; 'edm' = one ``randint(num_classes)`` from each seed's generator in ``generators`` (which must have
    drawn the latent already, as in EDM generate.py:282-285)."""
    if not num_classes:
        return None
    if rule == "mod":
        idx = torch.tensor([int(s) % num_classes for s in seeds])
    elif rule == "edm":
        if generators is None or len(generators) != len(seeds):
            raise ValueError("seed_labels(rule='edm') needs the per-seed generators, after the latents were drawn")
        idx = torch.stack([torch.randint(num_classes, size=(), generator=g) for g in generators])
    else:
        raise UserError(f"unknown seed label rule {rule!r}; choose one of: {', '.join(SEED_LABEL_RULES)}")
    return torch.nn.functional.one_hot(idx, num_classes).float()


def images_to_uint8_pixels(x: torch.Tensor) -> torch.Tensor:
    """Float images in [−1, 1] → uint8 pixels of the same shape, by EDM's rule uint8(clip(127.5·x + 128, 0, 255))
    (NVlabs/edm generate.py:297: the cast truncates, so this rounds 127.5·(x + 1) half up). PNG files, sample grids
    and the Inception/FID path all quantise this way, so a PNG folder scores what ``eval`` scored."""
    return (x.detach().float().cpu() * 127.5 + 128).clip(0, 255).to(torch.uint8)


@torch.no_grad()
def generate(denoiser, seeds, spec: dict, batch_size: int = 256, device="cpu", class_labels=None,
             label_rule: str | None = None, clip: bool | None = None, conditions=None, decode=None):
    """Generate one sample per seed with ``spec`` (``{'sampler', 'nfe'}`` or ``{'sampler', 'sigmas'}``, optionally
    ``'seed_labels'``: the class rule, 'mod' by default, and ``'sampler_options'``: the sampler's keyword options,
    e.g. ``{'s_churn': 40}`` for the stochastic sampler), ``'guidance'``: a guidance scale w for a
    conditional net (``guidance.for_sampling``: classifier-free guidance, where w ≠ 0, 1 costs two network
    evaluations per step, counted in ``nfe``; for a net that takes the scale as input — FLUX.1-dev, a
    w-conditioned student — w is written into the prompts' ``extra.guidance``, one evaluation), and ``'prompts'``: the encoded-prompts file of a net conditioned on embeddings — seed s gets
    prompt s mod N (``conditions``, a `Condition`, gives them directly).

    Per seed, in EDM's order: the latent from the seed's generator, then (rule 'edm') its class from the same
    generator, then the sampler's fresh noise. ``class_labels`` (one-hot [N, L]) replaces the drawn classes (the
    'edm' draw still happens, as EDM's ``--class`` does). ``label_rule`` overrides the spec's rule; ``clip=False``
    keeps a consistency sampler's raw values. ``decode`` (e.g. a VAE's ``LatentCodec.decode``) maps each batch of
    latent samples to images on the sampling device before they are collected.

    Returns ``(samples [N, ...] float32 on CPU, labels one-hot, a Condition or None, info)`` with ``info`` holding
    ``nfe`` (per sample), ``seconds``, ``images_per_second`` and, for prompts, ``prompt_index``. Samples are the sampler's values (no clamp is added here;
    the consistency sampler clamps images itself, as the official one does).
    """
    seeds = list(seeds)
    shape = tuple(denoiser.sample_shape)
    L = int(getattr(denoiser, "label_dim", 0) or 0)
    rule = label_rule or spec.get("seed_labels", "mod")
    if rule not in SEED_LABEL_RULES:
        raise UserError(f"unknown seed label rule {rule!r}; choose one of: {', '.join(SEED_LABEL_RULES)}")
    w = None if spec.get("guidance") is None else float(spec["guidance"])
    kind = cond.conditioning_of(denoiser)
    if w is not None and w != 1.0 and kind == "none":
        raise UserError(f"--guidance {w:g} needs a conditional network (class labels or prompts); this one is "
                        f"unconditional")
    if kind == "embeddings" and conditions is None:
        if not spec.get("prompts"):
            raise UserError("this network is conditioned on text embeddings: give the encoded prompts with "
                            "--prompts FILE")
        conditions = cond.load_conditions(spec["prompts"])
    # CFG, or the scale as a network input for a net that takes it (FLUX.1-dev, a w-conditioned student)
    net, conditions, evals = for_sampling(denoiser, w, conditions)
    if conditions is not None:
        cond.check_bank(denoiser, conditions, "this network")
    out, labels_out, nfe, t0 = [], [], 0, time.perf_counter()
    was_training = denoiser.training
    denoiser.eval()
    for i in range(0, len(seeds), batch_size):
        chunk = seeds[i:i + batch_size]
        gens = seeded_generators(chunk)
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        labels = seed_labels(chunk, L, rule, gens) if L else None
        if class_labels is not None:
            labels = class_labels[i:i + batch_size]
        if kind == "embeddings":
            labels = conditions.rows(torch.tensor(chunk) % len(conditions))
        if labels is not None:
            labels_out.append(labels.to("cpu"))
            labels = labels.to(device)
        x, nfe = sample(net, noise, spec["sampler"], sigmas=spec.get("sigmas"), nfe=spec.get("nfe"),
                        labels=labels, generator=gens, clip=clip, options=spec.get("sampler_options"))
        out.append((decode(x) if decode is not None else x).float().cpu())
    denoiser.train(was_training)
    secs = time.perf_counter() - t0
    nfe = nfe * evals
    info = {"nfe": nfe, "seconds": secs, "images_per_second": len(seeds) / max(secs, 1e-9)}
    if kind == "embeddings":
        info["prompt_index"] = (torch.tensor(seeds) % len(conditions)).tolist()
    return torch.cat(out), (cond.cat(labels_out) if labels_out else None), info
