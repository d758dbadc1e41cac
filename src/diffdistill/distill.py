"""Set up a distillation run: load the frozen teacher, derive the student's network and data from it, merge the
method's preset for the data kind, and hand everything to the one Trainer."""

from __future__ import annotations

import inspect

from .config import RUN_DEFAULTS, apply_overrides, deep_update, load_config_file, validate_run
from .errors import UserError
from .methods.registry import get_method


def load_teacher(path, device="cpu"):
    """(frozen teacher Denoiser in eval mode, its checkpoint dict)."""
    from .eval.evaluate import load_for_sampling
    net, state = load_for_sampling(path, device)
    if state.get("role") != "teacher":
        raise UserError(f"{path} is a {state.get('role')} checkpoint ({state.get('method')}); --teacher needs a "
                        f"checkpoint written by train-teacher")
    return net, state


def distill_config(method: str, teacher_state: dict, flags=None, config_file=None, overrides=None) -> dict:
    cls = get_method(method)
    tcfg = teacher_state["config"]
    kind = "points" if not teacher_state["net_config"].get("img_resolution") else "images"
    cfg = {"run": deep_update(RUN_DEFAULTS, {"out": f"runs/{method}"}), "data": dict(tcfg.get("data") or {}),
           "net": teacher_state["net_config"], "method": {"name": method}}
    cfg = deep_update(cfg, getattr(cls, "presets", {}).get(kind, {}))
    if config_file:
        cfg = deep_update(cfg, load_config_file(config_file))
    cfg = deep_update(cfg, flags or {})
    cfg = apply_overrides(cfg, overrides)
    cfg["method"]["name"] = method
    validate_run(cfg["run"])
    # Methods that keep files of their own in the run directory (e.g. DMD's teacher pairs) take ``run_dir``.
    if "run_dir" in inspect.signature(cls.__init__).parameters:
        cfg["method"].setdefault("run_dir", str(cfg["run"]["out"]))
    return cfg


def distill(method: str, teacher_path, flags=None, config_file=None, overrides=None, supplements=(), on_sample=None):
    from .train.trainer import Trainer
    device = ((flags or {}).get("run") or {}).get("device", "cpu")
    teacher, tstate = load_teacher(teacher_path, device)
    cfg = distill_config(method, tstate, flags, config_file, overrides)
    cfg["teacher"] = {"path": str(teacher_path), "step": tstate["step"], "sampling": tstate["sampling"]}
    trainer = Trainer(cfg, teacher=teacher, teacher_path=str(teacher_path), supplements=supplements)
    trainer.run(on_sample=on_sample)
    return trainer
