"""Class-conditional distillation and classifier-free guidance on the digits: the shipped class-conditional teacher
(``digits_cond`` preset: 10 classes, 10 % label dropout) sampled at several guidance scales, and 1-step DMD2 and
SiD students distilled with the real score guided at the same scales (``method.guidance_real``, DMD2's SD1.5
placement; ``--sid-lsg`` also guides SiD's fake score, κ1 = κ2 = κ3 = κ4 = w as SiD-LSG's scripts).

    python benchmarks/conditional_digits.py                                   # w = 1, 1.5, 2, 3; dmd2, sid; 10 min each
    python benchmarks/conditional_digits.py --guidance 1 --budget-minutes 30 # unguided students, longer
    python benchmarks/conditional_digits.py --methods dmd2 --guidance 1,2 --jobs 2

Each step is a subprocess (``diffdistill eval`` / ``distill``), one thread each. Prints one table per guidance
scale: the teacher's (Heun, 35 NFE, 70 network calls with guidance) and each student's proxy-FID, class accuracy
(the share of samples the digits classifier assigns to the requested class; classes are seed mod 10), class TV and
recall, 2,000 samples (seeds 0-1999); writes results.md, results.json and guidance.png (proxy-FID and class accuracy
vs w) under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _subprocess import ROOT, cli, run

TEACHER = ROOT / "src" / "diffdistill" / "assets" / "teacher_digits_cond.safetensors"


def evaluate(target: Path, out: Path, extra=()) -> dict:
    run(cli("eval", str(target), "--data", "digits", "--seeds", "0-1999", "--out", str(out), *extra),
        out.with_suffix(".log"))
    return json.loads(out.read_text())


def row(m: dict) -> dict:
    return {k: m.get(k) for k in ("proxy_fid", "class_accuracy", "class_tv", "recall", "precision", "nfe")}


def distill_one(teacher: Path, method: str, w: float, root: Path, budget: float, lsg: bool, extra: list) -> dict:
    out = root / f"{method}-w{w:g}"
    guide = ["--set", f"method.guidance_real={w}"]
    if lsg and method == "sid":
        guide += ["--set", f"method.guidance_fake={w}", "--set", f"method.guidance_fake_train={w}"]
    t0 = time.time()
    run(cli("distill", "--method", method, "--teacher", str(teacher), "--out", str(out), "--budget-minutes",
            str(budget), "--no-progress", "--overwrite", *guide, *extra), root / f"{method}-w{w:g}.log")
    final = sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]
    m = evaluate(final, root / f"{method}-w{w:g}.metrics.json")
    return {"method": method, "w": w, "iters": int(final.stem.split("-")[1]),
            "minutes": round((time.time() - t0) / 60, 1), **row(m)}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    series = {"teacher (35 NFE)": results["teacher"]}
    for r in results["students"]:
        series.setdefault(f"{r['method']} 1-step", []).append(r)
    for name, rows in series.items():
        rows = sorted(rows, key=lambda r: r["w"])
        ws = [r["w"] for r in rows]
        axes[0].plot(ws, [r["proxy_fid"] for r in rows], "o-", label=name)
        axes[1].plot(ws, [100 * r["class_accuracy"] for r in rows], "o-", label=name)
    axes[0].set(xlabel="guidance scale w", ylabel="proxy-FID (2,000 samples)", yscale="log")
    axes[1].set(xlabel="guidance scale w", ylabel="class accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=str(TEACHER))
    p.add_argument("--methods", default="dmd2,sid")
    p.add_argument("--guidance", default="1,1.5,2,3", help="students' guidance scales w, comma-separated")
    p.add_argument("--teacher-guidance", default=None, help="the teacher's guidance scales (default: --guidance)")
    p.add_argument("--budget-minutes", type=float, default=10.0, help="training minutes per distillation")
    p.add_argument("--sid-lsg", action="store_true", help="SiD: guide the fake score too (κ1 = κ2 = κ3 = κ4 = w)")
    p.add_argument("--jobs", type=int, default=1, help="distillations run at once (one thread each)")
    p.add_argument("--set", action="append", default=[], help="extra --set for every distillation")
    p.add_argument("--out", default="runs/conditional-digits")
    a = p.parse_args()
    root = Path(a.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    ws = [float(v) for v in a.guidance.split(",")]
    teacher_ws = sorted(set(ws) | {float(v) for v in (a.teacher_guidance or a.guidance).split(",")})
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    teacher = Path(a.teacher).resolve()
    results = {"teacher_file": str(teacher), "budget_minutes": a.budget_minutes, "teacher": [], "students": []}
    for w in teacher_ws:
        m = evaluate(teacher, root / f"teacher-w{w:g}.metrics.json", ["--guidance", str(w)])
        results["teacher"].append({"w": w, **row(m)})
        print(f"teacher w={w:g}: proxy-FID {m['proxy_fid']:.2f}, class accuracy {m['class_accuracy']:.3f}", flush=True)
    extra = [x for s in a.set for x in ("--set", s)]
    jobs = [(meth, w) for w in ws for meth in methods]
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        for r in pool.map(lambda j: distill_one(teacher, j[0], j[1], root, a.budget_minutes, a.sid_lsg, extra), jobs):
            results["students"].append(r)
            print(f"{r['method']} w={r['w']:g}: {r['iters']} it., proxy-FID {r['proxy_fid']:.2f}, class accuracy "
                  f"{r['class_accuracy']:.3f}", flush=True)
    lines = ["| w | model | iterations | proxy-FID | × teacher (same w) | × teacher (w = 1) | class accuracy | class TV "
             "| recall |", "|---|---|---|---|---|---|---|---|---|"]
    t_by_w = {t["w"]: t for t in results["teacher"]}
    t1 = t_by_w.get(1.0, results["teacher"][0])
    for w in teacher_ws:
        t = t_by_w[w]
        lines.append(f"| {w:g} | teacher (Heun 35 NFE) | — | {t['proxy_fid']:.2f} | 1 | {t['proxy_fid'] / t1['proxy_fid']:.2f} "
                     f"| {100 * t['class_accuracy']:.1f} % | {t['class_tv']:.3f} | {t['recall']:.3f} |")
        for r in (r for r in results["students"] if r["w"] == w):
            lines.append(f"| {w:g} | {r['method']} 1-step | {r['iters']} | {r['proxy_fid']:.2f} | "
                         f"{r['proxy_fid'] / t['proxy_fid']:.2f} | {r['proxy_fid'] / t1['proxy_fid']:.2f} | "
                         f"{100 * r['class_accuracy']:.1f} % | {r['class_tv']:.3f} | {r['recall']:.3f} |")
    table = "\n".join(lines)
    print(table)
    (root / "results.md").write_text(table + "\n")
    (root / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, root / "guidance.png")
    print(f"wrote {root / 'results.md'}, results.json, guidance.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
