"""Pictures of samples: image grids (PNG) and 2-D scatter plots, via matplotlib (Agg backend, no display)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile [N, C, H, W] images in [-1, 1] into one HxWx3 (or HxW) uint8 array."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    n, c, h, w = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = \
            x[i].transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid


def save_samples_png(x: torch.Tensor, path, title: str | None = None, reference: torch.Tensor | None = None) -> None:
    """Save images as an upscaled grid, or 2-D points as a scatter plot (over ``reference`` points if given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if x.ndim == 4:
        grid = image_grid(x)
        scale = max(1, 512 // max(grid.shape[:2]))
        grid = np.kron(grid, np.ones((scale, scale) + ((1,) if grid.ndim == 3 else ()), dtype=np.uint8))
        plt.imsave(path, grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255)
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
    """``series``: name → (xs, ys)."""
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", ms=3, label=name)
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
