"""Run configuration: nested dicts with presets, a YAML/JSON file, and ``--set a.b=value`` overrides.

Resolution order: preset → config file → command-line flags → ``--set`` overrides. The resolved dict is saved as
``RUN/config.json`` and inside every checkpoint.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from .errors import UserError
from .options import Options, nearest, option

@dataclass
class RunOptions(Options):
    """The ``run`` section: where and how long a run trains, and how it logs, checkpoints and guards itself."""

    section = "run"
    out: str = option("runs/run", "run directory")
    seed: int = option(0, "seed of noise draws, batch order and initialisation", ge=0, flag="--seed")
    device: str = option("cpu", "cpu, cuda or cuda:N", flag="--device")
    steps: int = option(1000, "training iterations", ge=1, flag="--iters")
    batch_size: int = option(128, "batch per process", ge=1, flag="--batch-size")
    global_batch_size: Optional[int] = option(None, "if set: batch_size = global_batch_size / processes", ge=1)
    grad_accum: int = option(1, "gradient accumulation: each phase's per-process batch is computed as this many "
                                "micro-batches (activations of one micro-batch), gradients summed before one "
                                "optimizer step; the same result as the whole batch (every method but RDD, SiDA "
                                "and CFD's diversity term; README: Gradient accumulation)", ge=1)
    log_every: int = option(50, "iterations between log.jsonl records", ge=1)
    ckpt_every: int = option(500, "iterations between checkpoints (0: only at the end)", ge=0)
    sample_every: int = option(500, "iterations between sample grids (0: only at the end)", ge=0)
    keep_ckpts: int = option(3, "checkpoints kept (0: all)", ge=0)
    nan_policy: str = option("stop", "non-finite loss or gradient: stop (exit 3) or skip the step",
                             choices=("stop", "skip"))
    spike_factor: float = option(10.0, "log a spike when a loss / grad norm exceeds this × its running median "
                                       "(0: off)", ge=0)
    grad_clip: Optional[float] = option(None, "max gradient norm per phase (null: off)", gt=0)
    collapse_steps: int = option(50, "stop as diverged (exit 3) after this many steps with every loss and gradient "
                                     "norm exactly 0 or a loss frozen at one value (0: off)", ge=0)
    progress: bool = option(True, "progress bar")
    resume: Optional[str] = option(None, "'auto' (newest valid checkpoint) or a checkpoint path", flag="--resume")
    overwrite: bool = option(False, "a new run may replace another run's files in its folder", flag="--overwrite")
    max_minutes: Optional[float] = option(None, "wall-clock budget of the training loop (evaluation excluded)", gt=0,
                                          flag="--budget-minutes")
    lr_decay: str = option("none", "every learning rate × a factor falling to 0 at the run's end, on top of the "
                                   "method's own schedule: none, linear or cosine (README: Learning-rate decay)",
                           choices=("none", "linear", "cosine"))
    lr_decay_start: int = option(0, "iterations at the full rate before run.lr_decay begins (a shorter run never "
                                    "decays)", ge=0)
    precision: str = option("fp32", "fp32, or bf16 autocast around the losses (weights stay fp32)",
                            choices=("fp32", "bf16"))
    compile: bool = option(False, "torch.compile every trained network and the teacher")
    channels_last: bool = option(False, "NHWC memory format for image networks")
    num_sample_grid: int = option(64, "images in each sample grid", ge=1)
    activation_checkpointing: list[str] = option([], "trained networks (names in the method's nets, e.g. generator, "
                                                     "fake_score, student, net) whose blocks are recomputed in "
                                                     "backward instead of kept: less activation memory, one extra "
                                                     "forward of those networks")
    teacher_dtype: str = option("fp32", "the frozen teacher's weights: fp32, or bf16 (half the memory; its forward "
                                        "runs under bf16 autocast and returns fp32); the trained copies start from "
                                        "the fp32 weights", choices=("fp32", "bf16"))
    fsdp: bool = option(False, "FSDP2: every network the method trains (and its EMA copies) sharded over the "
                               "processes, block by block and at the root (gloo on CPU, nccl on CUDA); "
                               "checkpoints sharded with torch.distributed.checkpoint (README: FSDP2)")
    fsdp_teacher: str = option("replicate", "with run.fsdp, the frozen teacher: replicate (a full copy per "
                                            "process) or shard (its blocks all-gathered one at a time when "
                                            "evaluated)", choices=("replicate", "shard"))
    draws: str = option("rank", "random draws of the losses on several processes: rank (each process its own "
                                "stream) or global (every process draws the global batch's noise from one stream "
                                "and takes its rows: N processes then equal one process with the same global "
                                "batch, up to round-off)", choices=("rank", "global"))

    def validate(self):
        check_device(self.device, meta_ok=True)   # meta: the Trainer allows it for a --dry-run only
        if self.fsdp_teacher == "shard" and not self.fsdp:
            raise UserError("run.fsdp_teacher=shard shards the teacher alongside the FSDP2-sharded networks: add "
                            "--set run.fsdp=true, or leave run.fsdp_teacher at replicate")


# Top-level sections of a config; anything else is a typo.
SECTIONS = ("run", "data", "net", "method", "el", "lora", "teacher", "preset")
PRESET_DIR = Path(__file__).resolve().parent / "configs"


def preset_path(owner: str, name: str) -> Path:
    """``configs/<owner>/<name>.yaml`` inside the package (installed with it; a checkout's ``configs/`` links here)."""
    return PRESET_DIR / owner / f"{name}.yaml"


def list_presets(owner: str) -> list[str]:
    d = PRESET_DIR / owner
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def load_preset(owner: str, name: str) -> dict:
    """A preset file's sections (its own ``preset:`` key removed)."""
    p = preset_path(owner, name)
    if not p.is_file():
        raise UserError(f"unknown preset {name!r} for {owner}; choose one of: {', '.join(list_presets(owner))}"
                        + nearest(name, list_presets(owner)))
    cfg = load_config_file(p)
    cfg.pop("preset", None)
    return cfg


TEACHER_PRESETS = ("digits", "digits_cond", "ring8", "checkerboard", "two_moons")


def deep_update(base: dict, new: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (new or {}).items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_config_file(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p} (check the path given to --config)")
    try:
        cfg = yaml.safe_load(p.read_text()) if p.suffix in (".yaml", ".yml") else json.loads(p.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise UserError(f"cannot parse config file {p}: {str(e).splitlines()[0]}; fix its YAML/JSON syntax") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise UserError(f"config file {p} must hold a mapping (sections {', '.join(SECTIONS)})")
    check_sections(cfg, f"config file {p}")
    # An empty section (every key commented out) means "nothing to change", not "erase the preset's values".
    return {k: v for k, v in cfg.items() if v is not None}


def check_sections(cfg: dict, where: str) -> None:
    """Unknown top-level sections are typos: refuse them, naming the nearest valid one."""
    for k, v in cfg.items():
        if k not in SECTIONS:
            raise UserError(f"{where}: unknown section {k!r}{nearest(k, SECTIONS)}; valid: {', '.join(SECTIONS)}")
        if k != "preset" and v is not None and not isinstance(v, dict):
            raise UserError(f"{where}: section {k!r} must be a mapping of key: value, got {v!r}")


def _parse_value(val: str):
    """YAML scalar, except that numbers YAML 1.1 leaves as strings (``1e-4``) become floats."""
    v = yaml.safe_load(val)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """``section.key=value`` strings; the value is parsed as YAML (numbers, lists, null, true/false)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set expects key=value (e.g. run.steps=200), got {item!r}")
        key, val = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise UserError(f"--set {key}: name a section and a key, e.g. run.steps=200 or method.lr=1e-4")
        check_sections({parts[0]: {}}, f"--set {key}")
        node = cfg
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(val)
    return cfg


def given_keys(*layers, overrides=()) -> set:
    """Dotted keys (``run.steps``, ``method.lr``) set explicitly by config files, flags and --set."""
    keys = {f"{sec}.{k}" for c in layers for sec, v in (c or {}).items() if isinstance(v, dict) for k in v}
    return keys | {str(o).split("=", 1)[0].strip() for o in overrides or []}


def resolve(preset: str | None, config_file=None, flags: dict | None = None, overrides=None,
            default_preset: str | None = None) -> dict:
    """Teacher training: run defaults ← ``configs/edm/<preset>.yaml`` ← config file ← flags ← --set; the method
    section is completed with every option of the EDM loss (its schema's defaults)."""
    file_cfg = load_config_file(config_file) if config_file else {}
    preset = preset or file_cfg.get("preset") or default_preset
    cfg = {"run": dict(RUN_DEFAULTS)}
    if preset:
        if preset not in TEACHER_PRESETS:
            raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(TEACHER_PRESETS)}"
                            + nearest(preset, TEACHER_PRESETS))
        cfg = deep_update(cfg, load_preset("edm", preset))
    cfg = deep_update(cfg, {k: v for k, v in file_cfg.items() if k != "preset"})
    cfg = deep_update(cfg, flags or {})
    cfg = apply_overrides(cfg, overrides)
    cfg.setdefault("method", {}).setdefault("name", "edm")
    cfg["preset"] = {"name": preset, "file": str(preset_path("edm", preset)) if preset else None}
    cfg["run"] = validate_run(cfg["run"])
    return cfg


def validate_run(run: dict) -> dict:
    """The run section checked against its schema (unknown keys, types, ranges); returns it complete."""
    return RunOptions.from_dict(run, owner="the run").to_dict()


def check_device(device, meta_ok: bool = False) -> None:
    """Refuse a device this machine does not have, naming the one to use (instead of a CUDA assertion later).
    ``meta`` (networks built without memory, to plan a run's memory) only where ``meta_ok`` (a --dry-run)."""
    import torch
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if d.type == "meta" and not meta_ok:
        raise UserError("device 'meta' builds the networks without memory, to plan a run's memory: use it with "
                        "--dry-run (train-teacher, distill), and cpu or cuda to run")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} is not available (no CUDA GPU is visible to this torch build): "
                            f"use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} "
                            f"GPU(s), use cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    elif d.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"device {device!r} is not available: use --device cpu")


def per_process_batch(run: dict, world: int) -> int:
    """The batch each process draws: ``run.global_batch_size`` split evenly over ``world`` processes when it is
    set, else ``run.batch_size`` (which is per process)."""
    g = run.get("global_batch_size")
    if g is None:
        return run["batch_size"]
    if g % world:
        lo, hi = (g // world) * world, -(-g // world) * world
        raise UserError(f"run.global_batch_size={g} is not divisible by the {world} processes: use a multiple of "
                        f"{world} (e.g. {lo or hi} or {hi}), or give the per-process --batch-size instead")
    return g // world


RUN_DEFAULTS = RunOptions.defaults()
