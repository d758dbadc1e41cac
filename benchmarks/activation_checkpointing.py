"""Memory of activation checkpointing (``run.activation_checkpointing``) and of the bf16 frozen teacher
(``run.teacher_dtype=bf16``), measured.

1. Checkpointing: one training forward + backward of the EDM denoising loss through a SongUNet (train mode), plain
   and with every encoder/decoder block checkpointed, on the digits-size network and a larger 32×32 one. Columns:
   the bytes of the tensors autograd keeps for backward (what ``--dry-run`` measures: a saved-tensors hook,
   parameters excluded), the peak of allocated bytes over the forward + backward (CPU: the profiler's memory
   timeline, ``torch.profiler._memory_profiler``; CUDA: ``torch.cuda.max_memory_allocated``) — both include the
   parameters, their gradients and the input — seconds per forward + backward (median of 3, outside the
   profiler), and whether every gradient is bit-identical to the plain one.
2. bf16 teacher: the digits teacher's weight bytes, its relative error against fp32 (‖D_bf16 − D_fp32‖ /
   ‖D_fp32‖ over σ ∈ {0.01, 0.3, 2.5, 80}) and its forward time.

    python benchmarks/activation_checkpointing.py [--device cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffdistill.diffusion.losses import edm_loss
from diffdistill.nets.checkpointing import (
    recomputation_probe,
    set_activation_checkpointing,
)
from diffdistill.nets.factory import build_denoiser, count_params
from diffdistill.nets.low_precision import store_in_bf16
from diffdistill.nets.songunet import digits_unet_config

CONFIGS = {
    "digits SongUNet (8×8×1, 32 ch, 2 levels × 2 blocks)": (
        {k: v for k, v in digits_unet_config().items() if k not in ("img_resolution", "in_channels", "out_channels")},
        1, 8, 256),
    "SongUNet 32×32×3 (64 ch, mult 1-2-2, 2 blocks, attention at 16)": (
        {"model_channels": 64, "channel_mult": (1, 2, 2), "num_blocks": 2, "attn_resolutions": (16,), "dropout": 0.1},
        3, 32, 32),
}


def build(kwargs, C, R, device):
    torch.manual_seed(0)
    net = build_denoiser({"arch": "songunet", "img_channels": C, "img_resolution": R, "kwargs": kwargs})
    return net.to(device).train()


def loss_fn(net, x, sigma, noise):
    return edm_loss(net, x, sigma, noise).mean()


def inputs(C, R, B, device):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(B, C, R, R, generator=g) * 2 - 1
    sigma = (torch.randn(B, generator=g) * 1.2 - 1.2).exp()
    noise = torch.randn(B, C, R, R, generator=g)
    return x.to(device), sigma.to(device), noise.to(device)


def saved_bytes(net, batch) -> tuple[int, int]:
    """(bytes autograd keeps for backward, the largest checkpointed block's saved bytes — what backward holds
    again while recomputing it; 0 without checkpointing)."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t
    with recomputation_probe() as blocks, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(net, *batch)
    del loss
    return sum(seen.values()), max(blocks, default=0)


def peak_bytes(net, batch, device) -> int:
    net.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        loss_fn(net, *batch).backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        loss_fn(net, *batch).backward()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    return int(max(sum(s) for s in sizes))


def seconds(net, batch, device, repeats) -> float:
    times = []
    for _ in range(repeats):
        net.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        loss_fn(net, *batch).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def grads(net, batch):
    net.zero_grad(set_to_none=True)
    torch.manual_seed(3)   # the dropout masks
    loss_fn(net, *batch).backward()
    return [p.grad.clone() for p in net.parameters()]


def mib(n) -> str:
    return f"{n / 2**20:.1f}"


def checkpointing_table(device, repeats):
    print(f"\n## activation checkpointing, EDM loss forward + backward, {device}\n")
    print("| network | params | batch | blocks checkpointed | saved for backward (MiB) | + largest block "
          "recomputed (MiB) | estimate (MiB) | peak allocated (MiB) | s / fwd+bwd | gradients bit-identical |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for name, (kwargs, C, R, B) in CONFIGS.items():
        net = build(kwargs, C, R, device)
        batch = inputs(C, R, B, device)
        rows = {}
        for on in (False, True):
            set_activation_checkpointing(net, on)
            rows[on] = (saved_bytes(net, batch), peak_bytes(net, batch, device), seconds(net, batch, device, repeats),
                        grads(net, batch))
        same = all(torch.equal(a, b) for a, b in zip(rows[False][3], rows[True][3]))
        # the dry run's estimate of the same pass: weights + gradients + input + kept + recomputed block
        fixed = 2 * sum(p.numel() * p.element_size() for p in net.parameters()) + \
            sum(t.numel() * t.element_size() for t in batch)
        for on in (False, True):
            (s, r), p, t, _ = rows[on]
            print(f"| {name} | {count_params(net):,d} | {B} | {'all' if on else 'none'} | {mib(s)} | {mib(r)} | "
                  f"{mib(fixed + s + r)} | {mib(p)} | {t:.3f} | {('yes' if same else 'NO') if on else '—'} |")
        (s0, r0), p0, t0, _ = rows[False]
        (s1, r1), p1, t1, _ = rows[True]
        print(f"| checkpointed / plain | | | | {s1 / s0:.2f} | | {(fixed + s1 + r1) / (fixed + s0 + r0):.2f} | "
              f"{p1 / p0:.2f} | {t1 / t0:.2f} | |")


def teacher_table(device, repeats):
    from diffdistill.demo import SHIPPED_TEACHER
    from diffdistill.distill import load_teacher
    print(f"\n## bf16 frozen teacher (the shipped digits teacher), {device}\n")
    print("| teacher_dtype | weight bytes (KiB) | relative error vs fp32 (worst σ) | s / forward, batch 256 |\n"
          "|---|---|---|---|")
    t32 = load_teacher(SHIPPED_TEACHER, str(device))[0].eval().requires_grad_(False)
    t16 = store_in_bf16(load_teacher(SHIPPED_TEACHER, str(device))[0].eval().requires_grad_(False))
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(256, 1, 8, 8, generator=g) * 2 - 1).to(device)
    y = torch.nn.functional.one_hot(torch.arange(256) % 10, 10).float().to(device) if t32.label_dim else None
    errs = []
    with torch.no_grad():
        for sigma in (0.01, 0.3, 2.5, 80.0):
            x = x0 + sigma * torch.randn(x0.shape, generator=g).to(device)
            d32, d16 = t32(x, sigma, y), t16(x, sigma, y)
            errs.append(float((d16 - d32).norm() / d32.norm()))
        for name, t in (("fp32", t32), ("bf16", t16)):
            times = []
            for _ in range(repeats):
                s = time.perf_counter()
                t(x0, 1.0, y)
                times.append(time.perf_counter() - s)
            nbytes = sum(p.numel() * p.element_size() for p in t.parameters())
            err = "—" if name == "fp32" else f"{max(errs):.2g} (per σ: {', '.join(f'{e:.2g}' for e in errs)})"
            print(f"| {name} | {nbytes / 1024:.0f} | {err} | {statistics.median(times):.3f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    device = torch.device(a.device)
    checkpointing_table(device, a.repeats)
    teacher_table(device, a.repeats)


if __name__ == "__main__":
    main()
