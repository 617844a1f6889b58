"""Affine coupling layer (paper, section 3.3, equations 7–9).

With a binary mask b (1 = passed through):

    y = b ⊙ x + (1 − b) ⊙ (x ⊙ exp(s(b ⊙ x)) + t(b ⊙ x))          (eq. 9, the paper's form)
    log|det ∂y/∂x| = Σ_j (1 − b_j) s_j(b ⊙ x)                          (eq. 6)

The official code's variant shifts first: y = (1 − b) ⊙ (x + t) ⊙ exp(s) + b ⊙ x; its
log-determinant is the same. The scale is bounded, s = scale · tanh(raw_s), with one learned
scalar ``scale`` per coupling, so exp(s) can never overflow (a NaN source in deep stacks).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .bijection import Bijection, sum_except_batch
from .masks import CheckerboardCache, MaskType, merge_channels, split_channels


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
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity!r}")
        self.net = net
        self.mask = mask
        self.parity = parity
        self.shift_then_scale = shift_then_scale
        # The learned bound of s. It starts at 1 (not at 0 as in the official code's checkerboard
        # layers) because the net's last layer starts at zero: both at zero would freeze s.
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))
        self._masks = CheckerboardCache(parity)
        # Mixed precision of the s/t network only: None runs it in the input's dtype,
        # torch.bfloat16 under autocast (set by RealNVP.set_precision; a run-time option, not
        # part of the architecture, and not saved with the weights).
        self.st_autocast: torch.dtype | None = None

    def _checkerboard(self, x: Tensor) -> Tensor:
        return self._masks.mask(x)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return split_channels(x, self.parity)

    def _merge(self, passed: Tensor, changed: Tensor) -> Tensor:
        return merge_channels(passed, changed, self.parity)

    def conditioner(self, x: Tensor) -> Tensor:
        """The part of x that passes through unchanged and is all that s and t see: b ⊙ x
        (checkerboard, same shape as x) or the passed half of the channels. It is the same for x
        and for its image y, which is what makes the layer invertible."""
        return x * self._checkerboard(x) if self.mask == "checkerboard" else self._split(x)[0]

    def s_t(self, h: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """s and t from the conditioner h: full-size and zero on the passed entries
        (checkerboard), or the size of the transformed half (channel)."""
        b = self._checkerboard(h) if self.mask == "checkerboard" else None
        if self.st_autocast is None:
            raw = self.net(h, cond, b)
        else:
            if h.dtype != torch.float32:  # model.double() after set_precision("bf16")
                raise TypeError(f"bf16 s/t networks need a float32 model, this one computes "
                                f"in {h.dtype}: call set_precision('fp32') first")
            with torch.autocast(h.device.type, dtype=self.st_autocast):
                raw = self.net(h, cond, b)
        # s, t, the affine map and the log-det stay in full precision, also under a caller's
        # own autocast region
        raw = raw.to(h.dtype)
        raw_s, t = raw.chunk(2, dim=1)
        s = self.scale * torch.tanh(raw_s)
        if b is not None:  # checkerboard: s and t act on the b = 0 entries only
            s, t = s * (1 - b), t * (1 - b)
        return s, t

    def _scale_shift(self, x: Tensor, s: Tensor, t: Tensor) -> Tensor:
        return (x + t) * torch.exp(s) if self.shift_then_scale else x * torch.exp(s) + t

    def _unscale_shift(self, y: Tensor, s: Tensor, t: Tensor) -> Tensor:
        return y * torch.exp(-s) - t if self.shift_then_scale else (y - t) * torch.exp(-s)

    def affine(self, x: Tensor, s: Tensor, t: Tensor) -> Tensor:
        """The coupling's map of the whole of x for given s and t (from :meth:`s_t`)."""
        if self.mask == "checkerboard":
            return self._scale_shift(x, s, t)  # s = t = 0 where b = 1: those entries pass
        passed, changed = self._split(x)
        return self._merge(passed, self._scale_shift(changed, s, t))

    def affine_inverse(self, y: Tensor, s: Tensor, t: Tensor) -> Tensor:
        """Inverse of :meth:`affine` for the same s and t."""
        if self.mask == "checkerboard":
            return self._unscale_shift(y, s, t)
        passed, changed = self._split(y)
        return self._merge(passed, self._unscale_shift(changed, s, t))

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s, t = self.s_t(self.conditioner(x), cond)
        return self.affine(x, s, t), sum_except_batch(s)

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s, t = self.s_t(self.conditioner(y), cond)  # conditioner(y) = conditioner(x)
        return self.affine_inverse(y, s, t), -sum_except_batch(s)
