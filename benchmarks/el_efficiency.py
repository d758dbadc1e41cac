"""EL efficiency on digits: iterations (and training wall-clock) each base method needs to reach its own final
proxy-FID, with and without the embedding loss, same seeds; also at half and quarter batch size.

    OMP_NUM_THREADS=1 python benchmarks/el_efficiency.py                                # all methods, preset lengths
    OMP_NUM_THREADS=1 python benchmarks/el_efficiency.py --methods dmd2 --iters 1000 --weights 0.3,1,3,10 \\
        --seeds 0,1,2 --set dmd2:method.gan_weight=0
    OMP_NUM_THREADS=1 python benchmarks/el_efficiency.py --iters 150 --eval-every 25 --num-samples 500 \\
        --batch-fractions 1,0.5,0.25 --budget-minutes 10                               # reduced run (≈ 10 min)

For every (method, seed): the base run (no EL) at the preset's batch B sets the target, its final proxy-FID (mean of
the last ``--final-window`` evaluations, to damp the noise); then each EL weight of ``--weights`` (mode ``--mode``,
other EL options via ``--set el.KEY=...``) runs with the same seed. "iters to target" is the first evaluation at
which a run's proxy-FID is at or below the target (the base run reaches its own target at the latest at its end);
the saving is base iterations ÷ EL iterations. With ``--batch-fractions`` the base and the first EL weight also run
at B·f (same iteration budget, same target). Proxy-FID: 1-step samples of the sampling network (the EMA where the
method has one), 64-d features of the project's digits classifier against the 1,500 training digits, n samples,
seed 0 — a noisy proxy, so treat single-seed differences of a few points as noise.

``--budget-minutes`` caps the whole benchmark's training wall-clock: the remaining budget is split evenly over the
runs not yet done (each run stops at --iters or at its share, whichever comes first; evaluation is not counted).
Writes --out/results.json, --out/report.md and one curve plot per method (--out/curves-<method>.png).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffdistill.demo import SHIPPED_TEACHER
from diffdistill.distill import distill
from diffdistill.eval.evaluate import evaluate_checkpoint, evaluate_net
from diffdistill.eval.stats import fmt_ci, t_interval, welch_p
from diffdistill.io import load_for_sampling
from diffdistill.eval.plots import line_plot
from diffdistill.config import load_preset
from diffdistill.methods.registry import get_method

# Method options pointing at files the runs of one benchmark share (DMD's teacher pairs are computed once).
SHARED_FILES = {"dmd": {"pairs_path": "dmd_pairs"}}
# Diversity and correctness kept from every evaluation (class accuracy only for a class-conditional teacher).
DIVERSITY = ("precision", "recall", "class_tv", "class_accuracy", "cond_spread", "cond_recall")


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def run_one(a, method: str, seed: int, batch: int, el: dict | None, iters: int, minutes: float | None, tag: str):
    """One training run with evaluations every ``a.eval_every`` iterations; returns the curve and timings."""
    data = {"name": "digits", "split": "train"}
    curve = []

    def evaluate(tr):
        m = evaluate_net(tr.method.sampling_net(), tr.method.sampling_spec(), data, a.num_samples, seed=0,
                         device=a.device)
        curve.append({"iter": tr.step, "train_seconds": round(tr.train_seconds, 2), "proxy_fid": m["proxy_fid"],
                      **{k: m[k] for k in DIVERSITY if k in m}})
        print(f"  [{tag}] it {tr.step:5d}  {tr.train_seconds:7.1f} s  proxy-FID {m['proxy_fid']:8.2f}", flush=True)

    def on_step(tr):
        if tr.step % a.eval_every == 0:
            evaluate(tr)

    run = {"out": str(Path(a.out) / "runs" / tag), "steps": iters, "batch_size": batch, "seed": seed,
           "progress": False, "ckpt_every": 0, "sample_every": 0, "log_every": max(1, a.eval_every),
           "device": a.device, "overwrite": True}   # a run re-done here (a killed benchmark) starts over
    if minutes:
        run["max_minutes"] = minutes
    flags = {"run": run}
    # Files a method can share between runs of one benchmark (DMD's teacher pairs: computed once).
    flags["method"] = {k: str(Path(a.out) / v) for k, v in SHARED_FILES.get(get_method(method).name, {}).items()}
    if el:
        flags["el"] = el
    mine = [o.split(":", 1)[1] for o in a.set if o.split(":", 1)[0] == method] + [o for o in a.set if ":" not in o]
    overrides = [o for o in mine if not o.startswith("el.")] + ([o for o in mine if o.startswith("el.")] if el else [])
    t0 = time.perf_counter()
    tr = distill(method, a.teacher, flags=flags, overrides=overrides, on_step=on_step)
    if not minutes and tr.step < iters:   # a signal stops a run gracefully: do not record it as finished
        raise SystemExit(f"{tag} stopped at iteration {tr.step} of {iters}; run the benchmark again with --resume")
    if not curve or curve[-1]["iter"] != tr.step:
        evaluate(tr)
    return {"method": method, "seed": seed, "batch_size": batch, "el": el, "iters_done": tr.step,
            "train_seconds": round(tr.train_seconds, 2), "wall_seconds": round(time.perf_counter() - t0, 2),
            "curve": curve}


def final_eval(a, r: dict) -> dict | None:
    """Quality and diversity of a run's last checkpoint with ``--final-samples`` samples (seeds 0…; more precise
    than the curve's n): proxy-FID and the DIVERSITY figures. None without a checkpoint or with --final-samples 0."""
    ckpts = sorted((Path(a.out) / "runs" / r["tag"] / "checkpoints").glob("ckpt-*.pt"))
    if not a.final_samples or not ckpts:
        return None
    m = evaluate_checkpoint(ckpts[-1], num_samples=a.final_samples, seed=0, device=a.device)
    return {"num_samples": a.final_samples, "iter": int(ckpts[-1].stem.split("-")[1]), "proxy_fid": m["proxy_fid"],
            **{k: m[k] for k in DIVERSITY if k in m}}


