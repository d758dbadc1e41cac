"""The method interface: the only thing the trainer knows about a training objective.

A method owns its networks, optimizers (one per *phase*) and per-phase losses. Each training step the trainer asks
``phases(step)`` for the ordered list of phases to run; for each it calls ``loss(phase, batch)``, checks the value
is finite, back-propagates, averages gradients over ranks, clips and steps ``optimizers[phase]``. Teacher training
(the EDM loss) is a method like any other.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from ..diffusion.precond import gain_matched_lr_factor
from ..lora import lora_copies
from ..options import Options, option
from ..train import distributed as dist
from ..train.ema import EMA, EMAOptions
from .draws import Draws

LR_GAIN_MATCH_DOC = ("scale the learning rates by min(1, an EDM network's |c_out| / the teacher's |c_out|) at the "
                     "student's input σ, so a step moves the one-step output as far as for an EDM teacher (1 for EDM "
                     "teachers; ÷5 for an ε-teacher at σ = 2.5); not in the papers")


@dataclass
class GainMatchedLROptions(Options):
    lr_gain_match: bool = option(False, LR_GAIN_MATCH_DOC)


def lr_factor(method: str, opts, teacher, sigma: float) -> float:
    """The learning-rate factor of ``lr_gain_match`` for a student fed ``sigma`` (1 when off), said when not 1."""
    factor = gain_matched_lr_factor(teacher, sigma) if opts.lr_gain_match else 1.0
    if factor != 1.0 and dist.rank() == 0:
        print(f"[diffdistill] {method}: learning rates × {factor:.3g} (lr_gain_match: the teacher's output gain at "
              f"σ = {sigma:.3g} is {teacher.output_gain(sigma):.3g})", flush=True)
    return factor


@dataclass
class MethodContext:
    """What a method gets from the trainer: where it runs and what it trains on."""

    device: torch.device
    generator: torch.Generator          # this rank's RNG for noise/σ draws (its state is checkpointed)
    batch_size: int                     # per rank and iteration (all micro-batches together)
    world_size: int = 1
    net_config: dict = field(default_factory=dict)   # how to build the student/teacher architecture
    teacher: Optional[nn.Module] = None  # frozen Denoiser (distillation methods)
    teacher_path: Optional[str] = None
    sample_shape: tuple = ()
    num_classes: int = 0
    run_dir: Optional[str] = None        # the run directory (methods that precompute files, e.g. DMD's pairs)
    data_name: Optional[str] = None      # the data set's name (CFD/RDD pick a classifier for it)
    # Every random draw of a loss goes through this (``draws.py``): with run.grad_accum = k it hands each
    # micro-batch its rows of the whole batch's draws. Default: plain draws from ``generator``.
    draws: Optional[Draws] = None
    lora: Any = None                     # the run's LoRAOptions when ``lora.rank`` is set (``trainable_copies``)
    # Embedding conditions (encoded prompts, a `Condition` of N rows) that data-free draws pick from, for
    # teachers conditioned on text embeddings (``--prompts`` or the dataset's own); None otherwise.
    conditions: Any = None

    def __post_init__(self):
        if self.draws is None:
            self.draws = Draws(self.generator)

    @property
    def micro_batch_size(self) -> int:
        """The samples one loss call computes on: ``batch_size``, or one micro-batch's share of it."""
        return self.draws.share(self.batch_size, "the per-process batch")


def trainable_copy(teacher: nn.Module) -> nn.Module:
    """A trainable copy of the teacher (train mode, requires_grad on): the generator's and the fake score's
    initialisation in DMD, DMD2 and Diff-Instruct."""
    return copy.deepcopy(teacher).train().requires_grad_(True)


