"""``diffdistill encode-data``: images + captions → a cached latent data set, encoded once by a pipeline folder's
own VAE (``io/vae.py``) and text encoder(s) (``io/text_encode.py``), so training never loads either.

Sources (`captioned_source`):

* a folder of images (top level, or class subfolders searched recursively) with captions from
  ``captions.jsonl`` / ``metadata.jsonl`` (per line ``{"file_name": "sub/x.png", "text": "..."}``; ``file`` /
  ``image`` and ``caption`` / ``prompt`` also read), or ``captions.txt`` (per line ``FILE<TAB>caption``), or — with
  neither — the class subfolder names (``a_handwritten_seven/`` → "a handwritten seven");
* an ``.npz`` with images (``x`` / ``images`` / ``samples`` / ``arr_0``; the layouts `load_npz` reads) and one
  caption per image under ``captions`` (or ``text``), or a ``--captions`` .txt / .jsonl with one per image in order.

Images must share one size, divisible by the VAE's factor (nothing is resized here); greyscale images feed an RGB
VAE as three equal channels. The work goes in shards of ``shard_size`` images under ``OUT.shards/`` (each written
atomically, with ``manifest.json`` holding the VAE's and text encoders' sha256, the inputs' fingerprint and the
settings): a run stopped at any point continues where it stopped when started again with the same command, and a
resume with another VAE, text encoder, inputs or setting is refused. The shards are then streamed into ``OUT.npz``
— ``latents`` [N, C, h, w] float32, each image's encoded caption (``embeds``, ``mask``, ``pooled``, ``extra.*``),
the negative prompt (``null.*``), ``captions`` and ``files`` — which `load_npz` reads as a data set, plus
``OUT.json`` (the manifest); the shard folder is then removed (``keep_shards`` keeps it).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..io.checkpoint import atomic_write, file_sha256
from ..io.paths import check_output_file
from ..io.text_encode import PromptEncoder, _jsonl_text, read_prompts
from ..io.vae import LatentCodec, weights_sha256
from .images import NPZ_IMAGE_KEYS, _is_image_name, _npz_images, _read_images

CAPTION_FILES = ("captions.jsonl", "metadata.jsonl", "captions.txt")
FORMAT = "diffdistill latent shards"


class CaptionedSource:
    """N images with one caption each; ``read(lo, hi)`` → float32 [n, C, H, W] in [-1, 1]."""

    def __init__(self, names: Sequence[str], captions: Sequence[str], reader: Callable, fingerprint: str,
                 where: str):
        self.names, self.captions, self._reader = list(names), list(captions), reader
        self.fingerprint, self.where = fingerprint, where

    def __len__(self) -> int:
        return len(self.names)

    def read(self, lo: int, hi: int) -> np.ndarray:
        return self._reader(lo, hi)


def _fingerprint(rows) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def _folder_captions(root: Path, files: list, given: Path | None) -> list:
    rel = [f.relative_to(root).as_posix() for f in files]
    cap_file = given or next((root / n for n in CAPTION_FILES if (root / n).is_file()), None)
    if cap_file is None:
        tops = {r.split("/", 1)[0] for r in rel if "/" in r}
        if not tops or any("/" not in r for r in rel):
            raise UserError(f"no captions for the images in {root}: add captions.jsonl (per line {{\"file_name\": "
                            f"\"x.png\", \"text\": \"...\"}}) or captions.txt (FILE<TAB>caption), or put the images "
                            f"in one subfolder per caption")
        return [r.split("/", 1)[0].replace("_", " ") for r in rel]
    if not cap_file.is_file():
        raise UserError(f"captions file not found: {cap_file}")
    lines = cap_file.read_text(encoding="utf-8").splitlines()
    table = {}
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        where = f"{cap_file}:{i}"
        if cap_file.suffix == ".jsonl":
            try:
                obj = json.loads(ln)
            except ValueError:
                raise UserError(f"{where}: not a JSON line") from None
            name = next((obj.get(k) for k in ("file_name", "file", "image") if isinstance(obj, dict) and k in obj),
                        None)
            if not isinstance(name, str):
                raise UserError(f"{where}: each line needs the image's \"file_name\" and its \"text\"")
            table[name.replace("\\", "/")] = _jsonl_text(ln, where, ("text", "caption", "prompt"))
        elif cap_file.suffix == ".txt":
            name, sep, text = ln.partition("\t")
            if not sep:
                raise UserError(f"{where}: captions.txt lines are FILE<TAB>caption")
            table[name.strip().replace("\\", "/")] = text.strip()
        else:
            raise UserError(f"captions file {cap_file}: use .jsonl or .txt")
    missing = [r for r in rel if r not in table]
    if missing:
        raise UserError(f"{cap_file} has no caption for {missing[0]!r} ({len(missing)} of {len(rel)} images): "
                        f"give every image one")
    unknown = sorted(set(table) - set(rel))
    if unknown:
        raise UserError(f"{cap_file} names {unknown[0]!r}, which is not an image in {root} ({len(unknown)} such "
                        f"lines): fix the file name or remove the line")
    return [table[r] for r in rel]


def captioned_source(path, captions=None) -> CaptionedSource:
    """The images and captions of a folder or .npz (module docstring)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"--data {p}: not found (give a folder of images with captions, or an .npz)")
    given = Path(captions) if captions else None
    if p.is_dir():
        files = sorted((f for f in p.rglob("*") if f.is_file() and _is_image_name(f.relative_to(p).as_posix())
                        and not any(part.startswith(".") for part in f.relative_to(p).parts)),
                       key=lambda f: f.relative_to(p).as_posix())
        if not files:
            raise UserError(f"no images found in {p}")
        caps = _folder_captions(p, files, given)
        rel = [f.relative_to(p).as_posix() for f in files]

        def read(lo, hi):
            return _read_images([(rel[i], lambda f=files[i]: f) for i in range(lo, hi)], repr(str(p)))
        fp = _fingerprint([(r, f.stat().st_size, c) for r, f, c in zip(rel, files, caps)])
        return CaptionedSource(rel, caps, read, fp, str(p))
    if p.suffix != ".npz":
        raise UserError(f"--data {p}: give a folder of images or an .npz")
    try:
        data = np.load(p, allow_pickle=False)
        key = next((k for k in NPZ_IMAGE_KEYS if k in data.files), None)
        if key is None:
            raise UserError(f"no image array in {p} (found keys {data.files}); store the images under 'x'")
        arr = data[key]
        caps = None
        if given is None:
            ck = next((k for k in ("captions", "text") if k in data.files), None)
            if ck is None:
                raise UserError(f"no captions for the images in {p}: store one per image under 'captions' "
                                f"(numpy.savez(path, x=images, captions=np.array(texts))) or give --captions FILE")
            caps = [str(c) for c in data[ck].reshape(-1)]
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read {p} as an .npz of images: {type(e).__name__}") from None
    if given is not None:
        caps = read_prompts(given)
    x = _npz_images(arr, repr(str(p)))
    if len(caps) != len(x):
        raise UserError(f"{len(caps)} captions for {len(x)} images in {p}: give one caption per image")
    return CaptionedSource([str(i) for i in range(len(x))], caps, lambda lo, hi: x[lo:hi],
                           _fingerprint([file_sha256(p)[0], caps]), str(p))