def done_runs(a, keep=lambda r: True) -> list[dict]:
    """With --resume, the runs already in --out/results.json (those ``keep`` accepts); else none."""
    path = Path(a.out) / "results.json"
    if not (a.resume and path.exists()):
        return []
    return [r for r in json.loads(path.read_text())["runs"] if keep(r)]


def backfill_final_evals(a, runs: list[dict]) -> None:
    """Give every run (kept by --resume, possibly from before --final-samples or with another n) its last
    checkpoint's evaluation at --final-samples."""
    for r in runs:
        if a.final_samples and (r.get("final_eval") or {}).get("num_samples") != a.final_samples:
            r["final_eval"] = final_eval(a, r)


def curve_series(runs: list[dict]) -> dict:
    """Plot series per (batch, EL weight): over seeds, the mean proxy-FID at each evaluation with a min–max band
    (evaluations aligned by index up to the shortest curve, at the first seed's iterations)."""
    groups: dict = {}
    for r in runs:
        name = f"b{r['batch_size']} " + ("base" if r["el"] is None else f"EL {r['el']['weight']:g}")
        groups.setdefault(name, []).append(r["curve"])
    series = {}
    for name, curves in groups.items():
        n = min(len(c) for c in curves)
        vals = [[c[i]["proxy_fid"] for c in curves] for i in range(n)]
        xs = [curves[0][i]["iter"] for i in range(n)]
        means = [sum(v) / len(v) for v in vals]
        series[name] = (xs, means) if len(curves) == 1 else (xs, means, [min(v) for v in vals], [max(v) for v in vals])
    return series


def iters_to(curve: list[dict], target: float):
    """(iterations, train seconds) of the first evaluation at or below ``target``; (None, None) if never."""
    for pt in curve:
        if pt["proxy_fid"] <= target:
            return pt["iter"], pt["train_seconds"]
    return None, None


def ci_cell(vals, spec=".2f") -> str:
    """mean ± 95 % t-interval over the non-None values, with "(k/N seeds)" when some are None."""
    v = [x for x in vals if x is not None]
    if not v:
        return "not reached"
    cell = fmt_ci(*t_interval(v), spec)
    return cell if len(v) == len(vals) else f"{cell} ({len(v)}/{len(vals)} seeds)"


