"""Datasets: seeded 2-D toys, sklearn digits, and loaders for users' image folders, EDM zips and .npz files.

All return a `Dataset` (images float32 [N, C, H, W] in [-1, 1]; points [N, 2] with std ≈ 0.5 per coordinate).
"""

from diffdistill.data.base import Dataset
from diffdistill.data.digits import DIGITS_HELDOUT, digits_split, load_digits_dataset
from diffdistill.data.images import (BUILTIN_NAMES, IMAGE_EXTENSIONS, load_dataset, load_edm_zip, load_image_folder,
                                     load_npz)
from diffdistill.data.toy2d import (GMM, RING8_RADIUS, RING8_STD, TOY2D_NAMES, gmm_denoiser, make_toy2d,
                                    mode_assignments, ring8_gmm, ring8_modes)
from diffdistill.errors import UserError
from diffdistill.options import nearest

__all__ = [
    "Dataset", "load_dataset", "BUILTIN_NAMES", "IMAGE_EXTENSIONS",
    "make_toy2d", "TOY2D_NAMES", "GMM", "ring8_gmm", "ring8_modes", "RING8_RADIUS", "RING8_STD", "gmm_denoiser",
    "mode_assignments",
    "load_digits_dataset", "digits_split", "DIGITS_HELDOUT",
    "load_image_folder", "load_edm_zip", "load_npz",
]


# The keys of a config's ``data`` section.
DATA_KEYS = ("name", "path", "split", "heldout", "n", "seed", "prompts")   # prompts: encoded prompts file


def dataset_from_config(cfg: dict) -> Dataset:
    """The ``data`` section of a run config: ``{'name': 'digits', 'split': 'train'|'heldout'|'all'}``,
    ``{'name': 'ring8', 'n': 20000, 'seed': 0}`` or ``{'path': 'my_images/'}``."""
    cfg = dict(cfg or {})
    for k in cfg:
        if k not in DATA_KEYS:
            raise UserError(f"data.{k} is not a data option{nearest(k, DATA_KEYS)}; valid: {', '.join(DATA_KEYS)}")
    spec = cfg.get("path") or cfg.get("name")
    if not spec:
        raise UserError("no data given: set --data (digits, ring8, checkerboard, two_moons, or a path)")
    if spec == "digits":
        split = cfg.get("split", "all")
        if split == "all":
            return load_digits_dataset()
        train, held = digits_split(int(cfg.get("heldout", DIGITS_HELDOUT)))
        if split not in ("train", "heldout"):
            raise UserError(f"digits split must be train, heldout or all, got {split!r}")
        return train if split == "train" else held
    return load_dataset(spec, n=int(cfg.get("n", 10000)), seed=int(cfg.get("seed", 0)))
