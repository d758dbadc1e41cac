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
    file_cfg = load_config_file(config_file) if config_file else {}
    cfg = deep_update(cfg, file_cfg)
    cfg = deep_update(cfg, flags or {})
    cfg = apply_overrides(cfg, overrides)
    cfg["method"]["name"] = method
    # Methods whose length follows from a schedule of their own (PD: halvings × iterations per halving) define
    # ``resolve_schedule(run, method, given)``; ``given`` holds the dotted keys set explicitly (file, flags, --set).
    resolve_schedule = getattr(cls, "resolve_schedule", None)
    if resolve_schedule is not None:
        given = {f"{sec}.{k}" for c in (file_cfg, flags or {}) for sec in ("run", "method") for k in (c.get(sec) or {})}
        given |= {str(o).split("=", 1)[0].strip() for o in overrides or []}
        resolve_schedule(cfg["run"], cfg["method"], given)
    validate_run(cfg["run"])
    # Methods that keep files of their own in the run directory (e.g. DMD's teacher pairs) take ``run_dir``.
    if "run_dir" in inspect.signature(cls.__init__).parameters:
        cfg["method"].setdefault("run_dir", str(cfg["run"]["out"]))
    # Methods whose defaults depend on the data set (CFD/RDD pick a classifier for it) take ``data_name``.
    if "data_name" in inspect.signature(cls.__init__).parameters:
        cfg["method"].setdefault("data_name", (cfg.get("data") or {}).get("name"))
    return cfg


def distill(method: str, teacher_path, flags=None, config_file=None, overrides=None, supplements=(), on_sample=None,
            on_step=None, dry_run: bool = False):
    """Build the trainer and train; with ``dry_run`` return the built trainer without training or writing."""
    from .train.trainer import Trainer
    from .config import check_device
    device = ((flags or {}).get("run") or {}).get("device", "cpu")
    check_device(device)  # before the teacher is moved there
    teacher, tstate = load_teacher(teacher_path, device)
    cfg = distill_config(method, tstate, flags, config_file, overrides)
    cfg["teacher"] = {"path": str(teacher_path), "step": tstate["step"], "sampling": tstate["sampling"]}
    # Supplements named in the config (the ``el`` section: --el-weight / --set el.KEY=...) join the given ones.
    from .methods.embedding_loss import embedding_loss_from_config
    el = embedding_loss_from_config(cfg.get("el"), get_method(method))
    if el:
        cfg["el"] = el[0].options()   # the run's config records every EL option, defaults included
    supplements = list(supplements) + el
    trainer = Trainer(cfg, teacher=teacher, teacher_path=str(teacher_path), supplements=supplements)
    if dry_run:
        return trainer
    trainer.run(on_sample=on_sample, on_step=on_step)
    return trainer
