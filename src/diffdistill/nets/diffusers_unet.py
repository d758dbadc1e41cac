"""A diffusers ``UNet2DModel`` as a Denoiser D(x; σ) (the files are read by ``io/diffusers.py``).

The preconditioning follows the model's scheduler config and prediction type. With ᾱ_t the cumulative product of
(1 − β_t) of a DDPM-family scheduler (DDPM, DDIM, PNDM, DPM-Solver, Euler …), the EDM noise level of timestep t is
σ_t = √((1 − ᾱ_t)/ᾱ_t), the network sees the VP input x/√(1 + σ²) (α = 1/√(1 + σ²)) and a fractional timestep
t(σ) interpolated linearly in ln σ over the table σ_0..σ_{T−1} (k-diffusion's discrete-schedule convention), and

    epsilon:      D = x − σ·ε̂                                  (c_skip 1,          c_out −σ)
    v_prediction: D = α²·x − σα·v̂ = x/(1+σ²) − σ/√(1+σ²)·v̂     (c_skip 1/(1+σ²),   c_out −σ/√(1+σ²))
    sample:       D = x̂₀                                       (c_skip 0,          c_out 1)

(v = α·ε − σ_vp·x₀ with σ_vp = σα, Salimans & Ho 2022). EDM-family schedulers (``EDMEulerScheduler``,
``EDMDPMSolverMultistepScheduler``) use EDM's preconditioning with their ``sigma_data`` and c_noise = ¼ ln σ, and
v_prediction flips the sign of c_out (diffusers' ``precondition_outputs``). Flow-matching schedulers
(``FlowMatchEulerDiscreteScheduler`` …, and DPM-Solver / UniPC configs with ``use_flow_sigmas`` and
``flow_prediction``, as SANA and Wan ship them) mean a velocity network v = ε − x₀ on x_t = (1 − t)x₀ + tε with
timestep t·num_train_timesteps: the flow preconditioning of ``diffusion/precond.py`` (``flow_coefficients``); their
``shift`` / ``flow_shift`` changes the sampling grid only (σ → shift·σ, ``shift_info``), not the network.
Text-to-image, latent DiT and video networks use the same preconditioning through ``nets/diffusers_cond.py``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..diffusion.precond import Precond, flow_coefficients
from ..errors import UserError

EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _require_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise UserError("diffusers teachers need the diffusers package: pip install -e '.[diffusers]'") from None


# ------------------------------------------------------------------------------------------------ schedules
def ddpm_alphas_cumprod(sched: dict) -> torch.Tensor:
    """ᾱ_t (length num_train_timesteps) of a DDPM-family scheduler config: ``trained_betas`` or ``beta_schedule``
    linear / scaled_linear / squaredcos_cap_v2 with ``beta_start``, ``beta_end``. Computed in float32 like
    diffusers' schedulers, so σ_t are the noise levels the model was trained with (returned as float64)."""
    T = int(sched.get("num_train_timesteps", 1000))
    b0, b1 = float(sched.get("beta_start", 1e-4)), float(sched.get("beta_end", 0.02))
    kind = sched.get("beta_schedule", "linear")
    if sched.get("trained_betas") is not None:
        betas = torch.tensor(sched["trained_betas"], dtype=torch.float32)
    elif kind == "linear":
        betas = torch.linspace(b0, b1, T, dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=torch.float32) ** 2
    elif kind == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine schedule, β capped at 0.999
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float32)
    else:
        raise UserError(f"unsupported beta_schedule {kind!r} in the scheduler config; supported: linear, "
                        f"scaled_linear, squaredcos_cap_v2 or trained_betas")
    if sched.get("rescale_betas_zero_snr"):
        raise UserError("rescale_betas_zero_snr schedulers (σ_max = ∞) are not supported")
    return torch.cumprod(1 - betas, 0).double()


