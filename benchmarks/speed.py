"""Speed claims, measured in one run (ratios, not absolute numbers, are the point):

1. sampling: images/s of the digits teacher at 1, 2, 4, 8 and 35 NFE at one batch size, i.e. what a k-step
   student of the same network gains: speed-up vs the NFE ratio (the limit);
2. trainer overhead: seconds per training step through the one Trainer vs the same method's phases run in a bare
   loop (loss → backward → optimizer step, nothing else), per method, on the same batches and seeds;
3. on a CUDA device only: the training step with fp32, bf16 autocast, channels-last and bf16 + torch.compile.

    python benchmarks/speed.py [--methods edm,dmd2,sid] [--steps 30] [--batch 256] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from diffdistill.compare import TEACHER_NFES, teacher_spec
from diffdistill.demo import SHIPPED_TEACHER
from diffdistill.distill import distill_config, load_teacher
from diffdistill.eval.throughput import sampling_throughput
from diffdistill.methods.registry import get_method, list_methods
from diffdistill.train.trainer import Trainer


def sampling_table(teacher, batch, device, rounds=3):
    print(f"\n## sampling, digits teacher, batch {batch}, {device} (best of {rounds} interleaved rounds)\n")
    print("| NFE | images/s | speed-up vs 35 NFE | NFE ratio | speed-up / NFE ratio |\n|---|---|---|---|---|")
    best = {n: 0.0 for n in TEACHER_NFES}
    for _ in range(rounds):  # round-robin, best of each: a load spike on a shared machine hits one round, not one NFE
        for n in TEACHER_NFES:
            r = sampling_throughput(teacher, teacher_spec(n), batch_size=batch, device=device, repeats=3,
                                    min_seconds=0.5)
            best[n] = max(best[n], r["images_per_second"])
    base = best[35]
    for n, ips in best.items():
        s = ips / base
        print(f"| {n} | {ips:.0f} | {s:.1f}× | {35 / n:.1f}× | {s / (35 / n):.2f} |")


def bare_step(tr: Trainer, step: int) -> None:
    """The method's work of one step and nothing else: no finite checks, clipping, logging or EMA bookkeeping of
    the trainer (the method's own after_step still runs: EMA/target updates are the method's work)."""
    m = tr.method
    batch = tr.batch(step)
    for phase in m.phases(step):
        opt = m.optimizers[phase]
        loss, _ = m.loss(phase, batch, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    m.after_step(step + 1, (step + 1) * tr.cfg["run"]["batch_size"])


def make_trainer(method, teacher, tstate, out, device):
    if get_method(method).role == "teacher":
        from diffdistill.config import resolve
        cfg = resolve("digits", flags={"run": {"out": out, "device": device, "progress": False}})
        return Trainer(cfg)
    cfg = distill_config(method, tstate, {"run": {"out": out, "device": device, "progress": False}})
    return Trainer(cfg, teacher=teacher, teacher_path=str(SHIPPED_TEACHER))


def overhead_table(methods, teacher, tstate, steps, device):
    print(f"\n## trainer overhead ({steps} steps each, interleaved in blocks, same seeds)\n")
    print("| method | trainer s/step | bare loop s/step | overhead |\n|---|---|---|---|")
    for method in methods:
        a = make_trainer(method, teacher, tstate, f"/tmp/diffdistill-speed/{method}-a", device)
        b = make_trainer(method, teacher, tstate, f"/tmp/diffdistill-speed/{method}-b", device)
        for _ in range(2):  # warm-up both paths
            a.train_step(); a.step += 1
            bare_step(b, b.step); b.step += 1
        t_tr = t_bare = 0.0
        block = max(1, steps // 5)
        for _ in range(5):  # alternate blocks so drift in machine load hits both paths alike
            t0 = time.perf_counter()
            for _ in range(block):
                a.train_step(); a.step += 1
            t_tr += time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(block):
                bare_step(b, b.step); b.step += 1
            t_bare += time.perf_counter() - t0
        n = 5 * block
        print(f"| {method} | {t_tr / n:.4f} | {t_bare / n:.4f} | {100 * (t_tr / t_bare - 1):+.1f} % |")


def precision_table(steps, device):
    """Teacher (EDM) training step and 35-NFE sampling per throughput option: fp32, bf16 autocast, channels-last,
    torch.compile. Printed only on a CUDA device (where these options are meant to pay off)."""
    from diffdistill.config import resolve
    print(f"\n## throughput options on {device} (digits teacher training step, batch 128)\n")
    print("| option | s/step | vs fp32 |\n|---|---|---|")
    base = None
    for name, run in (("fp32", {}), ("bf16", {"precision": "bf16"}), ("channels_last", {"channels_last": True}),
                      ("bf16 + compile", {"precision": "bf16", "compile": True})):
        cfg = resolve("digits", flags={"run": {"out": f"/tmp/diffdistill-speed/opt-{name}", "device": device,
                                               "progress": False, **run}})
        tr = Trainer(cfg)
        for _ in range(3):  # warm-up (and compilation)
            tr.train_step(); tr.step += 1
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            tr.train_step(); tr.step += 1
        torch.cuda.synchronize()
        sec = (time.perf_counter() - t0) / steps
        base = base or sec
        print(f"| {name} | {sec:.4f} | {base / sec:.2f}× |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="edm,dmd2,sid", help="comma-separated, or 'all'")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    teacher, tstate = load_teacher(SHIPPED_TEACHER, a.device)
    sampling_table(teacher, a.batch, a.device)
    methods = list(list_methods()) if a.methods == "all" else a.methods.split(",")
    overhead_table(methods, teacher, tstate, a.steps, a.device)
    if a.device.startswith("cuda"):
        precision_table(max(a.steps, 20), a.device)


if __name__ == "__main__":
    main()
