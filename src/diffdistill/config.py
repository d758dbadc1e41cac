"""Run configuration: nested dicts with presets, a YAML/JSON file, and ``--set a.b=value`` overrides.

Resolution order: preset → config file → command-line flags → ``--set`` overrides. The resolved dict is saved as
``RUN/config.json`` and inside every checkpoint.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from .errors import UserError

RUN_DEFAULTS = {
    "out": "runs/run",
    "seed": 0,
    "device": "cpu",
    "steps": 1000,
    "batch_size": 128,          # per rank
    "log_every": 50,
    "ckpt_every": 500,
    "sample_every": 500,
    "keep_ckpts": 3,
    "nan_policy": "stop",       # 'stop' or 'skip'
    "spike_factor": 10.0,       # a loss / grad norm above this × its running median is logged as a spike (0: off)
    "global_batch_size": None,  # if set: batch_size = global_batch_size / number of processes (must divide)
    "grad_clip": None,          # max grad norm, None = off
    "progress": True,
    "resume": None,             # None, 'auto' or a checkpoint path
    "max_minutes": None,        # wall-clock budget of the training loop (evaluation excluded); None = steps only
    "precision": "fp32",        # 'fp32' or 'bf16' (autocast around the losses; weights and optimizer stay fp32)
    "compile": False,           # torch.compile every trained network and the teacher (in place; same weights)
    "channels_last": False,     # NHWC memory format for image networks (faster convolutions on GPUs)
    "num_sample_grid": 64,
}

PRESETS = {
    # 413 k-parameter SongUNet on the 1,500 training digits (297 held out for the real-data floor).
    "digits": {
        "run": {"steps": 3000, "batch_size": 128, "ckpt_every": 1000, "sample_every": 1000, "out": "runs/teacher-digits"},
        "data": {"name": "digits", "split": "train"},
        "net": {"arch": "songunet", "img_channels": 1, "img_resolution": 8, "label_dim": 0, "sigma_data": 0.5,
                "kwargs": {"model_channels": 32, "channel_mult": [1, 1], "num_blocks": 2,
                           "attn_resolutions": [4], "dropout": 0.0}},
        "method": {"name": "edm", "lr": 2e-3, "warmup_steps": 200, "ema_halflife_kimg": 50.0, "ema_rampup": 0.1},
    },
    # MLP teacher on 2-D mixtures (data std ≈ 0.5 per coordinate, σ_d = 0.5).
    "ring8": {
        "run": {"steps": 3000, "batch_size": 512, "ckpt_every": 1000, "sample_every": 1000, "out": "runs/teacher-ring8"},
        "data": {"name": "ring8", "n": 20000, "seed": 0},
        "net": {"arch": "mlp", "img_channels": 2, "img_resolution": 0, "label_dim": 0, "sigma_data": 0.5,
                "kwargs": {"hidden": 256, "depth": 4}},
        "method": {"name": "edm", "lr": 1e-3, "warmup_steps": 100, "ema_halflife_kimg": 100.0, "ema_rampup": 0.1},
    },
}
for _toy in ("checkerboard", "two_moons"):
    PRESETS[_toy] = copy.deepcopy(PRESETS["ring8"])
    PRESETS[_toy]["data"]["name"] = _toy
    PRESETS[_toy]["run"]["out"] = f"runs/teacher-{_toy}"


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
    if not isinstance(cfg, dict):
        raise UserError(f"config file {p} must hold a mapping (sections run/data/net/method)")
    return cfg


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
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(val)
    return cfg


def resolve(preset: str | None, config_file=None, flags: dict | None = None, overrides=None) -> dict:
    cfg = {"run": dict(RUN_DEFAULTS)}
    if preset:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        cfg = deep_update(cfg, PRESETS[preset])
    if config_file:
        cfg = deep_update(cfg, load_config_file(config_file))
    cfg = deep_update(cfg, flags or {})
    cfg = apply_overrides(cfg, overrides)
    validate_run(cfg["run"])
    return cfg


def validate_run(run: dict) -> None:
    for key in ("steps", "batch_size"):
        v = run.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            flag = {"steps": "--steps (train-teacher) or --iters (distill)", "batch_size": "--batch-size"}[key]
            raise UserError(f"run.{key} must be a positive integer, got {v!r}: set it with {flag} N, N >= 1")
    mm = run.get("max_minutes")
    if mm is not None and (isinstance(mm, bool) or not isinstance(mm, (int, float)) or mm <= 0):
        raise UserError(f"run.max_minutes must be a positive number of minutes, got {mm!r}")
    if run.get("precision", "fp32") not in ("fp32", "bf16"):
        raise UserError(f"run.precision must be 'fp32' or 'bf16', got {run.get('precision')!r}")
    for key in ("compile", "channels_last"):
        if not isinstance(run.get(key, False), bool):
            raise UserError(f"run.{key} must be true or false, got {run.get(key)!r}")
    if run.get("nan_policy") not in ("stop", "skip"):
        raise UserError(f"run.nan_policy must be 'stop' or 'skip', got {run.get('nan_policy')!r}")
    for key in ("ckpt_every", "log_every", "sample_every", "keep_ckpts"):
        v = run.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise UserError(f"run.{key} must be a non-negative integer, got {v!r}")
    if not run.get("log_every"):
        raise UserError("run.log_every must be at least 1")
    g = run.get("global_batch_size")
    if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g <= 0):
        raise UserError(f"run.global_batch_size must be a positive integer (or null), got {g!r}")
    sf = run.get("spike_factor")
    if sf is not None and (isinstance(sf, bool) or not isinstance(sf, (int, float)) or sf < 0):
        raise UserError(f"run.spike_factor must be a number >= 0 (0 turns spike warnings off), got {sf!r}")
    check_device(run.get("device", "cpu"))


def check_device(device) -> None:
    """Refuse a device this machine does not have, naming the one to use (instead of a CUDA assertion later)."""
    import torch
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
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
