"""The ``--dry-run`` memory plan against the memory a real run uses, on the CPU; and the plan of networks that
cannot be allocated here (on the ``meta`` device). Results and their reading: benchmarks/notes/dry_run_memory.md.

1. For each case (the digits DMD2 / SiD default jobs; a random 27.9 M-parameter SongUNet teacher, 32×32×3, under
   DMD2 and SiD, with LoRA, activation checkpointing and the bf16 teacher), four fresh subprocesses, one thread each:

   * ``estimate``: ``distill(..., dry_run=True)`` and ``estimate_memory`` — what ``--dry-run`` prints — and the same
     job planned on the meta device (``run.device=meta``; the CPU's optimizer step, to compare like with like);
   * ``alloc``: the real run (``distill``, ``run.steps`` iterations, no sampling or checkpoints) under
     ``torch.profiler`` with ``profile_memory``: the running sum of every CPU allocation and free is torch's
     allocated bytes, and its maximum over the training window (from the end of the start-of-run check to the end
     of the last iteration) is the peak of tensors — the like-for-like figure for an estimate that counts tensors;
   * ``rss``: the same run without the profiler. Its resident size after the imports every run does (torch,
     diffdistill, tensorboard, peft, …) is the *import baseline*; the peak RSS (``VmHWM``) is read for the whole
     process and for the training window (``VmHWM`` reset by ``/proc/self/clear_refs`` at its start);
   * ``rss-mmap``: the same with glibc's mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``).

   The table gives the estimate, the meta plan, the allocated peak and their ratio (the 15 % check), the peak RSS,
   and the window's peak RSS less the import baseline, and less the non-tensor RSS at the window's start (its RSS
   then minus the tensors allocated then), each as a ratio to the estimate.

2. Meta-device plans: a diffusers ``UNet2DConditionModel`` with Stable Diffusion 1.5's published config and a
   ``FluxTransformer2DModel`` with FLUX.1's (19 double + 38 single blocks, width 3072), built from their config
   dicts under ``torch.device("meta")`` (no weights): parameter bytes and the bytes of the tensors autograd saves
   for backward in one forward at batch 1 and 2 (``module_memory_plan``), with and without checkpointing.

    python benchmarks/dry_run_vs_rss.py [--cases digits-dmd2,mid-sid] [--skip-meta | --meta-only] [--reuse]
                                        [--out runs/dry-run-vs-rss]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = 777_773   # bytes of the marker allocations that delimit the training window in the profiler's trace

MID_NET = ["--set", "net.img_channels=3", "--set", "net.img_resolution=32", "--set", "net.kwargs.model_channels=128",
           "--set", "net.kwargs.channel_mult=[1,2,2]", "--set", "net.kwargs.attn_resolutions=[16]"]

# name → (teacher, method, batch, steps, --set overrides). The digits jobs are the presets' (DMD2 steps its
# generator every 5th iteration, so 6 iterations hold two generator steps); the mid-size DMD2 jobs step the
# generator every iteration (dfake_gen_update_ratio=1: the same phases, fewer slow critic-only iterations), so
# their second iteration has both phases with every optimizer's state; SiD runs both phases every iteration.
MID_DMD2 = ["method.dfake_gen_update_ratio=1"]
# SiD is data-free, so its start-of-run check samples 128 images with the teacher (Heun, 35 steps): minutes for the
# mid-size teacher on one thread, before the measured window; those cases skip it ("no-start-check", not a --set)
NO_CHECK = ["no-start-check"]
CASES = {
    "digits-dmd2": ("digits", "dmd2", None, 6, []),
    "digits-sid": ("digits", "sid", None, 3, []),
    "mid-dmd2": ("mid", "dmd2", 8, 2, MID_DMD2),
    "mid-sid": ("mid", "sid", 8, 2, NO_CHECK),
    "mid-dmd2-lora": ("mid", "dmd2", 8, 2, MID_DMD2 + ["lora.rank=16"]),
    "mid-dmd2-ckpt": ("mid", "dmd2", 8, 2, MID_DMD2 + ["run.activation_checkpointing=[generator,fake_score]"]),
    "mid-sid-bf16": ("mid", "sid", 4, 2, NO_CHECK + ["run.teacher_dtype=bf16"]),
}
KINDS = ("estimate", "alloc", "rss", "rss-mmap")
# glibc keeps freed blocks below its (self-raising, up to 32 MiB) mmap threshold in its heaps; a fixed 128 KiB
# threshold maps every larger block on its own and returns it when freed, so RSS follows the live bytes
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


# ------------------------------------------------------------------------------------------------ children
def _status(key: str) -> int:
    """A /proc/self/status entry in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _run_flags(spec: dict, out: str, device: str = "cpu") -> dict:
    run = {"out": out, "steps": spec["steps"], "progress": False, "ckpt_every": 0, "sample_every": 0,
           "log_every": 1, "device": device, "overwrite": True}
    if spec["batch"]:
        run["batch_size"] = spec["batch"]
    return {"run": run}


