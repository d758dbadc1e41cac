"""The one training loop. It knows the Method interface only (phases → loss → backward → step), never a method.

Per step: draw this rank's batch (a pure function of seed, rank and step, so resuming needs no loader state), run
each phase of the method (as ``run.grad_accum`` micro-batches whose gradients sum to the batch's: see
``accumulate_phase``), guard against non-finite losses and gradients, average gradients across ranks, clip,
step, update EMAs, then log / sample / checkpoint on schedule. Checkpoints hold everything needed to continue
bit-exactly: every net, optimizer and scheduler, the method's extra state, the step and all RNG states.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import torch

from ..config import check_device, per_process_batch
from ..data import dataset_from_config as load_dataset
from ..diffusion import condition as cond
from ..diffusion.precond import conditioned_sigma_max
from ..errors import UserError
from ..eval.generate import generate
from ..eval.plots import save_samples_png
from ..io.checkpoint import (atomic_write, checkpoint_path, find_resume_checkpoint, list_checkpoints, load_checkpoint,
                             has_placeholders, prune_checkpoints, remove_stale_files, save_checkpoint,
                             save_sharded, sharded_dir, verify_checkpoint)
from ..io.paths import check_output_dir
from ..lora import lora_options
from ..methods.base import MethodContext
from ..methods.draws import Draws
from ..methods.registry import get_method, lora_methods
from ..nets.checkpointing import checkpointable, set_activation_checkpointing
from ..nets.low_precision import store_in_bf16
from ..options import nearest
from . import distributed as dist
from .health import HealthMonitor, initial_output_check, is_out_of_memory, out_of_memory_message
from .lr import run_decay_factor
from .runfolder import RunLock, claim
from .sharding import Sharding, clip_grad_norm, full_state_dict, restore_state, split_state


class DivergenceError(RuntimeError):
    """A loss or gradient became NaN/inf and the policy is 'stop'."""


class OutOfMemoryStop(RuntimeError):
    """Training ran out of memory; the message names the step, the phase, the knobs and the last checkpoint."""


class BatchSampler:
    """Batch indices as a pure function of (seed, rank, step): shuffled epochs, each rank takes its own slice."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.b, self.seed, self.rank, self.world = n, batch_size, seed, rank, world

    def indices(self, step: int) -> torch.Tensor:
        total = self.b * self.world
        if total > self.n:  # tiny data: independent draws with replacement
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            return torch.randint(self.n, (total,), generator=g)[self.rank * self.b:(self.rank + 1) * self.b]
        per_epoch = self.n // total
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        start = k * total + self.rank * self.b
        return perm[start:start + self.b]


