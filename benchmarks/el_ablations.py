"""EL ablations on digits, over seeds: which part of the embedding loss matters — the number of random feature
networks, their family (conv / MLP on flat pixels / no network at all), the kernel's bandwidth rule, the weight.

    OMP_NUM_THREADS=1 python benchmarks/el_ablations.py          # cd, seeds 0,1,2, 300 it. (≈ 80 min, shared CPU)
    OMP_NUM_THREADS=1 python benchmarks/el_ablations.py --method diff_instruct --variants base,default,pixels,count1

Every variant starts from EL's defaults (relative weight 3, four conv nets, five-bandwidth RBF mixture around the
median heuristic) and changes one thing; ``base`` is the method without EL. Each runs once per seed with the same
iterations, evaluations and seeds as ``el_efficiency.py`` (its ``run_one``): proxy-FID of 1-step samples (n
samples, seed 0) every ``--eval-every`` iterations, and the last checkpoint with ``--final-samples`` samples
(final proxy-FID, recall, class TV). The table gives mean ± 95 % Student-t
interval over seeds, iterations to the base run's final proxy-FID (same seed), and Welch's two-sided p of
the final proxy-FID against the default EL and against the base. Writes --out/results.json and --out/report.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from el_efficiency import backfill_final_evals, ci_cell, done_runs, final_eval, iters_to, run_one
from diffdistill.config import load_preset
from diffdistill.demo import SHIPPED_TEACHER
from diffdistill.eval.stats import welch_p
from diffdistill.methods.registry import get_method

# name → (what it changes, the el section's overrides on top of the defaults); None = no EL
VARIANTS = {
    "base": ("no EL", None),
    "default": ("EL defaults: 4 conv nets, RBF mixture ×{¼…4} of the median, relative weight 3", {}),
    "count1": ("1 random network (ReLU)", {"count": 1}),
    "count8": ("8 random networks (activations cycled)", {"count": 8}),
    "relu4": ("4 networks, all ReLU (no activation diversity)", {"activations": ["relu"]}),
    "mlp": ("MLP family on flattened pixels (no spatial prior)", {"arch": "mlp"}),
    "pixels": ("no network: MMD on raw pixels", {"arch": "pixels"}),
    "median1": ("one RBF bandwidth: the median heuristic alone", {"scales": [1.0]}),
    "linear": ("linear kernel (matches feature means only; no bandwidth)", {"kernel": "linear"}),
    "weight1": ("relative weight 1", {"weight": 1.0}),
    "weight10": ("relative weight 10", {"weight": 10.0}),
}
DEFAULT_SET = "base,default,count1,mlp,pixels,median1,weight1,weight10"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=str(SHIPPED_TEACHER))
    p.add_argument("--method", default="cd")
    p.add_argument("--variants", default=DEFAULT_SET, help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--final-samples", type=int, default=2000, help="samples of the last checkpoint's evaluation "
                                                                   "(final proxy-FID and diversity; 0: the curve's "
                                                                   "last point)")
    p.add_argument("--final-window", type=int, default=2, help="the base's target: mean of its last k evaluations")
    p.add_argument("--out", default="runs/bench-el-ablations")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out/results.json")
    p.add_argument("--set", action="append", default=[], help="override for every run (el.KEY: EL runs only)")
    a = p.parse_args()
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if "base" not in names:
        names.insert(0, "base")       # the target comes from it
    seeds = [int(s) for s in a.seeds.split(",")]
    method = get_method(a.method.replace("-", "_")).name
    batch = load_preset(method, "images")["run"]["batch_size"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    runs = done_runs(a, lambda r: r["variant"] in names and r["seed"] in seeds)   # kept by --resume
    done = {r["tag"] for r in runs}
    for seed in seeds:
        for name in names:
            overrides = VARIANTS[name][1]
            el = None if overrides is None else {"weight": 3.0, "mode": "relative", **overrides}
            tag = f"{method}-s{seed}-{name}"
            if tag in done:
                continue
            print(f"[{tag}] {a.iters} it., el = {el}", flush=True)
            r = run_one(a, method, seed, batch, el, a.iters, None, tag)
            r["variant"], r["tag"] = name, tag
            r["final_eval"] = final_eval(a, r)
            runs.append(r)
            (out / "results.json").write_text(json.dumps({"args": vars(a), "runs": runs}, indent=1))
    backfill_final_evals(a, runs)

    def final(r):   # the last checkpoint's large evaluation where there is one, else the curve's last point
        return r.get("final_eval") or r["curve"][-1]

    rows = {name: [] for name in names}
    for seed in seeds:
        mine = {r["variant"]: r for r in runs if r["seed"] == seed}
        tail = [pt["proxy_fid"] for pt in mine["base"]["curve"][-a.final_window:]]
        target = sum(tail) / len(tail)
        for name, r in mine.items():
            it, _ = iters_to(r["curve"], target)
            rows[name].append({"final": final(r)["proxy_fid"], "recall": final(r).get("recall"),
                               "class_tv": final(r).get("class_tv"), "iters_to_target": it,
                               "train_seconds": r["train_seconds"], "target": target})

    def p_cell(name, ref):
        if ref not in rows or name == ref or len(seeds) < 2:
            return "—"
        pv = welch_p([r["final"] for r in rows[name]], [r["final"] for r in rows[ref]])
        return "—" if pv is None else f"{pv:.2g}" + (" *" if pv < 0.05 else "")

    minutes = round((time.perf_counter() - t0) / 60, 1)
    lines = [f"# EL ablations: {method} on digits", "",
             f"Teacher `{a.teacher}`; {a.iters} iterations at the images preset's batch {batch}; proxy-FID of 1-step "
             f"samples (n = {a.num_samples}, seed 0) every {a.eval_every} iterations, the last checkpoint with n = "
             f"{a.final_samples or a.num_samples}; seeds {a.seeds}; {minutes} min "
             f"in all. Cells: mean ± 95 % Student-t interval over seeds. Target = the same seed's base run's final "
             f"proxy-FID (mean of its last {a.final_window} evaluations). * = Welch p < 0.05.", "",
             "| variant | what changes | final proxy-FID | best of curve (optimistic) | recall | class TV | "
             "iters to the base's final | train s | p vs default EL | p vs base |", "|" + "---|" * 10]
    for name in names:
        g = rows[name]
        best = [min(pt["proxy_fid"] for pt in r["curve"]) for r in runs if r["variant"] == name]
        lines.append(f"| {name} | {VARIANTS[name][0]} | {ci_cell([r['final'] for r in g])} | {ci_cell(best)} | "
                     f"{ci_cell([r['recall'] for r in g], '.3f')} | {ci_cell([r['class_tv'] for r in g], '.3f')} | "
                     f"{ci_cell([r['iters_to_target'] for r in g], '.0f')} | "
                     f"{ci_cell([r['train_seconds'] for r in g], '.0f')} | "
                     f"{p_cell(name, 'default')} | {p_cell(name, 'base')} |")
    (out / "results.json").write_text(json.dumps({"args": vars(a), "runs": runs, "rows": rows,
                                                  "minutes": minutes}, indent=1))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
