"""Export a student of a diffusers text-to-image / latent DiT / video teacher (``arch: diffusers_cond``) as a
diffusers pipeline folder that diffusers' own pipeline class loads and samples exactly as `diffdistill sample` does.

What is written (``export_cond_pipeline``):

- ``unet/`` or ``transformer/``: the student's network in its original class and ``save_pretrained`` layout;
- ``scheduler/scheduler_config.json``: a scheduler whose loop, given the student's σ list, is the student's sampler
  (the teacher's noise schedule and prediction type):

  ======================================= ======================================== ===============================
  student                                 scheduler (pipeline argument)            why it is the same loop
  ======================================= ======================================== ===============================
  DDPM-family teacher, 1 step, or a        ``EulerDiscreteScheduler``,              Euler's last step to σ = 0 is
  deterministic Euler/DDIM grid            ``sigmas=[σ_0, …, 0]`` (fractional        x + (0 − σ)(x − D)/σ = D; its
                                           timesteps by ln σ interpolation, as       ``init_noise_sigma`` is σ_0 with
                                           ours)                                     ``timestep_spacing: trailing``
  DDPM-family teacher, K > 1 steps         ``LCMScheduler``, ``timesteps=[t_k]``     x ← √ᾱ′·D + √(1 − ᾱ′)·ε is our
  (multistep: re-noise to σ_{k+1})         (integers: exact when every σ_k is the    x ← D + σ′·ε in VP space;
                                           teacher's σ at an integer timestep)       ``timestep_scaling`` 1e5 turns
                                                                                     LCM's boundary terms off
  flow teacher (SD3, FLUX, SANA)           ``FlowMatchEulerDiscreteScheduler``,      shift 1 (our σ's already hold
                                           ``sigmas=[t_k]``, t = σ/(1 + σ);          the shift); its stochastic
                                           K > 1: ``stochastic_sampling``            step is (1 − t′)·x̂₀ + t′·ε
  ======================================= ======================================== ===============================

- ``model_index.json``: the teacher pipeline's own (its other components — text encoders, tokenizers, VAE — are
  hard-linked or copied from the teacher folder), or, for a bare network folder, the pipeline class diffusers pairs
  the network with and ``null`` components (pass them to ``from_pretrained``: ``text_encoder=None``, …);
- ``diffdistill_sampling.json``: the σ list, per step the network timestep, input scale, c_skip and c_out (a manual
  loop for any class), guidance and shift, and ``pipeline``: the call that reproduces `diffdistill sample`.

The pipeline's own noise draw is replaced by ``latents = latents_scale · z`` with z the seed's standard-normal draw
(``torch.randn(shape, generator=torch.Generator().manual_seed(seed))``): the pipelines start at t = 1 or scale by
their own init sigma, and our students start at σ_0 < ∞.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from ..nets.diffusers_cond import build_cond_denoiser
from ..nets.diffusers_unet import shift_info

# component class → the pipeline class diffusers pairs it with, when the teacher folder names none
DEFAULT_PIPELINES = {"UNet2DConditionModel": "StableDiffusionPipeline",
                     "SD3Transformer2DModel": "StableDiffusion3Pipeline",
                     "FluxTransformer2DModel": "FluxPipeline", "SanaTransformer2DModel": "SanaPipeline",
                     "DiTTransformer2DModel": "DiTPipeline", "Transformer2DModel": "DiTPipeline",
                     "WanTransformer3DModel": "WanPipeline"}
# Pipelines whose __call__ takes custom sigmas / timesteps and initial latents (diffusers 0.42), with: whether
# they pass their generator to scheduler.step (the re-noise draw of a multistep student), how latents are given,
# and the VAE down-sampling factor they assume without a VAE.
PIPELINE_LOOPS = {
    # pipeline_stable_diffusion.py:620-622, 713 (latents × init_noise_sigma); _xl.py:607-609, 728
    "StableDiffusionPipeline": {"step_generator": True, "vae_factor": 8},
    "StableDiffusionXLPipeline": {"step_generator": True, "vae_factor": 8},
    # pipeline_stable_diffusion_3.py:1113, pipeline_flux.py:933: scheduler.step(noise_pred, t, latents) only
    "StableDiffusion3Pipeline": {"step_generator": False, "vae_factor": 8},
    "FluxPipeline": {"step_generator": False, "vae_factor": 8, "packed": True},
    # pipeline_sana.py:423-425 (extra_step_kwargs), 215-219 (32 without a VAE), 440 (height % 32)
    "SanaPipeline": {"step_generator": True, "vae_factor": 32, "sana": True},
}
WHY_NOT = {"DiTPipeline": "DiTPipeline sets its timesteps from num_inference_steps only and draws its own unscaled "
                          "latents (pipeline_dit.py:166-179)",
           "WanPipeline": "WanPipeline sets its timesteps from num_inference_steps only (pipeline_wan.py:554), "
                          "which start at t = 1"}
# Condition field → the pipelines' argument
CONDITION_ARGS = {"embeds": "prompt_embeds", "pooled": "pooled_prompt_embeds", "mask": "prompt_attention_mask",
                  "extra.guidance": "guidance_scale (FLUX's embedded guidance: one value per call)",
                  "extra.time_ids": "original_size + crops_coords_top_left + target_size (SDXL: one per call)"}
LCM_TIMESTEP_SCALING = 1e5   # LCM's c_skip = σ_d²/((t·s)² + σ_d²) ≈ 0 and c_out ≈ 1 for t ≥ 1: a plain denoiser
INTEGER_TOLERANCE = 1e-3     # |t(σ) − round(t(σ))| below which σ is the teacher's σ at that integer timestep


def _link_or_copy(src, dst):
    """Hard link (no extra disk for multi-GB text encoders) where the file system allows it, else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _teacher_root(state: dict) -> Path | None:
    """The teacher's diffusers folder: the recorded teacher path, or the folder a converted teacher
    (.safetensors from convert-teacher) was made from."""
    p = state.get("teacher_path")
    if not p:
        return None
    p = Path(p)
    if p.is_dir():
        return p
    if p.suffix == ".safetensors" and p.is_file():
        from safetensors import safe_open
        try:
            with safe_open(str(p), framework="pt") as f:
                src = json.loads((f.metadata() or {}).get("source") or "{}")
        except (OSError, ValueError, RuntimeError):   # unreadable: no components to copy (the report says so)
            return None
        folder = src.get("folder")
        return Path(folder) if folder and Path(folder).is_dir() else None
    return None


