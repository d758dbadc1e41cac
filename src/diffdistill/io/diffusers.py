"""diffusers folders: load a local ``UNet2DModel`` folder as a teacher (``local_files_only``; nothing is
downloaded) and export a student of such a teacher as a diffusers folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from ..nets.diffusers_unet import (DiffusersPrecond, UNet2DAdapter, _check_unet, _require_diffusers, _unet_kwargs,
                                   build_diffusers_denoiser, schedule_from_config)
from .checkpoint import file_sha256


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {p}: {type(e).__name__}") from None


def locate(path) -> tuple[Path, Path]:
    """(UNet folder, scheduler config file) of a pipeline folder (``unet/`` + ``scheduler/``) or of a UNet folder
    with a ``scheduler_config.json`` beside its ``config.json`` (or in ``../scheduler/``)."""
    p = Path(path)
    unet_dir = p / "unet" if (p / "unet" / "config.json").is_file() else p
    if not (unet_dir / "config.json").is_file():
        raise UserError(f"{p} is not a diffusers UNet2DModel folder (no config.json, no unet/config.json)")
    for cand in (p / "scheduler" / "scheduler_config.json", unet_dir / "scheduler_config.json",
                 unet_dir.parent / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            return unet_dir, cand
    raise UserError(f"no scheduler config for {p}: the noise schedule and prediction type come from it; give the "
                    f"pipeline folder (with scheduler/scheduler_config.json) or put scheduler_config.json next to "
                    f"config.json")


def load_diffusers_teacher(path, dropout: float | None = None) -> dict:
    """Checkpoint-like dict (role 'teacher') of a local diffusers folder; weights read with local_files_only."""
    _require_diffusers()
    from diffusers import UNet2DModel  # optional heavy dependency
    unet_dir, sched_path = locate(path)
    unet_cfg = _read_json(unet_dir / "config.json")
    if unet_cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise UserError(f"{unet_dir} holds a {unet_cfg['_class_name']}; only UNet2DModel (pixel-space, "
                        f"unconditional or class-conditional) is supported")
    schedule, pred = schedule_from_config(_read_json(sched_path))
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True, low_cpu_mem_usage=False)
    except Exception as e:  # missing weights file, corrupted safetensors, …
        raise UserError(f"cannot load the UNet2DModel in {unet_dir}: {type(e).__name__}: {str(e)[:160]}") from None
    kw = _unet_kwargs(unet.config)
    if dropout is not None:
        kw["dropout"] = float(dropout)
    C, R, L = _check_unet(kw, unet_dir)
    net = DiffusersPrecond(UNet2DAdapter(unet, C), C, R, L, schedule=schedule, prediction_type=pred)
    cfg = {"arch": "diffusers_unet2d", "img_channels": C, "img_resolution": R, "label_dim": L,
           # σ_d: EDM-family schedulers state it; a DDPM-family one does not, so a run measures it (None here)
           "sigma_data": net.sigma_data if schedule["family"] == "edm" else None, "sigma_min": net.sigma_min, "sigma_max": net.sigma_max, "kwargs": kw,
           "precond": "diffusers", "precond_kwargs": net.precond_config()}
    weights = sorted(unet_dir.glob("diffusion_pytorch_model*.safetensors")) or sorted(unet_dir.glob("*.bin"))
    return {"format": "diffusers", "method": "diffusers", "role": "teacher", "step": 0, "net_config": cfg,
            "sample_net": {k: v.detach().contiguous() for k, v in net.state_dict().items()},
            "sampling": {"sampler": "heun", "nfe": 35}, "config": {"data": {}}, "teacher_path": None,
            "source": {"format": "diffusers UNet2DModel", "folder": str(Path(path)),
                       "scheduler": schedule.get("scheduler"), "prediction_type": pred,
                       "weights_sha256": file_sha256(weights[0])[0] if weights else None}}


# ------------------------------------------------------------------------------------------------ export
def export_diffusers(state: dict, out_dir) -> dict:
    """Write a checkpoint whose network is a diffusers UNet2DModel as a diffusers folder: ``unet/`` (config +
    safetensors, ``UNet2DModel.from_pretrained`` loads it), ``scheduler/scheduler_config.json`` (the teacher's
    schedule and prediction type) and ``diffdistill_sampling.json`` (the student's σ list with, per step, the
    UNet's timestep and input scale, so a few lines of diffusers code reproduce `diffdistill sample`)."""
    cfg = state["net_config"]
    if cfg.get("arch") != "diffusers_unet2d":
        raise UserError(f"--format diffusers needs a network that is a diffusers UNet2DModel (a student of a "
                        f"diffusers teacher); this one is {cfg.get('arch')!r}, which has no UNet2DModel layout: "
                        f"export it as .safetensors")
    net = build_diffusers_denoiser(cfg)
    net.load_state_dict(state["sample_net"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net.model.unet.save_pretrained(str(out / "unet"), safe_serialization=True)
    sched = {k: v for k, v in net.schedule.items() if k not in ("family", "scheduler")}
    sched.update({"_class_name": net.schedule.get("scheduler") or ("EDMEulerScheduler" if net.schedule["family"] == "edm"
                                                                  else "DDPMScheduler")})
    if net.schedule["family"] != "flow":   # flow schedulers have no prediction_type (always velocity)
        sched["prediction_type"] = net.prediction_type
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    spec = state.get("sampling") or {}
    steps = []
    for s in spec.get("sigmas") or []:
        sig = torch.tensor([float(s)])
        c_skip, c_out, c_in, c_noise = (float(torch.as_tensor(c).reshape(-1)[0]) for c in net.coefficients(sig))
        steps.append({"sigma": float(s), "timestep": c_noise, "input_scale": c_in, "c_skip": c_skip, "c_out": c_out})
    info = {"role": state.get("role"), "method": state.get("method"), "sampler": spec.get("sampler"),
            "steps": steps, "prediction_type": net.prediction_type,
            "denoised": "x0 = c_skip * x + c_out * unet(input_scale * x, torch.tensor([timestep])).sample "
                        "(timestep as a float tensor: UNet2DModel truncates a Python float to an integer)"}
    if spec.get("sampler") == "multistep":
        info["multistep"] = ("x = sigma_0 * randn; per step k: x0 = denoised(x, k); x = x0 + sigma_{k+1} * randn "
                             "(last step: output x0)")
    (out / "diffdistill_sampling.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
