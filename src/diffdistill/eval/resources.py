"""Peak memory of a phase of work, per device: CUDA's allocator statistics on a GPU, the process's resident-set
high-water mark (VmHWM, reset through /proc/self/clear_refs) on a Linux CPU. Used by ``compare`` and the trainer's
run summary; everything degrades to ``None`` where the platform cannot tell."""

from __future__ import annotations

import resource
import sys

import torch


def reset_peak_memory(device="cpu") -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return
    try:  # '5' resets the peak RSS of this process (Linux ≥ 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device="cpu") -> float | None:
    """Peak memory since the last reset in MiB: allocated tensors on CUDA, resident set size on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not resettable: the process's lifetime peak
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20
