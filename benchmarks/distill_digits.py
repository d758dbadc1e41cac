"""Every distillation method on the shipped digits teacher: proxy-FID over iterations and wall-clock, and the
student's images/s against the teacher's, all measured in one run (a thin wrapper over ``diffdistill compare``).

    python benchmarks/distill_digits.py                         # all student methods, each method's preset length
    python benchmarks/distill_digits.py --methods dmd2,sid --budget-minutes 10
    python benchmarks/distill_digits.py --methods dmd2 --iters 3000 --set method.gan_weight=0

Prints three tables (curves, final quality and class-histogram distance vs the teacher, speed) and leaves the full
report (report.md/.html, plots, sample grids) in --out. Run with OMP_NUM_THREADS set to the cores you give it;
nothing else should run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffdistill.compare import compare
from diffdistill.demo import SHIPPED_TEACHER
from diffdistill.methods.registry import list_methods


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=str(SHIPPED_TEACHER))
    p.add_argument("--methods", default="all", help="comma-separated, or 'all' student methods")
    p.add_argument("--iters", type=int)
    p.add_argument("--budget-minutes", type=float)
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--curve-points", type=int, default=10)
    p.add_argument("--out", default="runs/bench-digits")
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args()
    methods = list(list_methods(role="student")) if a.methods == "all" else a.methods.split(",")
    r = compare(a.teacher, methods, out=Path(a.out), iters=a.iters, budget_minutes=a.budget_minutes,
                num_samples=a.num_samples, curve_points=a.curve_points, device=a.device, progress=False,
                overrides=a.set)
    key = r["quality_key"]
    t35 = next(t for t in r["teacher_rows"] if t["nfe"] == 35)

    print(f"\n## {key} over training ({r['curve_samples']} samples; teacher at 35 NFE, same n: "
          f"{r['teacher_curve_reference']:.3f})\n")
    print("| method | iteration | train s | " + key + " |\n|---|---|---|---|")
    for m in r["methods"]:
        for pt in m["curve"]:
            print(f"| {m['method']} | {pt['step']} | {pt['train_seconds']:.0f} | {pt[key]:.3f} |")

    tv = (lambda m: "–" if m.get("class_tv") is None else f"{m['class_tv']:.3f}")  # mode weights (digits)
    print(f"\n## final students ({r['num_samples']} samples) vs the teacher at 35 NFE ({t35[key]:.3f}, class TV "
          f"{tv(t35)})\n")
    print(f"| method | steps | {key} | ratio to teacher | class TV | iterations | train s | peak MiB | "
          "s to teacher quality |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in r["methods"]:
        if "error" in m:
            print(f"| {m['method']} | – | failed: {m['error']} | | | | | | |")
            continue
        for s in m["students"]:
            reach = m["seconds_to_teacher_quality"]
            print(f"| {m['method']} | {s['steps']} | {s[key]:.3f} | {s[key] / t35[key]:.2f}× | {tv(s)} | "
                  f"{m['iterations']} | {m['train_seconds']:.0f} | {m['peak_memory_mib']:.0f} | {'–' if reach is None else f'{reach:.0f}'} |")

    print(f"\n## sampling speed at batch {r['batch_for_throughput']} (images/s, measured in this run)\n")
    print("| model | NFE | images/s | speed-up vs teacher 35 NFE | NFE ratio | speed-up / NFE ratio |")
    print("|---|---|---|---|---|---|")
    rows = [(f"teacher ({t['spec']['sampler']})", t) for t in r["teacher_rows"]]
    rows += [(f"{m['method']} student", s) for m in r["methods"] for s in m.get("students", [])]
    for name, s in rows:
        speed = s["images_per_second"] / t35["images_per_second"]
        ratio = 35 / s["nfe"]
        print(f"| {name} | {s['nfe']} | {s['images_per_second']:.0f} | {speed:.1f}× | {ratio:.1f}× | "
              f"{speed / ratio:.2f} |")
    print(f"\nfull report: {Path(a.out) / 'report.md'}")


if __name__ == "__main__":
    main()
