"""Set up a distillation run: load the frozen teacher, derive the student's network and data from it, merge the
method's preset for the data kind, and hand everything to the one Trainer."""

from __future__ import annotations

import torch

from .config import (RUN_DEFAULTS, apply_overrides, check_device, deep_update, given_keys, list_presets,
                     load_config_file, load_preset, preset_path, validate_run)
from .data import dataset_from_config
from .errors import UserError
from .eval.generate import generate
from .io import load_teacher
from .io.load import without_weights
from .methods.embedding_loss import embedding_loss_from_config
from .methods.registry import get_method
from .train.distributed import launched_rank
from .train.trainer import Trainer, reads_data


def teacher_kind(teacher_state: dict) -> str:
    """'images' or 'points': which default preset a method uses for this teacher."""
    return "points" if not teacher_state["net_config"].get("img_resolution") else "images"


def distill_config(method: str, teacher_state: dict, flags=None, config_file=None, overrides=None,
                   preset: str | None = None) -> dict:
    """Resolve a distillation run's config: run defaults ← the teacher's data and network ← the preset file
    ``configs/<method>/<preset>.yaml`` ← config file ← flags ← --set; then the method's schedule hook and the run
    schema. The preset is ``--preset``, else the config file's ``preset:`` key, else the teacher's kind
    (``images`` / ``points``); ``official`` is the method's dataclass defaults plus the official run settings."""
    cls = get_method(method)
    tcfg = teacher_state["config"]
    file_cfg = load_config_file(config_file) if config_file else {}
    preset = preset or file_cfg.get("preset")
    if preset is None:  # the teacher's kind, when the method has a preset for it (else the dataclass defaults)
        preset = teacher_kind(teacher_state) if teacher_kind(teacher_state) in list_presets(cls.name) else "none"
    cfg = {"run": deep_update(RUN_DEFAULTS, {"out": f"runs/{cls.name}"}), "data": dict(tcfg.get("data") or {}),
           "net": teacher_state["net_config"], "method": {}}
    if preset != "none":
        cfg = deep_update(cfg, load_preset(cls.name, preset))
    cfg = deep_update(cfg, {k: v for k, v in file_cfg.items() if k != "preset"})
    cfg = deep_update(cfg, flags or {})
    cfg = apply_overrides(cfg, overrides)
    cfg["method"].pop("name", None)
    cls.resolve_schedule(cfg["run"], cfg["method"], given_keys(file_cfg, flags, overrides=overrides))
    cfg["run"] = validate_run(cfg["run"])
    cfg["method"] = {"name": cls.name, **cls.Options.from_dict(cfg["method"], owner=cls.name).to_dict()}
    cfg["preset"] = {"name": preset, "file": str(preset_path(cls.name, preset)) if preset != "none" else None}
    return cfg


def announce_data(method: str, cfg: dict, tstate: dict, supplements=()) -> bool:
    """Say, before anything runs, whether this run reads real data and which; refuse a run that needs data when
    none is given or recorded by the teacher. Returns whether it reads data."""
    cls = get_method(method)
    opts = cls.Options.from_dict({k: v for k, v in cfg["method"].items() if k != "name"}, owner=cls.name)
    reads = reads_data(cls, opts, supplements)
    data = cfg.get("data") or {}
    name = data.get("path") or data.get("name")
    recorded = (tstate["config"].get("data") or {})
    if reads and not name:
        raise UserError(f"method {cls.name} reads real data with these options, and the teacher records no data "
                        f"set: give --data NAME|PATH (digits, ring8, …, an image folder or a .npz/.pt file)")
    if launched_rank() == 0:
        origin = "the teacher's checkpoint" if name and name == (recorded.get("path") or recorded.get("name")) \
            else "--data or the config"
        print(f"[diffdistill] data: {name} (from {origin})" if reads
              else "[diffdistill] data: none (data-free with these options)", flush=True)
    return reads