def _sets(spec: dict) -> list[str]:
    """The case's --set overrides (without the "no-start-check" marker, which ``_imports`` applies)."""
    return [o for o in spec["set"] if o != "no-start-check"]


def _imports(spec: dict):
    """Every module a run imports, loaded before the baseline is read; with "no-start-check" in the case's sets the
    start-of-run check is turned off in this process."""
    import peft  # noqa: F401  (LoRA)
    import torch.profiler
    import torch.utils.tensorboard  # noqa: F401
    import tqdm  # noqa: F401

    import diffdistill.cli  # noqa: F401
    from diffdistill.distill import distill
    if "no-start-check" in spec["set"]:
        from diffdistill.train.trainer import Trainer
        Trainer.start_check = lambda self, n=128: None
    return distill


def child_estimate(spec: dict) -> dict:
    distill = _imports(spec)
    from diffdistill.train.memory import estimate_memory
    tr = distill(spec["method"], spec["teacher"], flags=_run_flags(spec, spec["out"]), overrides=_sets(spec),
                 dry_run=True)
    from diffdistill.errors import UserError
    t = time.perf_counter()
    out = {"cpu": {**_plan_terms(estimate_memory(tr)), "seconds": time.perf_counter() - t}}
    t = time.perf_counter()
    try:   # the same job planned on the meta device (the CPU's optimizer step, to compare like with like)
        meta = distill(spec["method"], spec["teacher"], flags=_run_flags(spec, spec["out"], device="meta"),
                       overrides=_sets(spec), dry_run=True)
        out["meta"] = {**_plan_terms(estimate_memory(meta, target="cpu")), "seconds": time.perf_counter() - t}
    except UserError as e:
        out["meta"] = {"refused": str(e)}
    return out


def _plan_terms(est: dict) -> dict:
    worst = est["worst_phase"]
    return {"peak": est["peak"], "weights": est["weights"], "optimizer_state": est["optimizer_state"],
            "step_temporaries": est["step_temporaries"].get(worst, 0), "loose": est["loose_bytes"],
            "grads": est["grads"].get(worst, 0), "activations": est["activations"].get(worst, 0),
            "worst_phase": worst, "per_phase": {ph: est["activations"][ph] + est["grads"].get(ph, 0)
                                                for ph in est["activations"]},
            "params": sum(i.params for i in est["networks"] if not i.shared_with), "errors": est["errors"],
            "teacher_params": next((i.params for i in est["networks"] if i.name == "teacher"), 0),
            "trained_params": sum(p.numel() for i in est["networks"] if i.phases for p in i.module.parameters()
                                  if p.requires_grad)}


