"""diffusers folders: load a local diffusers network folder as a teacher (``local_files_only``; nothing is
downloaded) — a pixel ``UNet2DModel``, or a text-to-image / latent DiT / video network (``nets/diffusers_cond.py``:
``UNet2DConditionModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ``SanaTransformer2DModel``,
``DiTTransformer2DModel``, ``Transformer2DModel``, ``WanTransformer3DModel``) — and export a student of a
``UNet2DModel`` teacher as a diffusers folder (students of the others: ``io/diffusers_export.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from ..nets.diffusers_unet import (DiffusersPrecond, UNet2DAdapter, _check_unet, _require_diffusers, _unet_kwargs,
                                   build_diffusers_denoiser, schedule_from_config, shift_info)
from .checkpoint import file_sha256
from ..nets import diffusers_cond as dc
from .diffusers_export import export_cond_pipeline

COMPONENTS = ("unet", "transformer")   # the pipeline sub-folders that hold the denoising network


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {p}: {type(e).__name__}") from None


def locate(path) -> tuple[Path, Path]:
    """(network folder, scheduler config file) of a pipeline folder (``unet/`` or ``transformer/`` +
    ``scheduler/``) or of a network folder with a ``scheduler_config.json`` beside its ``config.json`` (or in
    ``../scheduler/``)."""
    p = Path(path)
    found = [p / c for c in COMPONENTS if (p / c / "config.json").is_file()]
    if len(found) > 1:
        raise UserError(f"{p} holds both {' and '.join(f.name + '/' for f in found)}: give the network folder itself")
    net_dir = found[0] if found else p
    if not (net_dir / "config.json").is_file():
        raise UserError(f"{p} is not a diffusers model folder (no config.json, unet/config.json or "
                        f"transformer/config.json)")
    for cand in (p / "scheduler" / "scheduler_config.json", net_dir / "scheduler_config.json",
                 net_dir.parent / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            return net_dir, cand
    raise UserError(f"no scheduler config for {p}: the noise schedule and prediction type come from it; give the "
                    f"pipeline folder (with scheduler/scheduler_config.json) or put scheduler_config.json next to "
                    f"config.json")


def _weights(d: Path) -> list:
    return sorted(d.glob("diffusion_pytorch_model*.safetensors")) or sorted(d.glob("*.bin"))


def load_diffusers_teacher(path, dropout: float | None = None, sample_shape=None, weights: bool = True) -> dict:
    """Checkpoint-like dict (role 'teacher') of a local diffusers folder; weights read with local_files_only.
    ``sample_shape``: the latent shape of one sample for networks that take any size (default: the config's
    ``sample_size``, or the pipeline's default for FLUX and Wan); pixel UNet2DModels have theirs fixed.
    ``weights=False``: the network is built from its config on the meta device and no weights file is read (or
    needed): a folder holding only the published ``config.json`` files plans a model's memory (``--dry-run
    --device meta``) without downloading it; ``sample_net`` is then empty."""
    _require_diffusers()
    net_dir, sched_path = locate(path)
    name = _read_json(net_dir / "config.json").get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        return _load_cond_teacher(Path(path), net_dir, sched_path, name, dropout, sample_shape, weights)
    if sample_shape is not None:
        raise UserError("sample_shape: a UNet2DModel's sample shape is its config's (in_channels, sample_size)")
    from diffusers import UNet2DModel  # optional heavy dependency
    schedule, pred = schedule_from_config(_read_json(sched_path))
    try:
        unet = (UNet2DModel.from_pretrained(str(net_dir), local_files_only=True, low_cpu_mem_usage=False) if weights
                else _on_meta(UNet2DModel, net_dir))
    except Exception as e:  # missing weights file, corrupted safetensors, …
        raise UserError(f"cannot load the UNet2DModel in {net_dir}: {type(e).__name__}: {str(e)[:160]}") from None
    kw = _unet_kwargs(unet.config)
    if dropout is not None:
        kw["dropout"] = float(dropout)
    C, R, L = _check_unet(kw, net_dir)
    net = DiffusersPrecond(UNet2DAdapter(unet, C), C, R, L, schedule=schedule, prediction_type=pred)
    cfg = {"arch": "diffusers_unet2d", "img_channels": C, "img_resolution": R, "label_dim": L,
           # σ_d: EDM-family schedulers state it; a DDPM-family one does not, so a run measures it (None here)
           "sigma_data": net.sigma_data if schedule["family"] == "edm" else None, "sigma_min": net.sigma_min,
           "sigma_max": net.sigma_max, "kwargs": kw, "precond": "diffusers", "precond_kwargs": net.precond_config()}
    files = _weights(net_dir) if weights else []
    return {"format": "diffusers", "method": "diffusers", "role": "teacher", "step": 0, "net_config": cfg,
            "sample_net": _state(net, weights),
            "sampling": {"sampler": "heun", "nfe": 35}, "config": {"data": {}}, "teacher_path": None,
            "source": {"format": "diffusers UNet2DModel", "folder": str(Path(path)),
                       "scheduler": schedule.get("scheduler"), "prediction_type": pred,
                       "weights_sha256": file_sha256(files[0])[0] if files else None}}


def _on_meta(cls, net_dir: Path, **kwargs):
    """The network of ``net_dir`` built from its config alone, on the meta device (shapes, no memory)."""
    with torch.device("meta"):
        return cls.from_config({**cls.load_config(str(net_dir)), **kwargs})


def _state(net, weights: bool) -> dict:
    return {k: v.detach().contiguous() for k, v in net.state_dict().items()} if weights else {}


def _pipeline_info(root: Path, net_dir: Path) -> dict:
    """model_index.json of the pipeline folder holding ``net_dir`` ({} for a bare network folder)."""
    for d in (root, net_dir.parent):
        if (d / "model_index.json").is_file():
            return _read_json(d / "model_index.json")
    return {}


def _wan_default_shape(adapter, kw: dict, root: Path, net_dir: Path) -> tuple:
    """WanPipeline's default latent (81 frames of 480×832) with the folder's VAE factors where it has a VAE."""
    for d in (root / "vae", net_dir.parent / "vae"):
        if (d / "config.json").is_file():
            v = _read_json(d / "config.json")
            return adapter.default_sample_shape(kw, int(v.get("scale_factor_temporal", 4)),
                                                int(v.get("scale_factor_spatial", 8)))
    return adapter.default_sample_shape(kw)


def _load_cond_teacher(root: Path, net_dir: Path, sched_path: Path, name: str, dropout, sample_shape,
                       weights: bool = True) -> dict:
    kw = _unet_kwargs(_read_json(net_dir / "config.json"))
    dc.check_config(name, kw, net_dir)          # unsupported class / variant: refused before the weights are read
    schedule, pred = schedule_from_config(_read_json(sched_path))
    info = _pipeline_info(root, net_dir)
    if info.get("transformer_2") not in (None, [None, None]) and net_dir.name == "transformer":
        raise UserError(f"{root} is a two-expert pipeline (transformer and transformer_2 switch at boundary_ratio "
                        f"{info.get('boundary_ratio')}): one Denoiser cannot hold both; this is not supported")
    adapter = {"time_ids": 5} if name == "UNet2DConditionModel" and info.get("requires_aesthetics_score") else None
    if dropout is not None and float(dropout) != 0:
        if "dropout" not in kw:
            raise UserError(f"--dropout: the {name} config has no dropout setting")
    extra = {"dropout": float(dropout)} if dropout is not None and "dropout" in kw else {}
    try:
        model = (dc.model_class(name).from_pretrained(str(net_dir), local_files_only=True, **extra) if weights
                 else _on_meta(dc.model_class(name), net_dir, **extra))
    except UserError:
        raise
    except Exception as e:  # missing weights file, corrupted safetensors, …
        raise UserError(f"cannot load the {name} in {net_dir}: {type(e).__name__}: {str(e)[:160]}") from None
    model = model.float().eval()
    name = type(model).__name__   # diffusers loads a DiT-layout Transformer2DModel as a DiTTransformer2DModel
    if sample_shape is None and name == "WanTransformer3DModel":
        sample_shape = _wan_default_shape(dc.WanAdapter, _unet_kwargs(model.config), root, net_dir)
    net = dc.wrap(model, name, schedule, pred, adapter, sample_shape, where=net_dir)
    cfg = dc.net_config(net, name)
    grid = [s // p for s, p in zip(net.sample_shape[1:], net.model.patch())]
    files = _weights(net_dir) if weights else []
    return {"format": "diffusers", "method": "diffusers", "role": "teacher", "step": 0, "net_config": cfg,
            "sample_net": _state(net, weights),
            "sampling": {"sampler": "heun", "nfe": 35}, "config": {"data": {}}, "teacher_path": None,
            "source": {"format": f"diffusers {name}", "folder": str(root), "component": net_dir.name,
                       "pipeline": info.get("_class_name"), "scheduler": schedule.get("scheduler"),
                       "prediction_type": pred,
                       "timestep": (f"{net.time_scale:g}·t, t = σ/(1+σ)" if net.time_scale is not None
                                    else "the DDPM timestep t(σ)" if schedule["family"] == "ddpm" else "¼·ln σ"),
                       "shift": shift_info(schedule, int(torch.tensor(grid).prod())),
                       "conditioning": net.embedding_signature or ({"labels": net.label_dim} if net.label_dim
                                                                   else None),
                       "weights_sha256": file_sha256(files[0])[0] if files else None}}


# ------------------------------------------------------------------------------------------------ export
def export_diffusers(state: dict, out_dir) -> dict:
    """Write a checkpoint whose network is a diffusers UNet2DModel as a diffusers folder (a ``diffusers_cond``
    network: a pipeline folder, ``export_cond_pipeline``): ``unet/`` (config +
    safetensors, ``UNet2DModel.from_pretrained`` loads it), ``scheduler/scheduler_config.json`` (the teacher's
    schedule and prediction type) and ``diffdistill_sampling.json`` (the student's σ list with, per step, the
    UNet's timestep and input scale, so a few lines of diffusers code reproduce `diffdistill sample`)."""
    cfg = state["net_config"]
    if cfg.get("arch") == "diffusers_cond":   # text-to-image / latent DiT / video: a full pipeline folder
        return export_cond_pipeline(state, out_dir)
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
    return {**info, "written": ["unet/", "scheduler/"]}
