"""A teacher this project has never seen, used as a new user would: a plain diffusers ``UNet2DModel`` +
``DDPMScheduler`` trained on the sklearn digits with the diffusers recipe (``scripts/train_diffusers_teacher.py``),
then distilled by the CLI with each method's preset and no extra flag except ``--data digits``.

    python benchmarks/foreign_teacher.py                                   # ε-teacher; dmd2, sid, diff_instruct, cd
    python benchmarks/foreign_teacher.py --kinds eps,v,x0,eps-scaled --budget-minutes 30
    python benchmarks/foreign_teacher.py --teacher runs/ddpm-eps --methods dmd2 --budget-minutes 10

Each step is a subprocess (``python scripts/train_diffusers_teacher.py``, ``diffdistill eval``/``distill``), one
thread each (``--jobs`` runs that many distillations at once). Prints one table: per teacher kind and method, the
iterations reached within the budget, the 1-step student's proxy-FID (digits-classifier features, 2,000 samples,
seeds 0-1999) against the teacher's own (Heun, 35 NFE), their ratio, and whether the start-of-run health check
warned. Results go under --out (teachers, runs, metrics JSON, the table as results.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _subprocess import cli, run

KINDS = {   # name → train_diffusers_teacher.py flags
    "eps": [],
    "v": ["--prediction-type", "v_prediction"],
    "x0": ["--prediction-type", "sample"],
    "eps-scaled": ["--beta-schedule", "scaled_linear", "--beta-start", "0.00085", "--beta-end", "0.012"],
}


def evaluate(target: Path, out: Path, log: Path) -> dict:
    run(cli("eval", str(target), "--data", "digits", "--seeds", "0-1999", "--out", str(out)), log)
    return json.loads(out.read_text())


def distill_one(kind: str, teacher: Path, method: str, root: Path, budget: float, extra: list[str]) -> dict:
    out = root / kind / method
    t0 = time.time()
    text = run(cli("distill", "--method", method, "--teacher", str(teacher), "--data", "digits", "--out", str(out),
                   "--budget-minutes", str(budget), "--no-progress", "--overwrite", *extra), root / kind / f"{method}.log")
    final = sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]
    m = evaluate(final, root / kind / f"{method}.metrics.json", root / kind / f"{method}.eval.log")
    return {"kind": kind, "method": method, "iters": int(final.stem.split("-")[1]), "minutes": (time.time() - t0) / 60,
            "proxy_fid": m["proxy_fid"], "kid": m["kid"], "health_warning": "health check" in text}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="eps", help=f"teacher kinds, comma-separated: {', '.join(KINDS)}")
    p.add_argument("--teacher", help="use this diffusers folder (one kind) instead of training one")
    p.add_argument("--methods", default="dmd2,sid,diff_instruct,cd")
    p.add_argument("--budget-minutes", type=float, default=30.0, help="training minutes per distillation")
    p.add_argument("--teacher-iters", type=int, default=6000)
    p.add_argument("--jobs", type=int, default=1, help="distillations run at once (one thread each)")
    p.add_argument("--set", action="append", default=[], help="extra --set for every distillation")
    p.add_argument("--out", default="runs/foreign-teacher")
    a = p.parse_args()
    root = Path(a.out).resolve()
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    extra = [x for s in a.set for x in ("--set", s)]
    teachers, rows = {}, []
    for kind in kinds:
        folder = Path(a.teacher) if a.teacher else root / kind / "teacher"
        if not a.teacher and not (folder / "unet").is_dir():
            run([sys.executable, "scripts/train_diffusers_teacher.py", "--out", str(folder), "--lr", "2e-4",
                 "--iters", str(a.teacher_iters), *KINDS[kind]], root / kind / "teacher.log")
        teachers[kind] = (folder, evaluate(folder, root / kind / "teacher.metrics.json", root / kind / "teacher.eval.log"))
        print(f"teacher {kind}: proxy-FID {teachers[kind][1]['proxy_fid']:.3f} (Heun, {teachers[kind][1]['nfe']} NFE)",
              flush=True)
    jobs = [(kind, teachers[kind][0], m) for kind in kinds for m in methods]
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        for r in pool.map(lambda j: distill_one(j[0], j[1], j[2], root, a.budget_minutes, extra), jobs):
            r["ratio"] = r["proxy_fid"] / teachers[r["kind"]][1]["proxy_fid"]
            rows.append(r)
            print(f"{r['kind']} {r['method']}: proxy-FID {r['proxy_fid']:.3f} ({r['ratio']:.2f}× the teacher) after "
                  f"{r['iters']} it.", flush=True)
    lines = ["| teacher | teacher proxy-FID (35 NFE) | method | iterations | minutes | 1-step proxy-FID | × teacher | "
             "KID | start warning |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {teachers[r['kind']][1]['proxy_fid']:.3f} | {r['method']} | {r['iters']} | "
                     f"{r['minutes']:.1f} | {r['proxy_fid']:.3f} | {r['ratio']:.2f} | {r['kid']:.4f} | "
                     f"{'yes' if r['health_warning'] else 'no'} |")
    table = "\n".join(lines)
    print("\n" + table)
    (root / "results.md").write_text(table + "\n")
    return 0 if all(r["ratio"] <= 2.0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
