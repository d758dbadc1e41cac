"""Teachers trained elsewhere: NVlabs/edm snapshots (`edm_pickle`) and diffusers ``UNet2DModel`` folders
(`diffusers_unet`), turned into this package's Denoisers and checkpoint-like dicts."""

from __future__ import annotations

from pathlib import Path


def load_foreign_teacher(path, dropout: float | None = None) -> dict | None:
    """The checkpoint-like dict of an EDM ``.pkl`` or a diffusers folder; None for this package's own formats."""
    p = Path(path)
    if p.suffix == ".pkl":
        from .edm_pickle import load_edm_snapshot
        return load_edm_snapshot(p, dropout=dropout)
    if p.is_dir() and any((p / f).is_file() for f in ("config.json", "unet/config.json", "model_index.json")):
        from .diffusers_unet import load_diffusers_teacher
        return load_diffusers_teacher(p, dropout=dropout)
    return None


def convert_teacher(src, out, dropout: float | None = None, verify: bool = True) -> dict:
    """Write an EDM snapshot or diffusers folder as this package's teacher ``.safetensors`` (weights + JSON
    metadata, loadable by ``distill --teacher``, ``sample``, ``eval``) plus ``OUT.json`` with the same metadata.
    ``verify`` reloads the written file and checks D(x; σ) equals the source network's on a fixed batch."""
    import json

    import torch

    from ..errors import UserError
    from ..eval.evaluate import EXPORT_KEYS, load_for_sampling
    from ..nets.factory import build_denoiser
    from ..train.checkpoint import export_safetensors
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"convert-teacher writes safetensors: give an output path ending in .safetensors, not {out}")
    state = load_foreign_teacher(src, dropout)
    if state is None:
        raise UserError(f"{src}: convert-teacher takes an NVlabs/edm snapshot (.pkl) or a diffusers UNet2DModel folder")
    meta = {k: state.get(k) for k in EXPORT_KEYS}
    meta["source"] = state["source"]
    export_safetensors(state["sample_net"], out, meta)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    if verify:
        src_net = build_denoiser(state["net_config"])
        src_net.load_state_dict(state["sample_net"])
        net, _ = load_for_sampling(out)
        g = torch.Generator().manual_seed(0)
        x = torch.randn((2,) + tuple(net.sample_shape), generator=g)
        sigma = torch.tensor([0.5, 10.0])
        labels = torch.eye(net.label_dim)[:2] if net.label_dim else None
        with torch.no_grad():
            diff = (src_net.eval()(x, sigma, labels) - net(x, sigma, labels)).abs().max().item()
        if diff != 0:
            raise UserError(f"{out}: the reloaded teacher differs from the source by {diff:.3g}; please report this")
        meta["verified_max_abs_diff"] = diff
    return meta
