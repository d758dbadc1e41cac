"""Every model file this package reads, behind one call: ``load_model_file(path)`` returns the checkpoint-like
dict (``net_config``, ``sample_net``, ``sampling``, ``role``, ``method``, ``config``, …) of

- a diffdistill training checkpoint (``.pt``, verified against its sha256 manifest),
- an exported ``.safetensors`` (weights + JSON metadata, ``diffdistill export`` / ``convert-teacher``),
- an NVlabs/edm network snapshot (``.pkl``, read by a restricted unpickler: its code never runs),
- a local diffusers folder (``local_files_only``): a pixel ``UNet2DModel``, or a text-to-image / latent DiT /
  video network (``UNet2DConditionModel``, SD3 / FLUX / SANA / DiT / Wan transformers; ``nets/diffusers_cond.py``).

A LoRA student's checkpoint holds its adapter only: loading it reads the base teacher from the recorded path and
merges the adapter in (``with_merged_lora``), so every reader gets a plain student.
``load_for_sampling`` builds the network from it; ``load_teacher`` also checks the file holds a teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError
from ..lora import merged_network, peft_config, weights_fingerprint
from ..nets.diffusers_cond import example_condition
from ..nets.factory import build_denoiser
from .checkpoint import atomic_write, export_safetensors, load_checkpoint
from .diffusers import load_diffusers_teacher
from .edm_pickle import load_edm_snapshot

# The metadata an exported .safetensors carries beside the weights.
EXPORT_KEYS = ("method", "role", "step", "config", "net_config", "sampling", "teacher_path")


def is_diffusers_folder(p: Path) -> bool:
    return p.is_dir() and any((p / f).is_file() for f in ("config.json", "unet/config.json", "transformer/config.json",
                                                          "model_index.json"))


def is_run_folder(p: Path) -> bool:
    return p.is_dir() and ((p / "checkpoints").is_dir() or (p / "config.json").is_file() and (p / "log.jsonl").exists())


def load_foreign_teacher(path, dropout: float | None = None, sample_shape=None, weights: bool = True) -> dict | None:
    """The checkpoint-like dict of an EDM ``.pkl`` or a diffusers folder; None for this package's own formats.
    ``sample_shape``: the latent shape of a diffusers network that takes any size; ``weights=False``: a diffusers
    folder's network from its config alone (``load_diffusers_teacher``)."""
    p = Path(path)
    if p.suffix == ".pkl":
        return load_edm_snapshot(p, dropout=dropout)
    if is_diffusers_folder(p) and not is_run_folder(p):
        return load_diffusers_teacher(p, dropout=dropout, sample_shape=sample_shape, weights=weights)
    return None


