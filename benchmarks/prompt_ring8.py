"""Distillation of a teacher conditioned on prompt embeddings: 2-D ring8 where each of the 8 modes has its own
"prompt" (random token embeddings [3, 8] with a mask and a pooled vector; a separate null prompt for CFG). The
teacher (MLP with `PromptEmbedding`, 10 % prompt dropout) is trained here, then 1-step DMD2 and SiD students are
distilled data-free from the encoded prompts (`--prompts`), unguided and with the real score guided (w = 2).

    python benchmarks/prompt_ring8.py                       # teacher 1,500 it., students 4 min each
    python benchmarks/prompt_ring8.py --budget-minutes 8 --teacher-iters 3000

Reported per model (4,000 samples, seed s gets prompt s mod 8): prompt accuracy (the share of samples nearest to the
mode their prompt names and within 3 std of it; chance 12.5 %), the share of high-quality samples (within 3 std of
any mode) and the sliced W2 of all samples to the data. Writes results.md / results.json under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from _subprocess import cli, run

from diffdistill.data import RING8_STD, dataset_from_config, mode_assignments, ring8_modes
from diffdistill.diffusion.condition import Condition
from diffdistill.eval.metrics import sliced_w2

K, L, D, P = 8, 3, 8, 4


def prompts(seed: int = 0) -> Condition:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(K, L, dtype=torch.int64)
    mask[1::2, -1] = 0
    null = Condition(torch.randn(1, L, D, generator=g), torch.tensor([[1, 0, 0]]), torch.zeros(1, P))
    return Condition(torch.randn(K, L, D, generator=g), mask, torch.randn(K, P, generator=g), {}, null)


def write_data(root: Path) -> tuple[Path, Path, torch.Tensor]:
    ds = dataset_from_config({"name": "ring8", "n": 20000, "seed": 0})
    modes = mode_assignments(ds.x, ring8_modes(), RING8_STD, max_stds=1e9)
    bank = prompts()
    data, bank_file = root / "ring8_prompts.npz", root / "prompts.npz"
    np.savez(data, points=ds.x.numpy(), **{k: v.numpy() for k, v in bank.rows(modes).state().items()})
    np.savez(bank_file, **{k: v.numpy() for k, v in bank.state().items()})
    return data, bank_file, ds.x


def score(samples: Path, data_x: torch.Tensor) -> dict:
    z = np.load(samples)
    x, asked = torch.as_tensor(z["samples"]), torch.as_tensor(z["prompt_index"])
    near = mode_assignments(x, ring8_modes(), RING8_STD, max_stds=3.0)
    return {"prompt_accuracy": float((near == asked).float().mean()),
            "high_quality": float((near >= 0).float().mean()),
            "sliced_w2": float(sliced_w2(x, data_x[:len(x)], seed=0))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench_prompt_ring8")
    ap.add_argument("--teacher-iters", type=int, default=1500)
    ap.add_argument("--budget-minutes", type=float, default=4.0)
    ap.add_argument("--methods", default="dmd2,sid")
    ap.add_argument("--guidance", default="1,2", help="guidance_real values of the students")
    a = ap.parse_args()
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    data, bank, data_x = write_data(root)
    net = ["--set", "net.kwargs.embed_dim=8", "--set", "net.kwargs.pooled_dim=4", "--set", "net.prompt_tokens=3"]
    run(cli("train-teacher", "--preset", "ring8", "--data", str(data), "--out", str(root / "teacher"), "--iters",
            str(a.teacher_iters), "--no-progress", "--overwrite", "--set", "method.label_dropout=0.1", *net),
        root / "teacher.log")
    teacher = sorted((root / "teacher" / "checkpoints").glob("ckpt-*.pt"))[-1]
    rows = []
    for w in [float(v) for v in a.guidance.split(",")]:
        s = root / f"teacher-w{w:g}.npz"
        run(cli("sample", str(teacher), "--prompts", str(bank), "--num-samples", "4000", "--out", str(s),
                "--guidance", str(w)), s.with_suffix(".log"))
        rows.append({"model": f"teacher (35 NFE), w = {w:g}", **score(s, data_x)})
        for method in a.methods.split(","):
            out = root / f"{method}-w{w:g}"
            run(cli("distill", "--method", method, "--teacher", str(teacher), "--prompts", str(bank), "--out",
                    str(out), "--budget-minutes", str(a.budget_minutes), "--no-progress", "--overwrite",
                    "--set", f"method.guidance_real={w}"), root / f"{method}-w{w:g}.log")
            final = sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]
            s = root / f"{method}-w{w:g}.npz"
            run(cli("sample", str(final), "--num-samples", "4000", "--out", str(s)), s.with_suffix(".log"))
            rows.append({"model": f"{method} 1-step, guidance_real = {w:g} ({int(final.stem.split('-')[1])} it.)",
                         **score(s, data_x)})
            print(rows[-1], flush=True)
    lines = ["| model | prompt accuracy | high quality | sliced W2 |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {100 * r['prompt_accuracy']:.1f} % | {100 * r['high_quality']:.1f} % | "
              f"{r['sliced_w2']:.4f} |" for r in rows]
    (root / "results.md").write_text("\n".join(lines) + "\n")
    (root / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
