"""Image grids and PNG files.

Everything here takes image tensors (N, C, H, W) with values in [0, 1] and returns tensors or
writes PNGs with Pillow; the model-side computations live in :mod:`realnvp.experiments`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 2,
              pad_value: float = 1.0) -> Tensor:
    """Tile (N, C, H, W) images into one (C, rows·(H+p)+p, nrow·(W+p)+p) image, row-major.

    ``nrow`` images per row (default: a near-square grid); ``padding`` pixels of ``pad_value``
    between and around them.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding),
                      pad_value, dtype=images.dtype)
    for k in range(n):
        r, col = divmod(k, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = images[k]
    return grid


def to_pil(image: Tensor) -> Image.Image:
    """(C, H, W) in [0, 1] → an 8-bit PIL image (mode L for 1 channel, RGB for 3)."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be (1 or 3, H, W), got shape {tuple(image.shape)}")
    array = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    if array.shape[0] == 1:
        return Image.fromarray(array[0], mode="L")
    return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), mode="RGB")


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write a (C, H, W) image in [0, 1] as a PNG (folders created), via a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    to_pil(image).save(tmp, format="PNG")
    tmp.replace(path)
    return path


def save_image_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Tile (N, C, H, W) images in [0, 1] (see :func:`make_grid`) and write them as a PNG."""
    return save_png(make_grid(images.detach().float().cpu(), nrow), path)
