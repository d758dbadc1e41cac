"""The memory plan printed by ``--dry-run``: every network a method builds, its parameter count, and an estimate of
peak memory for the chosen batch — without training a step or writing a file.

Networks are found generically, by walking the method object (its ``nets`` first, then its attributes, helper
objects such as an EMA holder, dicts and lists, three levels deep) and the trainer's supplements for
``nn.Module`` instances; so a method's teacher, fake score, discriminator, EMA/target copies and random feature nets
appear without the method declaring them. Loose tensors found on the way (pair caches, memory banks) and the
training data held on the device are counted too.

Estimate (per process): weights and buffers + optimizer state (Adam/AdamW: 2 tensors per trainable parameter, SGD
with momentum: 1) + data and loose tensors + the largest phase's gradients plus the larger of its activations and
its optimizer step's temporaries (``_step_temporaries``: torch's foreach Adam — its default on CUDA — takes sqrt(v)
of every parameter at once, one copy of the trained parameters, which outgrows the activations of a large network
at a small batch; its for-loop step on the CPU, 2–3× the largest parameter). Activations are *measured*: the
phase's forward pass runs at batch 2 and at batch 4 with an autograd hook that adds up the bytes of every tensor
saved for backward (parameters excluded), and the difference is extrapolated linearly to the chosen batch — to one
micro-batch (batch / run.grad_accum) under gradient accumulation, which keeps one micro-batch's activations at a
time. With activation checkpointing the hook sees what the checkpoints keep, and the largest checkpointed block's
own saved tensors (held again while backward recomputes it) are added. ``benchmarks/dry_run_vs_rss.py`` checks the
plan against real CPU runs (``benchmarks/notes/dry_run_memory.md``): 0.998–1.077× the peak of torch's allocated
bytes over whole training iterations (digits DMD2 / SiD, a 27.9 M-parameter SongUNet under DMD2, SiD, LoRA,
checkpointing, the bf16 teacher; an upper bound, since backward frees activations as gradients appear); the
resident size above the process's own memory was 1.05–1.6× the estimate (glibc keeping freed blocks in its heaps;
0.95–1.1× with ``MALLOC_MMAP_THRESHOLD_=131072``).

On the meta device (``run.device=meta``, ``--dry-run --device meta``) the same plan is made without allocating
anything, so networks too large for the machine can be planned: the trainer builds every network there (a
teacher from its config, its copies, LoRA adapters), sizes come from shapes, and the phases' forwards run on meta
tensors under the same hook (saved-tensor hooks fire for meta tensors; tensors are told apart by storage identity,
since every meta storage has address 0). ``MetaForward`` makes numbers read from tensors placeholders and runs
attention as a fused kernel, as real devices do; bf16 autocast has no meta backend and is refused. The plan is the
CPU plan to the byte on the tested runs (``tests/test_memory_plan.py``), and it plans torch.optim's CUDA step unless
``target`` says otherwise. ``module_memory_plan`` measures one network alone (e.g. a diffusers model built from its
published config under ``torch.device("meta")``).

With ``run.fsdp`` the plan is per rank of W (the processes launched, or ``ranks``): every tensor of a sharded
network (``sharding.sharded_networks``) counts its largest dim-0 shard — weights, gradients and optimizer state
÷ W — and FSDP2's transient all-gather is added: a network's root parameters (gathered for its whole forward) plus
its largest block with that block's unsharded gradient, for the network where this is largest. Activations are
the same as without sharding; buffers are not sharded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..lora import LoRARole, lora_summary
from ..nets.checkpointing import blocks, recomputation_probe
from ..nets.saved_tensors import MetaForward, count_saved, storage_key
from .sharding import shard_bytes, sharded_networks

_SKIP_TYPES = (torch.optim.Optimizer, torch.Generator, torch.device, type)
_SKIP_NAMES = ("optimizers", "schedulers")
_FOREACH_DEVICES = ("cuda", "xpu")   # where torch.optim defaults to its foreach step


@dataclass
class NetInfo:
    name: str
    module: nn.Module
    params: int
    bytes: int
    dtypes: str
    phases: list = field(default_factory=list)  # optimizer phases that train it ([] = frozen)
    shared_with: str | None = None              # all of its parameters belong to a network listed earlier
    sharded: bool = False                       # FSDP2-sharded (run.fsdp): each rank holds 1/W of it


def _scheduler_types():
    sched = torch.optim.lr_scheduler
    return tuple(t for t in (getattr(sched, "LRScheduler", None), getattr(sched, "_LRScheduler", None)) if t)


def find_networks(method, supplements=(), extra_roots=None):
    """([NetInfo, …], [(name, tensor), …]): every nn.Module reachable from the method (its ``nets`` named by their
    keys, the rest by attribute path) and the supplements, and the loose tensors next to them."""
    modules: dict[int, tuple[str, nn.Module]] = {}
    tensors: dict[int, tuple[str, torch.Tensor]] = {}
    seen: set[int] = set()
    skip = _SKIP_TYPES + _scheduler_types()

    def visit(obj, name: str, depth: int):
        if isinstance(obj, nn.Module):
            modules.setdefault(id(obj), (name, obj))
            return
        if torch.is_tensor(obj):
            tensors.setdefault(id(obj), (name, obj))
            return
        if depth > 3 or id(obj) in seen or isinstance(obj, skip) or isinstance(obj, (str, bytes, int, float, bool)):
            return
        seen.add(id(obj))
        if isinstance(obj, dict):
            for k, v in obj.items():
                visit(v, f"{name}.{k}" if name else str(k), depth + 1)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                visit(v, f"{name}[{i}]", depth + 1)
        elif hasattr(obj, "__dict__"):
            for k, v in vars(obj).items():
                if k in _SKIP_NAMES or k.startswith("__"):
                    continue
                visit(v, f"{name}.{k}" if name else k, depth + 1)

    for k, net in method.nets.items():
        visit(net, k, 0)
    for k, ema in method.emas.items():   # the trainer-owned EMA copies, named by the net they follow
        visit(ema.net, f"ema.{k}", 0)
    visit(method, "", 0)
    for i, sup in enumerate(supplements):
        visit(sup, f"{type(sup).__name__.lower()}", 1)
    for k, v in (extra_roots or {}).items():
        visit(v, k, 0)
    # A LoRA role's parameters are its adapter's; the frozen base it runs lives in its stack. With a shared base
    # that is the teacher (found above); separate bases are listed as "<role>.base", each once.
    for name, m in list(modules.values()):
        if isinstance(m, LoRARole):
            visit(m.stack.base_role, f"{name}.base", 0)

    trained = {}
    for phase, opt in method.optimizers.items():
        for g in opt.param_groups:
            for p in g["params"]:
                trained.setdefault(id(p), set()).add(phase)
    infos, owner = [], {}
    used = set()
    for name, m in modules.values():
        if name.startswith("ctx.") and name[4:] not in used:  # the context's teacher is "teacher" unless taken
            name = name[4:]
        used.add(name)
        params = list(m.parameters())
        pids = {id(p) for p in params}
        shared = None
        if pids and all(i in owner for i in pids):
            shared = owner[next(iter(pids))]
        for i in pids:
            owner.setdefault(i, name)
        phases = sorted({ph for p in params for ph in trained.get(id(p), ())})
        nbytes = sum(p.numel() * p.element_size() for p in params) + \
            sum(b.numel() * b.element_size() for b in m.buffers())
        dtypes = ",".join(sorted({str(p.dtype).replace("torch.", "") for p in params})) or "-"
        infos.append(NetInfo(name, m, sum(p.numel() for p in params), nbytes, dtypes, phases, shared))
    module_ptrs = {storage_key(t) for _, m in modules.values() for t in list(m.parameters()) + list(m.buffers())}
    loose = [(n, t) for n, t in tensors.values()  # (tensors with a grad_fn are a step's leftovers, not state)
             if t.numel() and t.grad_fn is None and storage_key(t) not in module_ptrs]
    return infos, loose


def _optimizer_slots(opt: torch.optim.Optimizer) -> int:
    """State tensors per parameter: Adam-family 2 (3 with amsgrad), SGD with momentum 1, else 2 (an upper guess)."""
    d = opt.defaults
    if "betas" in d:
        return 3 if d.get("amsgrad") else 2
    if "momentum" in d:
        return 1 if d.get("momentum") else 0
    return 2


def _step_temporaries(opt: torch.optim.Optimizer, size, foreach_default: bool) -> int:
    """Bytes an optimizer step allocates beyond its state at its peak, following torch.optim's Adam/AdamW code
    paths: the foreach path (torch's default on CUDA) takes sqrt(v) of a whole (param group, device, dtype) group at
    once — one copy of the group's parameters (the copy of the gradients that Adam's coupled weight decay makes is
    freed before); the for-loop path (the default on the CPU) one parameter at a time — sqrt(v) and its quotient,
    plus that weight-decay copy: 2-3× the largest parameter. Fused steps, and other optimizers: 0."""
    d = opt.defaults
    if "betas" not in d or d.get("fused"):
        return 0
    foreach = foreach_default if d.get("foreach") is None else bool(d["foreach"])
    worst = 0
    for g in opt.param_groups:
        params = [p for p in g["params"] if p.requires_grad]
        if foreach:
            groups: dict = {}
            for p in params:
                groups[(p.device, p.dtype)] = groups.get((p.device, p.dtype), 0) + size(p)
            worst = max(worst, max(groups.values(), default=0))
        else:
            coupled = g.get("weight_decay", 0) and not g.get("decoupled_weight_decay", False)
            worst = max(worst, (3 if coupled else 2) * max((size(p) for p in params), default=0))
    return worst


def _saved_activation_bytes(trainer, phase: str, step: int, batch_size: int, exclude_keys: set,
                            recomputed: list | None = None) -> int:
    """Bytes of the tensors autograd saves for backward in one forward pass of ``phase`` at ``batch_size``. With
    activation checkpointing these are what the checkpoints keep; ``recomputed`` (a list) then receives the bytes
    of the largest checkpointed block's saved tensors, which backward holds again while it recomputes that block
    (0 without checkpointing)."""
    method = trainer.method
    batch = None
    if trainer.data_x is not None:
        idx = torch.arange(batch_size, device=trainer.data_x.device) % len(trainer.data_x)
        batch = (trainer.data_x[idx], trainer.data_y[idx] if trainer.data_y is not None else None)
    old = method.ctx.batch_size
    method.ctx.batch_size = batch_size
    # on the meta device numbers read from tensors (logged losses) are placeholders: no tensor has values there
    scalars = MetaForward() if trainer.device.type == "meta" else contextlib.nullcontext()
    try:
        with scalars:
            # The phases before this one in the same step run first (unmeasured): a method may hand samples from
            # one phase to the next (DMD2's critic reuses the generator phase's samples).
            for before in method.phases(step)[:method.phases(step).index(phase)]:
                trainer.phase_loss(before, batch, step)
            with recomputation_probe() as blocks, count_saved(exclude_keys=exclude_keys) as saved:
                loss, _ = trainer.phase_loss(phase, batch, step)
        del loss
        if recomputed is not None:
            recomputed.append(max(blocks, default=0))
    finally:
        method.ctx.batch_size = old
    return sum(saved.values())


def _phase_steps(method) -> dict:
    """phase → a step where it runs, preferably as the step's first phase."""
    first_step = {}
    for s in range(16):
        for i, ph in enumerate(method.phases(s)):
            if ph not in first_step or (i == 0 and method.phases(first_step[ph])[0] != ph):
                first_step[ph] = s
    return first_step