class Method(ABC):
    """Base class for every training objective; subclasses register with ``@register``."""

    name: ClassVar[str]
    summary: ClassVar[str]              # one line for ``--help``
    needs_data: ClassVar[bool] = True   # False for data-free methods: the trainer then builds no data loader
    role: ClassVar[str] = "student"     # 'teacher' for denoiser training
    # The phase that trains a generator from noise (None: the method has none). Supplements such as the embedding
    # loss attach to this phase and read its samples through ``generated_batch``.
    generator_phase: ClassVar[Optional[str]] = None
    # The option schema: a dataclass whose defaults are the official recipe (see ``options.py``).
    Options: ClassVar[type] = Options
    # Why a batch cannot be split into micro-batches with the same result (a loss that couples the samples of a
    # batch); run.grad_accum > 1 is then refused with this reason. None: accumulation is exact (``draws.py``).
    accumulation_refusal_reason: ClassVar[Optional[str]] = None
    # Why the method's networks cannot be sharded with FSDP2 (``run.fsdp``), which is then refused with this reason.
    # None: the trainer shards every network of ``nets`` and every EMA copy (``train/sharding.py``).
    fsdp_refusal_reason: ClassVar[Optional[str]] = None
    # The option that sets the student's one-step input noise level, named by the start-of-run health check when
    # the student's initial samples are off the data's scale (None: the method has no such option).
    input_sigma_option: ClassVar[Optional[str]] = None
    # Whether the method makes its trained networks with ``trainable_copies``, which the ``lora`` section turns into
    # LoRA adapters; the trainer refuses ``lora.rank`` for the others.
    supports_lora: ClassVar[bool] = False

    @classmethod
    def uses_data(cls, opts) -> bool:
        """Whether a run with these options reads real data (the trainer then builds a data loader). Default: the
        class's ``needs_data``; methods whose data use depends on an option (DMD2's GAN, SiDA) override it."""
        return cls.needs_data

    @classmethod
    def accumulation_refusal(cls, opts) -> Optional[str]:
        """Why run.grad_accum > 1 is refused with these options (None: allowed and exact). Default: the class's
        ``accumulation_refusal_reason``; methods whose coupling depends on an option (SiDA, CFD's dataset loss)
        override it."""
        return cls.accumulation_refusal_reason

    @classmethod
    def fsdp_refusal(cls, opts) -> Optional[str]:
        """Why run.fsdp is refused with these options (None: allowed). Default: ``fsdp_refusal_reason``."""
        return cls.fsdp_refusal_reason

    @classmethod
    def resolve_schedule(cls, run: dict, method: dict, given: set) -> None:
        """Fill options that follow from the run (e.g. PD's length from its halvings) into the ``run`` and
        ``method`` sections before validation; ``given`` holds the dotted keys set explicitly. Default: nothing."""

    def __init__(self, ctx: MethodContext, opts=None, **overrides: Any):
        """``opts``: an instance of ``self.Options`` (the trainer builds it from the config); keyword overrides
        are validated against the schema (``Method(ctx, lr=1e-4)`` is ``Method(ctx, Options(lr=1e-4))``)."""
        self.ctx = ctx
        if opts is None:
            opts = self.Options.from_dict(overrides, owner=getattr(self, "name", None))
        elif overrides:
            opts = opts.replace(**overrides)
        self.opts = opts
        self.nets: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self.emas: dict[str, EMA] = {}   # updated by the trainer after every iteration (``track_ema``)

    def trainable_copies(self, *names: str) -> list[nn.Module]:
        """Trainable copies of ``self.teacher``, one per name (train mode, on the device): full copies, or, with
        ``lora.rank`` set, LoRA adapters (``diffdistill.lora``) — on one frozen base shared with the teacher, which
        ``self.teacher`` and ``ctx.teacher`` then become the teacher role of, or on frozen copies of their own."""
        ctx = self.ctx
        if ctx.lora is None or not ctx.lora.enabled():
            return [trainable_copy(self.teacher).to(ctx.device) for _ in names]
        teacher, copies = lora_copies(self.teacher, names, ctx.lora, (ctx.net_config or {}).get("arch"),
                                      ctx.teacher_path, ctx.device)
        self.teacher = ctx.teacher = teacher
        return copies

    def track_ema(self, net_name: str, rule: EMAOptions, key: str | None = None) -> EMA:
        """Keep an EMA copy of ``self.nets[net_name]`` under ``key`` (default the net's name); the trainer updates
        it once per iteration with β from ``rule`` and checkpoints it. Returns the copy."""
        ema = EMA(self.nets[net_name], source=net_name, rule=rule)
        self.emas[key or net_name] = ema
        return ema

    def before_step(self, step: int) -> None:
        """Called at the start of iteration ``step`` (0-based), before ``phases``: state that changes on a schedule
        (PD enters its halving stage here), so that ``phases`` has no side effects. Default: nothing."""

    @abstractmethod
    def phases(self, step: int) -> list[str]:
        """Names of the optimizers to step this iteration, in order."""

    @abstractmethod
    def loss(self, phase: str, batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss for ``phase`` plus extra scalars to log."""

    def after_step(self, step: int, nimg: int) -> None:
        """Called after all phases of a step (EMA updates, target networks)."""

    @abstractmethod
    def sampling_net(self) -> nn.Module:
        """The Denoiser to sample from (the EMA when there is one)."""

    def student_net_config(self, net_config: dict) -> dict:
        """The ``net_config`` that rebuilds ``sampling_net`` (stored in the checkpoint): the run's ``net`` section,
        unless the method changed the architecture of its copies (a w-conditioned student's guidance embedding)."""
        return net_config

    @abstractmethod
    def sampling_spec(self) -> dict:
        """How to sample ``sampling_net``: ``{'sampler': 'heun', 'nfe': 35}`` or ``{'sampler': 'multistep',
        'sigmas': [...]}``; stored in the checkpoint so ``sample``/``eval`` need no flags."""

    def noise_levels(self) -> dict:
        """The noise levels this method trains at, by name (e.g. ``{'DM loss σ': [lo, hi]}``), as chosen for this
        teacher; printed at the start of a run beside the student's sampling σ's. Default: none to report."""
        return {}

    def sampling_variants(self) -> dict[int, dict]:
        """Every way this student can be sampled, as ``{number of steps: sampling spec}`` (``compare`` evaluates
        each). Default: the one recipe of ``sampling_spec``; a consistency model, which samples at any step count,
        returns several."""
        spec = self.sampling_spec()
        steps = len(spec["sigmas"]) if "sigmas" in spec else spec.get("nfe", 1)
        return {steps: spec}

    def generated_batch(self, batch, step: int):
        """(x, labels): this step's generated samples with the graph into the generator, for supplements; called
        after ``loss(generator_phase, batch, step)`` in the same step (and micro-batch). Only methods with a
        ``generator_phase``."""
        raise NotImplementedError(f"method {self.name!r} trains no generator from noise")

    def extra_state(self) -> dict:
        """Method state that is not a net/optimizer (EMA copies, memory banks)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {
            "nets": {k: v.state_dict() for k, v in self.nets.items()},
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
            "schedulers": {k: v.state_dict() for k, v in self.schedulers.items()},
            "emas": {k: v.net.state_dict() for k, v in self.emas.items()},
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        for k, net in self.nets.items():
            net.load_state_dict(state["nets"][k])
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
        for k, sch in self.schedulers.items():
            sch.load_state_dict(state["schedulers"][k])
        emas = state.get("emas")
        if emas is None and len(self.emas) == 1 and "ema" in state.get("extra", {}):
            emas = {next(iter(self.emas)): state["extra"]["ema"]}   # a checkpoint from before trainer-owned EMAs
        for k, ema in self.emas.items():
            ema.net.load_state_dict(emas[k])
        self.load_extra_state(state.get("extra", {}))

    def teacher_networks(self) -> list[nn.Module]:
        """The frozen teacher networks this method evaluates, which ``run.teacher_dtype=bf16`` stores in bf16 after
        the method is built (so trained copies start from the fp32 weights). Default: the teacher it was given; a
        method that keeps its own frozen teacher copy adds it (PD's stage teacher)."""
        return [self.ctx.teacher] if self.ctx.teacher is not None else []

    def trainable_params(self, phase: str):
        return [p for g in self.optimizers[phase].param_groups for p in g["params"]]
