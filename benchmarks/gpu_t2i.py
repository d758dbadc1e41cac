"""DMD2 iterations on full-size text-to-image teachers, timed on one GPU: an SDXL-shaped UNet2DConditionModel and a
FLUX.1-dev-shaped FluxTransformer2DModel (their published configs), random weights built directly on the device —
nothing is downloaded or read from disk — trained through the project's Trainer (generator and critic phases,
GAN head on the fake score's bottleneck, real latents with prompts), with the memory options a real run uses:

- ``run.precision=bf16`` (autocast around the losses), ``run.teacher_dtype=bf16`` (the frozen teacher stored in bf16),
  ``run.activation_checkpointing`` of the generator and the fake score (diffusers' gradient checkpointing);
- SDXL: full fp32 copies (generator, fake score, EMA; AdamW) beside the bf16 teacher, 4 steps with backward
  simulation (DMD2-SDXL), real score guided (w = 8, a second teacher branch);
- FLUX: LoRA adapters (``lora.rank``) on one frozen base shared by the teacher and every role — full fp32 copies of
  12 B parameters with AdamW state would not fit 139 GiB —, 1 step, its embedded guidance (3.5) instead of CFG.

Both teachers are built on the GPU in fp32 (``with torch.device('cuda')``) and stored in bf16 by
``run.teacher_dtype=bf16`` once the method has made its copies from them — the project's order (trained copies start
from fp32 weights; the method's set-up forwards, e.g. the GAN head's probe, run outside autocast): the peak while
building (FLUX: 48 GB of fp32 weights for a moment) is reported apart from the training peak.

Prints per configuration the seconds per iteration for critic-only iterations and for iterations that also run the
generator phase (DMD2 updates the generator every ``dfake_gen_update_ratio``-th iteration; the first iteration of
each kind is a warm-up and is not averaged), peak ``torch.cuda.max_memory_allocated`` over the iterations and after
building, and writes ``OUT/results.json``. A configuration that runs out of memory is reported as such.

    python benchmarks/gpu_t2i.py [--configs sdxl,flux] [--iters 11] [--out runs/gpu_t2i]   # CUDA only, ≤ 10 min
    python benchmarks/gpu_t2i.py --tiny                                                    # the same code on CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json and scheduler/scheduler_config.json
SDXL_UNET = {"act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
             "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
             "center_input_sample": False, "cross_attention_dim": 2048,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
             "layers_per_block": 2, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
             "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
             "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True}
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                  "steps_offset": 1, "timestep_spacing": "leading"}
# black-forest-labs/FLUX.1-dev transformer/config.json and scheduler/scheduler_config.json
FLUX_DEV = {"attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64,
            "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
            "patch_size": 1, "pooled_projection_dim": 768}
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
                  "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True}

CONFIGS = {
    # 1024² images: 128² latents; 77 CLIP tokens of 2048 (both encoders), pooled 1280, 6 size ids
    "sdxl": {"class": "UNet2DConditionModel", "kwargs": SDXL_UNET, "scheduler": SDXL_SCHEDULER,
             "shape": (4, 128, 128), "batch": 2, "text": (77, 2048), "pooled": 1280, "time_ids": 6,
             "method": {"student_steps": 4, "guidance_real": 8.0}, "lora": None},
    # 1024² images: 128² latents of 16 channels (4096 packed tokens); 512 T5 tokens of 4096, pooled CLIP 768
    "flux": {"class": "FluxTransformer2DModel", "kwargs": FLUX_DEV, "scheduler": FLUX_SCHEDULER,
             "shape": (16, 128, 128), "batch": 1, "text": (512, 4096), "pooled": 768, "guidance": 3.5,
             "method": {"student_steps": 1}, "lora": {"rank": 64}},
}
# --tiny: the same classes and code path at test size (as tests/test_diffusers_t2i.py builds them), on the CPU
TINY = {
    "sdxl": {"kwargs": {"block_out_channels": [8, 16], "layers_per_block": 1, "sample_size": 8, "in_channels": 4,
                        "out_channels": 4, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 16,
                        "attention_head_dim": 2, "norm_num_groups": 8, "addition_embed_type": "text_time",
                        "addition_time_embed_dim": 4, "projection_class_embeddings_input_dim": 8 + 6 * 4,
                        "use_linear_projection": True},
             "shape": (4, 8, 8), "text": (5, 16), "pooled": 8},
    "flux": {"kwargs": {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 2,
                        "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 24,
                        "pooled_projection_dim": 12, "guidance_embeds": True, "axes_dims_rope": [4, 4, 8]},
             "shape": (4, 8, 8), "text": (7, 24), "pooled": 12, "lora": {"rank": 4}},
}


def gib(n_bytes) -> float:
    return n_bytes / 2 ** 30


def build_teacher(name: str, cfg: dict, device):
    """The random-weight teacher Denoiser built on ``device`` (fp32) and its checkpoint-like state."""
    from diffdistill.nets import diffusers_cond as dc
    from diffdistill.nets.diffusers_unet import schedule_from_config
    cls = dc.model_class(cfg["class"])
    torch.manual_seed(0)
    with torch.device(device):   # initialised on the GPU itself: seconds, where a 12 B CPU init takes minutes
        model = cls(**cfg["kwargs"])
    schedule, pred = schedule_from_config(cfg["scheduler"])
    net = dc.wrap(model.eval(), cfg["class"], schedule, pred, None, cfg["shape"])
    state = {"net_config": dc.net_config(net, cfg["class"]), "config": {"data": {}}, "role": "teacher", "step": 0,
             "sampling": {"sampler": "euler", "nfe": 4}}
    return net.requires_grad_(False), state


def write_data(out: Path, cfg: dict, n: int = 8) -> tuple[Path, Path]:
    """Random prompt embeddings (and their null row) and n latents carrying them: the run's prompts and GAN data."""
    from diffdistill.diffusion.condition import Condition
    g = torch.Generator().manual_seed(1)
    L, D = cfg["text"]

    def cond(m):
        extra = {}
        if cfg.get("time_ids"):
            side = cfg["shape"][-1] * 8.0
            extra["time_ids"] = torch.tensor([[side, side, 0.0, 0.0, side, side]]).repeat(m, 1)
        if cfg.get("guidance"):
            extra["guidance"] = torch.full((m,), float(cfg["guidance"]))
        return Condition(torch.randn(m, L, D, generator=g), None, torch.randn(m, cfg["pooled"], generator=g), extra)
    bank = cond(n)
    bank = Condition(bank.embeds, None, bank.pooled, bank.extra, cond(1))
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "prompts.npz", **{k: v.numpy() for k, v in bank.state().items()})
    latents = torch.randn((n,) + tuple(cfg["shape"]), generator=g).numpy()
    np.savez(out / "latents.npz", latents=latents, **{k: v.numpy() for k, v in bank.state().items()
                                                      if not k.startswith("null.")})
    return out / "prompts.npz", out / "latents.npz"


