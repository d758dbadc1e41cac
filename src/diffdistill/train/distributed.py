"""torch.distributed in three functions: init from torchrun's env, the world, and gradient averaging.

Launched by ``torchrun`` → one process per rank (gloo on CPU, nccl on CUDA); launched plainly → a single process
and every call here is a no-op — unless a one-process group is asked for (``run.fsdp``: FSDP2 needs a process group
and a device mesh even on one process), which ``init_distributed(single_process=True)`` makes with an in-process
store and ``release()`` takes down again.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

_own_group = False   # whether init_distributed made a one-process group (release() destroys only that one)


def init_distributed(device: str = "cpu", single_process: bool = False) -> None:
    """Join torchrun's process group; launched plainly, make a one-process group when ``single_process``."""
    global _own_group
    if dist.is_initialized() or ("RANK" not in os.environ and not single_process):
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if "RANK" not in os.environ:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        _own_group = True
        return
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)


def release() -> None:
    """Destroy the one-process group ``init_distributed(single_process=True)`` made (torchrun's is left alone), so
    a later run in the same Python process starts as a plain single process."""
    global _own_group
    if _own_group and dist.is_initialized():
        dist.destroy_process_group()
    _own_group = False


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


def is_sharded(t) -> bool:
    """Whether ``t`` is a DTensor: a parameter (or its gradient, optimizer state) of an FSDP2-sharded network."""
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def autograd_leaves(params) -> list:
    """The tensors to differentiate with ``torch.autograd.grad`` for these parameters: a sharded parameter's
    unsharded one (FSDP2 runs the forward with it, so the graph reaches that tensor; its gradient is this rank's,
    before the reduction — what an unsharded parameter's is), else the parameter itself."""
    return [getattr(getattr(p, "_diffdistill_fsdp_param", None), "_unsharded_param", p) for p in params]


def average_gradients(params) -> None:
    """All-reduce and average .grad over ranks (DDP's effect, without wrapping the module). Sharded (FSDP2)
    parameters are skipped: FSDP reduce-scatters their gradients (averaged) in backward already."""
    if not is_distributed():
        return
    ws = world_size()
    for p in params:
        if p.grad is not None and not is_sharded(p):
            dist.all_reduce(p.grad)
            p.grad.div_(ws)


def all_reduce_mean(value: float) -> float:
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def all_reduce_max(value: float) -> float:
    """The largest ``value`` over the ranks (the same float on every rank)."""
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()