def seed_summary(rows: list[dict], n_seeds: int) -> list[str]:
    """Markdown table over seeds per (method, batch, EL weight): mean ± 95 % t-interval (t_{0.975, N−1}·s/√N) of the
    final (curve n; and the last checkpoint's --final-samples evaluation) and best proxy-FID, the final diversity
    (recall, class TV; class accuracy and within-class spread for a conditional teacher; from the large evaluation
    where there is one), the iterations to the target and the saving (iteration and saving cells: over the seeds
    that reached the target, with their count), and Welch's p of the final proxy-FID (large n where there is one)
    against the method's full-batch base rows."""
    cond = any("class_accuracy" in r for r in rows)
    head = (f"Over {n_seeds} seeds: mean ± 95 % Student-t interval" if n_seeds > 1 else
            "One seed: single values, no interval (give --seeds 0,1,2 for mean ± 95 % t-interval)")
    big = all(r.get("final_n") is not None for r in rows)   # the last checkpoint's larger evaluation
    key = "final_n" if big else "final"
    cols = ["method", "batch", "EL weight", "seeds", "final (curve n)", *(["final (last checkpoint, large n)"] if big
            else []), "best of curve (optimistic)", "recall", "class TV",
            *(["class accuracy", "within-class spread"] if cond else []), "iters to target", "images to target",
            "saving", "Welch p (final vs base)"]
    out = [head + ".", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["batch"], r["el"]), []).append(r)
    for (method, batch, el), g in groups.items():
        base = next(v for (m, _, e), v in groups.items() if m == method and e == "—")
        p = welch_p([r[key] for r in g], [r[key] for r in base]) if g is not base and n_seeds > 1 else None
        cells = [method, batch, el, len(g), ci_cell([r["final"] for r in g]),
                 *([ci_cell([r["final_n"] for r in g])] if big else []), ci_cell([r["best"] for r in g]),
                 ci_cell([r.get("recall") for r in g], ".3f"), ci_cell([r.get("class_tv") for r in g], ".3f"),
                 *([ci_cell([r.get(k) for r in g], ".3f") for k in ("class_accuracy", "cond_spread")] if cond else []),
                 ci_cell([r["iters_to_target"] for r in g], ".0f"), ci_cell([r["images_to_target"] for r in g], ".0f"),
                 ci_cell([r["saving"] for r in g]), "—" if p is None else f"{p:.2g}" + (" *" if p < 0.05 else "")]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=str(SHIPPED_TEACHER))
    p.add_argument("--methods", default="dmd2,dmd,diff_instruct,sid,cd")
    p.add_argument("--iters", type=int, help="iterations per run (default: each method's images preset)")
    p.add_argument("--budget-minutes", type=float, help="training wall-clock of the whole benchmark (evaluation "
                                                        "excluded), shared evenly by the runs")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=1000, help="samples per proxy-FID evaluation")
    p.add_argument("--seeds", default="0", help="run seeds, comma-separated (e.g. 0,1,2); with several, the summary "
                                                "table gives mean ± 95 %% t-interval over them (default %(default)s)")
    p.add_argument("--weights", default="3", help="EL weights to run (comma-separated; the first is also used "
                                                    "for the batch-size rows)")
    p.add_argument("--mode", default="relative", choices=["fixed", "relative"], help="EL weight mode")
    p.add_argument("--batch-size", type=int, help="full batch B (default: the preset's)")
    p.add_argument("--batch-fractions", default="1,0.5,0.25", help="batch fractions f: EL (first weight) also "
                                                                    "runs at batch B·f against the full-batch target")
    p.add_argument("--fraction-base", action="store_true", help="also run the base method at B·f")
    p.add_argument("--final-samples", type=int, default=2000, help="samples of the extra evaluation of each run's "
                                                                   "last checkpoint (proxy-FID and diversity "
                                                                   "columns; 0: none)")
    p.add_argument("--final-window", type=int, default=2, help="the target is the mean of the base run's last k "
                                                               "evaluations")
    p.add_argument("--out", default="runs/bench-el-efficiency")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out/results.json (same "
                                                         "tags) and run only the others; all done: report only")
    p.add_argument("--set", action="append", default=[], help="override for every run, e.g. run.grad_clip=1, or for "
                                                              "one method: dmd2:method.gan_weight=0; el.KEY=VALUE "
                                                              "only for the EL runs")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [m.strip().replace("-", "_") for m in a.methods.split(",") if m.strip()]
    seeds = [int(s) for s in a.seeds.split(",")]
    weights = _floats(a.weights)
    fractions = _floats(a.batch_fractions)
    _, tstate = load_for_sampling(a.teacher)
    if tstate["config"]["data"].get("name") != "digits":
        raise SystemExit("el_efficiency measures proxy-FID on digits: give a digits teacher")

    plan = []   # (method, seed, fraction, weight or None)
    for method in methods:
        for seed in seeds:
            plan.append((method, seed, 1.0, None))
            plan += [(method, seed, 1.0, w) for w in weights]
            for f in fractions:
                if f != 1.0:
                    plan += [(method, seed, f, None)] if a.fraction_base else []
                    plan += [(method, seed, f, weights[0])]
    t_start, spent, runs = time.perf_counter(), 0.0, done_runs(a)   # runs already done (same tags) are kept
    done = {r["tag"] for r in runs}
    for i, (method, seed, frac, w) in enumerate(plan):
        preset = load_preset(get_method(method).name, "images")["run"]
        B = a.batch_size or preset["batch_size"]
        batch = max(2, int(round(B * frac)))
        iters = a.iters or preset["steps"]
        minutes = None
        if a.budget_minutes:
            minutes = max(0.05, (a.budget_minutes * 60 - spent) / (len(plan) - i) / 60)
        tag = f"{method}-s{seed}-b{batch}-" + ("base" if w is None else f"el{w:g}")
        if tag in done:
            continue
        print(f"[{i + 1}/{len(plan)}] {tag}: {iters} it." + (f", ≤ {minutes:.2f} min" if minutes else ""), flush=True)
        el = None if w is None else {"weight": w, "mode": a.mode}
        r = run_one(a, method, seed, batch, el, iters, minutes, tag)
        r["fraction"], r["tag"] = frac, tag
        r["final_eval"] = final_eval(a, r)
        spent += r["train_seconds"]
        runs.append(r)
        (out / "results.json").write_text(json.dumps({"args": vars(a), "runs": runs}, indent=1))
    backfill_final_evals(a, runs)
    (out / "results.json").write_text(json.dumps({"args": vars(a), "runs": runs}, indent=1))

    # ---- analysis: per (method, seed), the full-batch base run's final value is the target
    rows = []
    for method in methods:
        for seed in seeds:
            mine = [r for r in runs if r["method"] == method and r["seed"] == seed]
            base = next((r for r in mine if r["fraction"] == 1.0 and r["el"] is None), None)
            if base is None:      # a benchmark stopped before this seed's base run: nothing to compare against
                continue
            tail = [pt["proxy_fid"] for pt in base["curve"][-a.final_window:]]
            target = sum(tail) / len(tail)
            b_it, b_s = iters_to(base["curve"], target)
            for r in mine:
                it, s = iters_to(r["curve"], target)
                rows.append({"method": method, "seed": seed, "batch": r["batch_size"],
                             "el": "—" if r["el"] is None else f"{r['el']['weight']:g} ({r['el']['mode']})",
                             "target": target, "final": r["curve"][-1]["proxy_fid"],
                             "best": min(pt["proxy_fid"] for pt in r["curve"]), "iters_done": r["iters_done"],
                             "iters_to_target": it, "seconds_to_target": s,
                             "images_to_target": None if it is None else it * r["batch_size"],
                             "saving": (b_it / it) if (it and b_it) else None, "tag": r["tag"],
                             **{k: v for k, v in (r.get("final_eval") or r["curve"][-1]).items() if k in DIVERSITY},
                             "final_n": (r.get("final_eval") or {}).get("proxy_fid")})
    summary = {"args": vars(a), "runs": runs, "rows": rows,
               "total_minutes": round((time.perf_counter() - t_start) / 60, 2)}
    (out / "results.json").write_text(json.dumps(summary, indent=1))

    lines = ["# EL efficiency on digits", "",
             f"Teacher `{a.teacher}`; proxy-FID of 1-step samples (n = {a.num_samples}, seed 0) every "
             f"{a.eval_every} iterations; EL mode `{a.mode}`; seeds {a.seeds}; total "
             f"{summary['total_minutes']} min (evaluation included). Target = the full-batch base run's final "
             f"proxy-FID (mean of its last {a.final_window} evaluations); saving = base iterations ÷ iterations to "
             f"the target.", "",
             "| method | seed | batch | EL weight | target | final | best of curve (optimistic) | iters done | "
             "iters to target | "
             "train s to target | images to target | saving |", "|" + "---|" * 12]
    fmt = lambda v, f="{:.1f}": "—" if v is None else f.format(v)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['method']} | {r['seed']} | {r['batch']} | {r['el']} | {r['target']:.2f} | "
                     f"{r['final']:.2f} | {r['best']:.2f} | {r['iters_done']} | {fmt(r['iters_to_target'], '{}')} | "
                     f"{fmt(r['seconds_to_target'])} | {fmt(r['images_to_target'], '{}')} | "
                     f"{fmt(r['saving'], '{:.2f}×')} |")
    lines += ["", *seed_summary(rows, len(seeds)), ""]
    for method in methods:
        line_plot(curve_series([r for r in runs if r["method"] == method]), out / f"curves-{method}.png",
                  "iteration", "proxy-FID", f"{method} ± EL"
                  + (f": mean, min–max of {len(seeds)} seeds" if len(seeds) > 1 else ""), logy=True)
        lines.append(f"![{method}](curves-{method}.png)")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(line for line in lines if not line.startswith("![")))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
