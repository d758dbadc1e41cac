"""FSDP2 sharding of a method's networks (``run.fsdp``), and the split of a sharded state for checkpoints.

What is sharded: every network of ``method.nets`` (those its optimizers train, and any frozen one it checkpoints,
such as PD's stage teacher) and every EMA copy, each in the same layout — ``fully_shard`` on each of its blocks
(``nets.checkpointing.blocks``: the residual / attention blocks activation checkpointing uses) and then at the
root, on a 1-D device mesh over all ranks (gloo on CPU, nccl on CUDA); with ``run.fsdp_teacher=shard`` the frozen
teacher too. Parameters become DTensors (each rank keeps 1/W of every tensor, along dim 0); a forward all-gathers
one block at a time and frees it after, backward gathers it again and reduce-scatters the gradients averaged over
the ranks — so the trainer does not all-reduce them itself (``distributed.average_gradients`` skips DTensors). The
optimizers step the local shards, ``clip_grad_norm_`` on DTensors computes the global norm, and an EMA update
lerps each local shard of the copy towards the same shard of its source.

The wrapping happens after the method is built: its optimizers hold the parameters from before, so their
param_groups are re-pointed at the sharded ones (no optimizer has state yet), and tensor hooks a method put on its
parameters (SiD's gradient guards) move to the unsharded parameters FSDP back-propagates into — so each sees the
same per-rank gradient, before the reduction, as without FSDP.

Checkpoints (``split_state`` / ``restore_state``): every DTensor of the trainer's state — network weights,
optimizer moments, EMA copies — goes to ``torch.distributed.checkpoint`` (each rank writes its own shards), with a
placeholder recording its global shape, dtype and placement in the ``.pt`` file rank 0 writes (steps, schedulers,
RNG, the consolidated sampling net). Loading builds DTensors for the *current* mesh from the placeholders and lets
DCP fill them, so a checkpoint written on another number of ranks is resharded on the way in.
"""

from __future__ import annotations

import torch
from torch import nn

from ..io.checkpoint import SHARD_KEY, fill_placeholders
from ..nets.checkpointing import blocks
from . import distributed as dist


def _dtensor():
    from torch.distributed.tensor import DTensor
    return DTensor


def shard_network(net: nn.Module, mesh) -> None:
    """``fully_shard`` every block of ``net`` (outermost ones), then ``net`` itself (its remaining parameters)."""
    from torch.distributed.fsdp import fully_shard
    for block in blocks(net):
        fully_shard(block, mesh=mesh)
    # resharded after every forward, the root too (FSDP2 keeps a root gathered for the backward it expects by
    # default): a forward without backward (sampling, a no-grad pass, the frozen teacher) then leaves every
    # parameter sharded, as EMA updates and state dicts need
    fully_shard(net, mesh=mesh, reshard_after_forward=True)


def _fsdp_modules(net: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in net.modules() if isinstance(m, FSDPModule)]


def sharded_networks(method, shard_teacher: bool = False) -> list[nn.Module]:
    """The networks ``run.fsdp`` shards: every one of ``method.nets`` and every EMA copy, plus the frozen teacher
    networks with ``run.fsdp_teacher=shard`` (each once; networks without parameters left out)."""
    nets = list(method.nets.values()) + [ema.net for ema in method.emas.values()]
    if shard_teacher:
        nets += method.teacher_networks()
    out, seen = [], set()
    for net in nets:
        if id(net) not in seen and any(True for _ in net.parameters()):
            seen.add(id(net))
            out.append(net)
    return out


