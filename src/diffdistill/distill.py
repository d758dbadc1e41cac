"""Set up a distillation run: load the frozen teacher, derive the student's network and data from it, merge the
method's preset for the data kind, and hand everything to the one Trainer."""

from __future__ import annotations

from .config import (RUN_DEFAULTS, apply_overrides, check_device, deep_update, given_keys, list_presets,
                     load_config_file, load_preset, preset_path, validate_run)
from .io import load_teacher
from .methods.embedding_loss import embedding_loss_from_config
from .methods.registry import get_method
from .train.distributed import launched_rank
from .train.trainer import Trainer


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


def distill(method: str, teacher_path, flags=None, config_file=None, overrides=None, supplements=(), on_sample=None,
            on_step=None, dry_run: bool = False, preset: str | None = None):
    """Build the trainer and train; with ``dry_run`` return the built trainer without training or writing."""
    device = ((flags or {}).get("run") or {}).get("device", "cpu")
    check_device(device)  # before the teacher is moved there
    teacher, tstate = load_teacher(teacher_path, device)
    cfg = distill_config(method, tstate, flags, config_file, overrides, preset=preset)
    if launched_rank() == 0:
        print(f"[diffdistill] {get_method(method).name}: preset {cfg['preset']['name']!r} "
              f"({cfg['preset']['file']})" + (f" + {config_file}" if config_file else ""), flush=True)
    cfg["teacher"] = {"path": str(teacher_path), "step": tstate["step"], "sampling": tstate["sampling"]}
    # Supplements named in the config (the ``el`` section: --el-weight / --set el.KEY=...) join the given ones.
    el = embedding_loss_from_config(cfg.get("el"), get_method(method))
    if el:
        cfg["el"] = el[0].options()   # the run's config records every EL option, defaults included
    supplements = list(supplements) + el
    trainer = Trainer(cfg, teacher=teacher, teacher_path=str(teacher_path), supplements=supplements)
    if dry_run:
        return trainer
    trainer.run(on_sample=on_sample, on_step=on_step)
    return trainer
