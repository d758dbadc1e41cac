"""The README's memory table: `distill --dry-run --device meta` for SD1.5-, SDXL- and FLUX.1-shaped teachers.

Each teacher is a diffusers pipeline folder holding only the published ``config.json`` files (no weights: on the meta
device a network is built from its config, so a user can plan a model before downloading it) and a small latent
data file of the right shapes (its values do not matter to memory). For each teacher the DMD2 preset is planned
under four settings:

1. three full copies (teacher, fake score, generator — plus the generator's EMA and the GAN head the preset holds);
2. + activation checkpointing of both trained roles (``run.activation_checkpointing``);
3. + FSDP2 over 8 processes (``run.fsdp=true``, ``--plan-ranks 8``), the frozen teacher replicated;
4. + the teacher sharded too (``run.fsdp_teacher=shard``);
5. LoRA (``lora.rank=64``): generator and fake score as adapters on one frozen base shared with the teacher;
6. LoRA + activation checkpointing. (FSDP2 and LoRA do not combine: the run refuses it.)

Per process, at batch 1 and 8 per process (8 from the plan's per-sample slope, ``peak_at``); the plan is for a
CUDA device (torch.optim's foreach step), without the CUDA context and the allocator's reserve.

    python benchmarks/memory_table.py [--models sd15,sdxl,flux] [--out runs/memory-table]

≈ 10 min on a 2-core CPU (nothing is allocated; the time is the forward passes on meta tensors)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from diffdistill.distill import distill
from diffdistill.io.load import load_for_sampling
from diffdistill.nets.diffusers_cond import example_condition
from diffdistill.train.memory import estimate_memory, peak_at

# The published configs' entries that differ from the diffusers classes' defaults.
SD15_UNET = {   # runwayml/stable-diffusion-v1-5 unet/config.json
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 2, "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32}
SDXL_UNET = {   # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 2, "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32}
FLUX1_TRANSFORMER = {   # black-forest-labs/FLUX.1-dev transformer/config.json
    "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19,
    "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}
SD_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                "steps_offset": 1, "timestep_spacing": "leading"}
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096}

MODELS = {   # name: (pipeline class, network folder, its config, scheduler config, text tokens, what it is)
    "sd15": ("StableDiffusionPipeline", "unet", SD15_UNET, SD_SCHEDULER, 77, "SD1.5 UNet, 512² (64² × 4 latents)"),
    "sdxl": ("StableDiffusionXLPipeline", "unet", SDXL_UNET, SD_SCHEDULER, 77,
             "SDXL UNet, 1024² (128² × 4 latents)"),
    "flux": ("FluxPipeline", "transformer", FLUX1_TRANSFORMER, FLUX_SCHEDULER, 512,
             "FLUX.1 transformer, 1024² (4,096 + 512 tokens)"),
}

CKPT = "run.activation_checkpointing=[generator,fake_score]"
SETTINGS = [   # (label, --set overrides, processes to plan for)
    ("three full copies", [], None),
    ("+ activation checkpointing", [CKPT], None),
    ("+ FSDP2 × 8 (teacher replicated)", [CKPT, "run.fsdp=true"], 8),
    ("+ teacher sharded too", [CKPT, "run.fsdp=true", "run.fsdp_teacher=shard"], 8),
    ("shared base + LoRA r64", ["lora.rank=64"], None),
    ("LoRA r64 + activation checkpointing", ["lora.rank=64", CKPT], None),
]


def write_folder(root: Path, name: str) -> Path:
    """A config-only pipeline folder and a latent data file (8 samples of the network's shapes) for ``name``."""
    pipe, part, cfg, sched, tokens, _ = MODELS[name]
    d = root / name
    for rel, obj in (("model_index.json", {"_class_name": pipe}), (f"{part}/config.json", cfg),
                     ("scheduler/scheduler_config.json", sched)):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(json.dumps(obj, indent=1) + "\n")
    net, _ = load_for_sampling(d, "meta")
    rng = np.random.default_rng(0)
    cond = example_condition(net, 8, length=tokens)
    arrays = {"latents": rng.standard_normal((8, *net.sample_shape)).astype(np.float32),
              "embeds": rng.standard_normal(tuple(cond.embeds.shape)).astype(np.float32)}
    if cond.pooled is not None:
        arrays["pooled"] = rng.standard_normal(tuple(cond.pooled.shape)).astype(np.float32)
    for k, v in cond.extra.items():
        arrays[f"extra.{k}"] = np.full(tuple(v.shape), 3.5 if k == "guidance" else 1.0, np.float32)
    np.savez(d / "latents.npz", **arrays)
    return d


def plan(folder: Path, overrides: list, ranks) -> dict:
    tr = distill("dmd2", str(folder), dry_run=True, overrides=list(overrides) + ["net.sigma_data=1.0"],
                 flags={"run": {"device": "meta", "batch_size": 1, "out": "/nonexistent/memory-table",
                                "progress": False},
                        "data": {"path": str(folder / "latents.npz")}})
    est = estimate_memory(tr, ranks=ranks)
    if est["errors"]:
        raise RuntimeError(f"{folder.name} {overrides}: {est['errors']}")
    return est


def gib(n: float) -> str:
    return f"{n / 2 ** 30:,.1f}"


def cli(name: str, overrides: list, ranks) -> str:
    sets = " ".join(f"--set {o}" for o in overrides)
    return (f"diffdistill distill --method dmd2 --teacher {name}/ --data {name}/latents.npz --dry-run --device meta "
            f"--batch-size 1 {sets}{f' --plan-ranks {ranks}' if ranks else ''}").replace("  ", " ")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", default="runs/memory-table")
    a = p.parse_args()
    root = Path(a.out)
    rows = ["| teacher | setting | parameters held | trained | weights | optimizer state | peak, batch 1 | "
            "peak, batch 8 | plan s |", "|---|---|---|---|---|---|---|---|---|"]
    for name in a.models.split(","):
        folder = write_folder(root, name)
        for label, overrides, ranks in SETTINGS:
            t = time.perf_counter()
            est = plan(folder, overrides, ranks)
            held = sum(i.params for i in est["networks"] if not i.shared_with)
            trained = sum(i.params for i in est["networks"] if i.phases and not i.shared_with)
            rows.append(f"| {MODELS[name][5]} | {label} | {held / 1e9:.2f} B | {trained / 1e9:.3f} B | "
                        f"{gib(est['weights'])} GiB | {gib(est['optimizer_state'])} GiB | {gib(est['peak'])} GiB | "
                        f"{gib(peak_at(est, 8))} GiB | {time.perf_counter() - t:.0f} |")
            print(rows[-1], "\n   ", cli(name, overrides, ranks), flush=True)
    text = "\n".join(rows)
    (root / "table.md").write_text(text + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
