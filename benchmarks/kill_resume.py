"""Kill -9 / resume, many times: for each configuration, N repetitions of "start ``diffdistill distill`` as a
subprocess, SIGKILL it at a random step after a checkpoint exists, resume with ``--resume auto``, compare the final
state with an uninterrupted run bit for bit". Every third repetition also truncates the newest checkpoint the killed
run left (resume must skip it loudly and still end identical). A configuration is a method plus its extra flags
(tests/helpers/kill_resume.CONFIGS): the eight registered methods, SiDA (sid, method.sida=true) and DMD2 + EL
(dmd2 --el-weight).

    python benchmarks/kill_resume.py                          # every configuration (when registered), 10 each
    python benchmarks/kill_resume.py --configs dmd2,sida,dmd2+el --reps 3 --seed 1

Prints one row per repetition and a summary table (identical / repetitions per configuration). Setting: the 2-D ring8
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

from helpers.kill_resume import CONFIGS, kill_and_resume, make_teacher, reference_run, registered  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", "--methods", dest="configs", default=",".join(CONFIGS),
                   help=f"comma-separated, from: {', '.join(CONFIGS)} (default: all)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="seeds the kill steps")
    p.add_argument("--out", help="work folder (default: a temp folder, deleted afterwards)")
    a = p.parse_args()
    torch.set_num_threads(1)
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    skipped = [c for c in configs if not registered(c)]
    configs = [c for c in configs if registered(c)]
    if skipped:
        print(f"method not registered (skipped): {', '.join(skipped)}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        teacher = make_teacher(root / "teacher")
        rng = random.Random(a.seed)
        summary = []
        print(f"{'config':13s} {'rep':>3s} {'kill step':>9s} {'resumed':>7s} {'corrupted newest':>16s} "
              f"{'identical':>9s} {'seconds':>7s}")
        for config in configs:
            t0 = time.perf_counter()
            ref = reference_run(config, teacher, root / f"{config}-reference")
            ok = ok_corrupt = 0
            for rep in range(a.reps):
                corrupt = rep % 3 == 2
                info = kill_and_resume(config, teacher, root / f"{config}-{rep}", rng, ref, corrupt_newest=corrupt)
                same = info.get("rc_resume") == 0 and info.get("differences") == []
                ok += same
                ok_corrupt += same and corrupt
                print(f"{config:13s} {rep:3d} {str(info.get('killed_at')):>9s} {str(info.get('resumed_from')):>7s} "
                      f"{(info.get('corrupted') or '-') if corrupt else '-':>16s} {'yes' if same else 'NO':>9s} "
                      f"{info.get('seconds', 0):7.1f}", flush=True)
                if not same:  # the killed run's stderr only when it failed on its own
                    print("   ", {k: v for k, v in info.items() if k != "stderr_killed" or info["killed_at"] is None},
                          flush=True)
            summary.append((config, ok, a.reps, ok_corrupt, time.perf_counter() - t0))
        print("\n| configuration | bit-identical / repetitions | of which resumed past a truncated newest checkpoint "
              "| wall-clock |\n|---|---|---|---|")
        for config, ok, n, ok_corrupt, sec in summary:
            print(f"| {config} | {ok}/{n} | {ok_corrupt} | {sec:.0f} s |")
        return 0 if all(ok == n for _, ok, n, _, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