# ------------------------------------------------------------------------------------------------ the cache
def shard_folder(out: Path) -> Path:
    return out.with_name(out.stem + ".shards")


def _to_vae_channels(x: np.ndarray, codec: LatentCodec, where: str) -> torch.Tensor:
    C = x.shape[1]
    if C != codec.in_channels:
        if C == 1 and codec.in_channels == 3:
            x = np.repeat(x, 3, axis=1)   # greyscale as RGB, as PIL's convert('RGB') does
        else:
            raise UserError(f"{where}: {C}-channel images for a VAE that takes {codec.in_channels}; convert them")
    return torch.from_numpy(np.ascontiguousarray(x))


def _text_hashes(root: Path, parts: Sequence[str]) -> dict:
    return {k: weights_sha256(root / k) for k in parts if k.startswith("text_encoder")}


def _check_manifest(found: dict, want: dict, shards: Path) -> None:
    if found.get("format") != FORMAT:
        raise UserError(f"{shards} is not a diffdistill latent shard folder (its manifest.json says "
                        f"{found.get('format')!r}): remove it or choose another --out")
    for key, what in (("vae_sha256", "VAE weights"), ("text_encoders_sha256", "text encoder weights"),
                      ("inputs_sha256", "images or captions"), ("scaling_factor", "VAE scaling factor"),
                      ("shift_factor", "VAE shift factor"), ("negative_prompt", "negative prompt"),
                      ("sample_posterior", "--sample-posterior"), ("seed", "--seed"), ("shard_size", "--shard-size"),
                      ("batch_size", "--batch-size"), ("num_images", "number of images"),
                      ("image_shape", "image shape"), ("text_options", "text encoding options")):
        if found.get(key) != want.get(key):
            a, b = str(found.get(key)), str(want.get(key))
            raise UserError(f"cannot resume {shards}: it was written with other {what} ({a[:16]} ≠ now {b[:16]}): "
                            f"run with the same inputs and options, or delete {shards} to start over")


