"""Prompts encoded by a diffusers pipeline folder's own text encoder(s) and tokenizer(s), once, into a prompt file
(`diffusion.condition.Condition` keys) that training and sampling read; nothing here is hand-rolled.

The pipeline class named in ``model_index.json`` is loaded with its text components only (the UNet/transformer,
VAE, scheduler and safety parts passed as None; ``local_files_only``) and its own ``encode_prompt`` is called with
the arguments its ``__call__`` passes by default (``max_sequence_length``, SANA's ``complex_human_instruction``
and ``clean_caption``: read from ``__call__``'s signature, so they follow the installed diffusers). What each
family's ``encode_prompt`` returns becomes the Condition fields its network adapter takes
(``nets/diffusers_cond.py``):

=========================== ==================================================================================
pipeline                    fields
=========================== ==================================================================================
StableDiffusionPipeline     embeds (CLIP last hidden state)
StableDiffusionXLPipeline   embeds (both CLIPs' penultimate states, concatenated), pooled (text_encoder_2),
                            extra.time_ids = original size + crop (0, 0) + target size, as ``__call__`` builds
                            them (default size: the UNet's sample_size × the VAE factor)
StableDiffusion3Pipeline    embeds (CLIP-L/G padded + T5), pooled
FluxPipeline                embeds (T5), pooled (CLIP); extra.guidance (``__call__``'s guidance_scale) when the
                            transformer embeds guidance
SanaPipeline                embeds (Gemma), mask
WanPipeline                 embeds (umT5)
=========================== ==================================================================================

The null (negative) prompt is what the pipeline uses when given ``negative_prompt`` (default: ``__call__``'s own
default — the empty prompt, or zeros for SDXL's ``force_zeros_for_empty_prompt``); FLUX has no negative branch in
``encode_prompt``, so its null is ``encode_prompt`` of the negative text ("" by default).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..diffusion.condition import Condition
from ..errors import UserError
from .vae import quiet_loading
from .checkpoint import atomic_write

TEXT_PARTS = ("text_encoder", "tokenizer")   # the components encode_prompt reads (text_encoder_2, tokenizer_3, …)


def read_json(p: Path) -> dict:
    try:
        return json.loads(Path(p).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {p}: {type(e).__name__}") from None


def _call_default(pipe, name: str, default=None):
    """The default ``__call__`` passes for ``name`` (what a user of the pipeline gets)."""
    p = inspect.signature(type(pipe).__call__).parameters.get(name)
    return default if p is None or p.default is inspect.Parameter.empty else p.default


def _first(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t[:1]


# ---- one function per pipeline family: (pipe, prompts, negative, with_null, opts) -> (fields, null fields) ------
def _sd(pipe, prompts, negative, with_null, o):
    e, n = pipe.encode_prompt(prompts, o["device"], 1, with_null, negative_prompt=negative)
    return {"embeds": e}, ({"embeds": _first(n)} if with_null else None)


def _sdxl(pipe, prompts, negative, with_null, o):
    e, n, p, np_ = pipe.encode_prompt(prompts, device=o["device"], num_images_per_prompt=1,
                                      do_classifier_free_guidance=with_null, negative_prompt=negative)
    H, W = o["image_size"]
    ids = torch.tensor([[H, W, 0, 0, H, W]], dtype=torch.float32).expand(len(prompts), 6)   # _get_add_time_ids
    return {"embeds": e, "pooled": p, "extra.time_ids": ids}, \
        ({"embeds": _first(n), "pooled": _first(np_)} if with_null else None)


def _sd3(pipe, prompts, negative, with_null, o):
    e, n, p, np_ = pipe.encode_prompt(prompts, None, None, device=o["device"], num_images_per_prompt=1,
                                      do_classifier_free_guidance=with_null, negative_prompt=negative,
                                      max_sequence_length=o["max_sequence_length"])
    return {"embeds": e, "pooled": p}, ({"embeds": _first(n), "pooled": _first(np_)} if with_null else None)


def _flux(pipe, prompts, negative, with_null, o):
    def enc(texts):
        e, p, _ = pipe.encode_prompt(texts, None, device=o["device"], num_images_per_prompt=1,
                                     max_sequence_length=o["max_sequence_length"])
        return e, p
    e, p = enc(prompts)
    fields = {"embeds": e, "pooled": p}
    if o.get("guidance") is not None:
        fields["extra.guidance"] = torch.full((len(prompts),), float(o["guidance"]))
    if not with_null:
        return fields, None
    ne, np_ = enc([negative or ""])
    return fields, {"embeds": ne, "pooled": np_}


def _sana(pipe, prompts, negative, with_null, o):
    e, m, n, nm = pipe.encode_prompt(prompts, do_classifier_free_guidance=with_null, negative_prompt=negative,
                                     num_images_per_prompt=1, device=o["device"],
                                     clean_caption=_call_default(pipe, "clean_caption", False),
                                     max_sequence_length=o["max_sequence_length"],
                                     complex_human_instruction=_call_default(pipe, "complex_human_instruction"))
    return {"embeds": e, "mask": m}, ({"embeds": _first(n), "mask": _first(nm)} if with_null else None)


def _wan(pipe, prompts, negative, with_null, o):
    e, n = pipe.encode_prompt(prompts, negative_prompt=negative, do_classifier_free_guidance=with_null,
                              num_videos_per_prompt=1, max_sequence_length=o["max_sequence_length"],
                              device=o["device"], dtype=torch.float32)
    return {"embeds": e}, ({"embeds": _first(n)} if with_null else None)


FAMILIES: dict[str, Callable] = {"StableDiffusionPipeline": _sd, "StableDiffusionXLPipeline": _sdxl,
                                 "StableDiffusion3Pipeline": _sd3, "FluxPipeline": _flux, "SanaPipeline": _sana,
                                 "WanPipeline": _wan}


class PromptEncoder:
    """A pipeline folder's text side: ``encode(prompts)`` → Condition rows; ``null()`` → the one-row null.

    ``image_size`` (H, W): SDXL's size ids (default: the pipeline's default resolution); ``guidance``: FLUX's
    embedded guidance (default: its ``__call__``'s guidance_scale, for guidance-embedding transformers only);
    ``max_sequence_length``: default ``__call__``'s."""

    def __init__(self, root, negative: str | None = None, device="cpu", image_size=None, guidance=None,
                 max_sequence_length: int | None = None):
        root = Path(root)
        self.root, self.device = root, torch.device(device)
        if not (root / "model_index.json").is_file():
            raise UserError(f"{root} is not a diffusers pipeline folder (no model_index.json): the prompts must be "
                            f"encoded by the text encoder(s) of the teacher's own pipeline; give that folder")
        info = read_json(root / "model_index.json")
        self.info, name = info, info.get("_class_name")
        parts = [k for k, v in info.items() if k.startswith(TEXT_PARTS) and isinstance(v, list) and v[0]]
        if not parts:
            raise UserError(f"{root}: the {name} has no text encoder (it is class-conditional or unconditional): "
                            f"there are no prompts to encode")
        if name not in FAMILIES:
            raise UserError(f"{root}: prompt encoding for a {name} is not supported; supported pipelines: "
                            f"{', '.join(FAMILIES)}")
        missing = [k for k in parts if not (root / k).is_dir()]
        if missing:
            raise UserError(f"{root / missing[0]}/ is missing: the {name} encodes prompts with "
                            f"{', '.join(parts)}; put the pipeline's own text encoder(s) and tokenizer(s) there")
        self.name, self.parts, self.family = name, parts, FAMILIES[name]
        import diffusers  # optional dependency
        quiet_loading()
        cls = getattr(diffusers, name, None)
        if cls is None:
            raise UserError(f"this diffusers ({diffusers.__version__}) has no {name}: pip install -U diffusers")
        skip = {k: None for k, v in info.items() if not k.startswith("_") and isinstance(v, list) and k not in parts}
        try:
            pipe = cls.from_pretrained(str(root), local_files_only=True, **skip)
        except Exception as e:   # missing weights, a tokenizer that will not load, …
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            raise UserError(f"cannot load the text encoder(s) of {root} ({', '.join(parts)}): "
                            f"{type(e).__name__}: {msg}") from None
        for k in parts:
            m = getattr(pipe, k, None)
            if isinstance(m, torch.nn.Module):
                m.to(self.device, torch.float32).eval().requires_grad_(False)   # fp16 weights upcast
        self.pipe = pipe
        self.negative = negative if negative is not None else _call_default(pipe, "negative_prompt")
        msl = max_sequence_length if max_sequence_length is not None else _call_default(pipe, "max_sequence_length")
        self.opts = {"device": self.device, "max_sequence_length": msl,
                     "image_size": tuple(image_size) if image_size else self.default_image_size(),
                     "guidance": self._guidance(guidance)}

    def default_image_size(self) -> tuple:
        """``__call__``'s default height/width: the denoiser's sample_size × the VAE's factor."""
        net = next((self.root / c / "config.json" for c in ("unet", "transformer")
                    if (self.root / c / "config.json").is_file()), None)
        vae = self.root / "vae" / "config.json"
        size = read_json(net).get("sample_size") if net else None
        f = 2 ** (len(read_json(vae).get("block_out_channels", [0] * 4)) - 1) if vae.is_file() else 8
        size = size if size is not None else 128
        h, w = (size, size) if isinstance(size, int) else (size[0], size[-1])
        return (int(h) * f, int(w) * f)

    def _guidance(self, given):
        cfg = self.root / "transformer" / "config.json"
        embeds = self.name == "FluxPipeline" and cfg.is_file() and read_json(cfg).get("guidance_embeds")
        if given is not None and not embeds:
            raise UserError(f"--embedded-guidance: the {self.name} in {self.root} does not embed a guidance scale "
                            f"(FLUX-dev-style transformers with guidance_embeds do)")
        return (float(given) if given is not None else float(_call_default(self.pipe, "guidance_scale", 3.5))) \
            if embeds else None

    @torch.no_grad()
    def _fields(self, prompts: Sequence[str], with_null: bool):
        pos, neg = self.family(self.pipe, list(prompts), self.negative, with_null, self.opts)
        def cpu(d):
            return None if d is None else {k: v.detach().to("cpu").contiguous() for k, v in d.items()}
        return cpu(pos), cpu(neg)

    def encode(self, prompts: Sequence[str], batch_size: int = 64) -> Condition:
        """Condition rows of ``prompts`` (in order), encoded ``batch_size`` at a time, with the null row."""
        if not prompts:
            raise UserError("no prompts to encode")
        rows, null = [], None
        for i in range(0, len(prompts), batch_size):
            pos, neg = self._fields(prompts[i:i + batch_size], with_null=i == 0)
            rows.append(pos)
            null = neg if i == 0 else null
        fields = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
        return condition_from_fields(fields, null)

    def null(self) -> dict | None:
        """The null (negative-prompt) row's fields alone."""
        return self._fields([""], with_null=True)[1]

    def describe(self) -> dict:
        """What a prompt file records about its encoding (its sidecar JSON)."""
        return {"pipeline": str(self.root.resolve()), "pipeline_class": self.name, "text_components": self.parts,
                "negative_prompt": self.negative,
                **{k: v for k, v in (("max_sequence_length", self.opts["max_sequence_length"]),
                                     ("image_size", list(self.opts["image_size"]) if self.name ==
                                      "StableDiffusionXLPipeline" else None),
                                     ("embedded_guidance", self.opts["guidance"])) if v is not None}}


def condition_from_fields(fields: dict, null: dict | None) -> Condition:
    state = dict(fields)
    state.update({f"null.{k}": v for k, v in (null or {}).items()})
    return Condition.from_state(state)


def read_prompts(path) -> list[str]:
    """Prompts of a ``.txt`` (one per line; blank lines skipped) or ``.jsonl`` file (per line a JSON string or an
    object with ``prompt``, ``text`` or ``caption``)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts file not found: {str(p)!r}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {p} as UTF-8 text: {type(e).__name__}") from None
    if p.suffix == ".txt":
        prompts = [ln.strip() for ln in lines if ln.strip()]
    elif p.suffix == ".jsonl":
        prompts = []
        for i, ln in enumerate(lines, 1):
            if ln.strip():
                prompts.append(_jsonl_text(ln, f"{p}:{i}", ("prompt", "text", "caption")))
    else:
        raise UserError(f"prompts file {p}: use .txt (one prompt per line) or .jsonl")
    if not prompts:
        raise UserError(f"{p} holds no prompts")
    return prompts


def read_prompt_labels(path) -> list[int] | None:
    """The class index of every prompt of a ``.jsonl`` prompts file whose objects carry ``"label": INT`` (e.g.
    ``{"text": "a handwritten seven", "label": 7}``), in the order of `read_prompts`; None when no row has one.
    Stored in the prompt file's sidecar, they let ``eval`` score conditional correctness for data kinds with a
    classifier (digits). Every row or none must have one."""
    p = Path(path)
    if p.suffix != ".jsonl":
        return None
    labels, missing = [], 0
    for i, ln in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not ln.strip():
            continue
        obj = json.loads(ln)
        if not isinstance(obj, dict) or "label" not in obj:
            missing += 1
            continue
        v = obj["label"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise UserError(f"{p}:{i}: \"label\" must be a class index (an integer >= 0), got {v!r}")
        labels.append(v)
    if labels and missing:
        raise UserError(f"{p}: {len(labels)} prompts carry a \"label\" and {missing} do not: give every row "
                        f"its class index or none")
    return labels or None


def prompt_file_labels(path) -> list[int] | None:
    """The class indices recorded beside an encoded prompts file (its ``.json`` sidecar's ``labels``), or None."""
    side = Path(path).with_suffix(".json")
    try:
        labels = json.loads(side.read_text()).get("labels") if side.is_file() else None
    except (OSError, ValueError):
        return None
    return [int(v) for v in labels] if isinstance(labels, list) else None


def _jsonl_text(line: str, where: str, keys) -> str:
    try:
        obj = json.loads(line)
    except ValueError:
        raise UserError(f"{where}: not a JSON line") from None
    if isinstance(obj, str):
        return obj
    text = next((obj[k] for k in keys if isinstance(obj, dict) and k in obj), None)
    if not isinstance(text, str):
        raise UserError(f"{where}: expected a JSON string or an object with a {' / '.join(keys)} string")
    return text


def write_prompt_file(cond: Condition, out, prompts: Sequence[str], meta: dict, labels=None) -> Path:
    """``out`` (.safetensors or .npz, the keys of `Condition.state`) and the sidecar ``out.json`` with each row's
    prompt text (and class index: ``labels``) and how it was encoded; both written atomically."""
    out = Path(out)
    state = {k: v.contiguous() for k, v in cond.state().items()}
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file
        atomic_write(out, lambda tmp: save_file(state, str(tmp)))
    else:
        import numpy as np

        def save(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **{k: v.numpy() for k, v in state.items()})
        atomic_write(out, save)
    side = out.with_suffix(".json")
    info = {**meta, "rows": len(cond), "fields": {k: list(v) for k, v in cond.signature.items()},
            "prompts": list(prompts), **({"labels": [int(v) for v in labels]} if labels is not None else {})}
    atomic_write(side, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n"))
    return side
