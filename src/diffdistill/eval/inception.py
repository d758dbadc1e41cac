"""Inception FID / KID / precision-recall the way papers report them, with the recipe attached to every number.

Extractor: the ``inception-2015-12-05`` network from a local file given by ``--inception PATH`` or
``$DIFFDISTILL_INCEPTION`` (nothing is downloaded), in either form, told apart by the file's contents
(`inception_file_format`): the TorchScript file that StyleGAN2-ADA-pytorch and clean-fid load
(``inception-2015-12-05.pt``, `TorchScriptExtractor`), or torch-fidelity's state dict
(``weights-inception-2015-12-05-6726825d.pth``, `FidelityExtractor`: our `nets.inception_fidelity` network,
strictly loaded, TF1 bilinear resize to 299×299, 2048-d pool features; the recipe's ``extractor_format`` says
which). StyleGAN3/EDM fetch the network as a ``.pkl`` that ``fid.py`` opens with ``pickle.load``; a pickle can run
code, so it is not accepted here. The TorchScript is called as EDM's ``fid.py`` calls its detector:
``net(images, return_features=True)`` on uint8 RGB images (greyscale tiled to 3 channels), which the network resizes
to 299×299 itself, giving 2048-d pool features. That is the convention of the numbers distillation papers quote
(EDM's fid.py, StyleGAN2-ADA); clean-fid's default "clean" mode resizes with PIL outside the network and gives
different numbers. Generated images are quantised exactly
as EDM's ``generate.py`` writes PNGs: uint8(clip(127.5·x + 128, 0, 255)) (truncation), so scores match a
PNG-folder evaluation bit for bit.

Statistics stream in float64 (`FeatureStats`: n, Σx, Σxxᵀ), summed over ranks under torchrun. FID is the Fréchet
distance of the two Gaussians (``metrics.frechet_distance``; EDM's ``scipy.linalg.sqrtm`` formula to round-off).
References: an EDM-style ``.npz`` with ``mu`` and ``sigma`` (e.g. EDM's ``cifar10-32x32.npz``), or one written by
``diffdistill ref-stats`` (adds ``num_images``, ``recipe`` and optionally ``features`` for KID / precision-recall),
or a folder / EDM zip / image ``.npz`` (features computed on the fly). KID: StyleGAN's estimator (cubic polynomial
kernel, 100 subsets of ≤ 1000). Precision/recall: Kynkäänniemi et al. 2019, k = 3 nearest-neighbour manifolds on
the same Inception features (the paper and StyleGAN use VGG-16 features; the recipe says so), on at most 10,000
samples per side by default.

Naming: a score is "FID-50k" only when it uses exactly 50,000 generated samples; otherwise "FID (n=…)".
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..data.images import load_npz
from ..errors import UserError
from ..io.checkpoint import file_sha256 as digest_and_size
from ..nets.inception_fidelity import fidelity_state_dict_problems, load_fidelity_weights, InceptionV3Fidelity
from .generate import generate, images_to_uint8_pixels
from .metrics import frechet_distance, kid as kid_score, precision_recall, FeatureStats


ENV_VAR = "DIFFDISTILL_INCEPTION"
STANDARD_N = 50_000


def fid_label(n: int) -> str:
    """'FID-50k' at exactly 50,000 samples, else 'FID (n=…)' — the sample count changes FID's bias."""
    return "FID-50k" if n == STANDARD_N else f"FID (n={n:,})"


def file_sha256(path) -> str:
    """The sha256 hex digest of a file (extractor and reference hashes in the recipe)."""
    return digest_and_size(path)[0]


def resolve_inception_path(path=None) -> Path | None:
    """``path``, else ``$DIFFDISTILL_INCEPTION``, else None."""
    p = path or os.environ.get(ENV_VAR)
    if not p:
        return None
    p = Path(p).expanduser()
    if not p.is_file():
        raise UserError(f"Inception weights not found: {p}; give the local inception-2015-12-05.pt (TorchScript of "
                        f"StyleGAN2-ADA / clean-fid) or weights-inception-2015-12-05-6726825d.pth (torch-fidelity) "
                        f"with --inception PATH or ${ENV_VAR}")
    return p