def _shard_ok(path: Path, n: int) -> bool:
    try:
        with np.load(path, allow_pickle=False) as z:
            return int(z["latents"].shape[0]) == n and int(z["embeds"].shape[0]) == n
    except Exception:   # a damaged shard is encoded again
        return False


def _save_npz(path: Path, arrays: dict) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(path, write)


def encode_shard(src: CaptionedSource, lo: int, hi: int, codec: LatentCodec, text: PromptEncoder, *,
                 batch_size: int, sample_posterior: bool, seed: int, shape) -> dict:
    """The arrays of images lo..hi−1: latents (batches of ``batch_size``) and the encoded captions."""
    x = _to_vae_channels(src.read(lo, hi), codec, src.where)
    if tuple(x.shape[1:]) != tuple(shape):
        raise UserError(f"images of mixed size in {src.where}: {src.names[lo]!r} and the following are "
                        f"{list(x.shape[2:])}, the first images {list(shape[1:])}; resize all to one size first")
    lat = []
    for i in range(0, len(x), batch_size):
        noise = None
        if sample_posterior:   # each image's draw from its own generator: independent of batching and resumes
            noise = torch.stack([torch.randn((codec.latent_channels, shape[1] // codec.factor,
                                              shape[2] // codec.factor),
                                             generator=torch.Generator().manual_seed((seed << 32) + lo + i + j))
                                 for j in range(min(batch_size, len(x) - i))])
        lat.append(codec.encode(x[i:i + batch_size], noise))
    caps = src.captions[lo:hi]
    unique = sorted(set(caps))
    cond = text.encode(unique, batch_size=max(1, batch_size))
    row = torch.tensor([unique.index(c) for c in caps])
    out = {"latents": torch.cat(lat).numpy()}
    out.update({k: v[row].numpy() for k, v in cond.tensors().items()})
    return out


def _stream_npz(tmp, shard_paths: Sequence[Path], keys: Sequence[str], small: dict) -> None:
    """One .npz of the shards' arrays joined along axis 0, written member by member (one shard's array in memory
    at a time), plus the ``small`` arrays."""
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key in keys:
            shapes, dtype = [], None
            for sp in shard_paths:
                with np.load(sp, allow_pickle=False) as z:
                    a = z[key]
                shapes.append(a.shape)
                dtype = a.dtype
            head = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                    "shape": (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])}
            with zf.open(key + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, head)
                for sp in shard_paths:
                    with np.load(sp, allow_pickle=False) as z:
                        f.write(np.ascontiguousarray(z[key], dtype=dtype).tobytes())
        for key, a in small.items():
            with zf.open(key + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(a), allow_pickle=False)


