"""Binary masks of the affine coupling layers (paper, section 3.4).

``b = 1`` marks the entries passed through unchanged (they condition ``s`` and ``t``),
``b = 0`` the entries that are transformed.
"""

from __future__ import annotations

import torch
from torch import Tensor


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


def _check_parity(parity: int) -> None:
    if parity not in (0, 1):
        raise ValueError(f"parity must be 0 or 1, got {parity!r}")