def load_exported(path) -> dict:
    """The checkpoint-like dict of an exported .safetensors file (``sample_net`` + metadata)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"weights file not found: {p} (give the path of a .safetensors file written by "
                        f"'diffdistill export', or a checkpoint .pt)")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"cannot read {p}: {type(e).__name__}; the file is corrupted or not safetensors") from None
    if "net_config" not in meta:
        raise UserError(f"{p} has no diffdistill metadata (net_config); export it with 'diffdistill export'")
    state = {k: json.loads(v) for k, v in meta.items()}
    state["sample_net"] = tensors
    return state


def load_model_file(path, sample_shape=None, weights: bool = True) -> dict:
    """The checkpoint-like dict of any model file this package reads (see the module docstring); ``sample_shape``
    and ``weights=False`` (no weights read) for diffusers folders only (``load_diffusers_teacher``)."""
    p = Path(path)
    if is_run_folder(p):
        raise UserError(f"{p} is a diffdistill run folder, not a model file: give one of its checkpoints "
                        f"({p}/checkpoints/ckpt-*.pt) or an exported .safetensors")
    state = load_foreign_teacher(p, sample_shape=sample_shape, weights=weights)
    if state is None and sample_shape is not None:
        raise UserError(f"sample_shape: {p} records its network's sample shape; it is set for diffusers folders only")
    if state is None:
        state = load_exported(p) if p.suffix == ".safetensors" else load_checkpoint(p)
    return with_merged_lora(state, p)


def with_merged_lora(state: dict, where) -> dict:
    """A LoRA checkpoint (``sample_net`` an adapter, ``lora`` its record) with its base teacher loaded from the
    recorded path, checked against the recorded weights fingerprint, and the adapter merged in: ``sample_net``
    becomes the full student's weights (``lora.merged`` true), so it loads as a plain student. Other states are
    returned unchanged."""
    rec = state.get("lora")
    if not rec or rec.get("merged"):
        return state
    base = rec.get("base") or {}
    path = base.get("path")
    if not path or not Path(path).exists():
        raise UserError(f"{where} is a LoRA checkpoint: it holds the adapter only, and its base teacher "
                        f"{path or '(not recorded)'} is not there: put the teacher back at that path (the merged "
                        f"export, 'diffdistill export', needs it too)")
    net = build_denoiser(state["net_config"])
    teacher = load_model_file(path)
    if teacher.get("role") != "teacher":
        raise UserError(f"{where}: its base {path} is a {teacher.get('role')} checkpoint, not the teacher the LoRA "
                        f"adapter was trained on: put that teacher back at the path")
    net.load_state_dict(teacher["sample_net"])
    found = weights_fingerprint(net.state_dict())
    if found != base.get("fingerprint"):
        raise UserError(f"{where}: the teacher at {path} is not the base its LoRA adapter was trained on (weights "
                        f"fingerprint {found}, recorded {base.get('fingerprint')}): put that teacher back at the path")
    merged = merged_network(net, rec, state["sample_net"])
    return {**state, "sample_net": merged.state_dict(), "lora": {**rec, "merged": True}}


def load_for_sampling(path, device="cpu", sample_shape=None):
    """(denoiser in eval mode, checkpoint dict) of any model file. On the meta device (a ``--dry-run`` memory
    plan) the network is built there from its config: a diffusers folder needs its ``config.json`` files only."""
    meta = torch.device(device).type == "meta"
    state = load_model_file(path, sample_shape=sample_shape, weights=not meta)
    if meta:
        with torch.device("meta"):
            net = build_denoiser(state["net_config"])
    else:
        net = build_denoiser(state["net_config"])
        net.load_state_dict(state["sample_net"])
    return net.to(device).eval().requires_grad_(False), state


# the parts of a checkpoint dict that hold weights: a teacher .pt from train-teacher carries its whole training
# state (network, EMA copy, Adam's two moments: 4× the teacher's size), an exported file the sampling weights
_WEIGHTS = ("sample_net", "method_state", "supplement_state")


def without_weights(state: dict) -> dict:
    """A checkpoint dict's record without its weights (once a network is built from them): a caller that keeps the
    record through a run would otherwise keep a second copy of the teacher — four with a training checkpoint."""
    return {k: v for k, v in state.items() if k not in _WEIGHTS}


def load_teacher(path, device="cpu", sample_shape=None):
    """(frozen teacher Denoiser in eval mode, its checkpoint dict); a student checkpoint is refused.
    ``sample_shape``: the latent shape of a diffusers network that takes any size (e.g. a Wan video's (C, F, H, W))."""
    net, state = load_for_sampling(path, device, sample_shape)
    if state.get("role") != "teacher":
        raise UserError(f"{path} is a {state.get('role')} checkpoint ({state.get('method')}); --teacher needs a "
                        f"checkpoint written by train-teacher, an EDM .pkl or a diffusers folder")
    return net, state


def export_checkpoint(ckpt_path, out_path, extra_metadata: dict | None = None) -> dict:
    """Write the sampling weights of a checkpoint as safetensors, with everything needed to rebuild and sample
    the network as JSON metadata (method, role, step, config, net_config, sampling recipe)."""
    state = with_merged_lora(load_checkpoint(ckpt_path), ckpt_path)   # a LoRA student: merged into its base
    meta = {k: state.get(k) for k in EXPORT_KEYS}
    if state.get("lora"):
        meta["lora"] = state["lora"]   # provenance: how it was trained (the weights are the merged student's)
    meta.update(extra_metadata or {})
    export_safetensors(state["sample_net"], out_path, meta)
    return meta


def _diffusers_key(key: str) -> str:
    """A Denoiser-relative module path or key of a diffusers student as diffusers' LoRA files name it (``unet.``,
    ``transformer.``)."""
    for part in ("unet", "transformer"):
        if key.startswith(f"model.{part}."):
            return key[len("model."):]
    return key


def export_lora_adapter(ckpt_path, out_dir) -> dict:
    """Write a LoRA checkpoint's adapter as peft writes one: ``OUT/adapter_model.safetensors`` (peft's keys, as
    ``get_peft_model_state_dict`` gives them for the Denoiser; for a diffusers UNet the ``unet.`` keys of diffusers'
    LoRA files) and ``OUT/adapter_config.json`` (the ``LoraConfig``), plus ``OUT/diffdistill_lora.json`` (the base
    teacher, network config and sampling recipe). Returns that metadata."""
    state = load_checkpoint(ckpt_path)
    rec = state.get("lora")
    if not rec:
        raise UserError(f"{ckpt_path} holds no LoRA adapter (it was not trained with lora.rank): export --format "
                        f"safetensors writes its full weights")
    diffusers = (state.get("net_config") or {}).get("arch") in ("diffusers_unet2d", "diffusers_cond")
    rename = _diffusers_key if diffusers else (lambda k: k)
    tensors = {rename(k): v.detach().contiguous().cpu() for k, v in state["sample_net"].items()}
    # diffusers' LoRA config is relative to the UNet, this package's to the Denoiser
    targets = [rename(t).removeprefix("unet.").removeprefix("transformer.") if diffusers else t
               for t in rec["target_modules"]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {**{k: state.get(k) for k in EXPORT_KEYS}, "lora": rec,
            "keys": "diffusers (unet.… / transformer.…)" if diffusers else "Denoiser (peft: get_peft_model_state_dict)"}
    atomic_write(out / "adapter_model.safetensors",
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "diffdistill": json.dumps(info)}))
    peft_config(rec["rank"], rec["alpha"], rec["dropout"], targets).save_pretrained(str(out))
    atomic_write(out / "diffdistill_lora.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    return info


def convert_teacher(src, out, dropout: float | None = None, verify: bool = True) -> dict:
    """Write an EDM snapshot or diffusers folder as this package's teacher ``.safetensors`` (weights + JSON
    metadata, loadable by ``distill --teacher``, ``sample``, ``eval``) plus ``OUT.json`` with the same metadata.
    ``verify`` reloads the written file and checks D(x; σ) equals the source network's on a fixed batch."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"convert-teacher writes safetensors: give an output path ending in .safetensors, not {out}")
    state = load_foreign_teacher(src, dropout)
    if state is None:
        raise UserError(f"{src}: convert-teacher takes an NVlabs/edm snapshot (.pkl) or a diffusers folder")
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
        labels = example_condition(net, 2, g)
        with torch.no_grad():
            # both frozen: on the CPU some kernels differ with the weights' requires_grad (1e-7), not the weights
            diff = (src_net.eval().requires_grad_(False)(x, sigma, labels) - net(x, sigma, labels)).abs().max().item()
        if diff != 0:
            raise UserError(f"{out}: the reloaded teacher differs from the source by {diff:.3g}; please report this")
        meta["verified_max_abs_diff"] = diff
    return meta
