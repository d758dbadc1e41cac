"""The one training loop. It knows the Method interface only (phases → loss → backward → step), never a method.

Per step: draw this rank's batch (a pure function of seed, rank and step, so resuming needs no loader state), run
each phase of the method, guard against non-finite losses and gradients, average gradients across ranks, clip,
step, update EMAs, then log / sample / checkpoint on schedule. Checkpoints hold everything needed to continue
bit-exactly: every net, optimizer and scheduler, the method's extra state, the step and all RNG states.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import torch

from ..errors import UserError
from ..methods.base import MethodContext
from ..methods.registry import get_method
from . import distributed as dist
from .checkpoint import (checkpoint_path, list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint)


class DivergenceError(RuntimeError):
    """A loss or gradient became NaN/inf and the policy is 'stop'."""


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


def _set_rng_state(gen: torch.Generator, state: dict) -> None:
    gen.set_state(state["method"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_data_matches_net(shape: tuple, num_classes: int, net_cfg: dict) -> None:
    """Refuse data whose shape or label count does not fit the network, naming the fix."""
    C, R, L = net_cfg.get("img_channels"), net_cfg.get("img_resolution", 0), net_cfg.get("label_dim", 0)
    want = (C, R, R) if R else (C,)
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


def check_method_options(method_cls, options: dict) -> None:
    """Unknown method options are a user error naming the valid ones, not a TypeError from deep inside."""
    import inspect
    params = inspect.signature(method_cls.__init__).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    valid = [k for k in params if k not in ("self", "ctx")]
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise UserError(f"method {method_cls.name!r} has no option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")


class Trainer:
    def __init__(self, cfg: dict, teacher=None, teacher_path: str | None = None, dataset=None, supplements=()):
        self.cfg = cfg
        run = cfg["run"]
        self.out = Path(run["out"])
        self.device = torch.device(run["device"])
        dist.init_distributed(run["device"])
        self.rank, self.world = dist.rank(), dist.world_size()
        method_cfg = dict(cfg["method"])
        method_cls = get_method(method_cfg.pop("name"))
        self.method_cls = method_cls
        torch.manual_seed(run["seed"] + self.rank)  # dropout etc. use the global RNG
        self.gen = torch.Generator().manual_seed(run["seed"] * 7919 + self.rank)

        self.dataset = dataset
        if method_cls.needs_data and self.dataset is None:
            from ..data import dataset_from_config as load_dataset
            self.dataset = load_dataset(cfg["data"])
        if self.dataset is not None and len(self.dataset) == 0:
            raise UserError("the dataset is empty: point --data at a folder/file with at least one sample")
        self.data_x = self.data_y = None
        if self.dataset is not None:
            self.data_x = self.dataset.x.to(self.device)
            L = self.dataset.num_classes
            self.data_y = (torch.nn.functional.one_hot(self.dataset.labels, L).float().to(self.device)
                           if L and self.dataset.labels is not None else None)
            self.sampler = BatchSampler(len(self.dataset), run["batch_size"], run["seed"], self.rank, self.world)

        net_cfg = cfg.get("net", {})
        shape = tuple(self.dataset.sample_shape) if self.dataset is not None else ()
        if shape and net_cfg:
            check_data_matches_net(shape, getattr(self.dataset, "num_classes", 0), net_cfg)
        ctx = MethodContext(device=self.device, generator=self.gen, batch_size=run["batch_size"],
                            world_size=self.world, net_config=net_cfg, teacher=teacher, teacher_path=teacher_path,
                            sample_shape=shape, num_classes=getattr(self.dataset, "num_classes", 0))
        check_method_options(method_cls, method_cfg)
        self.method = method_cls(ctx, **method_cfg)
        for net in self.method.nets.values():
            dist.broadcast_module(net)
        self.supplements = list(supplements)
        self.step = 0
        self.nimg = 0
        self.ckpt_dir = self.out / "checkpoints"
        self._stop_signal = None

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        net = self.method.sampling_net()
        return {
            "method": self.method_cls.name, "role": self.method_cls.role, "step": self.step, "nimg": self.nimg,
            "config": self.cfg, "net_config": self.cfg.get("net", {}), "sampling": self.method.sampling_spec(),
            "sample_net": net.state_dict(), "method_state": self.method.state_dict(),
            "rng": _rng_state(self.gen), "world_size": self.world,
            "data": None if self.dataset is None else {
                "name": getattr(self.dataset, "name", "?"), "sample_shape": list(self.dataset.sample_shape),
                "num_classes": self.dataset.num_classes},
            "teacher_path": self.method.ctx.teacher_path,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != self.method_cls.name:
            raise UserError(f"checkpoint was written by method {state.get('method')!r}, not {self.method_cls.name!r}:"
                            f" resume with the same --method or start a new run directory")
        if state.get("world_size", 1) != self.world:
            raise UserError(f"checkpoint was written with {state.get('world_size')} ranks, now {self.world}: "
                            f"resume with the same number of processes")
        self.method.load_state_dict(state["method_state"])
        self.step, self.nimg = int(state["step"]), int(state["nimg"])
        _set_rng_state(self.gen, state["rng"])

    def save(self) -> Path | None:
        path = checkpoint_path(self.ckpt_dir, self.step)
        if self.rank == 0:
            save_checkpoint(self.state_dict(), path)
            prune_checkpoints(self.ckpt_dir, self.cfg["run"]["keep_ckpts"])
        dist.barrier()
        return path

    def maybe_resume(self) -> None:
        what = self.cfg["run"].get("resume")
        if not what:
            return
        if what == "auto":
            found = list_checkpoints(self.ckpt_dir)
            if not found:
                self._say(f"resume auto: no checkpoint in {self.ckpt_dir}, starting fresh")
                return
            path = found[-1]
        else:
            path = Path(what)
        state = load_checkpoint(path)
        self.load_state_dict(state)
        self._say(f"resumed from {path} at step {self.step}")

    # ---------------------------------------------------------------- loop
    def _say(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[diffdistill] {msg}", flush=True)

    def batch(self, step: int):
        if self.data_x is None:
            return None
        idx = self.sampler.indices(step).to(self.device)
        return self.data_x[idx], (self.data_y[idx] if self.data_y is not None else None)

    def _nonfinite(self, what: str, phase: str) -> bool:
        """Apply the NaN policy; returns True when the step must be skipped."""
        msg = f"non-finite {what} in phase {phase!r} at step {self.step}"
        if self.cfg["run"]["nan_policy"] == "skip":
            print(f"[diffdistill] WARNING: {msg}; skipping this step (nan_policy=skip)", flush=True)
            return True
        last = list_checkpoints(self.ckpt_dir)
        raise DivergenceError(f"{msg}; stopped (nan_policy=stop). Last good checkpoint: "
                              f"{last[-1] if last else 'none'}. Lower the learning rate or resume with "
                              f"--set run.nan_policy=skip")

    def train_step(self) -> dict | None:
        batch = self.batch(self.step)
        logs = {}
        for phase in self.method.phases(self.step):
            opt = self.method.optimizers[phase]
            loss, extra = self.method.loss(phase, batch, self.step)
            for sup in self.supplements:
                if sup.applies_to(self.method, phase):
                    sup_loss, sup_logs = sup.loss(self.method, batch, self.step)
                    loss = loss + sup_loss
                    extra = {**extra, **sup_logs}
            if not torch.isfinite(loss).all():
                if self._nonfinite("loss", phase):
                    opt.zero_grad(set_to_none=True)
                    return None
            opt.zero_grad(set_to_none=True)
            loss.backward()
            params = self.method.trainable_params(phase)
            dist.average_gradients(params)
            clip = self.cfg["run"].get("grad_clip")
            gnorm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
            if not torch.isfinite(gnorm):
                if self._nonfinite("gradient", phase):
                    opt.zero_grad(set_to_none=True)
                    return None
            opt.step()
            opt.zero_grad(set_to_none=True)
            if phase in self.method.schedulers:
                self.method.schedulers[phase].step()
            logs[f"loss/{phase}"] = float(loss.detach())
            logs[f"grad_norm/{phase}"] = float(gnorm)
            logs.update(extra)
        return logs

    def _install_signal_handlers(self):
        def handler(signum, frame):
            self._stop_signal = signum
        try:
            signal.signal(signal.SIGTERM, handler)
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # not in the main thread
            pass

    def run(self, on_sample=None) -> dict:
        """Train to ``run.steps``; returns the final logs. ``on_sample(trainer)`` is called at sample steps."""
        run = self.cfg["run"]
        self.maybe_resume()
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(self.cfg, indent=2, default=str))
        log_f = open(self.out / "log.jsonl", "a") if self.rank == 0 else None
        tb = self._tensorboard()
        bar = self._progress(run["steps"])
        self._install_signal_handlers()
        t_last, steps_since, last_logs = time.perf_counter(), 0, {}
        try:
            while self.step < run["steps"]:
                logs = self.train_step()
                self.step += 1
                self.nimg += run["batch_size"] * self.world
                if logs is not None:
                    self.method.after_step(self.step, self.nimg)
                    last_logs.update(logs)  # latest value of every key (TTUR phases do not run every step)
                steps_since += 1
                if bar is not None:
                    bar.update(1)
                    if logs:
                        bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss/")})
                if self.step % run["log_every"] == 0 or self.step == run["steps"]:
                    now = time.perf_counter()
                    rec = {"step": self.step, "kimg": self.nimg / 1000,
                           **{k: dist.all_reduce_mean(v) for k, v in last_logs.items()},
                           "sec_per_step": (now - t_last) / max(steps_since, 1)}
                    t_last, steps_since = now, 0
                    if log_f:
                        log_f.write(json.dumps(rec) + "\n")
                        log_f.flush()
                    if tb:
                        for k, v in rec.items():
                            if k != "step":
                                tb.add_scalar(k, v, self.step)
                if run["sample_every"] and (self.step % run["sample_every"] == 0 or self.step == run["steps"]):
                    if self.rank == 0:
                        self.save_sample_grid()
                    if on_sample:
                        on_sample(self)
                if run["ckpt_every"] and self.step % run["ckpt_every"] == 0 and self.step < run["steps"]:
                    self.save()
                if self._stop_signal is not None:
                    self._say(f"signal {self._stop_signal}: writing checkpoint at step {self.step} and stopping")
                    self.save()
                    return last_logs
            self.save()
        finally:
            if bar is not None:
                bar.close()
            if log_f:
                log_f.close()
            if tb:
                tb.close()
        return last_logs

    def save_sample_grid(self) -> None:
        from ..eval.generate import generate
        from ..eval.plots import save_samples_png
        net = self.method.sampling_net()
        n = self.cfg["run"].get("num_sample_grid", 64) if net.img_resolution else 2000
        x, _, _ = generate(net, range(n), self.method.sampling_spec(), device=self.device)
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