def _rng_state(gen: torch.Generator) -> dict:
    state = {"method": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _config_changes(old, new, prefix="") -> list[str]:
    """'key: old → new' for every entry that differs between two resolved configs (``run.resume``, ``run.steps``,
    ``run.progress`` and ``run.out`` are expected to change and are left out, and so are
    ``run.activation_checkpointing`` and ``run.fsdp_teacher``, which leave every result bit-identical)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if key in ("run.resume", "run.steps", "run.progress", "run.out", "run.max_minutes", "run.overwrite",
                       "run.activation_checkpointing", "run.fsdp_teacher"):
                continue
            out += _config_changes(old.get(k), new.get(k), key)
        return out
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)) and list(old) == list(new):
        return []
    return [] if old == new else [f"{prefix}: {old!r} → {new!r}"]


def _set_rng_state(gen: torch.Generator, state: dict) -> None:
    gen.set_state(state["method"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_data_matches_net(shape: tuple, num_classes: int, net_cfg: dict, teacher_net: bool = False,
                           want: tuple | None = None) -> None:
    """Refuse data whose shape or label count does not fit the network, naming the fix. ``teacher_net``: the
    network is a teacher's (distillation), whose shape cannot change — the data must fit it; ``want``: its
    sample shape when the config's (C, R) do not give it (latents, video)."""
    C, R, L = net_cfg.get("img_channels"), net_cfg.get("img_resolution", 0), net_cfg.get("label_dim", 0)
    want = tuple(want) if want is not None else ((C, R, R) if R else (C,))
    if tuple(shape) != want and teacher_net:
        raise UserError(f"data samples have shape {tuple(shape)} but the teacher's network takes {want}, and a "
                        f"trained teacher's shape cannot change: give --data with {want} samples (resize or "
                        f"convert the images), or a teacher trained on this data")
    if tuple(shape) != want:
        fix = (f"--set net.img_channels={shape[0]} --set net.img_resolution={shape[-1]}" if len(shape) == 3
               else f"--set net.img_channels={shape[0]} --set net.img_resolution=0")
        raise UserError(f"data samples have shape {tuple(shape)} but the network expects {want}: use {fix} "
                        f"(or a preset made for this data)")
    if L and num_classes and L != num_classes:
        raise UserError(f"data has {num_classes} classes but the network has label_dim={L}: "
                        f"use --set net.label_dim={num_classes}")
    if L and not num_classes:
        raise UserError(f"the network is class-conditional (label_dim={L}) but the data has no labels: "
                        f"use --set net.label_dim=0 or give labelled data (class sub-folders / dataset.json)")


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp32 for a low-precision (bf16 autocast) loss; fp64 stays fp64, so a float64 run's 1/k is exact."""
    return t if t.dtype == torch.float64 else t.float()


def check_micro_batches(run: dict) -> None:
    """Refuse a per-process batch that ``run.grad_accum`` does not split into equal micro-batches."""
    k, B = int(run.get("grad_accum", 1)), run["batch_size"]
    if B % k:
        lo, hi = (B // k) * k, -(-B // k) * k
        divisors = [d for d in range(2, min(B, 16) + 1) if B % d == 0]
        raise UserError(f"run.grad_accum={k} does not divide the per-process batch {B} into equal micro-batches: "
                        f"use a batch that is a multiple of {k} (e.g. {lo or hi} or {hi})"
                        + (f" or a run.grad_accum that divides {B} ({', '.join(map(str, divisors[:4]))})"
                           if divisors else ""))


def check_grad_accum(run: dict, method_cls, opts) -> int:
    """``run.grad_accum`` (k), after refusing a method whose loss couples the samples of a batch with these
    options (its ``accumulation_refusal``), naming why. Returns k."""
    k = int(run.get("grad_accum", 1))
    if k == 1:
        return k
    reason = method_cls.accumulation_refusal(opts)
    if reason:
        raise UserError(f"run.grad_accum={k} is refused for method {method_cls.name!r}, whose micro-batches would "
                        f"not give the batch's result: {reason}; use run.grad_accum=1 (a smaller --batch-size or "
                        f"run.activation_checkpointing also lower memory)")
    return k


def reads_data(method_cls, opts, supplements=()) -> bool:
    """Whether a run of ``method_cls`` with ``opts`` and these supplements reads real data."""
    return method_cls.uses_data(opts) or any(getattr(s, "needs_data", False) for s in supplements)


def check_fsdp(run: dict, method_cls, opts, supplements=(), grad_accum: int = 1) -> bool:
    """Whether ``run.fsdp`` is on, after refusing a method that cannot be sharded with these options (its
    ``fsdp_refusal``) or a supplement that cannot (its ``fsdp_refusal(grad_accum)``), naming why."""
    if not run.get("fsdp"):
        return False
    reason = method_cls.fsdp_refusal(opts)
    if reason:
        raise UserError(f"run.fsdp is refused for method {method_cls.name!r}: {reason}; use run.fsdp=false "
                        f"(torchrun without it replicates the networks and averages their gradients)")
    for sup in supplements:
        reason = getattr(sup, "fsdp_refusal", lambda k: None)(grad_accum)
        if reason:
            raise UserError(f"run.fsdp is refused with the {getattr(sup, 'name', type(sup).__name__)} "
                            f"supplement: {reason}")
    return True


def _check_meta_plan(run: dict) -> None:
    """bf16 autocast has no meta backend: refused in a meta-device plan, with what to do instead."""
    bf16 = [f"run.{k}=bf16" for k in ("precision", "teacher_dtype") if run.get(k) == "bf16"]
    if bf16:
        raise UserError(f"{' and '.join(bf16)} cannot be planned on the meta device: torch's bf16 autocast has no "
                        f"meta backend; plan in fp32 (an upper bound: bf16 halves the frozen teacher's weights and "
                        f"the autocast ops' activations) or plan on cpu")


class Trainer:
    def __init__(self, cfg: dict, teacher=None, teacher_path: str | None = None, dataset=None, supplements=(),
                 dry_run: bool = False):
        """``dry_run``: built for ``--dry-run`` only — with ``run.fsdp`` the networks are left unsharded (the memory
        plan divides them by the number of processes instead)."""
        self.cfg = cfg
        run = cfg["run"]
        self.out = Path(run["out"])
        check_output_dir(self.out)
        check_device(run["device"], meta_ok=dry_run)
        self.device = torch.device(run["device"])
        if self.device.type == "meta":
            _check_meta_plan(run)
        run["batch_size"] = per_process_batch(run, dist.launched_world_size())
        check_micro_batches(run)
        method_cfg = dict(cfg["method"])
        method_cls = get_method(method_cfg.pop("name"))
        self.method_cls = method_cls
        # The method's options from its schema: unknown keys, wrong types and bad ranges stop here, and the saved
        # config records every option (defaults included).
        opts = method_cls.Options.from_dict(method_cfg, owner=method_cls.name)
        cfg["method"] = {"name": method_cls.name, **opts.to_dict()}
        self.grad_accum = check_grad_accum(run, method_cls, opts)
        lora = self._lora_options(cfg, method_cls)
        fsdp = check_fsdp(run, method_cls, opts, supplements, self.grad_accum)
        if fsdp and lora is not None:
            raise UserError("run.fsdp with a lora section is not supported: FSDP2 shards whole networks, and LoRA "
                            "roles share one frozen base (or wrap full copies in peft); remove the lora section or "
                            "use run.fsdp=false")
        # FSDP2 needs a process group and a device mesh even on one process
        dist.init_distributed(run["device"], single_process=fsdp)
        self.rank, self.world = dist.rank(), dist.world_size()
        torch.manual_seed(run["seed"] + self.rank)  # dropout etc. use the global RNG
        # run.draws=global: one stream on every rank, each taking its rows of the global batch's draws
        shared = run.get("draws", "rank") == "global"
        self.gen = torch.Generator().manual_seed(run["seed"] * 7919 + (0 if shared else self.rank))
        # every random draw of the losses goes through this, so k micro-batches see the batch's draws
        self.draws = Draws(self.gen, self.grad_accum, *((self.world, self.rank) if shared else (1, 0)))

        self.dataset = dataset
        # Data is loaded when the method or a supplement reads it (e.g. the embedding loss on a data-free method).
        if reads_data(method_cls, opts, supplements) and self.dataset is None:
            self.dataset = load_dataset(cfg["data"])
        if self.dataset is not None and len(self.dataset) == 0:
            raise UserError("the dataset is empty: point --data at a folder/file with at least one sample")
        self.data_x = self.data_y = None
        if self.dataset is not None:
            self.data_x = self.dataset.x.to(self.device)
            L = self.dataset.num_classes
            self.data_y = (torch.nn.functional.one_hot(self.dataset.labels, L).float().to(self.device)
                           if L and self.dataset.labels is not None else None)
            if self.dataset.conditions is not None:   # each sample's encoded prompt
                self.data_y = self.dataset.conditions.to(self.device)
            self.sampler = BatchSampler(len(self.dataset), run["batch_size"], run["seed"], self.rank, self.world)
        # encoded prompts for an embedding-conditioned teacher (draws, sample grids, health checks)
        self.conditions = conditions = self._condition_bank(cfg.get("data") or {}, teacher)

        net_cfg = cfg.get("net", {})
        shape = tuple(self.dataset.sample_shape) if self.dataset is not None else ()
        if shape and net_cfg:
            check_data_matches_net(shape, getattr(self.dataset, "num_classes", 0), net_cfg, teacher is not None,
                                   want=None if teacher is None else tuple(teacher.sample_shape))
        ctx = MethodContext(device=self.device, generator=self.gen, batch_size=run["batch_size"],
                            world_size=self.world, net_config=net_cfg, teacher=teacher, teacher_path=teacher_path,
                            sample_shape=shape, num_classes=getattr(self.dataset, "num_classes", 0),
                            run_dir=str(self.out), data_name=(cfg.get("data") or {}).get("name"),
                            draws=self.draws, lora=lora, conditions=conditions)
        self.method = method_cls(ctx, opts)
        self.teacher = ctx.teacher   # the method may wrap it (LoRA with a shared base: the base's teacher role)
        self.conditions = ctx.conditions   # … and fill the prompts' extra.guidance (method.guidance_embedded)
        for net in list(self.method.nets.values()) + [ema.net for ema in self.method.emas.values()]:
            dist.broadcast_module(net)
        self.sharding = None   # the FSDP2 layout (run.fsdp), made by _prepare_networks
        self._prepare_networks(self.teacher, shard=fsdp and not dry_run)
        self.supplements = list(supplements)
        self.step = 0
        self.nimg = 0
        self.train_seconds = 0.0  # wall-clock in the training loop, without sample grids and on_sample callbacks
        self.lr_decay_from = None  # run progress at which run.lr_decay began (None: not yet)
        self.ckpt_dir = self.out / "checkpoints"
        self._stop_signal = None
        self.stopped_by_signal = None  # the signal number when SIGINT/SIGTERM ended run() early
        self.phase = None              # the phase being computed (named by the NaN guard and OOM messages)
        self.health = HealthMonitor(self.out / "health.jsonl" if self.rank == 0 else None,
                                    factor=run.get("spike_factor", 10.0), say=self._say,
                                    collapse_steps=run.get("collapse_steps", 50))

    @staticmethod
    def _lora_options(cfg: dict, method_cls):
        """The ``lora`` section checked against its schema; None when LoRA is off (then the section is dropped from
        the saved config), its options when on — refused, in one line, for a method that makes no trainable copies
        of a teacher."""
        lora = lora_options(cfg.get("lora"))
        if not lora.enabled():
            cfg.pop("lora", None)
            return None
        if not method_cls.supports_lora:
            raise UserError(f"lora.rank: method {method_cls.name!r} does not train LoRA adapters (they replace the "
                            f"trainable copies of a frozen teacher in {', '.join(lora_methods())}): remove the "
                            f"lora section")
        cfg["lora"] = lora.to_dict()
        return lora

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        net = self.method.sampling_net()
        record = getattr(net, "lora_record", None)   # a LoRA role: its adapter, with what rebuilds the student
        return {
            "method": self.method_cls.name, "role": self.method_cls.role, "step": self.step, "nimg": self.nimg,
            "config": self.cfg, "net_config": self.method.student_net_config(self.cfg.get("net", {})),
            "sampling": self.method.sampling_spec(),
            "sample_net": full_state_dict(net) if self.sharding else net.state_dict(),
            "lora": record() if callable(record) else None,
            "method_state": self.method.state_dict(),
            "supplement_state": {getattr(s, "name", type(s).__name__): s.state_dict()
                                 for s in self.supplements if hasattr(s, "state_dict")},
            "rng": _rng_state(self.gen), "world_size": self.world, "health": self.health.state_dict(), "train_seconds": self.train_seconds,
            "lr_decay_from": self.lr_decay_from,
            "data": None if self.dataset is None else {
                "name": getattr(self.dataset, "name", "?"), "sample_shape": list(self.dataset.sample_shape),
                "num_classes": self.dataset.num_classes},
            "teacher_path": self.method.ctx.teacher_path,
        }

    def load_state_dict(self, state: dict, path=None) -> None:
        """Continue from a checkpoint's state (``path``: its file, whose shard folder a sharded state reads)."""
        if state.get("method") != self.method_cls.name:
            raise UserError(f"checkpoint was written by method {state.get('method')!r}, not {self.method_cls.name!r}:"
                            f" resume with the same --method or start a new run directory")
        lora = {k: (state.get("config") or {}).get("lora", {}).get(k) for k in ("rank", "target_modules",
                                                                                "shared_base")}
        now = {k: (self.cfg.get("lora") or {}).get(k) for k in lora}
        if lora != now:
            raise UserError(f"checkpoint was written with lora {lora}, this run has {now}: resume with the same lora "
                            f"options (the adapters' shapes and layers must match)")
        sharded = has_placeholders(state.get("method_state"))
        if sharded and self.sharding is None:
            raise UserError(f"checkpoint {path or ''} holds FSDP2-sharded networks (written with run.fsdp=true): "
                            f"resume with --set run.fsdp=true, or start a new run directory")
        if not sharded and self.sharding is not None:
            raise UserError(f"checkpoint {path or ''} was written without run.fsdp: resume it with "
                            f"run.fsdp=false, or start a new run directory")
        old_world = int(state.get("world_size", 1))
        saved_draws = ((state.get("config") or {}).get("run") or {}).get("draws", "rank")
        # each rank's own random stream cannot continue on another number of ranks; the global one can
        if old_world != self.world and not (saved_draws == "global" and self.cfg["run"].get("draws") == "global"):
            raise UserError(f"checkpoint was written with {old_world} ranks, now {self.world}: resume with the same "
                            f"number of processes (a run with run.draws=global resumes on any number)")
        if sharded:   # DCP fills DTensors laid out for this run's mesh: resharded when the world changed
            folder = sharded_dir(Path(path) if path else checkpoint_path(self.ckpt_dir, int(state["step"])))
            state = dict(state, method_state=restore_state(state["method_state"], folder, self.sharding.mesh))
        self.method.load_state_dict(state["method_state"])
        for s in self.supplements:
            saved = (state.get("supplement_state") or {}).get(getattr(s, "name", type(s).__name__))
            if saved is not None and hasattr(s, "load_state_dict"):
                s.load_state_dict(saved)
        self.health.load_state_dict(state.get("health", {}))
        self.step, self.nimg = int(state["step"]), int(state["nimg"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.lr_decay_from = state.get("lr_decay_from")
        ranks = state.get("rng_ranks") or [state["rng"]]
        if old_world == self.world:
            _set_rng_state(self.gen, ranks[self.rank])
        else:   # global draws: the method's stream is the same on every rank; the global RNG (dropout) starts anew
            self.gen.set_state(ranks[0]["method"])
            torch.manual_seed(self.cfg["run"]["seed"] * 1_000_003 + self.step * 7919 + self.rank)

    def save(self) -> Path | None:
        path = checkpoint_path(self.ckpt_dir, self.step)
        rng_ranks = dist.all_gather_object(_rng_state(self.gen))  # every rank's RNG, so each resumes its own
        if self.sharding is not None:
            return self._save_sharded(path, rng_ranks)
        if self.rank == 0:
            remove_stale_files(self.ckpt_dir)
            save_checkpoint(dict(self.state_dict(), rng_ranks=rng_ranks), path)
            prune_checkpoints(self.ckpt_dir, self.cfg["run"]["keep_ckpts"])
        dist.barrier()
        return path

    def _save_sharded(self, path: Path, rng_ranks: list) -> Path:
        """A sharded checkpoint (run.fsdp): every rank writes its shards of the nets, optimizer moments and EMA
        copies with DCP, then rank 0 the .pt file (the rest of the state, the consolidated sampling net and the
        manifest listing the shard files) — see io/checkpoint.py for why a half-written one is never resumed."""
        if self.rank == 0:
            remove_stale_files(self.ckpt_dir)
        dist.barrier()
        state, tensors = split_state(dict(self.state_dict(), rng_ranks=rng_ranks))   # state_dict: a collective
        shards = save_sharded(tensors, path, self.rank)
        if self.rank == 0:
            save_checkpoint(state, path, shards=shards)
            prune_checkpoints(self.ckpt_dir, self.cfg["run"]["keep_ckpts"])
        dist.barrier()
        return path

    def last_good_checkpoint(self, diverged: bool = False) -> str:
        """The newest checkpoint that matches its manifest (named by the OOM message). After a divergence, the one
        before it: the newest state is the one that went on to produce the NaN."""
        valid = [p for p in list_checkpoints(self.ckpt_dir) if verify_checkpoint(p)[0] is not False]
        if not valid:
            return "none yet"
        if diverged and len(valid) >= 2:
            return str(valid[-2])
        return str(valid[-1])

    def _find_resume(self, what: str):
        """(path, state, why) of the checkpoint to resume from (path None: none yet)."""
        if what == "auto":
            path, state, why, skipped = find_resume_checkpoint(self.ckpt_dir)
            if path is None:
                self._say(f"resume auto: no checkpoint in {self.ckpt_dir}, starting fresh")
                return None, None, ""
            for bad, reason in skipped:
                self._say(f"WARNING: resume auto: skipping {bad.name}: {reason}")
            why = f"the newest valid checkpoint ({why})" + (f"; {len(skipped)} newer one(s) skipped" if skipped else "")
            return path, state, why
        return Path(what), load_checkpoint(Path(what)), "given by --resume"

    def _find_resume_once(self, what: str):
        """``_find_resume`` on rank 0 only, which verifies the checkpoint (and its shards: the whole checkpoint's
        bytes) against the manifest; the other ranks load the file it chose. Its refusal reaches every rank."""
        found = None
        if self.rank == 0:
            try:
                path, state, why = self._find_resume(what)
                found = ("ok", None if path is None else str(path), why)
            except UserError as e:
                found = ("error", str(e), "")
        found = dist.all_gather_object(found)[0]
        if found[0] == "error":
            raise UserError(found[1])
        if found[1] is None:
            return None, None, ""
        return Path(found[1]), (state if self.rank == 0 else load_checkpoint(found[1], verify=False)), found[2]

    def maybe_resume(self) -> None:
        what = self.cfg["run"].get("resume")
        if not what:
            return
        path, state, why = self._find_resume_once(what) if self.sharding else self._find_resume(what)
        if path is None:
            return
        fresh = self._optimizer_settings()   # as this run's config built them, before the checkpoint's overwrite
        self.load_state_dict(state, path)
        self._say(f"resumed from {path} at step {self.step}: {why}")
        changes = _config_changes(state.get("config", {}), self.cfg)
        old_world = int(state.get("world_size", 1))
        old_batch = ((state.get("config") or {}).get("run") or {}).get("batch_size")
        if old_world != self.world and old_batch and old_batch * old_world == self.cfg["run"]["batch_size"] * self.world:
            changes = [c for c in changes if not c.startswith("run.batch_size:")]   # the same global batch
        if changes:
            self._say("WARNING: the configuration differs from the checkpoint's, so the run will not continue "
                      "exactly: " + "; ".join(changes[:6]) + (" …" if len(changes) > 6 else ""))
        applied = self._apply_optimizer_settings(fresh)
        if applied:
            self._say("changed optimizer settings applied on resume: " + "; ".join(applied))
        if self.rank == 0:
            self._truncate_logs()

    _HYPER = ("initial_lr", "betas", "eps", "weight_decay", "momentum")

    def _optimizer_settings(self) -> dict:
        return {name: [{k: g[k] for k in ("lr",) + self._HYPER if k in g} for g in opt.param_groups]
                for name, opt in self.method.optimizers.items()}

    def _apply_optimizer_settings(self, fresh: dict) -> list[str]:
        """Give the resumed optimizers this run's learning rates and other hyper-parameters where the config
        changed them (the checkpoint's state otherwise keeps the old ones); the LR schedule's position is kept, so
        a changed base rate scales the scheduled rate. Returns what changed, for the log."""
        applied = []
        for name, opt in self.method.optimizers.items():
            sched = self.method.schedulers.get(name)
            for i, (g, f) in enumerate(zip(opt.param_groups, fresh.get(name, []))):
                base_new, base_old = f.get("initial_lr", f["lr"]), g.get("initial_lr", g["lr"])
                if base_new != base_old and "initial_lr" in f:
                    g["lr"] *= base_new / base_old
                    g["initial_lr"] = base_new
                    if sched is not None and hasattr(sched, "base_lrs"):
                        sched.base_lrs[i] = base_new
                    applied.append(f"{name} lr {base_old:.4g} → {base_new:.4g}")
                elif "initial_lr" not in f and f["lr"] != g["lr"]:
                    applied.append(f"{name} lr {g['lr']:.4g} → {f['lr']:.4g}")
                    g["lr"] = f["lr"]
                for k in ("betas", "eps", "weight_decay", "momentum"):
                    if k in f and _plain(f[k]) != _plain(g[k]):   # β may come back from a checkpoint as a list
                        applied.append(f"{name} {k} {g[k]} → {f[k]}")
                        g[k] = f[k]
        return applied

    def _truncate_logs(self) -> None:
        """Drop log/health records written after the resumed step (by the run that was killed), so the logs read
        as one run."""
        for name in ("log.jsonl", "health.jsonl"):
            f = self.out / name
            if not f.is_file():
                continue
            lines = f.read_text().splitlines(keepends=True)
            keep = []
            for line in lines:
                try:
                    if int(json.loads(line).get("step", 0)) > self.step:
                        continue
                except (ValueError, AttributeError, TypeError):
                    continue  # a half-written last line
                keep.append(line if line.endswith("\n") else line + "\n")
            if len(keep) != len(lines):
                atomic_write(f, lambda tmp: Path(tmp).write_text("".join(keep)))

    def _condition_bank(self, data_cfg: dict, teacher):
        """The encoded prompts that data-free draws pick from (``data.prompts``, else the dataset's own), for a
        teacher conditioned on embeddings; None for every other teacher (a teacher being trained: the data's)."""
        if teacher is None:   # training a teacher: its sample grids use the data's own prompts
            return None if self.dataset is None else self.dataset.conditions
        if cond.conditioning_of(teacher) != "embeddings":
            if data_cfg.get("prompts"):
                raise UserError("data.prompts (--prompts) is for teachers conditioned on text embeddings; this "
                                "teacher is not: remove it")
            return None
        if data_cfg.get("prompts"):
            bank = cond.load_conditions(data_cfg["prompts"])
        elif self.dataset is not None and self.dataset.conditions is not None:
            bank = self.dataset.conditions
        elif data_cfg.get("path"):   # a data-free method: the data set is read for its prompts only
            bank = load_dataset(data_cfg).conditions
        else:
            bank = None
        cond.check_bank(teacher, bank, "the teacher")
        return bank.to(self.device)

    # ---------------------------------------------------------------- loop
    def _say(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[diffdistill] {msg}", flush=True)

    def batch(self, step: int):
        if self.data_x is None:
            return None
        idx = self.sampler.indices(step).to(self.device)
        return self.data_x[idx], cond.rows(self.data_y, idx)

    def _nonfinite(self, what: str, phase: str, value=None, logs=None) -> bool:
        """Apply the NaN policy; returns True when the step must be skipped."""
        parts = [f"{k}={v:.4g}" for k, v in (logs or {}).items()
                 if isinstance(v, float) and not torch.isfinite(torch.tensor(v))]
        if value is not None and torch.as_tensor(value).numel() == 1:
            parts.insert(0, f"value {float(value):.4g}")
        msg = f"non-finite {what} in phase {phase!r} at step {self.step}" + (f" ({', '.join(parts[:5])})" if parts else "")
        self.health.event(self.step, f"nonfinite_{what}", phase=phase, policy=self.cfg["run"]["nan_policy"],
                          losses=parts)
        if self.cfg["run"]["nan_policy"] == "skip":
            print(f"[diffdistill] WARNING: {msg}; skipping this step (nan_policy=skip)", flush=True)
            return True
        raise DivergenceError(f"{msg}; stopped (nan_policy=stop). {self.divergence_advice()}, or use --set "
                              f"run.nan_policy=skip")

    def divergence_advice(self) -> str:
        good = self.last_good_checkpoint(diverged=True)
        if good == "none yet":
            return "No checkpoint yet: lower the learning rate (--set method.lr=...) or set run.grad_clip and start again"
        return (f"Last good checkpoint: {good}. Resume from it with a lower learning rate: --resume {good} --set "
                f"method.lr=... (changed optimizer settings apply on resume), or set run.grad_clip")

    def _prepare_networks(self, teacher, shard: bool = False) -> None:
        """Memory options — activation checkpointing of the named networks, the frozen teacher in bf16, FSDP2
        sharding (``shard``) — and the GPU-throughput options, applied to every trained network and the teacher:
        NHWC memory format and torch.compile (all in place: parameter names, and so checkpoints, are unchanged).
        Runs after the method is built, so the trained copies of the teacher were made from its fp32 weights."""
        run = self.cfg["run"]
        self._checkpoint_activations(run.get("activation_checkpointing") or [])
        if run.get("teacher_dtype", "fp32") == "bf16":
            self._store_teachers_in_bf16()
        nets = list(self.method.nets.values()) + ([teacher] if teacher is not None else [])
        if run.get("channels_last"):
            for net in nets:
                if any(p.ndim == 4 for p in net.parameters()):  # convolutional: image networks only
                    net.to(memory_format=torch.channels_last)
        if shard:
            self.sharding = Sharding(self.method, self.device, run.get("fsdp_teacher") == "shard").apply()
        if run.get("compile"):
            for net in nets:
                net.compile()

    def _trained_param_ids(self) -> set:
        return {id(p) for opt in self.method.optimizers.values() for g in opt.param_groups for p in g["params"]}

    def _checkpoint_activations(self, names: list) -> None:
        """Turn on block checkpointing in each named network of ``method.nets``; a name that is not a trained,
        checkpointable network there is refused with the valid ones."""
        if not names:
            return
        trained = self._trained_param_ids()
        nets = self.method.nets
        is_trained = {k: any(id(p) in trained for p in net.parameters()) for k, net in nets.items()}
        valid = [k for k, net in nets.items() if is_trained[k] and checkpointable(net)]
        for name in names:
            if name in valid:
                continue
            if name not in nets:
                why = f"has no network {name!r}{nearest(name, valid or list(nets))}"
            elif not is_trained[name]:
                why = f"network {name!r} is frozen (no optimizer trains it, so it keeps no activations for backward)"
            else:
                why = f"network {name!r} ({type(nets[name]).__name__}) has no blocks to checkpoint"
            raise UserError(f"run.activation_checkpointing: method {self.method_cls.name!r} {why}; valid: "
                            f"{', '.join(valid) or 'none'}")
        for name in dict.fromkeys(names):
            set_activation_checkpointing(nets[name])

    def _store_teachers_in_bf16(self) -> None:
        """``run.teacher_dtype=bf16``: the method's frozen teacher networks stored in bf16 (`store_in_bf16`)."""
        teachers = self.method.teacher_networks()
        if not teachers:
            raise UserError(f"run.teacher_dtype=bf16 stores a distillation's frozen teacher in bf16, but method "
                            f"{self.method_cls.name!r} has no teacher: remove the option (run.precision=bf16 "
                            f"runs the losses in bf16)")
        trained = self._trained_param_ids()
        for net in teachers:
            if any(id(p) in trained for p in net.parameters()):  # a method bug, not a user error
                raise RuntimeError(f"{self.method_cls.name}: a network listed by teacher_networks() is trained")
            store_in_bf16(net.requires_grad_(False))

    def _autocast(self):
        """bf16 autocast around the forward passes and losses (no loss scaling needed for bf16)."""
        on = self.cfg["run"].get("precision", "fp32") == "bf16"
        if self.device.type == "meta":   # autocast has no meta backend; bf16 is refused there (_check_meta_plan)
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=on)

    def phase_loss(self, phase: str, batch, step: int):
        """(loss, logs) of one phase: the method's loss plus every supplement that applies to the phase (each gets
        the method's own loss as ``base_loss``, e.g. to balance gradient norms)."""
        with self._autocast():
            loss, extra = self._phase_loss(phase, batch, step)
        return loss.float(), extra

    def _phase_loss(self, phase: str, batch, step: int, supplements=None):
        loss, extra = self.method.loss(phase, batch, step)
        base_loss = loss
        for sup in self.supplements if supplements is None else supplements:
            if sup.applies_to(self.method, phase):
                sup_loss, sup_logs = sup.loss(self.method, batch, step, base_loss=base_loss)
                loss = loss + sup_loss
                extra = {**extra, **sup_logs}
        return loss, extra

    def run_progress(self) -> float:
        """How far the run is, in [0, 1]: iterations done / run.steps, or, under a time budget, the training time
        spent / the budget when that is further (the largest rank's time, so every rank agrees)."""
        run = self.cfg["run"]
        p = self.step / run["steps"]
        if run.get("max_minutes"):
            p = max(p, dist.all_reduce_max(self.train_seconds) / (60.0 * run["max_minutes"]))
        return min(p, 1.0)

    def lr_decay_factor(self) -> float:
        """``run.lr_decay``'s factor for this iteration: 1 before ``run.lr_decay_start``, then falling from 1 where
        the decay began to 0 at the run's end. Depends only on the step, the training time and the progress at the
        start (all in the checkpoint), so a resumed run continues the same schedule."""
        run = self.cfg["run"]
        kind = run.get("lr_decay", "none")
        if kind == "none" or self.step < run.get("lr_decay_start", 0):
            return 1.0
        p = self.run_progress()
        if self.lr_decay_from is None:
            self.lr_decay_from = p
        return run_decay_factor(kind, p, self.lr_decay_from)

    def train_step(self) -> dict | None:
        batch = self.batch(self.step)
        logs = {}
        decay = self.lr_decay_factor()
        if self.cfg["run"].get("lr_decay", "none") != "none":
            logs["lr_decay"] = decay
        self.method.before_step(self.step)
        for phase in self.method.phases(self.step):
            self.phase = phase
            opt = self.method.optimizers[phase]
            if self.grad_accum == 1:
                loss, extra = self.phase_loss(phase, batch, self.step)
                if not dist.all_true(bool(torch.isfinite(loss).all())):  # every rank takes the same branch
                    if self._nonfinite("loss", phase, loss.detach(), extra):
                        opt.zero_grad(set_to_none=True)
                        return None
                opt.zero_grad(set_to_none=True)
                loss.backward()
            else:
                opt.zero_grad(set_to_none=True)
                done = self.accumulate_phase(phase, batch, self.grad_accum)
                if done is None:
                    opt.zero_grad(set_to_none=True)
                    return None
                loss, extra = done
            params = self.method.trainable_params(phase)
            dist.average_gradients(params)
            clip = self.cfg["run"].get("grad_clip")
            gnorm = clip_grad_norm(params, clip if clip else float("inf"))   # the global norm for sharded nets
            if not torch.isfinite(gnorm):
                if self._nonfinite("gradient norm", phase, gnorm, extra):
                    opt.zero_grad(set_to_none=True)
                    return None
            scheduled = [g["lr"] for g in opt.param_groups]
            for g in opt.param_groups:   # the method's scheduled rate stays in the optimizer (and its checkpoint)
                g["lr"] *= decay
            opt.step()
            for g, lr in zip(opt.param_groups, scheduled):
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            if phase in self.method.schedulers:
                self.method.schedulers[phase].step()
            logs[f"loss/{phase}"] = float(loss.detach())
            logs[f"grad_norm/{phase}"] = float(gnorm)
            logs.update(extra)
        return logs

    # ---------------------------------------------------------------- gradient accumulation
    @staticmethod
    def micro_batches(batch, k: int) -> list:
        """The real batch as k consecutive equal slices (None for data-free runs): micro-batch j holds rows
        [j·B/k, (j+1)·B/k), the rows whose random draws ``Draws`` hands it."""
        if batch is None:
            return [None] * k
        n = len(batch[0]) // k
        return [tuple(None if t is None else t[j * n:(j + 1) * n] for t in batch) for j in range(k)]

    def accumulate_phase(self, phase: str, batch, k: int):
        """One phase as k micro-batches (``run.grad_accum``): each micro-batch's loss is back-propagated ÷ k, so
        the parameters' gradients sum to the whole batch's; the caller then averages over ranks, clips and steps
        once. Every random draw goes through ``self.draws``, which hands micro-batch j its rows of the whole batch's
        draws, so the result equals one pass over the batch up to round-off. A supplement whose loss couples the
        batch's samples (``couples_batch``: the embedding loss's MMD) is computed on the whole batch by gradient
        caching (``_coupled_gradients``). Returns (loss, logs) — the loss and every logged value a mean over the
        micro-batches — or None when the NaN policy skips the step."""
        step, method = self.step, self.method
        micro = self.micro_batches(batch, k)
        applies = [s for s in self.supplements if s.applies_to(method, phase)]
        coupled = [s for s in applies if getattr(s, "couples_batch", False)]
        plain = [s for s in applies if s not in coupled]
        params = [p for p in method.trainable_params(phase) if p.requires_grad]
        self.draws.begin(k)
        try:
            targets, coupled_logs = [], {}
            if coupled:
                targets = self._coupled_gradients(phase, micro, batch, coupled, plain)
                if targets is None:
                    return None
                for sup, value, _, _, logs in targets:
                    coupled_logs.update(logs)
            apart = {}   # coupled supplement → its parameter gradient, kept apart until its weight is known
            losses, extras = [], []
            for j, mb in enumerate(micro):
                self.draws.micro(j)
                with self._autocast():
                    loss, extra = self._phase_loss(phase, mb, step, plain)
                    surrogates = []
                    if targets:   # ∂/∂θ Σ x_j·g_j is this micro-batch's share of the coupled loss's gradient
                        x = method.generated_batch(mb, step)[0]
                        rows = slice(j * len(x), (j + 1) * len(x))
                        surrogates = [_at_least_fp32((x * grad[rows].to(x.dtype)).sum())
                                      for _, _, grad, _, _ in targets]
                loss = _at_least_fp32(loss)
                finite = dist.all_true(bool(torch.isfinite(loss).all()))   # every rank takes the same branch
                if not finite and self._nonfinite("loss", phase, loss.detach(), extra):
                    return None
                total = loss / k
                for (sup, _, _, weight, _), sur in zip(targets, surrogates):
                    if weight is None:
                        grads = torch.autograd.grad(sur, params, retain_graph=True, allow_unused=True)
                        acc = apart.setdefault(sup, [None] * len(params))
                        for i, g in enumerate(grads):
                            if g is not None:
                                acc[i] = g if acc[i] is None else acc[i] + g
                    else:
                        total = total + weight * sur
                total.backward()
                losses.append(loss.detach())
                extras.append(extra)
            self.draws.end()
        finally:
            self.draws.begin(1)
        # weights that follow from this step's gradient norms (the embedding loss's relative mode): the base
        # gradient is what the loop left in .grad, the coupled loss's own gradient was kept apart
        weights = {sup: weight for sup, _, _, weight, _ in targets}
        base = [p.grad for p in params]
        for sup, grads in apart.items():
            weights[sup] = sup.weight_from_gradients(step, grads, base)
        for sup, grads in apart.items():
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = weights[sup] * g if p.grad is None else p.grad.add_(g, alpha=weights[sup])
        loss = torch.stack(losses).mean().float()
        for sup, value, _, _, _ in targets:
            loss = loss + weights[sup] * value
            coupled_logs.update(sup.weight_logs(weights[sup]))
        logs = {}
        for extra in extras:
            for key, v in extra.items():
                logs.setdefault(key, []).append(v)
        logs = {key: sum(v) / len(v) for key, v in logs.items()}
        return loss, {**logs, **coupled_logs}

    def _coupled_gradients(self, phase, micro, batch, coupled, plain):
        """Gradient caching for supplements whose loss couples the batch: every micro-batch's generated samples
        first (its phase loss without a graph, the draws recorded), then each supplement's loss on the whole batch
        and its gradient with respect to those samples, which the micro-batches then back-propagate through their
        own graphs. Returns [(supplement, loss value, ∂loss/∂x, weight or None, logs)] (weight None: it follows
        from this step's gradient norms), or None when the NaN policy skips the step."""
        xs = []
        with torch.no_grad():
            for j, mb in enumerate(micro):
                self.draws.micro(j)
                with self._autocast():
                    self._phase_loss(phase, mb, self.step, plain)
                    xs.append(self.method.generated_batch(mb, self.step)[0].detach())
        x = torch.cat(xs)
        out = []
        for sup in coupled:
            with self._autocast():
                value, grad, weight, logs = sup.batch_gradient(self.method, x, batch, self.step)
            finite = dist.all_true(bool(torch.isfinite(value).all()))
            if not finite and self._nonfinite("loss", phase, value, logs):
                return None
            out.append((sup, _at_least_fp32(value.detach()), grad, weight, logs))
        return out

    def update_emas(self, nimg_before: int) -> None:
        """Every EMA copy the method tracks, with β from the images seen before this iteration (EDM's rule)."""
        global_batch = self.cfg["run"]["batch_size"] * self.world
        for ema in self.method.emas.values():
            ema.update(self.method.nets[ema.source], ema.beta(global_batch, nimg_before))

    def _install_signal_handlers(self) -> dict:
        """SIGTERM/SIGINT only set a flag; the loop finishes the step, writes a checkpoint and returns. Returns the
        previous handlers, which run() restores."""
        def handler(signum, frame):
            self._stop_signal = signum
        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not in the main thread
            pass
        return previous

    def _train_step_guarded(self) -> dict | None:
        """train_step, with an out-of-memory error turned into a message naming the step, the phase, the knobs
        that lower memory and the last checkpoint."""
        try:
            return self.train_step()
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            k = self.grad_accum
            where = (f"at step {self.step}, phase {self.phase!r}, batch {self.cfg['run']['batch_size']} per process "
                     + (f"as {k} micro-batches of {self.cfg['run']['batch_size'] // k} " if k > 1 else "")
                     + f"on {self.device}")
            msg = out_of_memory_message(e, where)
            self.health.event(self.step, "out_of_memory", phase=self.phase, error=str(e).splitlines()[0][:200]
                              if str(e) else type(e).__name__)
            raise OutOfMemoryStop(f"{msg}. Last checkpoint: {self.last_good_checkpoint()} "
                                  f"(continue from it with --resume auto)") from None

    def run(self, on_sample=None, on_step=None) -> dict:
        """Train to ``run.steps`` (or ``run.max_minutes``); returns the final logs. ``on_sample(trainer)`` is called
        at sample steps, ``on_step(trainer)`` after every step; neither counts towards ``train_seconds``."""
        run = self.cfg["run"]
        lock = RunLock(self.out, self._say)
        try:
            if self.rank == 0:
                claim(self.out, run.get("resume"), run.get("overwrite", False))
                if self.out.is_dir():   # before resuming, which trims this folder's logs
                    lock.acquire()
            self.maybe_resume()         # a bad --resume is refused before a new folder is made
            if self.rank == 0 and not lock.held:
                lock.acquire()
            return self._run(run, on_sample, on_step)
        finally:
            lock.release()

    def _run(self, run, on_sample, on_step) -> dict:
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(self.cfg, indent=2, default=str))
        log_f = open(self.out / "log.jsonl", "a") if self.rank == 0 else None
        tb = self._tensorboard()
        bar = self._progress(run["steps"])
        previous_handlers = self._install_signal_handlers()
        t_last, steps_since, last_logs = time.perf_counter(), 0, {}
        if self.step == 0:
            report = self.noise_report()
            if report:
                self._say(report)
            self.start_check()
        try:
            while self.step < run["steps"]:
                t_step = time.perf_counter()
                logs = self._train_step_guarded()
                self.step += 1
                nimg_before, self.nimg = self.nimg, self.nimg + run["batch_size"] * self.world
                if logs is not None:
                    self.update_emas(nimg_before)
                    self.method.after_step(self.step, self.nimg)
                    last_logs.update(logs)  # latest value of every key (TTUR phases do not run every step)
                    self.health.observe(self.step, logs)
                    collapsed = self.health.collapse(logs)
                    if dist.any_true(collapsed is not None):
                        self.health.event(self.step, "collapse", reason=collapsed)
                        raise DivergenceError(f"training collapsed at step {self.step}: {collapsed or 'on a rank'} "
                                              f"(a run that learns never repeats a loss exactly). "
                                              f"{self.divergence_advice()}, or --set run.collapse_steps=0 to "
                                              f"turn the check off")
                self.train_seconds += time.perf_counter() - t_step
                if on_step:
                    on_step(self)
                steps_since += 1
                if bar is not None:
                    bar.update(1)
                    if logs:
                        bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss/")})
                if self.step % run["log_every"] == 0 or self.step == run["steps"]:
                    now = time.perf_counter()
                    rec = {"step": self.step, "kimg": self.nimg / 1000,
                           **{k: dist.all_reduce_mean(v) for k, v in last_logs.items()},
                           **{k: dist.all_reduce_mean(v) for k, v in self.health.pop_interval_max().items()},
                           "sec_per_step": (now - t_last) / max(steps_since, 1),
                           "train_seconds": round(self.train_seconds, 3)}
                    t_last, steps_since = now, 0
                    if log_f:
                        log_f.write(json.dumps(rec) + "\n")
                        log_f.flush()
                    if tb:
                        for k, v in rec.items():
                            if k != "step":
                                tb.add_scalar(k, v, self.step)
                if run["sample_every"] and (self.step % run["sample_every"] == 0 or self.step == run["steps"]):
                    if self.rank == 0 or self.sharding is not None:   # sharded nets: every rank runs the forwards
                        self.save_sample_grid()
                    if on_sample:
                        on_sample(self)
                if run["ckpt_every"] and self.step % run["ckpt_every"] == 0 and self.step < run["steps"]:
                    self.save()
                if dist.any_true(self._stop_signal is not None):  # every rank stops at the same step
                    self.stopped_by_signal = self._stop_signal or signal.SIGTERM
                    path = self.save()
                    self.health.event(self.step, "signal", signal=int(self.stopped_by_signal), checkpoint=str(path))
                    self._say(f"{signal.Signals(self.stopped_by_signal).name}: wrote {path} at step {self.step} "
                              f"and stopped; continue with --resume auto")
                    return last_logs
                if self._over_budget(run.get("max_minutes")):
                    self._say(f"time budget of {run['max_minutes']} min reached at step {self.step}: stopping")
                    break
            self.save()
        finally:
            if bar is not None:
                bar.close()
            if log_f:
                log_f.close()
            if tb:
                tb.close()
            for sig, h in previous_handlers.items():
                if h is not None:
                    signal.signal(sig, h)
        return last_logs

    def _over_budget(self, max_minutes) -> bool:
        if not max_minutes:
            return False
        return dist.any_true(self.train_seconds >= 60.0 * max_minutes)  # every rank stops at the same step

    @torch.no_grad()
    def noise_report(self) -> str | None:
        """The noise levels chosen for this teacher, in one line: its family and σ range, σ_d, the student's
        sampling σ's and the σ ranges of the method's losses (``Method.noise_levels``); None without a teacher.
        Each value comes from the teacher (σ range, output gain) unless a method option set it."""
        t = self.teacher
        if t is None:
            return None
        fmt = lambda v: (f"[{fmt(v[0])}, {fmt(v[1])}]" if isinstance(v, (list, tuple)) and len(v) == 2   # noqa: E731
                         else f"{v:.4g}" if isinstance(v, float) else str(v))
        family = t.family() if hasattr(t, "family") else type(t).__name__
        parts = [f"teacher {family}, σ {fmt([float(t.sigma_min), float(t.sigma_max)])}, "
                 f"σ_d {fmt(float(getattr(t, 'sigma_data', 0.5)))}"]
        sigmas = self.method.sampling_spec().get("sigmas")
        if sigmas:
            parts.append("student samples at σ " + ", ".join(fmt(float(v)) for v in sigmas if v > 0))
        parts += [f"{k} {fmt(v)}" for k, v in self.method.noise_levels().items()]
        return "; ".join(parts)

    def start_check(self, n: int = 128) -> str | None:
        """Start-of-run health check of a distillation: the student's initial samples (its own sampling recipe)
        against the data, or, for a data-free run, the teacher's own samples. Prints and returns a one-line warning
        naming the fix when they are far off the data's scale (``health.initial_output_check``), else None."""
        if self.teacher is None or (self.rank != 0 and self.sharding is None):   # sharded: a collective forward
            return None
        spec = self.method.sampling_spec()
        x, _, _ = generate(self.method.sampling_net(), range(n), spec, device=self.device, clip=False,
                           conditions=self.conditions)
        if self.data_x is not None:
            pick = torch.randperm(len(self.data_x), generator=torch.Generator().manual_seed(0))[:max(n, 1024)]
            ref, what = self.data_x[pick.to(self.data_x.device)].cpu(), "data"
        else:
            teacher_spec = (self.cfg.get("teacher") or {}).get("sampling") or {"sampler": "heun", "nfe": 35}
            ref, _, _ = generate(self.teacher, range(n), teacher_spec, device=self.device,
                                 conditions=self.conditions)
            what = "teacher's samples"
        hint = "Check the teacher's parameterisation and the method's input noise level."
        sigma = (spec.get("sigmas") or [None])[0]
        gain = getattr(self.teacher, "output_gain", None)
        if sigma is not None and gain is not None:
            hint = (f"Its input noise level σ = {sigma:.3g} is where the teacher's output gain |c_out| is "
                    f"{gain(sigma):.3g} (every error of the network's output ×{gain(sigma):.3g})")
            opt = self.method_cls.input_sigma_option
            good = conditioned_sigma_max(self.teacher)
            hint += (f": lower it, e.g. --set method.{opt}={good:.3g}" if opt and good < sigma else ".")
        warning = initial_output_check(x, ref, what, hint)
        if warning:
            self._say("WARNING: " + warning)
            self.health.event(0, "start_check", message=warning)
        return warning

    def save_sample_grid(self) -> None:
        net = self.method.sampling_net()
        n = self.cfg["run"].get("num_sample_grid", 64) if net.img_resolution else 2000
        x, _, _ = generate(net, range(n), self.method.sampling_spec(), device=self.device,
                           conditions=self.conditions)
        if self.rank != 0:
            return
        save_samples_png(x, self.out / "samples" / f"samples-{self.step:08d}.png",
                         title=f"{self.method_cls.name} step {self.step}")

    def _tensorboard(self):
        if self.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but logging must never stop training
            return None
        return SummaryWriter(str(self.out / "tb"))

    def _progress(self, total):
        if self.rank != 0 or not self.cfg["run"].get("progress", True):
            return None
        from tqdm import tqdm
        return tqdm(total=total, initial=self.step, desc=self.method_cls.name, dynamic_ncols=True,
                    mininterval=1.0)