def _gathered_bytes(net: nn.Module) -> int:
    """FSDP2's transient memory for one sharded network: its root parameters (outside every block, gathered for
    the whole forward) plus its largest block twice (the gathered weights and their unsharded gradient)."""
    def nbytes(ps) -> int:
        return sum(p.numel() * p.element_size() for p in ps)
    inner = [list(b.parameters()) for b in blocks(net)]
    in_blocks = {id(p) for ps in inner for p in ps}
    root = nbytes(p for p in net.parameters() if id(p) not in in_blocks)
    return root + 2 * max((nbytes(ps) for ps in inner), default=0)


def estimate_memory(trainer, probe=(2, 4), ranks: int | None = None, target: str | None = None) -> dict:
    """The memory plan (module docstring); ``ranks``: plan FSDP2's shards for that many processes (default: the
    trainer's); ``target``: the device type the plan is for, which decides torch.optim's default step (foreach on
    cuda, a for-loop on cpu) — default the trainer's device, cuda for a plan on the meta device."""
    method = trainer.method
    target = target or ("cuda" if trainer.device.type == "meta" else trainer.device.type)
    run = trainer.cfg["run"]
    world = int(ranks or trainer.world) if run.get("fsdp") else 1
    sharded_nets = sharded_networks(method, run.get("fsdp_teacher") == "shard") if run.get("fsdp") else []
    sharded = {id(p) for net in sharded_nets for p in net.parameters()}

    def size(t) -> int:
        return shard_bytes(t, world) if id(t) in sharded else t.numel() * t.element_size()

    rng = (method.ctx.generator.get_state(), torch.get_rng_state())
    for ph, s in _phase_steps(method).items():  # one small forward first: supplements build their nets lazily
        try:
            _saved_activation_bytes(trainer, ph, s, probe[0], set())
        except Exception:  # reported by the measurement below
            pass
    infos, loose = find_networks(method, trainer.supplements,
                                 {"data": [t for t in (trainer.data_x, trainer.data_y) if t is not None]})
    unique, weights = set(), 0
    for info in infos:
        info.sharded = any(id(p) in sharded for p in info.module.parameters())
        for t in list(info.module.parameters()) + list(info.module.buffers()):
            if id(t) not in unique:
                unique.add(id(t))
                weights += size(t)
    loose_bytes = sum(t.numel() * t.element_size() for _, t in loose)
    opt_state = sum(_optimizer_slots(opt) * size(p)
                    for opt in method.optimizers.values() for g in opt.param_groups for p in g["params"])
    grads = {ph: sum(size(p) for p in method.trainable_params(ph)) for ph in method.optimizers}
    foreach = target in _FOREACH_DEVICES
    temporaries = {ph: _step_temporaries(opt, size, foreach) for ph, opt in method.optimizers.items()}
    gathered = max((_gathered_bytes(net) for net in sharded_nets), default=0)
    first_step = _phase_steps(method)
    exclude = {storage_key(t) for info in infos for t in list(info.module.parameters()) + list(info.module.buffers())}
    B = trainer.cfg["run"]["batch_size"]
    k = int(trainer.cfg["run"].get("grad_accum", 1))
    micro = B // k   # activations are held for one micro-batch at a time (run.grad_accum)
    acts, recomputed, errors, per_sample = {}, {}, {}, {}

    def slope(a, b):
        return max(b - a, 0) / (probe[1] - probe[0])

    def extrapolate(a, b):
        return max(0.0, a + (micro - probe[0]) * slope(a, b))
    for ph, s in first_step.items():
        try:
            r = []
            a, b = (_saved_activation_bytes(trainer, ph, s, n, exclude, r) for n in probe)
            recomputed[ph] = extrapolate(*r)
            acts[ph] = extrapolate(a, b) + recomputed[ph]
            per_sample[ph] = slope(a, b) + slope(*r)
        except Exception as e:  # a method that cannot run at the probe batch: say so, estimate the rest
            errors[ph] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    method.ctx.generator.set_state(rng[0])
    torch.set_rng_state(rng[1])

    def phase_peak(ph):   # backward holds the activations and the gradients; the step, gradients and temporaries
        return grads.get(ph, 0) + max(acts.get(ph, 0), temporaries.get(ph, 0))
    worst = max(first_step, key=phase_peak) if first_step else None
    peak = weights + opt_state + loose_bytes + gathered + (phase_peak(worst) if worst else 0)
    return {"networks": infos, "loose": loose, "weights": weights, "optimizer_state": opt_state, "grads": grads,
            "step_temporaries": temporaries, "target": target,
            "fsdp_world": world if run.get("fsdp") else None, "gathered": gathered,
            "activations": acts, "recomputed": recomputed, "errors": errors, "loose_bytes": loose_bytes, "worst_phase": worst,
            "peak": peak, "batch_size": B, "grad_accum": k, "micro_batch": micro, "probe": probe,
            "activations_per_sample": per_sample}