def make_trainer(name: str, cfg: dict, teacher, tstate: dict, out: Path, device: str, iters: int):
    from diffdistill.data import dataset_from_config
    from diffdistill.distill import distill_config
    from diffdistill.train.trainer import Trainer
    prompts, latents = write_data(out / "data", cfg)
    flags = {"run": {"out": str(out / name), "steps": iters, "batch_size": cfg["batch"], "device": device,
                     "precision": "bf16", "teacher_dtype": "bf16",
                     "activation_checkpointing": ["generator", "fake_score"], "ckpt_every": 0, "sample_every": 0,
                     "log_every": 1, "progress": False},
             "data": {"path": str(latents), "prompts": str(prompts)},
             "net": {"sigma_data": 0.5},   # a DDPM-family / flow scheduler states none; a run would measure it
             "method": dict(cfg["method"])}
    if cfg.get("lora"):
        flags["lora"] = dict(cfg["lora"])
    rc = distill_config("dmd2", tstate, flags, preset="official")
    teacher.sigma_data = 0.5
    dataset = dataset_from_config(rc["data"])
    return Trainer(rc, teacher=teacher, teacher_path=None, dataset=dataset)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_config(name: str, cfg: dict, device: str, iters: int, out: Path) -> dict:
    cuda = torch.device(device).type == "cuda"
    row = {"config": name, "class": cfg["class"], "batch": cfg["batch"], "latent": list(cfg["shape"]),
           "student_steps": cfg["method"]["student_steps"], "lora_rank": (cfg.get("lora") or {}).get("rank")}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    teacher, tstate = build_teacher(name, cfg, device)
    row["teacher_params"] = sum(p.numel() for p in teacher.parameters())
    trainer = make_trainer(name, cfg, teacher, tstate, out, device, iters)
    sync(device)
    row["build_seconds"] = round(time.perf_counter() - t0, 1)
    trained = {id(p): p for opt in trainer.method.optimizers.values() for g in opt.param_groups for p in g["params"]}
    row["trained_params"] = sum(p.numel() for p in trained.values())
    row["ratio"] = trainer.method.ratio
    if cuda:
        row["build_peak_gib"] = round(gib(torch.cuda.max_memory_allocated()), 1)
        row["after_build_gib"] = round(gib(torch.cuda.memory_allocated()), 1)
        torch.cuda.reset_peak_memory_stats()
    times = {"critic": [], "generator+critic": []}
    losses = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        logs = trainer.train_step()   # the Trainer's phases, as run() calls them (no logging or checkpoints)
        nimg_before = trainer.nimg
        trainer.step += 1
        trainer.nimg += cfg["batch"]
        trainer.update_emas(nimg_before)
        trainer.method.after_step(trainer.step, trainer.nimg)
        sync(device)
        if logs is None:
            raise RuntimeError(f"{name}: a non-finite loss or gradient at iteration {trainer.step}")
        kind = "generator+critic" if "loss/generator" in logs else "critic"
        times[kind].append(time.perf_counter() - t)
        losses += [v for k, v in logs.items() if k.startswith("loss/")]
    for kind, ts in times.items():   # the first of each kind warms up kernels and the allocator
        row[f"sec_{kind}"] = round(sum(ts[1:]) / len(ts[1:]), 3) if len(ts) > 1 else None
        row[f"n_{kind}"] = max(len(ts) - 1, 0)
    row["losses_finite"] = all(math.isfinite(v) for v in losses)
    if cuda:
        row["train_peak_gib"] = round(gib(torch.cuda.max_memory_allocated()), 1)
    del trainer, teacher
    return row