def shard_bytes(t: torch.Tensor, world: int) -> int:
    """Bytes of the largest shard (rank 0's) of ``t`` split along dim 0 over ``world`` ranks, as FSDP2 does."""
    if t.ndim == 0 or world <= 1:
        return t.numel() * t.element_size()
    rows = -(-t.shape[0] // world)
    return rows * (t.numel() // max(t.shape[0], 1)) * t.element_size()


class Sharding:
    """The FSDP2 layout of one trainer's networks: ``apply()`` wraps them (see the module docstring)."""

    def __init__(self, method, device: torch.device, shard_teacher: bool = False):
        from torch.distributed.device_mesh import init_device_mesh
        self.method, self.shard_teacher = method, shard_teacher
        self.mesh = init_device_mesh(device.type, (dist.world_size(),))
        self.networks: list[nn.Module] = []

    def apply(self) -> Sharding:
        method = self.method
        targets = sharded_networks(method, self.shard_teacher)
        owner: dict[int, int] = {}
        for i, net in enumerate(targets):
            for p in net.parameters():
                if owner.setdefault(id(p), i) != i:   # a method bug: each network must own its parameters
                    raise RuntimeError(f"{type(method).__name__}: two networks share parameters, which FSDP2 cannot "
                                       f"shard apart")
        where = {id(p): (i, name) for i, net in enumerate(targets) for name, p in net.named_parameters()}
        for phase, opt in method.optimizers.items():
            if opt.state:
                raise RuntimeError(f"{type(method).__name__}: optimizer {phase!r} has state before the first step")
            outside = [p for g in opt.param_groups for p in g["params"] if id(p) not in where]
            if outside:
                raise RuntimeError(f"{type(method).__name__}: optimizer {phase!r} trains {len(outside)} tensor(s) "
                                   f"outside the method's networks, which FSDP2 cannot shard")
        hook_fns = {where[id(p)]: list(p._backward_hooks.values()) for net in targets for p in net.parameters()
                    if getattr(p, "_backward_hooks", None)}
        for net in targets:
            shard_network(net, self.mesh)
        sharded = [dict(net.named_parameters()) for net in targets]
        for opt in method.optimizers.values():
            for g in opt.param_groups:
                g["params"] = [sharded[where[id(p)][0]][where[id(p)][1]] for p in g["params"]]
        if hook_fns:
            self._move_hooks(targets, hook_fns)
        for net in targets:   # for distributed.autograd_leaves: sharded parameter → FSDP's record of it
            for m in _fsdp_modules(net):
                for group in m._get_fsdp_state()._fsdp_param_groups:
                    for fp in group.fsdp_params:
                        fp.sharded_param._diffdistill_fsdp_param = fp
        self.networks = targets
        return self

    @staticmethod
    def _move_hooks(targets, hook_fns: dict) -> None:
        """Register each old parameter's tensor hooks on the unsharded parameter FSDP creates for it (the one a
        forward uses and autograd accumulates into; it persists across all-gathers)."""
        for i, net in enumerate(targets):
            mine = {name: fns for (j, name), fns in hook_fns.items() if j == i}
            if not mine:
                continue
            modules = _fsdp_modules(net)
            for m in modules:
                m.unshard()
            try:
                unsharded = dict(net.named_parameters())
                for name, fns in mine.items():
                    for fn in fns:
                        unsharded[name].register_hook(fn)
            finally:
                for m in modules:
                    m.reshard()


def is_sharded_network(net: nn.Module) -> bool:
    return any(dist.is_sharded(p) for p in net.parameters())


def full_state_dict(net: nn.Module) -> dict:
    """``net.state_dict()`` with full tensors on the CPU: a collective for a sharded network (every rank must
    call it; rank 0 receives the tensors, the others an empty dict)."""
    if not is_sharded_network(net):
        return net.state_dict()
    from torch.distributed.checkpoint import state_dict as dcp_state
    options = dcp_state.StateDictOptions(full_state_dict=True, cpu_offload=True)
    return dcp_state.get_model_state_dict(net, options=options)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` returning a plain tensor: for sharded parameters the norm is the global one (each
    DTensor's local norm reduced over the ranks), and is returned as a full tensor."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, _dtensor()) else norm


def _placement(p) -> list:
    from torch.distributed.tensor import Replicate, Shard
    if isinstance(p, Shard):
        return ["shard", int(p.dim)]
    if isinstance(p, Replicate):
        return ["replicate"]
    raise RuntimeError(f"cannot checkpoint a DTensor placed as {p!r}")


def _placements(spec) -> list:
    from torch.distributed.tensor import Replicate, Shard
    return [Shard(s[1]) if s[0] == "shard" else Replicate() for s in spec]


def split_state(state, path: tuple = ()):
    """(state with every DTensor replaced by a placeholder, {key: DTensor}) — the two halves of a sharded
    checkpoint: the first for the .pt file, the second for DCP. Keys are the DTensors' paths in ``state``."""
    tensors: dict = {}
    DTensor = _dtensor()

    def walk(obj, path):
        if isinstance(obj, DTensor):
            key = "/".join(path)
            tensors[key] = obj
            return {SHARD_KEY: key, "shape": list(obj.shape), "dtype": str(obj.dtype).replace("torch.", ""),
                    "placements": [_placement(p) for p in obj.placements]}
        if isinstance(obj, dict):
            return {k: walk(v, path + (str(k),)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(walk(v, path + (str(i),)) for i, v in enumerate(obj))
        return obj

    return walk(state, path), tensors


def restore_state(state, folder, mesh):
    """``state`` with every placeholder replaced by a DTensor on ``mesh`` (this run's), filled from the DCP
    checkpoint in ``folder`` — resharded by DCP when it was written on another number of ranks. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import zeros
    templates: dict = {}

    def make(spec):
        t = zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]), device_mesh=mesh,
                  placements=_placements(spec["placements"]))
        templates[spec[SHARD_KEY]] = t
        return t

    out = fill_placeholders(state, make)
    dcp.load(templates, checkpoint_id=str(folder))
    return out


def consolidated(state):
    """``state`` with every DTensor gathered into a full CPU tensor (a collective; every rank gets them): a
    sharded trainer's state in the layout of an unsharded one, for comparisons and tests."""
    DTensor = _dtensor()
    if isinstance(state, DTensor):
        return state.full_tensor().cpu()
    if isinstance(state, dict):
        return {k: consolidated(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(consolidated(v) for v in state)
    return state
