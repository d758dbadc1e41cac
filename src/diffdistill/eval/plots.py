"""Pictures of samples: image grids and per-sample PNG files (written with PIL, exact uint8 pixels by EDM's rule,
``generate.images_to_uint8_pixels``), 2-D scatter plots and line plots via matplotlib (Agg backend, no display)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .generate import images_to_uint8_pixels  # noqa: E402


def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile [N, C, H, W] images in [-1, 1] into one HxWx3 (or HxW) uint8 array (pixels quantised by EDM's rule)."""
    x = images_to_uint8_pixels(x).numpy()
    n, c, h, w = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = \
            x[i].transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid


def write_png(pixels: np.ndarray, path) -> None:
    """Write an HxW (grey, PNG mode L) or HxWx3 (RGB) uint8 array exactly, as EDM's generate.py:302-305 does."""
    from PIL import Image
    pixels = np.ascontiguousarray(pixels)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    Image.fromarray(pixels, "L" if pixels.ndim == 2 else "RGB").save(path)


def write_png_folder(x: torch.Tensor, out_dir, names) -> list[Path]:
    """One PNG per image of [N, C, H, W] float images in [−1, 1] (``names[i]`` without suffix), pixels by EDM's
    rule; reading a file back gives exactly ``images_to_uint8_pixels(x[i])``, the uint8 the FID path scores."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pixels = images_to_uint8_pixels(x).permute(0, 2, 3, 1).numpy()
    paths = []
    for name, p in zip(names, pixels):
        paths.append(out_dir / f"{name}.png")
        write_png(p, paths[-1])
    return paths


def save_samples_png(x: torch.Tensor, path, title: str | None = None, reference: torch.Tensor | None = None) -> None:
    """Save images as an upscaled grid, or 2-D points as a scatter plot (over ``reference`` points if given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if x.ndim == 4:
        grid = image_grid(x)
        scale = max(1, 512 // max(grid.shape[:2]))
        grid = np.kron(grid, np.ones((scale, scale) + ((1,) if grid.ndim == 3 else ()), dtype=np.uint8))
        write_png(grid, path)
        return
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=1, c="0.75", label="data")
    ax.scatter(x[:, 0].cpu(), x[:, 1].cpu(), s=1, c="C0", label="samples")
    lim = float(max(3.0, x.abs().max().clamp(max=6).item() * 1.1))
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def line_plot(series: dict, path, xlabel: str, ylabel: str, title: str = "", logy: bool = False) -> None:
    """``series``: name → (xs, ys) or (xs, ys, lows, highs): a line, with a shaded band between lows and highs."""
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for i, (name, (xs, ys, *band)) in enumerate(series.items()):
        ax.plot(xs, ys, marker="o", ms=3, label=name, color=f"C{i % 10}")
        if band:
            ax.fill_between(xs, band[0], band[1], color=f"C{i % 10}", alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