def encode_data(pipeline, data, out, *, captions=None, negative: str | None = None, shard_size: int = 1000,
                batch_size: int = 16, sample_posterior: bool = False, seed: int = 0, device="cpu",
                keep_shards: bool = False, overwrite: bool = False, max_sequence_length: int | None = None,
                guidance: float | None = None, log: Callable = print) -> dict:
    """Encode ``data`` with the VAE and text encoder(s) of the pipeline folder ``pipeline`` into ``out`` (.npz);
    resumable (module docstring). Returns the manifest."""
    out = Path(out)
    if out.suffix != ".npz":
        raise UserError(f"encode-data writes an .npz: give --out ending in .npz, not {out}")
    for name, v, lo in (("--shard-size", shard_size, 1), ("--batch-size", batch_size, 1)):
        if v < lo:
            raise UserError(f"{name} must be at least {lo}, got {v}")
    check_output_file(out, "--out")
    root = Path(pipeline)
    if not root.is_dir():
        raise UserError(f"pipeline folder not found: {root}")
    if not (root / "vae" / "config.json").is_file():
        raise UserError(f"{root / 'vae'}/ is missing: encode-data encodes the images with the pipeline's own VAE")
    shards = shard_folder(out)
    if out.exists() and not shards.exists() and not overwrite:
        raise UserError(f"{out} already exists: add --overwrite to encode again, or choose another --out")
    src = captioned_source(data, captions)
    codec = LatentCodec(root / "vae", device)
    if sample_posterior and codec.deterministic:
        raise UserError(f"--sample-posterior: the {codec.name} in {root / 'vae'} encodes deterministically (it has "
                        f"no posterior to sample)")
    first = _to_vae_channels(src.read(0, 1), codec, src.where)
    shape = tuple(first.shape[1:])
    if shape[1] % codec.factor or shape[2] % codec.factor:
        raise UserError(f"the images in {src.where} are {shape[1]}×{shape[2]}: the VAE needs sizes divisible by "
                        f"{codec.factor}; resize or crop them first")
    text = PromptEncoder(root, negative, device, image_size=shape[1:], guidance=guidance,
                         max_sequence_length=max_sequence_length)
    tdesc = text.describe()
    manifest = {"format": FORMAT, "version": 1, **codec.describe(), **{k: tdesc[k] for k in
                                                                      ("pipeline", "pipeline_class")},
                "vae_sha256": codec.sha256, "text_encoders_sha256": _text_hashes(root, text.parts),
                "inputs": src.where, "inputs_sha256": src.fingerprint, "num_images": len(src),
                "image_shape": list(shape), "latent_shape": [codec.latent_channels, shape[1] // codec.factor,
                                                            shape[2] // codec.factor],
                "negative_prompt": text.negative, "sample_posterior": bool(sample_posterior), "seed": int(seed),
                "shard_size": int(shard_size), "batch_size": int(batch_size),
                "text_options": {k: v for k, v in tdesc.items() if k not in ("pipeline", "pipeline_class",
                                                                             "text_components", "negative_prompt")}}
    mpath = shards / "manifest.json"
    if shards.exists():
        if not mpath.is_file():
            raise UserError(f"{shards} exists without a manifest.json: remove it or choose another --out")
        _check_manifest(json.loads(mpath.read_text()), manifest, shards)
        log(f"[diffdistill] resuming {shards}")
    else:
        shards.mkdir(parents=True)
        atomic_write(mpath, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n"))
    n, paths = len(src), []
    count = (n + shard_size - 1) // shard_size
    for k in range(count):
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        sp = shards / f"shard-{k:06d}.npz"
        paths.append(sp)
        if sp.is_file() and _shard_ok(sp, hi - lo):
            continue
        arrays = encode_shard(src, lo, hi, codec, text, batch_size=batch_size, sample_posterior=sample_posterior,
                              seed=seed, shape=shape)
        _save_npz(sp, arrays)
        log(f"[diffdistill] shard {k + 1}/{count}: images {lo}..{hi - 1} encoded")
    with np.load(paths[0], allow_pickle=False) as z:
        keys = list(z.files)
    null = text.null() or {}
    small = {f"null.{k}": v.numpy() for k, v in null.items()}
    small.update({"captions": np.array(src.captions), "files": np.array(src.names)})
    atomic_write(out, lambda tmp: _stream_npz(tmp, paths, keys, small))
    info = {k: v for k, v in manifest.items() if k != "format"}
    atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(
        {**info, "arrays": keys + sorted(small)}, indent=2, ensure_ascii=False) + "\n"))
    if not keep_shards:
        shutil.rmtree(shards)
    log(f"[diffdistill] wrote {out}: {n} latents {manifest['latent_shape']} with their captions' embeddings "
        f"(+ {out.with_suffix('.json').name})")
    return manifest