def _is_component(v) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and (v[0] is None or isinstance(v[0], str))


def _pipeline_class(name: str):
    import diffusers
    return getattr(diffusers, name, None)


def _vae_factor(vae_cfg: dict | None, pipe: str) -> int:
    loop = PIPELINE_LOOPS.get(pipe, {})
    if not vae_cfg:
        return int(loop.get("vae_factor", 8))
    if loop.get("sana"):
        return 2 ** (len(vae_cfg.get("encoder_block_out_channels") or [0]) - 1)
    return 2 ** (len(vae_cfg.get("block_out_channels") or [0]) - 1)


def _steps_table(net, sigmas) -> list:
    steps = []
    for s in sigmas:
        c_skip, c_out, c_in, c_noise = (float(torch.as_tensor(c).reshape(-1)[0])
                                        for c in net.coefficients(torch.tensor([float(s)])))
        row = {"sigma": float(s), "timestep": c_noise, "input_scale": c_in, "c_skip": c_skip, "c_out": c_out}
        if net.schedule["family"] == "flow":
            row["t"] = float(s) / (1 + float(s))
        steps.append(row)
    return steps


def _ddpm_config(net) -> dict:
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    return {**{k: net.schedule[k] for k in keep if k in net.schedule}, "prediction_type": net.prediction_type,
            "steps_offset": 1}