class DiffusersPrecond(Precond):
    """D(x; σ) around a diffusers ``UNet2DModel`` (held by `UNet2DAdapter` as ``model``); see the module docstring.

    ``schedule``: ``{'family': 'ddpm', <scheduler config>}``, ``{'family': 'edm', 'sigma_data': …}`` or
    ``{'family': 'flow', …}``. ``time_scale`` (flow only): the network time is time_scale·t; default
    num_train_timesteps, what the scheduler's ``timesteps`` are (architectures whose pipeline rescales them,
    FLUX and SANA, give their own: ``nets/diffusers_cond.py``)."""

    kind = "diffusers"

    def __init__(self, model: nn.Module, img_channels: int, img_resolution: int, label_dim: int, schedule: dict,
                 prediction_type: str = "epsilon", sigma_data: float = 0.5, sigma_min: Optional[float] = None,
                 sigma_max: Optional[float] = None, time_scale: Optional[float] = None):
        family = schedule.get("family")
        if time_scale is not None and family != "flow":
            raise UserError(f"time_scale is a flow-matching setting; this schedule is {family!r}")
        self.time_scale = None if time_scale is None else float(time_scale)
        if family == "flow":   # a velocity network whatever the config says (flow schedulers name no type)
            prediction_type = "velocity"
        elif prediction_type not in PREDICTION_TYPES:
            raise UserError(f"unsupported prediction_type {prediction_type!r}; supported: {', '.join(PREDICTION_TYPES)}")
        self.schedule, self.prediction_type = dict(schedule), prediction_type
        if family == "ddpm":
            with torch.device("cpu"):   # a table of numbers even where the network is built on the meta device
                ac = ddpm_alphas_cumprod(self.schedule)
                table = ((1 - ac) / ac).sqrt()
            lo, hi = float(table[0]), float(table[-1])
        elif family == "edm":
            if prediction_type == "sample":
                raise UserError("EDM-family diffusers schedulers define epsilon and v_prediction only")
            sigma_data = float(self.schedule.get("sigma_data", 0.5))
            lo, hi = float(self.schedule.get("sigma_min", 0.002)), float(self.schedule.get("sigma_max", 80.0))
            table = None
        elif family == "flow":
            lo, hi, table = 0.002, 80.0, None
        else:
            raise UserError(f"unknown diffusers schedule family {family!r}")
        super().__init__(model, img_channels, img_resolution, label_dim, sigma_data,
                         max(0.002, lo) if sigma_min is None else sigma_min,
                         min(80.0, hi) if sigma_max is None else sigma_max)
        # ln σ of the training timesteps: numbers of the schedule, not of the network, so kept on the CPU (a copy
        # per device on first use) and valid even where the network lives on the meta device
        self._log_sigmas = {torch.device("cpu"): None if table is None else table.log().float()}
        self._timestep_sigmas = table   # float64 σ_t, t = 0..T−1 (DDPM family), else None

    def timestep_sigmas(self) -> Optional[torch.Tensor]:
        """σ_t = √((1 − ᾱ_t)/ᾱ_t) of the scheduler's training timesteps t = 0..T−1 (DDPM family; float64 from
        diffusers' float32 ᾱ_t), None for EDM and flow schedulers."""
        return None if self._timestep_sigmas is None else self._timestep_sigmas.clone()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional DDPM timestep of σ: linear interpolation in ln σ between neighbouring table entries
        (clamped to [0, T − 1])."""
        ls = self._log_sigmas.get(sigma.device)
        if ls is None:
            ls = self._log_sigmas[sigma.device] = self._log_sigmas[torch.device("cpu")].to(sigma.device)
        s = sigma.float().clamp(ls[0].exp(), ls[-1].exp()).log()
        hi = torch.searchsorted(ls, s.contiguous()).clamp(1, ls.numel() - 1)
        lo = hi - 1
        w = ((s - ls[lo]) / (ls[hi] - ls[lo])).clamp(0, 1)
        return lo.float() + w

    def coefficients(self, sigma):
        if self.schedule["family"] == "flow":
            scale = self.time_scale if self.time_scale is not None else self.schedule.get("num_train_timesteps", 1000)
            return flow_coefficients(sigma, "velocity", float(scale))
        if self.schedule["family"] == "edm":
            d2, s2 = self.sigma_data ** 2, sigma ** 2
            sign = -1.0 if self.prediction_type == "v_prediction" else 1.0
            return d2 / (s2 + d2), sign * sigma * self.sigma_data / (s2 + d2).sqrt(), 1 / (s2 + d2).sqrt(), \
                sigma.log() / 4
        c_in, t = 1 / (sigma ** 2 + 1).sqrt(), self.sigma_to_t(sigma)
        if self.prediction_type == "epsilon":
            return torch.ones_like(sigma), -sigma, c_in, t
        if self.prediction_type == "v_prediction":
            return 1 / (sigma ** 2 + 1), -sigma * c_in, c_in, t
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in, t

    def family(self) -> str:
        sc, fam = self.schedule, self.schedule["family"]
        if fam == "ddpm":
            what = f"DDPM {sc.get('beta_schedule', 'trained_betas')} T={sc.get('num_train_timesteps', 1000)}"
        elif fam == "flow":
            what = "flow matching"
        else:
            what = "EDM"
        pred = "velocity" if fam == "flow" else self.prediction_type
        return f"diffusers {sc.get('scheduler') or fam} ({what}, {pred})"

    def precond_config(self) -> dict:
        out = {"schedule": self.schedule, "prediction_type": self.prediction_type}
        if self.time_scale is not None:
            out["time_scale"] = self.time_scale
        return out


class UNet2DAdapter(nn.Module):
    """Calls a ``UNet2DModel`` as a raw network F(x_in, c_noise, one-hot labels): labels become class indices, a
    learned-variance output (2C channels) keeps its first C, and the bottleneck is the mid-block output."""

    def __init__(self, unet: nn.Module, out_channels: int):
        super().__init__()
        self.unet, self.out_channels = unet, out_channels
        self._feats = None

    def forward(self, x, c_noise, class_labels=None, return_bottleneck: bool = False, bottleneck_only: bool = False):
        idx = None if class_labels is None else class_labels.argmax(dim=1)
        hook = None
        if return_bottleneck or bottleneck_only:
            block = self.unet.mid_block if self.unet.mid_block is not None else self.unet.down_blocks[-1]
            hook = block.register_forward_hook(lambda m, i, o: setattr(self, "_feats", o[0] if isinstance(o, tuple) else o))
        try:
            out = self.unet(x, c_noise.float(), class_labels=idx).sample[:, :self.out_channels]
        finally:
            if hook is not None:
                hook.remove()
        feats, self._feats = self._feats, None
        if bottleneck_only:
            return feats
        return (out, feats) if return_bottleneck else out


def schedule_from_config(sched: dict) -> tuple[dict, str]:
    """({'family': …, …}, prediction_type) from a diffusers scheduler config."""
    name = sched.get("_class_name", "")
    pred = sched.get("prediction_type", "epsilon")
    if name in FLOW_SCHEDULERS:
        if sched.get("invert_sigmas"):
            raise UserError(f"{name} with invert_sigmas is not supported")
        keep = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
                "base_image_seq_len", "max_image_seq_len", "time_shift_type")
        return {"family": "flow", "scheduler": name, **{k: sched[k] for k in keep if k in sched}}, "velocity"
    if sched.get("use_flow_sigmas") or pred == "flow_prediction":
        # DPM-Solver / UniPC run on flow sigmas (SANA, Wan): a velocity network ("flow_prediction": x₀ = x_t −
        # t·v, scheduling_dpmsolver_multistep.py) on t = σ_flow; their flow_shift is the static shift s
        if not (sched.get("use_flow_sigmas") and pred == "flow_prediction"):
            raise UserError(f"{name}: use_flow_sigmas and prediction_type 'flow_prediction' go together; this "
                            f"config has use_flow_sigmas={sched.get('use_flow_sigmas')!r}, prediction_type {pred!r}")
        out = {"family": "flow", "scheduler": name, "shift": float(sched.get("flow_shift", 1.0))}
        for k in ("num_train_timesteps", "use_dynamic_shifting", "time_shift_type"):
            if k in sched:
                out[k] = sched[k]
        return out, "velocity"
    if name in EDM_SCHEDULERS:
        keep = ("sigma_min", "sigma_max", "sigma_data")
        return {"family": "edm", "scheduler": name, **{k: sched[k] for k in keep if k in sched}}, pred
    if any(k in sched for k in ("beta_schedule", "trained_betas", "beta_start")):
        keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr")
        return {"family": "ddpm", "scheduler": name, **{k: sched[k] for k in keep if k in sched}}, pred
    raise UserError(f"unsupported scheduler {name or '?'}: need a DDPM-family config (beta_schedule / trained_betas), "
                    f"an EDM scheduler ({', '.join(EDM_SCHEDULERS)}) or a flow-matching one "
                    f"({', '.join(FLOW_SCHEDULERS)})")


def shift_info(schedule: dict, image_seq_len: Optional[int] = None) -> Optional[dict]:
    """How a flow scheduler shifts its sampling grid, as the σ-space multiplier σ′ = m·σ (``shift_sigma``): static
    ``shift`` s (m = s), or FLUX / SD3.5's resolution-dependent shift: μ = ``calculate_shift(image_seq_len)`` of the
    pipelines (linear in the token count between (base_image_seq_len, base_shift) and (max_image_seq_len,
    max_shift); pipeline_flux.py:73-83), m = e^μ ("exponential" time_shift_type) or μ ("linear"): t′ = μ/(μ + 1/t − 1)
    is σ′ = μ·σ. For the sampler presets; the network does not depend on it. None for non-flow schedules."""
    if schedule.get("family") != "flow":
        return None
    if not schedule.get("use_dynamic_shifting"):
        s = float(schedule.get("shift", 1.0))
        return {"kind": "static", "shift": s, "sigma_scale": s}
    info = {"kind": "dynamic", "time_shift_type": schedule.get("time_shift_type", "exponential")}
    if image_seq_len is not None and schedule.get("scheduler") == "FlowMatchEulerDiscreteScheduler":
        b0, b1 = float(schedule.get("base_shift", 0.5)), float(schedule.get("max_shift", 1.15))
        n0, n1 = int(schedule.get("base_image_seq_len", 256)), int(schedule.get("max_image_seq_len", 4096))
        mu = image_seq_len * (b1 - b0) / (n1 - n0) + b0 - (b1 - b0) / (n1 - n0) * n0
        info.update({"image_seq_len": int(image_seq_len), "mu": mu,
                     "sigma_scale": math.exp(mu) if info["time_shift_type"] == "exponential" else mu})
    return info


def _unet_kwargs(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


def _check_unet(kw: dict, where) -> tuple[int, int, int]:
    if kw.get("time_embedding_type", "positional") != "positional":
        raise UserError(f"{where}: time_embedding_type {kw.get('time_embedding_type')!r} is not supported (only "
                        f"'positional' DDPM/EDM UNets; score-SDE Fourier UNets are not)")
    if kw.get("class_embed_type") is not None:
        raise UserError(f"{where}: class_embed_type {kw['class_embed_type']!r} is not supported (only "
                        f"num_class_embeds class labels)")
    size = kw.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise UserError(f"{where}: non-square sample_size {size} is not supported")
        size = size[0]
    C, out = int(kw.get("in_channels", 3)), int(kw.get("out_channels", 3))
    if out not in (C, 2 * C):
        raise UserError(f"{where}: out_channels {out} must equal in_channels {C} (or 2×, learned variance)")
    if not size:
        raise UserError(f"{where}: the UNet config has no sample_size (the image resolution)")
    return C, int(size), int(kw.get("num_class_embeds") or 0)


def build_diffusers_denoiser(cfg: dict) -> DiffusersPrecond:
    """Rebuild from a ``net_config`` with ``arch: diffusers_unet2d`` (fresh weights; load the state dict after)."""
    _require_diffusers()
    from diffusers import UNet2DModel  # optional heavy dependency: imported only for diffusers networks
    kw = dict(cfg.get("kwargs", {}))
    C, R, L = _check_unet(kw, "net_config")
    unet = UNet2DModel.from_config(kw)
    pk = dict(cfg.get("precond_kwargs") or {})
    return DiffusersPrecond(UNet2DAdapter(unet, C), C, R, L, schedule=pk["schedule"],
                            prediction_type=pk.get("prediction_type", "epsilon"),
                            sigma_data=cfg.get("sigma_data") or 0.5, sigma_min=cfg.get("sigma_min"),
                            sigma_max=cfg.get("sigma_max"))


