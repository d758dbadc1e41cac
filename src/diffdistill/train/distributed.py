"""torch.distributed in three functions: init from torchrun's env, the world, and gradient averaging.

Launched by ``torchrun`` → one process per rank (gloo on CPU, nccl on CUDA); launched plainly → a single process
and every call here is a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(device: str = "cpu") -> None:
    if "RANK" not in os.environ or dist.is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _reduce_device() -> torch.device:
    """Where small reduction tensors live: NCCL reduces CUDA tensors only."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched_rank() -> int:
    """This process's rank as torchrun set it (its RANK), known before the process group exists."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def launched_world_size() -> int:
    """The number of processes torchrun started (its WORLD_SIZE), known before the process group exists."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def all_true(flag: bool) -> bool:
    """True when ``flag`` is true on every rank (so all ranks take the same branch)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def any_true(flag: bool) -> bool:
    """True when ``flag`` is true on any rank."""
    return not all_true(not flag)


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, …] on every rank ([obj] in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_module(module: torch.nn.Module) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if is_distributed():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def average_gradients(params) -> None:
    """All-reduce and average .grad over ranks (DDP's effect, without wrapping the module)."""
    if not is_distributed():
        return
    ws = world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(ws)


def all_reduce_mean(value: float) -> float:
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()