def images_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] float in [−1, 1] (or uint8) → uint8 RGB, quantised like EDM's generate.py; grey → 3 channels."""
    if x.dtype != torch.uint8:
        x = images_to_uint8_pixels(x)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise UserError(f"Inception metrics need images [N, 1|3, H, W], got shape {tuple(x.shape)}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class TorchScriptExtractor:
    """A feature network stored as TorchScript, called ``net(uint8 images, return_features=True)`` → [B, D].

    Loading TorchScript runs no Python from the file (its graph is interpreted by torch)."""

    def __init__(self, path, device="cpu", name: str = "inception-2015-12-05"):
        self.path, self.device, self.name = Path(path), torch.device(device), name
        if not self.path.is_file():
            raise UserError(f"feature extractor not found: {self.path}")
        try:
            with warnings.catch_warnings():  # torch ≥ 2.10 marks torch.jit as deprecated; the file format is TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(self.path), map_location=self.device).eval()
        except Exception as e:
            hint = (" (a .pkl is a Python pickle, e.g. StyleGAN3/EDM's detector; pickles can run code and are not "
                    "loaded)" if self.path.suffix == ".pkl" else "")
            raise UserError(f"{self.path} is not a TorchScript file ({type(e).__name__}){hint}; give the TorchScript "
                            f"inception-2015-12-05.pt of StyleGAN2-ADA-pytorch / clean-fid") from None
        self.sha256 = file_sha256(self.path)
        self.dim = None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images_to_uint8(images).to(self.device)
        try:
            f = self.net(x, return_features=True)
        except Exception as e:
            raise UserError(f"{self.path.name} failed on a [{', '.join(map(str, x.shape))}] uint8 batch "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); it must accept "
                            f"net(images, return_features=True) like StyleGAN's inception-2015-12-05.pt") from None
        f = f.reshape(f.shape[0], -1).to(torch.float64)
        self.dim = f.shape[1]
        return f

    def recipe(self) -> dict:
        return {"extractor": self.name, "extractor_format": "TorchScript", "extractor_file": self.path.name,
                "extractor_sha256": self.sha256, "feature_dim": self.dim,
                "input": "uint8 RGB from uint8(clip(127.5·x + 128, 0, 255)) (EDM PNG quantisation); grey tiled ×3",
                "resize": "inside the network (to 299×299, as StyleGAN/EDM call it on uint8 images)"}