def child_rss(spec: dict) -> dict:
    import gc
    distill = _imports(spec)
    from diffdistill.train.trainer import Trainer
    gc.collect()
    baseline = _status("VmRSS")
    marks = {}
    original = Trainer.start_check

    def start_check(self):
        original(self)
        gc.collect()
        marks["start_rss"] = _status("VmRSS")
        marks["setup_hwm"] = _status("VmHWM")
        Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS, so the window's peak is its own

    def on_step(tr):
        if tr.step == spec["steps"]:
            marks["window_hwm"] = _status("VmHWM")
    Trainer.start_check = start_check
    distill(spec["method"], spec["teacher"], flags=_run_flags(spec, spec["out"]), overrides=_sets(spec),
            on_step=on_step)
    return {"baseline": baseline, **marks, "process_hwm": max(marks["setup_hwm"], _status("VmHWM"))}


def child_alloc(spec: dict) -> dict:
    distill = _imports(spec)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from diffdistill.train.trainer import Trainer
    original = Trainer.start_check

    def mark():
        torch.empty(MARK, dtype=torch.uint8)

    def start_check(self):
        original(self)
        mark()

    def on_step(tr):
        if tr.step == spec["steps"]:
            mark()
    Trainer.start_check = start_check
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        distill(spec["method"], spec["teacher"], flags=_run_flags(spec, spec["out"]), overrides=_sets(spec),
                on_step=on_step)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.device("cpu").type and e.nbytes())
    if not events:
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.nbytes())
    total, peak_all, window, peak_window, inside = 0, 0, [], 0, False
    for _, n in events:
        total += n
        peak_all = max(peak_all, total)
        if n == MARK:
            window.append(total - n)
            inside = len(window) == 1
            continue
        if inside:
            peak_window = max(peak_window, total)
    if len(window) != 2:
        raise RuntimeError(f"found {len(window)} window markers in the profiler's trace, expected 2")
    return {"alloc_peak_window": peak_window, "alloc_at_start": window[0], "alloc_peak_process": peak_all,
            "events": len(events)}


# ------------------------------------------------------------------------------------------------ parent
def _child(kind: str, spec: dict, log: Path, reuse: bool = False) -> dict:
    """The result of one child process (``reuse``: an earlier result for the same spec, when there is one)."""
    result = log.with_suffix(".json")
    if reuse and result.exists():
        done = json.loads(result.read_text())
        if done.get("spec") == spec:
            return done
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **(MMAP_ENV if kind == "rss-mmap" else {}))
    cmd = [sys.executable, __file__, "--child", kind, "--spec", json.dumps(spec), "--result", str(result)]
    with open(log, "w") as f:
        rc = subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if rc != 0:
        raise SystemExit(f"{kind} child failed ({rc}):\n{log.read_text()[-3000:]}")
    return json.loads(result.read_text())


def _cli(args: list[str], log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "diffdistill.cli", *args], check=False, stdout=f,
                            stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(args)}\n{log.read_text()[-2000:]}")


def make_teachers(root: Path) -> dict:
    """Teachers with random weights (one EDM iteration through train-teacher, exported to safetensors so loading
    one holds its weights only): the digits SongUNet, and a 32×32×3 SongUNet (128 channels, mult 1-2-2, 2 blocks,
    attention at 16; 27.9 M parameters) trained on 512 random images."""
    import numpy as np
    teachers = {}
    npz = root / "random32.npz"
    if not npz.exists():
        np.savez(npz, images=np.random.default_rng(0).integers(0, 256, (512, 32, 32, 3)).astype(np.uint8))
    for name, extra in (("digits", ["--preset", "digits"]),
                        ("mid", ["--preset", "digits", "--data", str(npz), *MID_NET])):
        out = root / f"teacher-{name}.safetensors"
        if not out.exists():
            run = root / f"teacher-{name}"
            _cli(["train-teacher", *extra, "--iters", "1", "--batch-size", "2", "--out", str(run), "--overwrite",
                  "--no-progress", "--set", "run.sample_every=0"], root / f"teacher-{name}.log")
            _cli(["export", str(max((run / "checkpoints").glob("ckpt-*.pt"))), str(out)],
                 root / f"export-{name}.log")
        teachers[name] = str(out)
    return teachers


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def compare(cases: list[str], root: Path, reuse: bool = False) -> list[dict]:
    teachers = make_teachers(root)
    rows = []
    for name in cases:
        teacher, method, batch, steps, sets = CASES[name]
        spec = {"method": method, "teacher": teachers[teacher], "batch": batch, "steps": steps, "set": sets}
        t = time.time()
        row = {"case": name, **spec}
        for kind in KINDS:
            row[kind] = _child(kind, {**spec, "out": str(root / "runs" / f"{name}-{kind}")}, root / f"{name}-{kind}.log",
                               reuse)
        row["seconds"] = time.time() - t
        rows.append(row)
        print(_row(row), flush=True)
    return rows


