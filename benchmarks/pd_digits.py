"""PD, CFD and RDD on the shipped digits teacher, halving N₀ → 1 steps: proxy-FID after every halving, with the
wall-clock of each stage, in one table.

    OMP_NUM_THREADS=1 python benchmarks/pd_digits.py                                   # presets: 8 → 1, 500 it./halving
    OMP_NUM_THREADS=1 python benchmarks/pd_digits.py --iters-per-halving 100 --batch-size 64 --num-samples 1000
    OMP_NUM_THREADS=1 python benchmarks/pd_digits.py --methods rdd --iters-per-halving 100 --batch-size 64 \
        --num-samples 1000 --set method.rdd_compat_view_bug=true                    # the official enqueue rows

Each row is the student a halving ends with, sampled with deterministic DDIM on its own σ grid; the first row of a
method (N₀ steps) is the starting point, the teacher with DDIM on the N₀-step grid, and the "teacher DDIM" column is
the teacher with the same number of steps (what distillation buys). Proxy-FID: 64-d features of the project's
digits classifier against the 1,500 training digits (not the classifier CFD/RDD match), n samples, seed 0.
Results also go to --out/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffdistill.demo import SHIPPED_TEACHER
from diffdistill.distill import distill
from diffdistill.eval.evaluate import evaluate_net
from diffdistill.io import load_for_sampling
from diffdistill.methods.pd import pd_student_sigmas


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=str(SHIPPED_TEACHER))
    p.add_argument("--methods", default="pd,cfd,rdd")
    p.add_argument("--start-steps", type=int, default=8)
    p.add_argument("--iters-per-halving", type=int, help="default: each method's images preset (500)")
    p.add_argument("--batch-size", type=int, help="default: the preset's (128)")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-pd-digits")
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", default=[], help="override, e.g. method.lr=5e-4 (every method)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    teacher, tstate = load_for_sampling(a.teacher, a.device)
    data = tstate["config"]["data"]
    teacher_rows = {}
    n = a.start_steps
    while n >= 1:
        t0 = time.perf_counter()
        m = evaluate_net(teacher, {"sampler": "ddim", "sigmas": pd_student_sigmas(n, teacher.sigma_min,
                                                                                    teacher.sigma_max)},
                         data, a.num_samples, seed=0, device=a.device)
        teacher_rows[n] = {"proxy_fid": m["proxy_fid"], "eval_s": time.perf_counter() - t0}
        print(f"teacher DDIM {n} step(s): proxy-FID {m['proxy_fid']:.2f}", flush=True)
        n //= 2

    results = {"teacher": a.teacher, "start_steps": a.start_steps, "num_samples": a.num_samples,
               "teacher_ddim": teacher_rows, "methods": {}}
    for method in a.methods.split(","):
        run = {"out": str(out / method), "progress": False, "ckpt_every": 0, "sample_every": 0, "seed": a.seed,
               "device": a.device}
        if a.batch_size:
            run["batch_size"] = a.batch_size
        opts = {"start_steps": a.start_steps}
        if a.iters_per_halving:
            opts["iters_per_halving"] = a.iters_per_halving
        rows = [{"steps": a.start_steps, "proxy_fid": teacher_rows[a.start_steps]["proxy_fid"], "train_s": 0.0,
                 "note": "start (teacher)"}]
        last = {"t": 0.0}

        def on_step(tr):
            K = tr.method.iters_per_halving
            if tr.step % K or tr.step // K > len(tr.method.stages):
                return
            stage_train = tr.train_seconds - last["t"]
            last["t"] = tr.train_seconds
            t0 = time.perf_counter()
            m = evaluate_net(tr.method.sampling_net(), tr.method.sampling_spec(), data, a.num_samples, seed=0,
                             device=a.device)
            rows.append({"steps": tr.method.student_steps, "proxy_fid": m["proxy_fid"], "train_s": stage_train,
                         "eval_s": time.perf_counter() - t0, "nfe": m["nfe"]})
            print(f"{method}: {tr.method.student_steps} step(s) after {tr.step} it.: proxy-FID {m['proxy_fid']:.2f} "
                  f"(stage {stage_train:.0f} s)", flush=True)

        torch.manual_seed(a.seed)
        tr = distill(method, a.teacher, flags={"run": run, "method": opts}, overrides=a.set, on_step=on_step)
        results["methods"][method] = {"rows": rows, "iters_per_halving": tr.method.iters_per_halving,
                                      "batch_size": tr.cfg["run"]["batch_size"], "lr": tr.cfg["method"].get("lr"),
                                      "train_seconds": tr.train_seconds}
        # the largest gradient norm of every phase over the run (RDD: is the head's clip at run.grad_clip binding?)
        logs = [json.loads(line) for line in (out / method / "log.jsonl").read_text().splitlines()]
        results["methods"][method]["grad_norm_max"] = {
            k.split("/", 1)[1]: max(r[k] for r in logs if k in r) for k in {k for r in logs for k in r}
            if k.startswith("grad_norm_max/")}

    total = time.perf_counter() - t_start
    results["total_seconds"] = total
    (out / "results.json").write_text(json.dumps(results, indent=2))
    methods = list(results["methods"])
    print(f"\nproxy-FID (n={a.num_samples}) after each halving; teacher {a.teacher}; stage wall-clock in seconds")
    print("| steps | teacher DDIM | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for n in sorted(teacher_rows, reverse=True):
        cells = []
        for mth in methods:
            row = next((r for r in results["methods"][mth]["rows"] if r["steps"] == n), None)
            cells.append("–" if row is None else (f"{row['proxy_fid']:.1f}" + (f" ({row['train_s']:.0f} s)"
                                                                               if row["train_s"] else " (start)")))
        print(f"| {n} | {teacher_rows[n]['proxy_fid']:.1f} | " + " | ".join(cells) + " |")
    for mth in methods:
        r = results["methods"][mth]
        print(f"{mth}: {r['iters_per_halving']} it./halving, batch {r['batch_size']}, lr {r['lr']}, "
              f"training {r['train_seconds']:.0f} s; largest gradient norm per phase "
              + ", ".join(f"{k} {v:.3g}" for k, v in sorted(r["grad_norm_max"].items())))
    print(f"total wall-clock {total:.0f} s (training, evaluation and the classifier/teacher set-up)")


if __name__ == "__main__":
    main()
