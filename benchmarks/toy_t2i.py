"""Text-to-image end to end at toy scale, as a Stable Diffusion 1.5 user would run it: a StableDiffusionPipeline
folder made on the sklearn digits (``scripts/make_toy_t2i_pipeline.py``: a tiny AutoencoderKL, a frozen random CLIP
text encoder, a latent UNet2DConditionModel trained with the diffusers text-to-image recipe and 10 % empty
captions), then only the CLI:

    diffdistill encode-prompts PIPE --prompts prompts_seen.jsonl --out seen.safetensors      (+ held-out phrasings)
    diffdistill encode-data PIPE --data data/ --out latents.npz                               (PNGs + captions.jsonl)
    diffdistill distill --method dmd2 --teacher PIPE --data latents.npz --prompts seen.safetensors \\
        --student-steps 4 --set method.guidance_real=1.75          (backward simulation; GAN on the real latents)
    diffdistill distill --method sid --teacher PIPE --prompts seen.safetensors \\
        --set method.guidance_real=K --set method.guidance_fake=K --set method.guidance_fake_train=K   (SiD-LSG, data-free)
    diffdistill eval MODEL --data digits --prompts seen.safetensors|heldout.safetensors [--guidance W]

``eval`` decodes the latents with the pipeline's VAE and scores the 8×8 images in the digits classifier's feature
space (proxy-FID against the 1,500 training digits) and their conditional correctness: the share of samples the
classifier assigns to the digit the prompt asks for (the prompt files carry each row's class: ``"label"``). "seen"
are the training phrasings, "held-out" phrasings never used in training. Fixed iteration counts; one seed.

    python benchmarks/toy_t2i.py                                 # everything (~27 min on the shared 2-core CPU)
    python benchmarks/toy_t2i.py --pipeline runs/toy_t2i         # reuse a made pipeline (OUT/pipe, prompts, data)

Writes OUT/results.md (the table) and OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _subprocess import ROOT, cli, run


def evaluate(model: str, prompts: Path, out: Path, log: Path, n: int, extra=()) -> dict:
    run(cli("eval", model, "--data", "digits", "--prompts", str(prompts), "--seeds", f"0-{n - 1}", "--out",
            str(out), *extra), log)
    return json.loads(out.read_text())


def random_init_copy(pipe: Path, out: Path, seed: int = 0) -> Path:
    """The pipeline with its UNet re-initialised (same config, random weights): what a student is before any
    training if it does not start from the teacher — the floor the students must clear."""
    import shutil

    import torch
    from diffusers import UNet2DConditionModel
    if not (out / "unet" / "config.json").is_file():
        shutil.copytree(pipe, out, ignore=shutil.ignore_patterns("unet"), dirs_exist_ok=True)
        torch.manual_seed(seed)
        UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(pipe / "unet"))).save_pretrained(
            str(out / "unet"))
    return out


def last_checkpoint(run_dir: Path) -> str:
    return str(sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/toy_t2i")
    p.add_argument("--pipeline", help="folder made by scripts/make_toy_t2i_pipeline.py --out (default: make it "
                                      "in OUT)")
    p.add_argument("--vae-iters", type=int, default=1500)
    p.add_argument("--unet-iters", type=int, default=3000)
    p.add_argument("--dmd2-iters", type=int, default=400)
    p.add_argument("--sid-iters", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32, help="students' batch size (run.batch_size)")
    p.add_argument("--teacher-guidance", type=float, default=1.75, help="teacher CFG scale in its eval rows")
    p.add_argument("--dmd2-guidance", type=float, default=1.75, help="DMD2 real-score CFG (SD1.5: 1.75)")
    p.add_argument("--sid-kappa", type=float, default=1.5, help="SiD-LSG κ1 = κ2 = κ3 = κ4")
    p.add_argument("--teacher-steps", type=int, default=18, help="teacher Heun steps (NFE 2N-1, x2 with CFG)")
    p.add_argument("--num-samples", type=int, default=1000)
    a = p.parse_args(argv)
    out = Path(a.out)
    if not out.is_absolute():
        out = ROOT / out
    logs = out / "logs"
    t0, secs = time.time(), {}
    made = Path(a.pipeline) if a.pipeline else out
    if not a.pipeline:
        print("making the pipeline ...", flush=True)
        run([sys.executable, "scripts/make_toy_t2i_pipeline.py", "--out", str(out), "--vae-iters",
             str(a.vae_iters), "--unet-iters", str(a.unet_iters)], logs / "make.log")
        secs["make"] = time.time() - t0
    pipe, info = made / "pipe", json.loads((made / "toy_t2i.json").read_text())
    seen, held = out / "seen.safetensors", out / "heldout.safetensors"
    for name, f in (("seen", seen), ("heldout", held)):
        if not f.exists():
            run(cli("encode-prompts", str(pipe), "--prompts", str(made / f"prompts_{name}.jsonl"), "--out", str(f)),
                logs / f"encode-prompts-{name}.log")
    lat = out / "latents.npz"
    if not lat.exists():
        run(cli("encode-data", str(pipe), "--data", str(made / "data"), "--out", str(lat)), logs / "encode-data.log")
    common = ["--prompts", str(seen), "--set", f"run.batch_size={a.batch_size}", "--set", "run.sample_every=0",
              "--no-progress"]
    runs = {
        "dmd2": cli("distill", "--method", "dmd2", "--teacher", str(pipe), "--data", str(lat), "--student-steps",
                    "4", "--iters", str(a.dmd2_iters), "--set", f"method.guidance_real={a.dmd2_guidance}",
                    "--out", str(out / "runs" / "dmd2"), *common),
        "sid": cli("distill", "--method", "sid", "--teacher", str(pipe), "--iters", str(a.sid_iters),
                   *[x for k in ("guidance_real", "guidance_fake", "guidance_fake_train")
                     for x in ("--set", f"method.{k}={a.sid_kappa}")], "--out", str(out / "runs" / "sid"), *common),
    }
    for name, cmd in runs.items():
        if not (out / "runs" / name / "checkpoints").is_dir():
            t1 = time.time()
            print(f"distilling {name} ...", flush=True)
            run(cmd, logs / f"distill-{name}.log")
            secs[name] = time.time() - t1
    rows = [("teacher (Heun, CFG w = %g)" % a.teacher_guidance, str(pipe),
             ["--steps", str(a.teacher_steps), "--guidance", str(a.teacher_guidance)]),
            ("teacher (Heun, no CFG)", str(pipe), ["--steps", str(a.teacher_steps)]),
            ("teacher (Euler 4 steps, CFG)", str(pipe), ["--sampler", "euler", "--steps", "4", "--guidance",
                                                       str(a.teacher_guidance)]),
            ("DMD2 4-step (backward sim., real CFG %g)" % a.dmd2_guidance, last_checkpoint(out / "runs" / "dmd2"), []),
            ("SiD-LSG 1-step (κ = %g)" % a.sid_kappa, last_checkpoint(out / "runs" / "sid"), []),
            ("random-init UNet (Euler 1 step)", str(random_init_copy(pipe, out / "pipe_random")),
             ["--sampler", "euler", "--steps", "1"])]
    results = []
    for i, (name, model, extra) in enumerate(rows):
        r = {"model": name}
        for split, f in (("seen", seen), ("heldout", held)):
            m = evaluate(model, f, out / "metrics" / f"{i}-{split}.json", logs / f"eval-{i}-{split}.log",
                         a.num_samples, extra)
            r.update({"nfe": m["nfe"], f"proxy_fid_{split}": m["proxy_fid"],
                      f"class_accuracy_{split}": m["class_accuracy"], f"recall_{split}": m.get("recall")})
        results.append(r)
        print(r, flush=True)
    head = ("| model | NFE | proxy-FID (seen) | correct (seen) | recall (seen) | proxy-FID (held-out) | "
            "correct (held-out) |\n|---|---|---|---|---|---|---|\n")
    table = head + "".join(
        f"| {r['model']} | {r['nfe']} | {r['proxy_fid_seen']:.2f} | {100 * r['class_accuracy_seen']:.1f} % | "
        f"{r['recall_seen']:.2f} | {r['proxy_fid_heldout']:.2f} | {100 * r['class_accuracy_heldout']:.1f} % |\n"
        for r in results)
    notes = (f"\nOne seed; {a.num_samples} samples per cell (seeds 0-{a.num_samples - 1}, seed s gets prompt s mod N: "
             f"{len(json.loads(seen.with_suffix('.json').read_text())['prompts'])} seen / "
             f"{len(json.loads(held.with_suffix('.json').read_text())['prompts'])} held-out prompts). "
             f"VAE reconstruction MSE {info['vae_recon_mse_heldout']:.4f} on the held-out digits (pixels in [-1, 1]); "
             f"teacher UNet {info['unet_parameters'] / 1e6:.2f} M parameters, {info['unet_iters']} iterations; "
             f"DMD2 {a.dmd2_iters}, SiD {a.sid_iters} iterations at batch {a.batch_size}. Chance = 10 %.\n")
    (out / "results.md").write_text("# Toy text-to-image end to end (benchmarks/toy_t2i.py)\n\n" + table + notes)
    (out / "results.json").write_text(json.dumps({"rows": results, "args": vars(a), "pipeline": info,
                                                  "seconds": {k: round(v, 1) for k, v in secs.items()},
                                                  "total_seconds": round(time.time() - t0, 1)}, indent=2) + "\n")
    print(table + notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