HEADER = ("| case | teacher params | trained params | batch | estimate | meta plan | allocated peak (profiler) | "
          "estimate / allocated | peak RSS | RSS − import baseline | estimate / that | RSS − non-tensor RSS | "
          "estimate / that | same, mmap threshold 128 KiB | estimate / that |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _row(r: dict) -> str:
    """One case: the plan, torch's allocated peak and the resident size over the training window — less the
    baseline after imports, and less the RSS that is not tensors at the window's start (its RSS then minus the
    tensors allocated then: modules loaded on first use, the data set's readers, the start-of-run check's
    leftovers), with glibc's defaults and with a fixed mmap threshold."""
    e, m, a = r["estimate"]["cpu"], r["estimate"]["meta"], r["alloc"]

    def rss(d):
        return d["window_hwm"] - (d["start_rss"] - a["alloc_at_start"])
    meta = f"{mib(m['peak'])} MiB" if "peak" in m else "refused: bf16 autocast has no meta backend"
    base = r["rss"]["window_hwm"] - r["rss"]["baseline"]
    return (f"| {r['case']} | {e['teacher_params']:,} | {e['trained_params']:,} | {r['batch'] or 'preset'} | "
            f"{mib(e['peak'])} MiB | {meta} | {mib(a['alloc_peak_window'])} MiB | "
            f"{e['peak'] / a['alloc_peak_window']:.3f} | {mib(r['rss']['process_hwm'])} MiB | {mib(base)} MiB | "
            f"{e['peak'] / base:.3f} | {mib(rss(r['rss']))} MiB | {e['peak'] / rss(r['rss']):.3f} | "
            f"{mib(rss(r['rss-mmap']))} MiB | {e['peak'] / rss(r['rss-mmap']):.3f} |")


TERMS = ("| case | weights and buffers | optimizer state | data and other tensors | worst phase | its gradients | "
         "its activations | its step temporaries | CPU plan s | meta plan s |\n|---|---|---|---|---|---|---|---|---|---|")


def _terms(r: dict) -> str:
    e, m = r["estimate"]["cpu"], r["estimate"]["meta"]
    return (f"| {r['case']} | {mib(e['weights'])} | {mib(e['optimizer_state'])} | {mib(e['loose'])} | "
            f"{e['worst_phase']} | {mib(e['grads'])} | {mib(e['activations'])} | {mib(e['step_temporaries'])} | "
            f"{e['seconds']:.1f} | {m.get('seconds', float('nan')):.1f} |")


SD15_UNET = {   # runwayml/stable-diffusion-v1-5 unet/config.json (the entries that differ from the class defaults)
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32}
FLUX1_TRANSFORMER = {   # black-forest-labs/FLUX.1-dev transformer/config.json
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56]}


def sd15_inputs(b: int) -> dict:
    """A UNet2DConditionModel forward at batch b: 64×64×4 latents (512² images) and CLIP text states (b, 77, 768)."""
    import torch
    return {"sample": torch.randn(b, 4, 64, 64), "timestep": torch.full((b,), 500.0),
            "encoder_hidden_states": torch.randn(b, 77, 768)}


