"""Build a Denoiser (a preconditioner around a raw network) from a plain config dict stored in every checkpoint."""

from __future__ import annotations

from ..diffusion.precond import PRECONDS, Precond
from ..errors import UserError
from .dhariwalunet import DhariwalUNet
from .diffusers_cond import build_cond_denoiser
from .diffusers_unet import build_diffusers_denoiser
from .mlp import MLPDenoiserNet
from .songunet import SongUNet

ARCHS = ("songunet", "dhariwalunet", "mlp", "diffusers_unet2d", "diffusers_cond")
# Architecture arguments that are sizes (a zero or negative value is a mistake, refused before torch sees it).
SIZE_KWARGS = ("model_channels", "channel_mult", "channel_mult_emb", "channel_mult_noise", "num_blocks", "hidden",
               "depth")


def build_denoiser(cfg: dict) -> Precond:
    """`_build` below, plus ``default_guidance`` (a net that takes the guidance scale as input: the scale it samples
    at when ``--guidance`` is not given, e.g. a w-conditioned student's; recorded in its ``net_config``)."""
    net = _build(cfg)
    if cfg.get("default_guidance") is not None:
        net.default_guidance = float(cfg["default_guidance"])
    return net


def _build(cfg: dict) -> Precond:
    """cfg: ``arch`` ('songunet' | 'dhariwalunet' | 'mlp' | 'diffusers_unet2d' | 'diffusers_cond': a diffusers
    text-to-image / DiT / video network named by ``class_name``), ``img_channels``,
    ``img_resolution`` (0 for points), ``label_dim``, ``sigma_data``, ``sigma_min``, ``sigma_max``, the
    architecture's own keyword arguments under ``kwargs``, and optionally ``precond`` ('edm', the default; 'vp';
    've'; 'diffusers') with its keyword arguments under ``precond_kwargs``."""
    arch = cfg.get("arch")
    kw = dict(cfg.get("kwargs", {}))
    C, R, L = int(cfg["img_channels"]), int(cfg.get("img_resolution", 0)), int(cfg.get("label_dim", 0))
    if arch == "diffusers_unet2d":  # a diffusers UNet2DModel: its preconditioning comes from its scheduler
        return build_diffusers_denoiser(cfg)
    if arch == "diffusers_cond":    # UNet2DConditionModel, SD3/FLUX/SANA/DiT/Wan transformers (nets/diffusers_cond.py)
        return build_cond_denoiser(cfg)
    builders = {"songunet": lambda: SongUNet(img_resolution=R, in_channels=C, out_channels=C, label_dim=L, **kw),
                "dhariwalunet": lambda: DhariwalUNet(img_resolution=R, in_channels=C, out_channels=C, label_dim=L,
                                                     **kw),
                "mlp": lambda: MLPDenoiserNet(dim=C, label_dim=L, **kw)}
    if arch not in builders:
        raise UserError(f"unknown network architecture {arch!r}; use one of {', '.join(ARCHS)}")
    sizes = [(k, v) for k, v in kw.items() if k in SIZE_KWARGS]
    bad = [f"{k}={v!r}" for k, v in sizes
           if any(not isinstance(x, bool) and isinstance(x, (int, float)) and x <= 0
                  for x in (v if isinstance(v, (list, tuple)) else [v]))]
    if C <= 0 or R < 0 or L < 0 or bad:
        raise UserError(f"net: sizes must be positive, got {', '.join(bad) or f'img_channels={C}, img_resolution={R}'}"
                        f"; fix net.kwargs / the net section")
    try:
        model = builders[arch]()
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError, AssertionError) as e:
        raise UserError(f"cannot build the {arch} network from net.kwargs {kw}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''}; fix net.kwargs") from None
    kind = cfg.get("precond", "edm")
    if kind not in PRECONDS:
        raise UserError(f"unknown preconditioning {kind!r}; use one of {', '.join(PRECONDS)}")
    net = PRECONDS[kind](model, img_channels=C, img_resolution=R, label_dim=L,
                         sigma_data=cfg.get("sigma_data", 0.5), sigma_min=cfg.get("sigma_min", 0.002),
                         sigma_max=cfg.get("sigma_max", 80.0), **dict(cfg.get("precond_kwargs") or {}))
    if kw.get("guidance_embed") and getattr(model, "map_prompt", None) is None:
        raise UserError("net.kwargs.guidance_embed (the guidance scale as an input) needs a network conditioned on "
                        "prompt embeddings: set net.kwargs.embed_dim too")
    if getattr(model, "map_prompt", None) is not None:   # conditioned on prompt embeddings (kwargs.embed_dim)
        tokens = int(cfg.get("prompt_tokens") or 0)
        if tokens <= 0 or L:
            raise UserError("a network with kwargs.embed_dim takes prompt embeddings: set net.prompt_tokens (the "
                            "embeddings' sequence length) and net.label_dim=0")
        net.embedding_signature = model.map_prompt.signature(tokens)
    return net


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())