def table(rows: list) -> str:
    head = ("| config | teacher params | trained params | batch × latent | K | s/iter critic | s/iter gen+critic "
            "| peak GiB (train) | peak GiB (build) | finite |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r.get('teacher_params', '?')} | | | | {r['error']} | | | | |")
            continue
        what = f"{r['trained_params'] / 1e6:,.1f} M" + (f" (LoRA r{r['lora_rank']})" if r["lora_rank"] else "")
        lines.append(f"| {r['config']} | {r['teacher_params'] / 1e9:.2f} B | {what} | {r['batch']} × "
                     f"{'×'.join(map(str, r['latent']))} | {r['student_steps']} | {r['sec_critic']} | "
                     f"{r['sec_generator+critic']} | {r.get('train_peak_gib', '-')} | {r.get('build_peak_gib', '-')} "
                     f"| {r['losses_finite']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="sdxl,flux", help="comma-separated: sdxl, flux (default %(default)s)")
    ap.add_argument("--iters", type=int, default=11,
                    help="DMD2 iterations per configuration (default %(default)s: generator phases at 0, 5, 10)")
    ap.add_argument("--out", default="runs/gpu_t2i", help="folder for the data files and results.json")
    ap.add_argument("--tiny", action="store_true", help="tiny configs of the same classes on the CPU (a smoke test)")
    a = ap.parse_args(argv)
    names = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        print(f"gpu_t2i.py: error: unknown configuration(s) {', '.join(unknown) or '(none)'}; choose from "
              f"{', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    if a.iters < 2:
        print("gpu_t2i.py: error: --iters must be at least 2 (the first iteration is a warm-up)", file=sys.stderr)
        return 2
    if a.tiny:
        device = "cpu"
    elif not torch.cuda.is_available():
        print("gpu_t2i.py: error: this benchmark builds full-size SDXL / FLUX teachers and needs a CUDA GPU "
              "(torch.cuda.is_available() is False); --tiny runs the same code at test size on the CPU",
              file=sys.stderr)
        return 2
    else:
        device = "cuda"
    out = Path(a.out)
    rows = []
    for name in names:
        cfg = dict(CONFIGS[name])
        if a.tiny:
            cfg.update(TINY[name], batch=1)
        print(f"[gpu_t2i] {name}: building {cfg['class']} on {device} …", flush=True)
        try:
            rows.append(run_config(name, cfg, device, a.iters, out))
        except torch.cuda.OutOfMemoryError as e:
            rows.append({"config": name, "error": f"out of memory: {str(e).splitlines()[0][:120]}"})
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"[gpu_t2i] {name}: {json.dumps(rows[-1])}", flush=True)
    dev = torch.cuda.get_device_name() if device == "cuda" else "cpu (--tiny)"
    print(f"\n## DMD2 iterations, {dev}, bf16 autocast, bf16 teacher, activation checkpointing\n")
    print(table(rows))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"device": dev, "rows": rows}, indent=2) + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
