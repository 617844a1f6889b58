"""Affine coupling layer (paper, section 3.3, equations 7–9).

With a binary mask b (1 = passed through):

    y = b ⊙ x + (1 − b) ⊙ (x ⊙ exp(s(b ⊙ x)) + t(b ⊙ x))          (eq. 9, the paper's form)
    log|det ∂y/∂x| = Σ_j (1 − b_j) s_j(b ⊙ x)                          (eq. 6)

The official code's variant shifts first: y = (1 − b) ⊙ (x + t) ⊙ exp(s) + b ⊙ x; its
log-determinant is the same. The scale is bounded, s = scale · tanh(raw_s), with one learned
scalar ``scale`` per coupling, so exp(s) can never overflow (a NaN source in deep stacks).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .bijection import Bijection, sum_except_batch
from .masks import checkerboard_mask

MaskType = Literal["checkerboard", "channel"]


class AffineCoupling(Bijection):
    """One affine coupling layer.

    ``mask="checkerboard"``: x is (N, C, H, W); the net sees b ⊙ x plus the mask as an extra
    channel and returns (N, 2C, H, W).
    ``mask="channel"``: x is (N, C, ...) (images or vectors); one half of dimension 1 passes
    through and conditions the other: with ``parity`` 0 the first ceil(C/2) entries pass,
    with parity 1 the last floor(C/2). The net maps the passed half to 2 × the other half.
    """

    def __init__(
        self,
        net: nn.Module,
        mask: MaskType,
        parity: int,
        *,
        shift_then_scale: bool = False,
        scale_init: float = 1.0,
    ) -> None:
        super().__init__()
        if mask not in ("checkerboard", "channel"):
            raise ValueError(f"mask must be 'checkerboard' or 'channel', got {mask!r}")
        self.net = net
        self.mask = mask
        self.parity = parity
        self.shift_then_scale = shift_then_scale
        # The learned bound of s. It starts at 1 (not at 0 as in the official code's checkerboard
        # layers) because the net's last layer starts at zero: both at zero would freeze s.
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))
        self._mask_cache: dict[tuple, Tensor] = {}

    def _checkerboard(self, x: Tensor) -> Tensor:
        key = (x.shape[-2], x.shape[-1], x.device, x.dtype)
        if key not in self._mask_cache:  # built once per spatial size, not at every step
            self._mask_cache[key] = checkerboard_mask(
                x.shape[-2], x.shape[-1], self.parity, device=x.device, dtype=x.dtype
            )
        return self._mask_cache[key]

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        first = (x.shape[1] + 1) // 2
        a, b = x[:, :first], x[:, first:]
        return (a, b) if self.parity == 0 else (b, a)

    def _merge(self, passed: Tensor, changed: Tensor) -> Tensor:
        return torch.cat([passed, changed] if self.parity == 0 else [changed, passed], dim=1)

    def _s_t(self, passed: Tensor, cond: Tensor | None, b: Tensor | None) -> tuple[Tensor, Tensor]:
        raw_s, t = self.net(passed, cond, b).chunk(2, dim=1)
        s = self.scale * torch.tanh(raw_s)
        if b is not None:  # checkerboard: s and t act on the b = 0 entries only
            s, t = s * (1 - b), t * (1 - b)
        return s, t

    def _affine(self, x: Tensor, s: Tensor, t: Tensor) -> Tensor:
        return (x + t) * torch.exp(s) if self.shift_then_scale else x * torch.exp(s) + t

    def _affine_inverse(self, y: Tensor, s: Tensor, t: Tensor) -> Tensor:
        return y * torch.exp(-s) - t if self.shift_then_scale else (y - t) * torch.exp(-s)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.mask == "checkerboard":
            b = self._checkerboard(x)
            s, t = self._s_t(x * b, cond, b)
            return self._affine(x, s, t), sum_except_batch(s)  # s = t = 0 where b = 1
        passed, changed = self._split(x)
        s, t = self._s_t(passed, cond, None)
        return self._merge(passed, self._affine(changed, s, t)), sum_except_batch(s)

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.mask == "checkerboard":
            b = self._checkerboard(y)
            s, t = self._s_t(y * b, cond, b)  # b ⊙ y = b ⊙ x: the net sees the same input
            return self._affine_inverse(y, s, t), -sum_except_batch(s)
        passed, changed = self._split(y)
        s, t = self._s_t(passed, cond, None)
        return self._merge(passed, self._affine_inverse(changed, s, t)), -sum_except_batch(s)
