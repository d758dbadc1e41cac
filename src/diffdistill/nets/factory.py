"""Build a Denoiser (a preconditioner around a raw network) from a plain config dict stored in every checkpoint."""

from __future__ import annotations

from ..diffusion.precond import PRECONDS, Precond
from ..errors import UserError
from .dhariwalunet import DhariwalUNet
from .diffusers_unet import build_diffusers_denoiser
from .mlp import MLPDenoiserNet
from .songunet import SongUNet

ARCHS = ("songunet", "dhariwalunet", "mlp", "diffusers_unet2d")


def build_denoiser(cfg: dict) -> Precond:
    """cfg: ``arch`` ('songunet' | 'dhariwalunet' | 'mlp' | 'diffusers_unet2d'), ``img_channels``,
    ``img_resolution`` (0 for points), ``label_dim``, ``sigma_data``, ``sigma_min``, ``sigma_max``, the
    architecture's own keyword arguments under ``kwargs``, and optionally ``precond`` ('edm', the default; 'vp';
    've'; 'diffusers') with its keyword arguments under ``precond_kwargs``."""
    arch = cfg.get("arch")
    kw = dict(cfg.get("kwargs", {}))
    C, R, L = int(cfg["img_channels"]), int(cfg.get("img_resolution", 0)), int(cfg.get("label_dim", 0))
    if arch == "diffusers_unet2d":  # a diffusers UNet2DModel: its preconditioning comes from its scheduler
        return build_diffusers_denoiser(cfg)
    if arch == "songunet":
        model = SongUNet(img_resolution=R, in_channels=C, out_channels=C, label_dim=L, **kw)
    elif arch == "dhariwalunet":
        model = DhariwalUNet(img_resolution=R, in_channels=C, out_channels=C, label_dim=L, **kw)
    elif arch == "mlp":
        model = MLPDenoiserNet(dim=C, label_dim=L, **kw)
    else:
        raise UserError(f"unknown network architecture {arch!r}; use one of {', '.join(ARCHS)}")
    kind = cfg.get("precond", "edm")
    if kind not in PRECONDS:
        raise UserError(f"unknown preconditioning {kind!r}; use one of {', '.join(PRECONDS)}")
    return PRECONDS[kind](model, img_channels=C, img_resolution=R, label_dim=L,
                          sigma_data=cfg.get("sigma_data", 0.5), sigma_min=cfg.get("sigma_min", 0.002),
                          sigma_max=cfg.get("sigma_max", 80.0), **dict(cfg.get("precond_kwargs") or {}))


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())
