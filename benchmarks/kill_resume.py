"""Kill -9 / resume, many times: for each method, N repetitions of "start ``diffdistill distill`` as a subprocess,
SIGKILL it at a random step after a checkpoint exists, resume with ``--resume auto``, compare the final state with
an uninterrupted run bit for bit". Every third repetition also truncates the newest checkpoint the killed run left
(resume must skip it loudly and still end identical).

    python benchmarks/kill_resume.py                          # dmd2, sid and pd (when registered), 10 each
    python benchmarks/kill_resume.py --methods dmd2,sid,dmd,diff_instruct,cd --reps 10 --seed 1

Prints one row per repetition and a summary table (identical / repetitions per method). Setting: the 2-D ring8
teacher (MLP 32×2, trained here in a second), batch 32, a checkpoint every 7 steps (keep 3), the log written every
step; CPU, one thread. Exit code 1 if any repetition differs.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

from helpers.kill_resume import kill_and_resume, make_teacher, reference_run, registered  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="dmd2,sid,pd")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="seeds the kill steps")
    p.add_argument("--out", help="work folder (default: a temp folder, deleted afterwards)")
    a = p.parse_args()
    torch.set_num_threads(1)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    skipped = [m for m in methods if not registered(m)]
    methods = [m for m in methods if registered(m)]
    if skipped:
        print(f"not registered (skipped): {', '.join(skipped)}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        teacher = make_teacher(root / "teacher")
        rng = random.Random(a.seed)
        summary = []
        print(f"{'method':12s} {'rep':>3s} {'kill step':>9s} {'resumed':>7s} {'corrupted newest':>16s} "
              f"{'identical':>9s} {'seconds':>7s}")
        for method in methods:
            t0 = time.perf_counter()
            ref = reference_run(method, teacher, root / f"{method}-reference")
            ok = 0
            for rep in range(a.reps):
                corrupt = rep % 3 == 2
                info = kill_and_resume(method, teacher, root / f"{method}-{rep}", rng, ref, corrupt_newest=corrupt)
                same = info.get("rc_resume") == 0 and info.get("differences") == []
                ok += same
                print(f"{method:12s} {rep:3d} {str(info.get('killed_at')):>9s} {str(info.get('resumed_from')):>7s} "
                      f"{(info.get('corrupted') or '-') if corrupt else '-':>16s} {'yes' if same else 'NO':>9s} "
                      f"{info.get('seconds', 0):7.1f}", flush=True)
                if not same:
                    print("   ", {k: v for k, v in info.items() if k not in ("stderr_killed",)}, flush=True)
            summary.append((method, ok, a.reps, time.perf_counter() - t0))
        print("\n| method | identical / repetitions | wall-clock |\n|---|---|---|")
        for method, ok, n, sec in summary:
            print(f"| {method} | {ok}/{n} | {sec:.0f} s |")
        return 0 if all(ok == n for _, ok, n, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