class FidelityExtractor:
    """torch-fidelity's Inception weights (``weights-inception-2015-12-05-6726825d.pth``, a plain state dict of its
    ``FeatureExtractorInceptionV3``) in our `InceptionV3Fidelity`: every key and shape must match (one-line
    UserError naming the file and the first differences otherwise). Features: the 2048-d pool layer on uint8 RGB,
    resized inside the network with TF1's bilinear resize. The file is read with ``torch.load(weights_only=True)``,
    which rebuilds tensors only and runs no code from the file."""

    def __init__(self, path, device="cpu", name: str = "inception-2015-12-05/torch-fidelity"):
        self.path, self.device, self.name = Path(path), torch.device(device), name
        if not self.path.is_file():
            raise UserError(f"feature extractor not found: {self.path}")
        try:
            state = torch.load(str(self.path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{self.path} is not a readable torch.save state dict ({type(e).__name__}); give "
                            f"torch-fidelity's weights-inception-2015-12-05-6726825d.pth or the TorchScript "
                            f"inception-2015-12-05.pt") from None
        if not isinstance(state, dict):
            raise UserError(f"{self.path} holds a {type(state).__name__}, not a state dict; give torch-fidelity's "
                            f"weights-inception-2015-12-05-6726825d.pth")
        self.net = InceptionV3Fidelity()
        problems = fidelity_state_dict_problems(self.net, state)
        if problems:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            raise UserError(f"{self.path.name} does not match torch-fidelity's InceptionV3: {'; '.join(problems[:3])}"
                            f"{more}; give the unmodified weights-inception-2015-12-05-6726825d.pth")
        load_fidelity_weights(self.net, state)
        self.net.to(self.device)
        self.sha256 = file_sha256(self.path)
        self.dim = None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        f = self.net.features(images_to_uint8(images).to(self.device)).to(torch.float64)
        self.dim = f.shape[1]
        return f

    def recipe(self) -> dict:
        return {"extractor": self.name, "extractor_format": "torch-fidelity state dict (FeatureExtractorInceptionV3)",
                "extractor_file": self.path.name, "extractor_sha256": self.sha256, "feature_dim": self.dim,
                "feature_layer": "2048 (global average pool after Mixed_7c), float32",
                "input": "uint8 RGB from uint8(clip(127.5·x + 128, 0, 255)) (EDM PNG quantisation); grey tiled ×3",
                "resize": "inside the extractor: TF1 bilinear (align_corners=False, no antialias) to 299×299 in "
                          "float32, as torch-fidelity; then (x − 128)/128"}


Extractor = TorchScriptExtractor | FidelityExtractor


def inception_file_format(path) -> str:
    """'torchscript' or 'state_dict', from the file's contents (not its name). Both TorchScript archives and
    ``torch.save`` files are zips; only TorchScript has a ``code/`` folder and ``constants.pkl``. A non-zip file
    may be a legacy (pre-1.6) ``torch.save`` pickle: 'state_dict' (``torch.load(weights_only=True)`` judges it)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return "state_dict"
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"cannot read {path} as a TorchScript or torch.save archive ({e})") from None
    parts = [n.split("/") for n in names]
    if any(len(q) > 2 and q[1] == "code" for q in parts) or any(q[-1] == "constants.pkl" for q in parts):
        return "torchscript"
    if any(q[-1] == "data.pkl" for q in parts):
        return "state_dict"
    raise UserError(f"{path} is a zip but neither a TorchScript archive nor a torch.save file; give inception-"
                    f"2015-12-05.pt (TorchScript) or weights-inception-2015-12-05-6726825d.pth (torch-fidelity)")


def load_extractor(path, device="cpu"):
    """The Inception extractor for a local file of either accepted form (see `inception_file_format`)."""
    if Path(path).suffix == ".pkl":
        return TorchScriptExtractor(path, device)  # its error explains why pickles are refused
    return TorchScriptExtractor(path, device) if inception_file_format(path) == "torchscript" else \
        FidelityExtractor(path, device)


# ------------------------------------------------------------------------------------------------ distributed
def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _rank_world() -> tuple[int, int]:
    d = _dist()
    return (d.get_rank(), d.get_world_size()) if d else (0, 1)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate [n_r, D] tensors of every rank in rank order (n_r may differ); identity without torch.distributed.
    The result is on ``t``'s device (NCCL gathers through the rank's GPU)."""
    d = _dist()
    if d is None:
        return t
    home = t.device
    if d.get_backend() == "nccl":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(d.get_world_size())]
    d.all_gather(sizes, n)
    m = max(int(s) for s in sizes)
    pad = torch.zeros((m - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    bufs = [torch.empty((m,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device) for _ in sizes]
    d.all_gather(bufs, torch.cat([t, pad]))
    return torch.cat([b[:int(s)] for b, s in zip(bufs, sizes)]).to(home)


def gather_in_order(feats: list, index: list, dim: int) -> torch.Tensor:
    """All ranks' feature rows sorted by their global index (seed or image number), so KID's random subsets and
    the precision/recall cut-off see the same order for any number of ranks."""
    f = torch.cat(feats) if feats else torch.zeros(0, dim)
    i = torch.tensor(index, dtype=torch.int64).reshape(-1, 1)
    f, i = all_gather_rows(f), all_gather_rows(i)
    return f[i[:, 0].argsort()]


# ------------------------------------------------------------------------------------------------ references
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _image_items(path: Path):
    """Sorted (name, opener) pairs of the images in a folder (recursive) or zip."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                       and not p.name.startswith("."))
        return [(str(p.relative_to(path)), (lambda p=p: open(p, "rb"))) for p in files]
    if path.suffix.lower() == ".zip":
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise UserError(f"cannot read {path} as a zip archive ({e})") from None
        names = sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_EXTS) and "__MACOSX" not in n)
        return [(n, (lambda n=n: io.BytesIO(zf.read(n)))) for n in names]
    raise UserError(f"reference {path} is not a folder, .zip or .npz")


def _decode(name, opener) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(opener()) as img:
            a = np.asarray(img.convert("L" if img.mode in ("1", "L", "I", "I;16") else "RGB"), dtype=np.uint8)
    except Exception as e:
        raise UserError(f"cannot read reference image {name!r} ({type(e).__name__}); remove or replace it") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def iter_reference_uint8(path, batch_size: int = 250, max_images: int | None = None, rank: int = 0, world: int = 1):
    """Yield (image numbers, uint8 [B, C, H, W]) batches of this rank's share (image i goes to rank i mod world)
    of a folder, zip or image ``.npz``, in sorted-name order; ``max_images`` takes the first N."""
    path = Path(path)
    if path.suffix == ".npz":
        x = torch.from_numpy(load_npz(path).x)
        x = x[:max_images] if max_images else x
        idx = torch.arange(rank, x.shape[0], world)
        for i in range(0, len(idx), batch_size):
            yield idx[i:i + batch_size].tolist(), images_to_uint8(x[idx[i:i + batch_size]])
        return
    items = _image_items(path)
    if not items:
        raise UserError(f"no images found in {path}")
    items = items[:max_images] if max_images else items
    mine, numbers, shape = items[rank::world], list(range(rank, len(items), world)), None
    for i in range(0, len(mine), batch_size):
        arrs = [_decode(n, o) for n, o in mine[i:i + batch_size]]
        for (n, _), a in zip(mine[i:i + batch_size], arrs):
            shape = shape or (n, a.shape)
            if a.shape != shape[1]:
                raise UserError(f"reference images differ in size/channels: {shape[0]!r} is {shape[1]}, {n!r} is "
                                f"{a.shape}; resize them to one size first")
        yield numbers[i:i + batch_size], torch.from_numpy(np.stack(arrs))


class Reference:
    """Reference statistics: ``mu``/``sigma`` (float64), image count, optional features, the file's sha256."""

    def __init__(self, mu, sigma, num_images=None, features=None, source=None, sha256=None, recipe=None):
        self.mu, self.sigma = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64)
        self.num_images, self.features = num_images, features
        self.source, self.sha256, self.recipe = source, sha256, recipe or {}

    def describe(self) -> dict:
        out = {"reference": self.source, "reference_sha256": self.sha256, "reference_num_images": self.num_images,
               "reference_features": None if self.features is None else int(self.features.shape[0])}
        if self.recipe.get("extractor_sha256"):  # a ref-stats file: which network made it
            out["reference_extractor_sha256"] = self.recipe["extractor_sha256"]
        return out


def compute_reference(path, extractor: Extractor, batch_size: int = 250, max_images: int | None = None,
                      keep_features: bool = True) -> Reference:
    """Statistics (and features, for KID / precision-recall) of reference images, sharded over ranks."""
    rank, world = _rank_world()
    stats, feats, index = FeatureStats(), [], []
    for numbers, x in iter_reference_uint8(path, batch_size, max_images, rank, world):
        f = extractor(x)
        stats.update(f)
        if keep_features:
            feats.append(f.float().cpu())
            index += numbers
    dim = stats.dim or _probe_dim(extractor, path)
    stats = stats if stats.dim else FeatureStats(dim, extractor.device)
    stats.all_reduce_()
    features = gather_in_order(feats, index, dim) if keep_features else None
    return Reference(stats.mean, stats.cov, stats.n, features, source=str(path), sha256=None,
                     recipe={**extractor.recipe(), "max_images": max_images})


def _probe_dim(extractor, path) -> int:
    _, x = next(iter_reference_uint8(path, 1, 1))
    return extractor(x).shape[1]


def save_reference(ref: Reference, out, keep_features: bool = False) -> str:
    """Write an EDM-compatible ``.npz`` (``mu``, ``sigma``) plus ``num_images``, ``recipe`` (JSON) and optionally
    ``features`` (float32); returns the file's sha256."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": ref.mu.numpy(), "sigma": ref.sigma.numpy(), "num_images": np.int64(ref.num_images or 0),
              "recipe": np.array(json.dumps({**ref.recipe, "source": ref.source}, sort_keys=True))}
    if keep_features and ref.features is not None:
        arrays["features"] = ref.features.numpy().astype(np.float32)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
    return file_sha256(out)


def load_reference(path, extractor: Extractor | None = None, batch_size: int = 250,
                   max_images: int | None = None) -> Reference:
    """A `Reference` from a statistics ``.npz`` (``mu``, ``sigma``) or from images (folder / zip / image ``.npz``,
    needs ``extractor``)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"reference not found: {p}; give an EDM-style .npz (mu, sigma) or a folder/zip of images")
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                files = set(z.files)
                if {"mu", "sigma"} <= files:
                    recipe = json.loads(str(z["recipe"])) if "recipe" in files else {}
                    return Reference(z["mu"], z["sigma"], int(z["num_images"]) if "num_images" in files else None,
                                     torch.from_numpy(z["features"]).float() if "features" in files else None,
                                     source=str(p), sha256=file_sha256(p), recipe=recipe)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read {p} as an .npz ({type(e).__name__})") from None
    if extractor is None:
        raise UserError(f"{p} holds images, not statistics: computing them needs --inception")
    ref = compute_reference(p, extractor, batch_size, max_images)
    ref.sha256 = None if p.is_dir() else file_sha256(p)
    return ref


# ------------------------------------------------------------------------------------------------ evaluation
def inception_scores(gen_stats: FeatureStats, gen_feats: torch.Tensor | None, ref: Reference, seed: int = 0,
                     pr: bool = True, pr_max: int = 10_000, k: int = 3) -> dict:
    """FID (and KID / precision-recall where reference features exist) from generated statistics."""
    if ref.mu.shape[0] != gen_stats.dim:
        raise UserError(f"reference statistics are {ref.mu.shape[0]}-d but the extractor gives {gen_stats.dim}-d "
                        f"features: the reference was made with another network")
    n = gen_stats.n
    out = {"fid": frechet_distance(gen_stats.mean, gen_stats.cov, ref.mu, ref.sigma), "fid_label": fid_label(n)}
    if gen_feats is not None and ref.features is not None:
        km, ks = kid_score(gen_feats.double(), ref.features.double(), seed=seed)
        out.update({"kid": km, "kid_std": ks, "kid_subsets": 100, "kid_subset_size": min(1000, n, len(ref.features))})
    if pr and gen_feats is not None and ref.features is not None:
        p, r = precision_recall(ref.features[:pr_max], gen_feats[:pr_max], k=k)
        out.update({"precision": p, "recall": r, "pr_k": k, "pr_num_samples": min(pr_max, n),
                    "pr_num_reference": min(pr_max, len(ref.features))})
    return out


def evaluate_inception(net, spec: dict, extractor: Extractor, ref: Reference, num_samples: int,
                       seed: int = 0, device="cpu", batch_size: int = 250, kid: bool = True, pr: bool = True,
                       pr_max: int = 10_000, seeds=None, decode=None) -> dict:
    """Generate ``num_samples`` images (sample i from seed ``seed + i``, or from ``seeds[i]``; under torchrun rank r
    makes i ≡ r mod world) and score them against ``ref``; ``decode``: latents → images (a VAE). Returns the
    scores, timing and the full recipe."""
    rank, world = _rank_world()
    all_seeds = list(range(seed, seed + num_samples) if seeds is None else seeds)
    seeds = all_seeds[rank::world]
    stats, feats = FeatureStats(), []
    t0, gen_secs, nfe = time.perf_counter(), 0.0, None
    for i in range(0, len(seeds), batch_size):
        t1 = time.perf_counter()
        x, _, info = generate(net, seeds[i:i + batch_size], spec, batch_size=batch_size, device=device,
                              decode=decode)
        gen_secs, nfe = gen_secs + time.perf_counter() - t1, info["nfe"]
        f = extractor(x)
        stats.update(f)
        if kid or pr:
            feats.append(f.float().cpu())
    if stats.dim is None:  # a rank with no seeds still joins the collectives
        x0 = torch.zeros(1, *net.sample_shape)
        stats = FeatureStats(extractor(decode(x0).cpu() if decode is not None else x0).shape[1], extractor.device)
    stats.all_reduce_()
    gen_feats = gather_in_order(feats, seeds, stats.dim) if kid or pr else None
    scores = inception_scores(stats, gen_feats, ref, seed, pr=pr, pr_max=pr_max)
    if not kid:
        scores = {k: v for k, v in scores.items() if not k.startswith("kid")}
    recipe = {**extractor.recipe(), **ref.describe(), "num_samples": stats.n,
              "seeds": f"{all_seeds[0]}..{all_seeds[-1]} ({len(all_seeds)} seeds, sample i from seed i)", "world_size": world,
              "statistics": "float64 sums over all ranks; unbiased covariance", "fid_formula":
              "|mu1-mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)"}
    if "kid" in scores:
        recipe["kid"] = "cubic polynomial kernel (x·y/d + 1)^3, 100 subsets, seeded"
    if "precision" in scores:
        recipe["precision_recall"] = (f"Kynkäänniemi et al. 2019, k=3, first {scores['pr_num_samples']} generated vs "
                                      f"first {scores['pr_num_reference']} reference samples, on {extractor.name} "
                                      f"features (the paper uses VGG-16)")
    if ref.features is None:
        recipe["note"] = "reference has mu/sigma only: KID and precision/recall need reference features"
    return {**scores, "nfe": nfe, "num_samples": stats.n, "seed": seed,
            "images_per_second": round(len(seeds) / max(gen_secs, 1e-9), 2),
            "eval_seconds": round(time.perf_counter() - t0, 2), "fid_recipe": recipe}