def scheduler_plan(net, spec: dict) -> tuple[dict, dict | None, str | None]:
    """(scheduler config, the pipeline's sampling arguments or None, why None) for a student's sampling spec:
    see the module docstring's table."""
    family, sampler = net.schedule["family"], spec.get("sampler")
    sigmas = [float(s) for s in spec.get("sigmas") or []]
    if not sigmas:
        return ({"_class_name": net.schedule.get("scheduler") or "EulerDiscreteScheduler"}, None,
                f"a {spec.get('sampler')} sampler with no σ list (a teacher): no fixed schedule to export")
    multistep = sampler == "multistep"
    pos = [s for s in sigmas if s > 0]
    if sampler not in ("multistep", "euler", "ddim"):
        why = (f"the {sampler} sampler (consistency boundary coefficients and clamping) has no diffusers scheduler "
               f"that reproduces it")
        return {"_class_name": "EulerDiscreteScheduler", **(_ddpm_config(net) if family == "ddpm" else {})}, None, why
    if family == "ddpm":
        if not multistep or len(pos) == 1:
            grid = [pos[0], 0.0] if multistep else sigmas
            cfg = {"_class_name": "EulerDiscreteScheduler", **_ddpm_config(net), "timestep_spacing": "trailing",
                   "interpolation_type": "linear", "use_karras_sigmas": False, "final_sigmas_type": "zero",
                   "timestep_type": "discrete"}
            # latents × init_noise_sigma = σ_0 (timestep_spacing trailing): z itself is passed
            return cfg, {"scheduler_args": {"sigmas": grid}, "latents_scale": 1.0, "renoise": False}, None
        t = net.sigma_to_t(torch.tensor(pos, dtype=torch.float32)).double()
        ints = t.round()
        cfg = {"_class_name": "LCMScheduler", **_ddpm_config(net), "timestep_scaling": LCM_TIMESTEP_SCALING,
               "original_inference_steps": int(net.schedule.get("num_train_timesteps", 1000)),
               "clip_sample": False, "thresholding": False, "timestep_spacing": "leading"}
        if (t - ints).abs().max() > INTEGER_TOLERANCE:
            return cfg, None, (f"the student's σ's {[round(s, 6) for s in pos]} lie between the teacher's timesteps "
                               f"(t = {[round(float(v), 3) for v in t]}); LCMScheduler, the diffusers scheduler "
                               f"that re-noises fully between steps, takes integer timesteps: distil with --set "
                               f"method.sigmas=[...] at integer timesteps (README) or run manual_loop")
        s0 = pos[0]
        return cfg, {"scheduler_args": {"timesteps": [int(v) for v in ints]},
                     "latents_scale": s0 / (1 + s0 * s0) ** 0.5, "renoise": True}, None   # VP input: LCM's σ_init 1
    if family == "flow":
        if not multistep and sigmas[-1] != 0:
            return ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, None,
                    f"FlowMatchEulerDiscreteScheduler always ends at t = 0; this grid ends at σ = {sigmas[-1]:g}")
        ts = [s / (1 + s) for s in pos]
        cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler",
               "num_train_timesteps": int(net.schedule.get("num_train_timesteps", 1000)), "shift": 1.0,
               "use_dynamic_shifting": False, "stochastic_sampling": bool(multistep and len(pos) > 1)}
        # the pipelines take latents as given: x_t0 = x_σ0/(1 + σ_0) = t_0·z
        return cfg, {"scheduler_args": {"sigmas": ts}, "latents_scale": ts[0],
                     "renoise": bool(multistep and len(pos) > 1)}, None
    return ({"_class_name": net.schedule.get("scheduler") or "EDMEulerScheduler"}, None,
            f"{family}-family schedules are not mapped to a diffusers pipeline by this exporter")


def _model_index(root: Path | None, out: Path, name: str, component: str, sched_class: str, sdxl: bool) -> tuple:
    """(model_index dict, components copied, components left null that the pipeline needs passed)."""
    import diffusers
    src = {}
    if root is not None:
        for d in (root, root.parent):
            if (d / "model_index.json").is_file():
                src = json.loads((d / "model_index.json").read_text())
                root = d
                break
    copied = []
    if src:
        index = dict(src)
        for key, v in src.items():
            if key in (component, "scheduler") or not _is_component(v) or v[0] is None:
                continue
            if (root / key).is_dir():
                shutil.copytree(root / key, out / key, copy_function=_link_or_copy)
                copied.append(key)
            else:
                index[key] = [None, None]
    else:
        pipe = DEFAULT_PIPELINES[name]
        if pipe == "StableDiffusionPipeline" and sdxl:
            pipe = "StableDiffusionXLPipeline"
        index = {"_class_name": pipe}
        cls = _pipeline_class(pipe)
        if cls is not None:
            expected, _ = cls._get_signature_keys(cls)
            index.update({k: [None, None] for k in sorted(expected)})
        if pipe == "StableDiffusionPipeline":
            index["requires_safety_checker"] = False
    index.update({"_diffusers_version": diffusers.__version__, component: ["diffusers", name],
                  "scheduler": ["diffusers", sched_class]})
    cls = _pipeline_class(index["_class_name"])
    optional = set(getattr(cls, "_optional_components", []) or []) if cls is not None else set()
    missing = sorted(k for k, v in index.items() if _is_component(v) and v[0] is None and k not in optional)
    return index, copied, missing


