"""Binary masks of the affine coupling layers (paper, section 3.4).

``b = 1`` marks the entries passed through unchanged (they condition ``s`` and ``t``),
``b = 0`` the entries that are transformed.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

MaskType = Literal["checkerboard", "channel"]


def checkerboard_mask(
    height: int,
    width: int,
    parity: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Spatial checkerboard, shape (1, 1, H, W): 1 where (i + j) % 2 == parity.

    The paper's first checkerboard coupling passes the pixels with i + j odd (parity 1);
    successive couplings alternate the parity so that every pixel gets transformed.
    """
    _check_parity(parity)
    i = torch.arange(height, device=device).view(-1, 1)
    j = torch.arange(width, device=device).view(1, -1)
    return ((i + j) % 2 == parity).to(dtype).view(1, 1, height, width)


def channel_mask(
    channels: int,
    parity: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Channel-wise mask, shape (1, C, 1, 1): 1 on the first half of the channels (parity 0) or
    on the second half (parity 1). For odd C the first half is the larger, ceil(C / 2)."""
    _check_parity(parity)
    first = (channels + 1) // 2
    b = torch.zeros(channels, device=device, dtype=dtype)
    if parity == 0:
        b[:first] = 1
    else:
        b[first:] = 1
    return b.view(1, channels, 1, 1)


def channel_halves(channels: int, parity: int) -> tuple[slice, slice]:
    """(passed, transformed) slices of dimension 1 for a channel-wise coupling: the passed half
    is the one :func:`channel_mask` marks with 1."""
    _check_parity(parity)
    first = (channels + 1) // 2
    head, tail = slice(0, first), slice(first, channels)
    return (head, tail) if parity == 0 else (tail, head)


def split_channels(x: Tensor, parity: int) -> tuple[Tensor, Tensor]:
    """(passed, transformed) halves of dimension 1 of x (:func:`channel_halves`)."""
    passed, changed = channel_halves(x.shape[1], parity)
    return x[:, passed], x[:, changed]


def merge_channels(passed: Tensor, changed: Tensor, parity: int) -> Tensor:
    """Inverse of :func:`split_channels`: the two halves back in their order."""
    return torch.cat([passed, changed] if parity == 0 else [changed, passed], dim=1)


def checkerboard_passed(height: int, width: int, parity: int) -> int:
    """How many of the H·W positions :func:`checkerboard_mask` marks 1: ⌈H·W/2⌉ for parity 0
    (it holds the corner (0, 0)), ⌊H·W/2⌋ for parity 1."""
    _check_parity(parity)
    return (height * width + 1 - parity) // 2


class CheckerboardCache:
    """The checkerboard mask of one parity, built once per (H, W, device, dtype) and not at
    every step: ``mask(x)`` (1, 1, H, W), and ``transformed(x)`` the flat indices i·W + j of its
    b = 0 positions, which select them without a host sync (boolean indexing would read the
    count back)."""

    def __init__(self, parity: int) -> None:
        _check_parity(parity)
        self.parity = parity
        self._built: dict[tuple, Tensor] = {}

    def mask(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The mask for x's spatial size and device, in ``dtype`` (default: x's)."""
        return self._get("mask", x, dtype or x.dtype)

    def transformed(self, x: Tensor) -> Tensor:
        """(H·W − passed,) int64 indices of the b = 0 positions, ascending."""
        return self._get("transformed", x, torch.long)

    def _build(self, kind: str, x: Tensor, dtype: torch.dtype) -> Tensor:
        height, width = x.shape[-2], x.shape[-1]
        if kind == "transformed":
            return torch.tensor([i * width + j for i in range(height) for j in range(width)
                                 if (i + j) % 2 != self.parity], device=x.device, dtype=dtype)
        return checkerboard_mask(height, width, self.parity, device=x.device, dtype=dtype)

    def _get(self, kind: str, x: Tensor, dtype: torch.dtype) -> Tensor:
        if torch.compiler.is_compiling():
            # Filling the cache inside a compiled graph would invalidate that graph's guards
            # (a recompilation on the next call); there the mask is a folded constant anyway.
            return self._build(kind, x, dtype)
        key = (kind, x.shape[-2], x.shape[-1], x.device, dtype)
        if key not in self._built:
            # built outside inference mode, so a mask first made while evaluating can still
            # take part in a later training step's autograd graph
            with torch.inference_mode(False):
                self._built[key] = self._build(kind, x, dtype)
        return self._built[key]


def _check_parity(parity: int) -> None:
    if parity not in (0, 1):
        raise ValueError(f"parity must be 0 or 1, got {parity!r}")
