"""Squeeze and the multi-scale latent layout (paper, section 3.6).

Squeeze turns (N, C, H, W) into (N, 4C, H/2, W/2): each 2×2 block of every channel becomes four
channels, channel 4c + 2i + j holding sub-pixel (i, j) of input channel c (``pixel_unshuffle``
order). Each half of the squeezed channels therefore holds sub-pixels of both checkerboard colours,
so the channel-wise masks that follow partition the pixels differently from the checkerboard ones.

At the end of every scale but the last, the second half of the channels is factored out as that
scale's latent z_i and the first half goes on to the next scale. The model's latent is the list
[z_1, …, z_L], finest scale first; :func:`flatten_latents` concatenates them, each flattened in
(C, H, W) order, into exactly D = C·H·W numbers per example.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .bijection import Bijection, zeros_logdet


class Squeeze(Bijection):
    """(N, C, H, W) → (N, 4C, H/2, W/2); a permutation, so log|det| = 0."""

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"cannot squeeze a {tuple(x.shape[-2:])} image: H and W must be even")
        return F.pixel_unshuffle(x, 2), zeros_logdet(x)

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return F.pixel_shuffle(y, 2), zeros_logdet(y)


def factor_out(h: Tensor) -> tuple[Tensor, Tensor]:
    """Split (N, 2C, H, W) into the kept half (first C channels) and the latent (last C)."""
    half = h.shape[1] // 2
    return h[:, :half], h[:, half:]


def latent_shapes(image_shape: tuple[int, int, int], scales: int) -> list[tuple[int, int, int]]:
    """Shapes (C, H, W) of z_1 … z_L for an input of ``image_shape``.

    Every scale but the last squeezes (halving H and W, so they must be even there) and factors
    out half of the channels; the last scale's output is z_L.
    """
    c, h, w = image_shape
    shapes = []
    for scale in range(scales - 1):
        if h % 2 or w % 2:
            raise ValueError(
                f"scale {scale + 1} of {scales} must squeeze a {h}×{w} input, but H and W must "
                f"be even there: use fewer scales or an input size divisible by {2 ** (scales - 1)}"
            )
        c, h, w = 4 * c, h // 2, w // 2
        shapes.append((c - c // 2, h, w))
        c = c // 2
    shapes.append((c, h, w))
    return shapes


def flatten_latents(latents: list[Tensor]) -> Tensor:
    """[z_1 (N, C_1, H_1, W_1), …] → (N, D), finest scale first, each in (C, H, W) order."""
    return torch.cat([z.reshape(z.shape[0], -1) for z in latents], dim=1)


def unflatten_latents(z: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
    """Inverse of :func:`flatten_latents` for the given per-scale shapes."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if z.shape[1] != sum(sizes):
        raise ValueError(f"expected {sum(sizes)} latent numbers per example, got {z.shape[1]}")
    return [part.reshape(z.shape[0], *s) for part, s in zip(z.split(sizes, dim=1), shapes)]
