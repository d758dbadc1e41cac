"""Loaders for users' own images, and `load_dataset`, the one entry point that resolves a dataset spec.

Every loader returns a `Dataset` of float32 ``[N, C, H, W]`` images in [-1, 1] with C = 1 (greyscale) or 3 (RGB):

* `load_image_folder`: a folder of images (png, jpg, bmp, gif, tif, webp, ppm/pgm). One subfolder per class gives
  labels (classes = subfolder names, sorted; label k = k-th name); images directly in the folder are unlabelled.
* `load_edm_zip`: a zip as written by EDM's ``dataset_tool.py``: images plus an optional ``dataset.json`` holding
  ``{"labels": [[filename, label], ...]}`` (or ``"labels": null``).
* `load_npz`: an ``.npz`` with the images under ``x`` (or ``images``, ``samples``, ``arr_0``), uint8 0..255 or float
  in [-1, 1], layout NHWC, NCHW or NHW (when both axes 1 and 3 could hold channels, the layout giving square images
  wins, else NCHW), and optional integer ``labels`` (or ``y``). Instead of images, ``latents`` (float [N, C, …],
  any channels and range: a VAE's encodings) or ``points`` ([N, D]); instead of labels, each sample's encoded
  prompt: ``embeds`` [N, L, D] with optional ``mask``, ``pooled``, ``extra.*`` and the negative prompt's
  ``null.*`` (the keys of `diffusion.condition.Condition.state`).

8-bit pixels map to [-1, 1] by p/127.5 − 1 (16-bit greyscale by p/32767.5 − 1). All images must share one size and
one channel count; problems raise `UserError` with a one-line message naming the fix.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from diffdistill.data.base import Dataset
from diffdistill.diffusion.condition import Condition
from diffdistill.data.digits import load_digits_dataset
from diffdistill.data.toy2d import TOY2D_NAMES, make_toy2d
from diffdistill.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
NPZ_IMAGE_KEYS = ("x", "images", "samples", "arr_0")
NPZ_LABEL_KEYS = ("labels", "y")
BUILTIN_NAMES = ("digits",) + TOY2D_NAMES
_MODE_CHANNELS = {"1": 1, "L": 1, "I": 1, "I;16": 1, "I;16L": 1, "I;16B": 1, "I;16N": 1, "LA": 2, "La": 2, "PA": 2,
                  "RGB": 3, "RGBX": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "CMYK": 3, "RGBA": 4, "RGBa": 4}
PathLike = Union[str, os.PathLike]


def _is_image_name(name: str) -> bool:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return not base.startswith(".") and "__MACOSX" not in name and base.lower().endswith(IMAGE_EXTENSIONS)


def _existing(path: PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"path not found: {str(p)!r}; check the spelling, or pass an existing folder, .zip or .npz file")
    return p


def _channels(img) -> Optional[int]:
    if img.mode == "P":
        return 4 if "transparency" in img.info else 3
    return _MODE_CHANNELS.get(img.mode)


def _pixels(img, name: str) -> np.ndarray:
    """Decode one PIL image to float32 ``[C, H, W]`` in [-1, 1]."""
    if img.mode.startswith("I"):
        a = np.asarray(img, dtype=np.float64)
        if a.min() < 0 or a.max() > 65535:
            raise UserError(f"image {name!r} has {img.mode!r} pixels outside 0..65535; save it as 8- or 16-bit")
        return (a / 32767.5 - 1).astype(np.float32)[None]
    if _channels(img) == 1:
        return (np.asarray(img.convert("L"), dtype=np.float32) / 127.5 - 1)[None]
    return (np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1).transpose(2, 0, 1)


def _read_images(items: Sequence[Tuple[str, Callable]], where: str) -> np.ndarray:
    """Load ``(display_name, open_fn)`` items into one float32 ``[N, C, H, W]`` array after checking that all share
    one size and channel count (headers are checked first, so a bad file is reported before decoding everything)."""
    from PIL import Image

    def unreadable(name, e):
        msg = str(e).splitlines()[0] if str(e) else "unreadable"
        return UserError(f"cannot read image {name!r} in {where} ({type(e).__name__}: {msg}); remove or replace the file")

    first = None
    for name, open_fn in items:
        try:
            with Image.open(open_fn()) as img:
                size, ch, mode = img.size, _channels(img), img.mode
        except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
            raise unreadable(name, e) from None
        if ch is None:
            raise UserError(f"image {name!r} has unsupported pixel mode {mode!r}; save it as 8-bit greyscale or RGB")
        if ch not in (1, 3):
            raise UserError(f"image {name!r} has {ch} channels (mode {mode}); only 1 (greyscale) or 3 (RGB) are "
                            "supported: convert it, e.g. with PIL's Image.convert('RGB')")
        if first is None:
            first = (name, size, ch)
        elif size != first[1]:
            raise UserError(f"images of mixed size in {where}: {first[0]!r} is {first[1][0]}x{first[1][1]} but "
                            f"{name!r} is {size[0]}x{size[1]}; resize all images to one size first")
        elif ch != first[2]:
            raise UserError(f"images with mixed channel counts in {where}: {first[0]!r} has {first[2]} but {name!r} "
                            f"has {ch}; convert all images to greyscale ('L') or all to RGB first")
    (w, h), c = first[1], first[2]
    out = np.empty((len(items), c, h, w), dtype=np.float32)
    for i, (name, open_fn) in enumerate(items):
        try:
            with Image.open(open_fn()) as img:
                img.load()
                out[i] = _pixels(img, name)
        except UserError:
            raise
        except Exception as e:
            raise unreadable(name, e) from None
    return out


def load_image_folder(path: PathLike) -> Dataset:
    """Images in ``path`` (unlabelled) or in its class subfolders (labelled by sorted subfolder name).

    Subfolders are searched recursively; hidden files and folders are skipped.
    """
    root = _existing(path)
    if not root.is_dir():
        raise UserError(f"{str(root)!r} is not a folder; pass a folder of images (or use a .zip / .npz loader)")

    def images_in(d: Path, recursive: bool) -> List[Path]:
        files = d.rglob("*") if recursive else d.iterdir()
        return sorted((f for f in files if f.is_file() and _is_image_name(f.relative_to(root).as_posix())
                       and not any(part.startswith(".") for part in f.relative_to(root).parts)),
                      key=lambda f: f.relative_to(root).as_posix())

    top = images_in(root, recursive=False)
    classes = [(d.name, imgs) for d in sorted(root.iterdir(), key=lambda d: d.name)
               if d.is_dir() and not d.name.startswith(".") and (imgs := images_in(d, recursive=True))]
    if top and classes:
        raise UserError(f"{str(root)!r} has images both at its top level ({top[0].name!r}) and in class subfolders "
                        f"({classes[0][0]!r}); move every image into a class subfolder, or remove the subfolders")
    if not top and not classes:
        raise UserError(f"no images found in {str(root)!r} (looked for {', '.join(IMAGE_EXTENSIONS)}); put images "
                        "there directly, or in one subfolder per class")
    files = top if top else [f for _, imgs in classes for f in imgs]
    labels = None if top else np.concatenate([np.full(len(imgs), k) for k, (_, imgs) in enumerate(classes)])
    x = _read_images([(f.relative_to(root).as_posix(), lambda f=f: f) for f in files], repr(str(root)))
    return Dataset(x, labels, num_classes=None if top else len(classes), kind="images", name=root.name,
                   class_names=None if top else [n for n, _ in classes])


def load_edm_zip(path: PathLike) -> Dataset:
    """An EDM-style zip: images (any folder depth) and an optional ``dataset.json`` with integer labels."""
    p = _existing(path)
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"cannot read {str(p)!r} as a zip archive ({e}); re-create it, e.g. with EDM's dataset_tool.py") from None
    with zf:
        names = sorted(n for n in zf.namelist() if not n.endswith("/") and _is_image_name(n))
        if not names:
            raise UserError(f"no images found in zip {str(p)!r} (looked for {', '.join(IMAGE_EXTENSIONS)}); "
                            "add image files to the archive")
        labels = None
        if "dataset.json" in zf.namelist():
            try:
                meta = json.loads(zf.read("dataset.json"))
            except (ValueError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read dataset.json in {str(p)!r} ({e}); fix the JSON or remove the file") from None
            raw = meta.get("labels") if isinstance(meta, dict) else meta
            if raw is not None:
                try:
                    mapping = {str(k).replace("\\", "/"): v for k, v in raw}
                except (TypeError, ValueError):
                    raise UserError(f"dataset.json in {str(p)!r}: 'labels' must be a list of [filename, label] pairs "
                                    "or null; fix the file") from None
                missing = [n for n in names if n.replace("\\", "/") not in mapping]
                if missing:
                    raise UserError(f"dataset.json in {str(p)!r} has no label for {missing[0]!r} ({len(missing)} "
                                    "images unlabelled); add a [filename, label] pair for every image or set labels to null")
                labels = [mapping[n.replace("\\", "/")] for n in names]
                bad = [v for v in labels if isinstance(v, bool) or not isinstance(v, int)]
                if bad:
                    raise UserError(f"dataset.json in {str(p)!r}: labels must be integer class indices, found {bad[0]!r}; "
                                    "store one integer 0..K-1 per image")
        x = _read_images([(n, lambda n=n: io.BytesIO(zf.read(n))) for n in names], repr(str(p)))
    return Dataset(x, labels, kind="images", name=p.stem)


def _npz_conditions(data, p: Path):
    """The per-sample prompt embeddings of an .npz dataset (None when it has no ``embeds``)."""
    if "embeds" not in data.files:
        return None
    keys = [k for k in data.files if k in ("embeds", "mask", "pooled") or k.startswith(("extra.", "null."))]
    return Condition.from_state({k: np.asarray(data[k]) for k in keys})


def _npz_images(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.ndim >= 1 and arr.shape[0] == 0:
        raise UserError(f"the image array in {where} is empty; save at least one image")
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise UserError(f"image array in {where} has shape {arr.shape}; expected [N, H, W, C], [N, C, H, W] or [N, H, W]")
    c1, c3 = arr.shape[1], arr.shape[3]
    nhwc = c3 in (1, 3) and (c1 not in (1, 3) or (arr.shape[1] == arr.shape[2] and arr.shape[2] != arr.shape[3]))
    if nhwc:
        arr = arr.transpose(0, 3, 1, 2)
    elif c1 not in (1, 3):
        raise UserError(f"image array in {where} has shape {arr.shape}: no axis of size 1 or 3 for channels; "
                        "only greyscale (C=1) or RGB (C=3) images in NHWC or NCHW layout are supported")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 127.5 - 1
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise UserError(f"integer images in {where} span {lo}..{hi}; store 8-bit pixels 0..255 (uint8) or floats in [-1, 1]")
        return arr.astype(np.float32) / 127.5 - 1
    if np.issubdtype(arr.dtype, np.floating):
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1 - 1e-4 or hi > 1 + 1e-4:
            raise UserError(f"float images in {where} span [{lo:.4g}, {hi:.4g}], outside [-1, 1]; rescale them "
                            "(x / 127.5 - 1 for 0..255 data, 2 * x - 1 for [0, 1] data) or save uint8 pixels")
        return arr.astype(np.float32)
    raise UserError(f"image array in {where} has dtype {arr.dtype}; use uint8 0..255 or float in [-1, 1]")


def load_npz(path: PathLike) -> Dataset:
    """Images (and optional labels) from an ``.npz`` file; see the module docstring for accepted keys and layouts."""
    p = _existing(path)
    try:
        data = np.load(p, allow_pickle=False)
    except Exception as e:
        raise UserError(f"cannot read {str(p)!r} as an .npz file ({type(e).__name__}); save it with "
                        "numpy.savez(path, x=images, labels=labels)") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UserError(f"{str(p)!r} holds a single array, not an .npz archive; save it with numpy.savez(path, x=images)")
    with data:
        conditions = _npz_conditions(data, p)
        for key, kind in (("latents", "latents"), ("points", "points")):
            if key in data.files:
                arr = np.asarray(data[key], dtype=np.float32)
                if not np.isfinite(arr).all():
                    raise UserError(f"{str(p)!r}: the {key} hold NaN or inf values; fix them")
                lkey = next((k for k in NPZ_LABEL_KEYS if k in data.files), None)
                return Dataset(arr, data[lkey] if lkey else None, kind=kind, name=p.stem, conditions=conditions)
        key = next((k for k in NPZ_IMAGE_KEYS if k in data.files), None)
        if key is None:
            raise UserError(f"no image array in {str(p)!r} (found keys {data.files}); store the images under 'x' "
                            "(numpy.savez(path, x=images, labels=labels))")
        lkey = next((k for k in NPZ_LABEL_KEYS if k in data.files), None)
        try:
            arr, labels = data[key], (data[lkey] if lkey else None)
        except Exception as e:
            raise UserError(f"cannot read arrays from {str(p)!r} ({type(e).__name__}); re-save the file") from None
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).reshape(len(arr), -1).any(1).sum())
        raise UserError(f"{str(p)!r}: {bad} image(s) contain NaN or inf values; remove or fix them (data must be "
                        f"finite, in [-1, 1] or uint8)")
    x = _npz_images(arr, repr(str(p)))
    if labels is not None and not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise UserError(f"labels in {str(p)!r} have dtype {labels.dtype}; store integer class indices 0..K-1")
    return Dataset(x, labels, kind="images", name=p.stem, conditions=conditions)


def _npz_conditions(data, p: Path):
    """The per-sample prompt embeddings of an .npz dataset (None when it has no ``embeds``)."""
    if "embeds" not in data.files:
        return None
    keys = [k for k in data.files if k in ("embeds", "mask", "pooled") or k.startswith(("extra.", "null."))]
    return Condition.from_state({k: np.asarray(data[k]) for k in keys})


def load_dataset(spec: PathLike, n: int = 10000, seed: int = 0) -> Dataset:
    """Resolve a dataset spec: 'digits', a 2-D toy name (ring8, checkerboard, two_moons; ``n`` points drawn with
    ``seed``), or a path to an image folder, an EDM-style .zip or an .npz file."""
    s = os.fspath(spec)
    if s == "digits":
        return load_digits_dataset()
    if s in TOY2D_NAMES:
        return make_toy2d(s, n=n, seed=seed)
    p = Path(s).expanduser()
    if not p.exists() and not any(ch in s for ch in "/\\~.") and p.suffix == "":
        raise UserError(f"unknown dataset {s!r}; use one of {', '.join(BUILTIN_NAMES)}, or a path to an image "
                        "folder, .zip or .npz file")
    p = _existing(p)
    if p.is_dir():
        return load_image_folder(p)
    suffix = p.suffix.lower()
    if suffix == ".zip":
        return load_edm_zip(p)
    if suffix == ".npz":
        return load_npz(p)
    raise UserError(f"unsupported dataset file {str(p)!r}; pass an image folder, a .zip (EDM style) or an .npz file")