def export_cond_pipeline(state: dict, out_dir) -> dict:
    """Write a student of a ``diffusers_cond`` teacher as a diffusers pipeline folder (module docstring); returns
    the content of ``diffdistill_sampling.json``."""
    cfg = state["net_config"]
    net = build_cond_denoiser(cfg)
    net.load_state_dict(state["sample_net"])
    net.eval()
    name, adapter = cfg["class_name"], net.model
    component = adapter.component
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter.net.save_pretrained(str(out / component), safe_serialization=True)

    spec = dict(state.get("sampling") or {})
    sched_cfg, plan, why = scheduler_plan(net, spec)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_cfg, indent=2) + "\n")

    root = _teacher_root(state)
    index, copied, missing = _model_index(root, out, name, component, sched_cfg["_class_name"],
                                          getattr(adapter, "sdxl", False))
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    pipe = index["_class_name"]

    shape = [int(v) for v in net.sample_shape]
    sigmas = [float(s) for s in spec.get("sigmas") or []]
    method_cfg = ((state.get("config") or {}).get("method") or {})
    teacher_guidance = {k: v for k, v in method_cfg.items() if "guidance" in k and isinstance(v, (int, float))}
    signature = net.embedding_signature or {}
    info = {"role": state.get("role"), "method": state.get("method"), "class_name": name, "component": component,
            "sampler": spec.get("sampler"), "sigmas": sigmas, "sample_shape": shape,
            "prediction_type": net.prediction_type, "steps": _steps_table(net, sigmas),
            "guidance": {"baked_in": any(float(v) != 1.0 for v in teacher_guidance.values()),
                         "teacher_guidance_in_training": teacher_guidance,
                         "sampling_guidance_scale": float(spec.get("guidance", 1.0)),
                         "note": "the student samples without classifier-free guidance (one network call per "
                                 "step): the teacher's guidance, if any, is baked in by training; call the pipeline "
                                 "with guidance_scale=1"},
            "shift": {"teacher": shift_info(net.schedule, math.prod(s // p for s, p in
                                                                    zip(shape[1:], adapter.patch()))),
                      "note": "already in the σ list; the exported scheduler has shift 1 and no dynamic shift"},
            "manual_loop": ("x = sigmas[0]*z; per step k: x0 = c_skip*x + c_out*F(input_scale*x, timestep, cond) "
                            "(F: the component called as its pipeline calls it, with this timestep as given); "
                            + ("x = x0 + sigmas[k+1]*randn (multistep; last step: output x0)"
                               if spec.get("sampler") == "multistep" else
                               "x = x0 + (sigmas[k+1]/sigmas[k])*(x - x0) (Euler/DDIM; output x at the last σ)")),
            "teacher_folder": str(root) if root is not None else None, "copied_components": copied}
    loop = PIPELINE_LOOPS.get(pipe)
    if plan is not None and loop is None:
        plan, why = None, WHY_NOT.get(pipe, f"this exporter does not know {pipe}'s sampling loop; it reproduces "
                                            f"{', '.join(PIPELINE_LOOPS)}")
    if plan is None:
        info["pipeline"], info["pipeline_note"] = None, why
    else:
        vae_cfg = None
        if (out / "vae" / "config.json").is_file():
            vae_cfg = json.loads((out / "vae" / "config.json").read_text())
        f = _vae_factor(vae_cfg, pipe)
        kwargs = {**plan["scheduler_args"], "output_type": "latent", "height": shape[-2] * f, "width": shape[-1] * f}
        if not (loop.get("packed") and "extra.guidance" in signature):   # FLUX: guidance_scale is the embedded one
            kwargs["guidance_scale"] = 1.0
        if loop.get("sana"):
            kwargs["use_resolution_binning"] = False
        renoise = None
        if plan["renoise"]:
            renoise = ("the pipeline's generator (pass the seeds' generators, after z was drawn from them)"
                       if loop["step_generator"] else
                       "torch's global RNG: this pipeline does not pass its generator to scheduler.step, so the "
                       "re-noise draws are the seed's only for one seed per call on the CPU, after "
                       "torch.manual_seed(seed) drew z" + ("; FLUX draws them in its packed token layout, so they "
                                                           "are equal in distribution only" if loop.get("packed")
                                                           else ""))
        info["pipeline"] = {"class": pipe, "scheduler": sched_cfg["_class_name"], "kwargs": kwargs,
                            "latents_scale": plan["latents_scale"], "pack_latents": bool(loop.get("packed")),
                            **({"packing": "pass latents=FluxPipeline._pack_latents(latents_scale*z, B, C, H, W); "
                                           "output_type='latent' returns packed tokens: FluxPipeline."
                                           "_unpack_latents(images, height, width, pipe.vae_scale_factor)"}
                               if loop.get("packed") else {}),
                            "missing_components": missing,
                            "condition_args": {k: CONDITION_ARGS.get(k, k) for k in signature},
                            "renoise": renoise}
    (out / "diffdistill_sampling.json").write_text(json.dumps(info, indent=2) + "\n")
    info["written"] = [f"{component}/", "scheduler/", "model_index.json"] + [f"{c}/" for c in copied]
    return info