def peak_at(est: dict, micro_batch: int) -> float:
    """The peak of the plan ``est`` (`estimate_memory`) at another micro-batch per process: the activations move
    along the line they were extrapolated on, everything else stays (the data held is the run's data set)."""
    base = est["weights"] + est["optimizer_state"] + est["loose_bytes"] + est["gathered"]
    d = micro_batch - est["micro_batch"]

    def phase_peak(ph):
        a = max(0.0, est["activations"].get(ph, 0) + d * est["activations_per_sample"].get(ph, 0))
        return est["grads"].get(ph, 0) + max(a, est["step_temporaries"].get(ph, 0))
    phases = set(est["grads"]) | set(est["activations"])
    return base + max((phase_peak(ph) for ph in phases), default=0)


def module_memory_plan(module: nn.Module, inputs: list) -> dict:
    """The memory of one network, on any device — the meta device included, where a network far larger than this
    machine (built under ``with torch.device("meta"):`` from its published config, no weights) is planned from
    shapes alone. ``inputs``: example inputs, one per batch size to measure, each a dict of keyword arguments, a
    tuple of positional ones or a tensor (on the module's device). Returns ``params`` (count), ``param_bytes``,
    ``buffer_bytes``, and per input: ``saved`` — the bytes of the tensors autograd saves for backward in one forward
    (parameters and buffers excluded; an input counts when it is saved), with activation checkpointing turned on
    through this package (``set_activation_checkpointing``) plus the largest checkpointed block's own saved tensors,
    which backward holds again while recomputing it (``recomputed``) — and ``output`` bytes. What is saved depends on
    which parameters require grad and on train/eval mode: set them as the run would. On meta, numbers read from
    tensors are placeholders (``MetaForward``); an op without a meta implementation raises."""
    params = list(module.parameters())
    buffers = list(module.buffers())
    exclude = {storage_key(t) for t in params + buffers}
    meta = any(p.is_meta for p in params)
    saved, recomputed, outputs = [], [], []
    for example in inputs:
        args, kwargs = ((), example) if isinstance(example, dict) else \
            ((example,), {}) if torch.is_tensor(example) else (tuple(example), {})
        with MetaForward() if meta else contextlib.nullcontext(), torch.enable_grad(), \
                recomputation_probe() as blocks, count_saved(exclude_keys=exclude) as seen:
            out = module(*args, **kwargs)
        flat = [t for t in _tensors(out)]
        outputs.append(sum(t.numel() * t.element_size() for t in flat))
        del out, flat
        recomputed.append(max(blocks, default=0))
        saved.append(sum(seen.values()) + recomputed[-1])
    return {"params": sum(p.numel() for p in params), "param_bytes": sum(p.numel() * p.element_size() for p in params),
            "buffer_bytes": sum(b.numel() * b.element_size() for b in buffers), "saved": saved,
            "recomputed": recomputed, "output": outputs}