@torch.no_grad()
def measure_sigma_data(cfg: dict, teacher, dataset=None, n: int = 2048) -> float:
    """σ_d, the data's standard deviation over every value, for a teacher that does not state it: from the run's
    data (``dataset``, or the data section when it names one), else from 512 of the teacher's own samples (its
    recorded sampling recipe); printed."""
    data = cfg.get("data") or {}
    if dataset is not None or data.get("path") or data.get("name"):
        x = (dataset if dataset is not None else dataset_from_config(data)).x
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]]
        origin = f"the data ({data.get('path') or data.get('name')})"
    else:
        if next(teacher.parameters()).device.type == "meta":
            raise UserError("the teacher does not state σ_data and a meta-device plan cannot sample it: give "
                            "--set net.sigma_data=S or --data")
        spec = dict((cfg.get("teacher") or {}).get("sampling") or {"sampler": "heun", "nfe": 35})
        if data.get("prompts"):
            spec["prompts"] = data["prompts"]
        x, _, _ = generate(teacher, range(512), spec, device=next(teacher.parameters()).device)
        origin = "512 of the teacher's samples"
    sigma_data = round(float(x.float().std()), 4)
    if launched_rank() == 0:
        print(f"[diffdistill] σ_data = {sigma_data} measured from {origin} (the teacher does not state it; "
              f"set --set net.sigma_data=S to fix it)", flush=True)
    return sigma_data


def distill(method: str, teacher_path, flags=None, config_file=None, overrides=None, supplements=(), on_sample=None,
            on_step=None, dry_run: bool = False, preset: str | None = None, teacher=None):
    """Build the trainer and train; with ``dry_run`` return the built trainer without training or writing.
    ``teacher``: (frozen denoiser, checkpoint-like dict with at least ``net_config``) to use instead of reading
    ``teacher_path`` — e.g. a network built on the meta device from a published config, to plan its memory."""
    device = ((flags or {}).get("run") or {}).get("device", "cpu")
    check_device(device, meta_ok=dry_run)  # before the teacher is moved there
    shape = ((flags or {}).get("teacher") or {}).get("sample_shape")   # a diffusers transformer's latent size
    if teacher is None:
        teacher, tstate = load_teacher(teacher_path, device, sample_shape=shape)
        tstate = without_weights(tstate)   # the weights are in the teacher; this record lives through the run
    else:
        teacher, tstate = teacher[0].to(device).eval().requires_grad_(False), \
            {"config": {}, "step": 0, "sampling": None, "role": "teacher", **teacher[1]}
    sigma_data_stated = tstate["net_config"].get("sigma_data") is not None
    cfg = distill_config(method, tstate, flags, config_file, overrides, preset=preset)
    if launched_rank() == 0:
        print(f"[diffdistill] {get_method(method).name}: preset {cfg['preset']['name']!r} "
              f"({cfg['preset']['file']})" + (f" + {config_file}" if config_file else ""), flush=True)
    cfg["teacher"] = {"path": str(teacher_path), "step": tstate["step"], "sampling": tstate["sampling"],
                      **({"sample_shape": list(shape)} if shape else {})}
    # Supplements named in the config (the ``el`` section: --el-weight / --set el.KEY=...) join the given ones.
    el = embedding_loss_from_config(cfg.get("el"), get_method(method))
    if el:
        cfg["el"] = el[0].options()   # the run's config records every EL option, defaults included
    supplements = list(supplements) + el
    dataset = dataset_from_config(cfg["data"]) if announce_data(method, cfg, tstate, supplements) else None
    if not sigma_data_stated:   # a teacher that does not state σ_d (DDPM-family diffusers): --set net.sigma_data
        given = cfg["net"].get("sigma_data")
        sigma_data = float(given) if given is not None else measure_sigma_data(cfg, teacher, dataset)
        cfg["net"] = {**cfg["net"], "sigma_data": sigma_data}
        teacher.sigma_data = sigma_data
    trainer = Trainer(cfg, teacher=teacher, teacher_path=str(teacher_path), dataset=dataset,
                      supplements=supplements, dry_run=dry_run)
    if dry_run:
        if trainer.device.type != "meta":   # the health check samples: nothing to look at on meta
            trainer.start_check()
        return trainer
    trainer.run(on_sample=on_sample, on_step=on_step)
    return trainer
