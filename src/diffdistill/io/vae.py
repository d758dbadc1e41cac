"""A pipeline's VAE as the bridge between pixels and the latents a teacher works in, with the latent convention
its diffusers pipeline applies (so latents encoded here are the ones the teacher was trained on, and decoding
here gives the images the pipeline would show):

* encode: z = (posterior mean − shift_factor) · scaling_factor (or a posterior sample instead of the mean:
  ``sample_posterior``), as diffusers' training scripts and img2img pipelines do;
* decode: x = vae.decode(z / scaling_factor + shift_factor) (pipeline_stable_diffusion.py:1085,
  pipeline_stable_diffusion_3.py:1141, pipeline_flux.py:962: shift_factor is None → 0 for SD1.x/2.x/SDXL).

``AutoencoderKL`` (SD, SDXL, SD3, FLUX) and ``AutoencoderDC`` (SANA: a deterministic ``latent``, scaling only,
pipeline_sana.py:961) are read; the Wan video VAE is not (yet). Pixels are float [-1, 1], [B, C, H, W].
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import UserError
from .checkpoint import file_sha256

VAE_CLASSES = ("AutoencoderKL", "AutoencoderDC")


def quiet_loading() -> None:
    """No loading progress bars from diffusers / transformers: a CLI error stays one line, logs stay readable."""
    from diffusers.utils import logging as dlog
    dlog.disable_progress_bar()
    try:
        from transformers.utils import logging as tlog
        tlog.disable_progress_bar()
    except ImportError:   # a VAE alone needs no transformers
        pass


def _class_of(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def find_vae_folder(path) -> Path | None:
    """The VAE folder of a pipeline folder (``vae/``), of one of its component folders (``../vae``), or the VAE
    folder itself; None when there is none."""
    p = Path(path)
    if not p.is_dir():
        return None
    if (p / "vae" / "config.json").is_file():
        return p / "vae"
    if p.name in ("unet", "transformer") and (p.parent / "vae" / "config.json").is_file():
        return p.parent / "vae"
    return p if _class_of(p) in VAE_CLASSES + ("AutoencoderKLWan",) else None


def weights_sha256(folder) -> str:
    """One sha256 over a model folder's config and weight files (name + content, sorted): what a cache of its
    outputs is keyed by."""
    folder = Path(folder)
    files = sorted(f for f in folder.iterdir() if f.is_file() and (f.name == "config.json" or f.suffix in
                                                                   (".safetensors", ".bin")))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + file_sha256(f)[0].encode() + b"\n")
    return h.hexdigest()


class LatentCodec:
    """A loaded VAE with its pipeline's scale and shift (module docstring)."""

    def __init__(self, folder, device="cpu"):
        folder = Path(folder)
        name = _class_of(folder)
        if name == "AutoencoderKLWan":
            raise UserError(f"{folder}: the Wan video VAE (AutoencoderKLWan) is not supported yet: encode and "
                            f"decode Wan latents outside diffdistill")
        if name not in VAE_CLASSES:
            raise UserError(f"{folder} is not a VAE folder diffdistill reads ({name or 'no config.json'}); "
                            f"supported: {', '.join(VAE_CLASSES)}")
        import diffusers  # optional dependency
        quiet_loading()
        try:
            vae = getattr(diffusers, name).from_pretrained(str(folder), local_files_only=True)
        except Exception as e:
            msg = str(e).splitlines()[0][:160] if str(e) else ""
            raise UserError(f"cannot load the {name} in {folder}: {type(e).__name__}: {msg}") from None
        self.vae = vae.to(device, torch.float32).eval().requires_grad_(False)   # fp16 weights upcast
        self.folder, self.name, self.device = folder, name, torch.device(device)
        cfg = vae.config
        self.scaling_factor = float(cfg.get("scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(cfg.get("shift_factor") or 0.0)
        self.in_channels = int(cfg.get("in_channels", 3))
        self.latent_channels = int(cfg.get("latent_channels", 4))
        blocks = cfg.get("block_out_channels") or cfg.get("encoder_block_out_channels")
        self.factor = 2 ** (len(blocks) - 1)   # the pipelines' vae_scale_factor
        self.deterministic = name == "AutoencoderDC"
        self._sha = None

    @property
    def sha256(self) -> str:
        if self._sha is None:
            self._sha = weights_sha256(self.folder)
        return self._sha

    def describe(self) -> dict:
        return {"vae": str(self.folder.resolve()), "vae_class": self.name, "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor, "vae_factor": self.factor}

    @torch.no_grad()
    def encode(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Latents of pixels ``x`` [B, C, H, W] in [-1, 1]: the posterior mean, or mean + std·``noise`` (a posterior
        sample with the caller's noise, so each image's draw depends on its own seed only)."""
        out = self.vae.encode(x.to(self.device, torch.float32))
        if self.deterministic:
            if noise is not None:
                raise UserError(f"--sample-posterior: the {self.name} encodes deterministically (no posterior)")
            z = out.latent
        else:
            post = out.latent_dist
            z = post.mean if noise is None else post.mean + post.std * noise.to(post.mean.device)
        return ((z - self.shift_factor) * self.scaling_factor).float().cpu()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels (unclamped, ≈ [-1, 1]) of latents ``z`` as the pipeline decodes them."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise UserError(f"the {self.name} in {self.folder} decodes [B, {self.latent_channels}, h, w] latents; "
                            f"these samples have shape {list(z.shape[1:])}: this VAE is not the teacher's")
        x = self.vae.decode(z.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor).sample
        return x.float()

    def decode_batched(self, z: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        return torch.cat([self.decode(z[i:i + batch_size]).cpu() for i in range(0, len(z), batch_size)])


def teacher_folder_of(state: dict) -> Path | None:
    """The diffusers folder a checkpoint's network came from: a diffusers teacher's own ``source.folder``; for a
    student, its recorded teacher path (a folder, or a converted teacher .safetensors whose metadata names the
    folder). None when it records none (a teacher trained here)."""
    src = state.get("source") or {}
    if src.get("folder"):
        return Path(src["folder"])
    tp = state.get("teacher_path") or ((state.get("config") or {}).get("teacher") or {}).get("path")
    if not tp:
        return None
    p = Path(tp)
    if p.is_dir():
        return p
    if p.suffix == ".safetensors" and p.is_file():
        from safetensors import safe_open
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
            folder = (json.loads(meta.get("source", "null")) or {}).get("folder")
        except Exception:   # not ours to validate here: the teacher itself is not read for sampling
            return None
        return Path(folder) if folder else None
    return None


def latent_codec_for(state: dict, vae=None, device="cpu", required: bool = False) -> LatentCodec | None:
    """The VAE that decodes a checkpoint's samples: ``vae`` (a VAE or pipeline folder) when given, else the VAE of
    the teacher's diffusers folder; None when there is none (``required``: a one-line error instead)."""
    if vae is not None:
        folder = find_vae_folder(vae)
        if folder is None:
            raise UserError(f"--vae {vae}: no VAE there (a pipeline folder with vae/, or a VAE folder with "
                            f"config.json)")
        return LatentCodec(folder, device)
    teacher = teacher_folder_of(state)
    folder = find_vae_folder(teacher) if teacher is not None else None
    if folder is None:
        if required:
            why = (f"its teacher folder {teacher} has no vae/" if teacher is not None
                   else "it records no diffusers teacher folder")
            raise UserError(f"--decode: no VAE for this checkpoint ({why}): give one with --vae DIR")
        return None
    name = _class_of(folder)
    if not required and name not in VAE_CLASSES:   # e.g. an LDM pipeline's VQModel: its samples stay latents
        import sys
        print(f"diffdistill: warning: {folder} holds a {name}, which diffdistill does not decode (it reads "
              f"{', '.join(VAE_CLASSES)}): the samples stay latents", file=sys.stderr)
        return None
    return LatentCodec(folder, device)