def _tensors(obj):
    """The tensors in a model's output (a tensor, a tuple/list/dict of them, or a diffusers output dataclass)."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "__dataclass_fields__"):
        for k in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, k, None))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def dry_run_report(trainer, ranks: int | None = None) -> str:
    """The text ``--dry-run`` prints (``ranks``: the processes FSDP2's shards are planned for)."""
    est = estimate_memory(trainer, ranks=ranks)
    data = trainer.dataset
    what = f"data {getattr(data, 'name', '?')} {list(data.sample_shape)}" if data is not None else "data-free"
    noise = trainer.noise_report()
    lines = [f"dry run: method {trainer.method_cls.name} ({trainer.method_cls.role}), {what}, batch "
             f"{est['batch_size']} per process × {trainer.world} process(es), device {trainer.device}",
             *([f"noise levels: {noise}"] if noise else []), "",
             f"{'network':28s} {'parameters':>12s} {'size':>10s}  {'dtype':16s} trained by",
             "-" * 92]
    for info in est["networks"]:
        trained = ("optimizer " + "/".join(info.phases)) if info.phases else "frozen (no optimizer)"
        if info.shared_with:
            trained += f"; shares its parameters with {info.shared_with}"
        if isinstance(info.module, LoRARole):
            trained += "; LoRA adapter" if info.module.adapter else "; frozen LoRA base"
        if info.sharded:
            trained += f"; FSDP2-sharded (1/{est['fsdp_world']} per process)"
        if any(getattr(m, "activation_checkpointing", False) or getattr(m, "gradient_checkpointing", False)
               for m in info.module.modules()):   # this package's networks / diffusers' blocks
            trained += "; activation checkpointing"
        lines.append(f"{info.name:28s} {info.params:>12,d} {_fmt_bytes(info.bytes):>10s}  {info.dtypes:16s} {trained}")
    uniq = sum(i.params for i in est["networks"] if not i.shared_with)
    lines.append(f"{'total (distinct)':28s} {uniq:>12,d}")
    lines += lora_summary({i.name: i.module for i in est["networks"]})
    big = sorted(est["loose"], key=lambda nt: -nt[1].numel() * nt[1].element_size())
    if big:
        shown = ", ".join(f"{n} {list(t.shape)} {_fmt_bytes(t.numel() * t.element_size())}" for n, t in big[:6])
        more = f" and {len(big) - 6} more" if len(big) > 6 else ""
        lines.append(f"tensors held by the run: {shown}{more}")
    B, k = est["batch_size"], est["grad_accum"]
    accum = f" as {k} micro-batches of {est['micro_batch']} (run.grad_accum; activations of one)" if k > 1 else ""
    world = est["fsdp_world"]
    fsdp = (f", FSDP2 over {world} process(es): sharded networks' weights, gradients and optimizer state ÷ {world}"
            if world else "")
    lines += ["", f"peak memory estimate per process at batch {B}{accum}{fsdp}:",
              f"  weights and buffers      {_fmt_bytes(est['weights']):>12s}",
              f"  optimizer state          {_fmt_bytes(est['optimizer_state']):>12s}   "
              f"(Adam/AdamW: 2 tensors per trained parameter)",
              f"  data and other tensors   {_fmt_bytes(est['loose_bytes']):>12s}"]
    if world:
        lines.append(f"  all-gathered (FSDP2)     {_fmt_bytes(est['gathered']):>12s}   (one network's root parameters "
                     f"+ its largest block and that block's gradient, unsharded)")
    for ph in sorted(set(est["grads"]) | set(est["activations"]) | set(est["errors"])):
        if ph in est["errors"]:
            lines.append(f"  phase {ph:18s} activations not measured ({est['errors'][ph]})")
            continue
        rec = est["recomputed"].get(ph, 0)
        temp = est["step_temporaries"].get(ph, 0)
        step = f"; step temporaries {_fmt_bytes(temp)}" if temp else ""
        lines.append(f"  phase {ph:18s} gradients {_fmt_bytes(est['grads'].get(ph, 0)):>10s} + activations "
                     f"{_fmt_bytes(est['activations'].get(ph, 0)):>10s}{step}"
                     + (f"   (incl. {_fmt_bytes(rec)} recomputed in backward: the largest checkpointed block)"
                        if rec else ""))
    meta = trainer.device.type == "meta"
    grow = max(est["activations_per_sample"].values(), default=0)
    if grow:
        lines.append(f"  each further sample per process adds ≈ {_fmt_bytes(grow)} of activations (the largest "
                     f"phase's slope; at batch {2 * est['micro_batch']}{' per micro-batch' if k > 1 else ''}: "
                     f"peak ≈ {_fmt_bytes(peak_at(est, 2 * est['micro_batch']))})")
    lines += [f"  peak ≈ {_fmt_bytes(est['peak'])} (largest phase: {est['worst_phase']}) of tensors: weights, state "
              f"and data + the phase's gradients + the larger of its activations (the tensors saved for backward, "
              f"measured at batch {est['probe'][0]} and {est['probe'][1]} and extrapolated linearly) and its "
              f"optimizer step's temporaries (torch.optim's {est['target']} default). Add the process itself; on the CPU "
              f"glibc kept 5–60 % more resident in the benchmark's runs (MALLOC_MMAP_THRESHOLD_=131072: ≤ 10 %), "
              f"on a GPU add the CUDA context and the caching allocator's reserve"]
    if meta:
        lines.append("  planned on the meta device: every size from shapes, nothing allocated; numbers read from "
                     "tensors are placeholders, attention counts as a fused kernel")
    lines += ["", "dry run: nothing was trained or written."]
    return "\n".join(lines)
