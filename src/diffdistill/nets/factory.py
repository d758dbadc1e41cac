"""Build a Denoiser (EDMPrecond around a raw network) from a plain config dict stored in every checkpoint."""

from __future__ import annotations

from ..diffusion.precond import EDMPrecond
from ..errors import UserError


def build_denoiser(cfg: dict) -> EDMPrecond:
    """cfg: ``arch`` ('songunet' | 'mlp'), ``img_channels``, ``img_resolution`` (0 for points), ``label_dim``,
    ``sigma_data``, ``sigma_min``, ``sigma_max`` and the architecture's own keyword arguments under ``kwargs``."""
    arch = cfg.get("arch")
    kw = dict(cfg.get("kwargs", {}))
    C, R, L = int(cfg["img_channels"]), int(cfg.get("img_resolution", 0)), int(cfg.get("label_dim", 0))
    if arch == "songunet":
        from .songunet import SongUNet
        model = SongUNet(img_resolution=R, in_channels=C, out_channels=C, label_dim=L, **kw)
    elif arch == "mlp":
        from .mlp import MLPDenoiserNet
        model = MLPDenoiserNet(dim=C, label_dim=L, **kw)
    else:
        raise UserError(f"unknown network architecture {arch!r}; use 'songunet' (images) or 'mlp' (2-D points)")
    return EDMPrecond(model, img_channels=C, img_resolution=R, label_dim=L,
                      sigma_data=cfg.get("sigma_data", 0.5), sigma_min=cfg.get("sigma_min", 0.002),
                      sigma_max=cfg.get("sigma_max", 80.0))


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())
