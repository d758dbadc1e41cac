"""The Python API: the CLI's four main jobs as functions (exported from the package root).

    import diffdistill as dd
    teacher, info = dd.load_teacher("teacher.safetensors")
    run = dd.distill("dmd2", "teacher.safetensors", out="runs/dmd2", iters=200, options={"lr": 5e-4})
    images = dd.sample(run.checkpoint, num_samples=16, seed=0)           # [16, C, H, W] in [-1, 1]
    metrics = dd.evaluate(run.checkpoint, num_samples=500)               # the metrics.json of `diffdistill eval`

Every function takes the same model files as the CLI (training checkpoints, exported .safetensors, NVlabs/edm
pickles, diffusers folders) and raises ``UserError`` with the same one-line messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .distill import distill as _distill
from .eval.evaluate import evaluate_checkpoint, sampling_spec_for
from .eval.generate import generate
from .io import load_for_sampling, load_teacher
from .io.checkpoint import list_checkpoints
from .train.trainer import Trainer

__all__ = ["load_teacher", "distill", "sample", "evaluate", "DistillRun"]


@dataclass
class DistillRun:
    """What ``distill`` returns: the run folder, its newest checkpoint, the trainer (``.method`` holds the
    networks) and the resolved configuration (every option, defaults included)."""

    out: Path
    checkpoint: Path
    trainer: Trainer
    config: dict


def distill(method: str, teacher, *, out=None, iters: int | None = None, preset: str | None = None,
            options: dict | None = None, run: dict | None = None, config_file=None, resume: str | None = None,
            progress: bool = False) -> DistillRun:
    """Distill ``teacher`` (a model file) with ``method``: the preset (default: the teacher's kind), then
    ``options`` (method options, as ``--set method.KEY=VALUE``) and ``run`` (run options), validated by their
    schemas. ``resume='auto'`` continues a run in ``out``."""
    run_flags = dict(run or {})
    for key, value in (("out", out), ("steps", iters), ("resume", resume)):
        if value is not None:
            run_flags[key] = str(value) if key == "out" else value
    run_flags.setdefault("progress", progress)
    flags = {"run": run_flags, "method": dict(options or {})}
    trainer = _distill(method, teacher, flags=flags, config_file=config_file, preset=preset)
    return DistillRun(out=trainer.out, checkpoint=list_checkpoints(trainer.ckpt_dir)[-1], trainer=trainer,
                      config=trainer.cfg)


def sample(model, num_samples: int = 64, seed: int = 0, steps: int | None = None, device="cpu",
           raw: bool = False) -> torch.Tensor:
    """``num_samples`` samples of a model file (sample i from seed ``seed + i``, as ``diffdistill sample``), with
    its own sampling recipe or ``steps`` sampler steps. Images are clamped to [−1, 1] unless ``raw``."""
    net, state = load_for_sampling(model, device)
    x, _, _ = generate(net, range(seed, seed + num_samples), sampling_spec_for(state, steps), device=device)
    return x if raw or x.ndim != 4 else x.clamp(-1, 1)


def evaluate(model, num_samples: int = 2000, seed: int = 0, steps: int | None = None, device="cpu") -> dict:
    """The metrics of ``diffdistill eval`` (proxy-FID/KID for digits, sliced W2/MMD for 2-D, images/s, …)."""
    return evaluate_checkpoint(model, steps=steps, num_samples=num_samples, seed=seed, device=device)
