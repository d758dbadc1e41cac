"""DMD2 and SiD on a flow-matching digits teacher, beside the same runs on the EDM digits teacher.

    diffdistill train-teacher --preset digits --objective flow --out runs/teacher-digits-flow   # ≈ 20 min, 1 thread
    python benchmarks/flow_digits.py --flow runs/teacher-digits-flow/checkpoints/ckpt-00003000.pt --iters 600

Both teachers have the same architecture and training budget (the `digits` preset; the EDM one is the shipped
asset). Every student gets the same iteration count (not a time budget, so a loaded machine changes the wall time,
not the result) with its method's images preset. Each step is a subprocess with one thread (``--jobs`` at once).
Prints one table: proxy-FID (2,000 samples, seeds 0-1999), recall, precision, and the student/teacher ratio;
writes results.md / results.json under --out.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _subprocess import ROOT, cli, run

EDM_TEACHER = ROOT / "src" / "diffdistill" / "assets" / "teacher_digits.safetensors"


def evaluate(target: Path, out: Path) -> dict:
    run(cli("eval", str(target), "--data", "digits", "--seeds", "0-1999", "--out", str(out)), out.with_suffix(".log"))
    return json.loads(out.read_text())


def student(kind: str, teacher: Path, method: str, iters: int, root: Path) -> dict:
    out = root / f"{kind}-{method}"
    run(cli("distill", "--method", method, "--teacher", str(teacher), "--out", str(out), "--iters", str(iters),
            "--no-progress", "--overwrite"), root / f"{kind}-{method}.log")
    final = sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]
    return {"teacher": kind, "method": method, "iters": iters, **evaluate(final, root / f"{kind}-{method}.json")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flow", required=True, help="the flow-matching digits teacher checkpoint")
    ap.add_argument("--edm", default=str(EDM_TEACHER))
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--methods", default="dmd2,sid")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_flow_digits")
    a = ap.parse_args()
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    teachers = {"edm": Path(a.edm), "flow": Path(a.flow)}
    with ThreadPoolExecutor(a.jobs) as pool:
        ref = {k: pool.submit(evaluate, t, root / f"teacher-{k}.json") for k, t in teachers.items()}
        runs = [pool.submit(student, k, t, m, a.iters, root) for k, t in teachers.items()
                for m in a.methods.split(",")]
        ref = {k: f.result() for k, f in ref.items()}
        rows = [f.result() for f in runs]
    lines = ["| teacher | model | proxy-FID | × teacher | recall | precision |", "|---|---|---|---|---|---|"]
    for k in teachers:
        t = ref[k]
        lines.append(f"| {k} | teacher, {t.get('nfe')} NFE | {t['proxy_fid']:.2f} | 1 | {t.get('recall', 0):.2f} | "
                     f"{t.get('precision', 0):.2f} |")
        for r in rows:
            if r["teacher"] == k:
                lines.append(f"| {k} | {r['method']} 1-step, {r['iters']} it. | {r['proxy_fid']:.2f} | "
                             f"{r['proxy_fid'] / t['proxy_fid']:.2f}× | {r.get('recall', 0):.2f} | "
                             f"{r.get('precision', 0):.2f} |")
    (root / "results.md").write_text("\n".join(lines) + "\n")
    (root / "results.json").write_text(json.dumps({"teachers": ref, "students": rows}, indent=2, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