def flux_inputs(b: int, side: int = 64, text: int = 512) -> dict:
    """A FluxTransformer2DModel forward at batch b: a 1024² image (128² latents of 16 channels packed 2×2 into
    64² = 4,096 tokens of 64), 512 T5 tokens of 4,096, CLIP pooled 768, guidance 3.5."""
    import torch
    ids = torch.zeros(side * side, 3)
    ids[:, 1] = torch.arange(side).repeat_interleave(side)
    ids[:, 2] = torch.arange(side).repeat(side)
    return {"hidden_states": torch.randn(b, side * side, 64), "encoder_hidden_states": torch.randn(b, text, 4096),
            "pooled_projections": torch.randn(b, 768), "timestep": torch.full((b,), 0.5), "img_ids": ids,
            "txt_ids": torch.zeros(text, 3), "guidance": torch.full((b,), 3.5)}


def meta_plans() -> list[str]:
    """Part 2: SD1.5's UNet and FLUX.1's transformer planned on the meta device (trainable, train mode)."""
    import torch

    from diffdistill.nets.checkpointing import set_activation_checkpointing
    from diffdistill.train.memory import module_memory_plan
    try:
        from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    except ImportError as e:
        return [f"diffusers not importable ({e}): meta plans skipped"]
    lines = []
    for name, cls, cfg, inputs in (("SD1.5 UNet2DConditionModel (64×64×4 latents, text (B, 77, 768))",
                                    UNet2DConditionModel, SD15_UNET, sd15_inputs),
                                   ("FLUX.1 FluxTransformer2DModel (4,096 image + 512 text tokens)",
                                    FluxTransformer2DModel, FLUX1_TRANSFORMER, flux_inputs)):
        for ckpt in (False, True):
            t = time.perf_counter()
            try:
                with torch.device("meta"):
                    model = cls(**cfg)
                    examples = [inputs(1), inputs(2)]
                model.train()
                if ckpt:
                    set_activation_checkpointing(model, True)
                plan = module_memory_plan(model, examples)
            except Exception as e:  # noqa: BLE001  (say what does not run on meta, and go on)
                lines.append(f"| {name} | {'on' if ckpt else 'off'} | not measured: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]} | | | |")
                continue
            b1, b2 = plan["saved"]
            lines.append(f"| {name} | {'on' if ckpt else 'off'} | {plan['params']:,} ({mib(plan['param_bytes'])} MiB "
                         f"fp32) | {mib(b1)} MiB | {mib(b2)} MiB | {mib(plan['recomputed'][1])} MiB | "
                         f"{time.perf_counter() - t:.1f} s |")
    head = ("| network on meta | checkpointing | parameters | saved for backward, batch 1 | batch 2 | of which "
            "recomputed block (batch 2) | seconds |")
    return [head, "|---|---|---|---|---|---|---|", *lines]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    p.add_argument("--out", default="runs/dry-run-vs-rss")
    p.add_argument("--reuse", action="store_true", help="keep the results of children already run with the same spec")
    p.add_argument("--skip-meta", action="store_true", help="skip part 2 (diffusers networks on meta)")
    p.add_argument("--meta-only", action="store_true", help="part 2 only")
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        import torch
        torch.set_num_threads(1)
        spec = json.loads(a.spec)
        res = {"estimate": child_estimate, "rss": child_rss, "rss-mmap": child_rss,
               "alloc": child_alloc}[a.child](spec)
        res["spec"] = spec
        Path(a.result).write_text(json.dumps(res))
        return 0
    root = Path(a.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    text = []
    if not a.meta_only:
        cases = [c for c in a.cases.split(",") if c]
        unknown = [c for c in cases if c not in CASES]
        if unknown:
            p.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
        print(HEADER, flush=True)
        rows = compare(cases, root, a.reuse)
        (root / "results.json").write_text(json.dumps(rows, indent=1))
        text += [HEADER, *map(_row, rows), "", "Estimate terms (MiB):", "", TERMS, *map(_terms, rows), ""]
        print("\n".join(text[len(rows) + 2:]), flush=True)
    if not a.skip_meta:
        meta = meta_plans()
        print("\n".join(meta), flush=True)
        text += meta
    (root / "results.md").write_text("\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
