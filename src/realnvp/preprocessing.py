"""From pixels to the space the flow models, and the bits/dim unit (paper, section 4.1).

Dequantisation: x̃ = (x + u) / 2ⁿ with u ~ U[0, 1)^D for n-bit pixels x ∈ {0, …, 2ⁿ − 1}, so
x̃ ∈ [0, 1)^D has a density and the model's continuous log-likelihood bounds the discrete one.

Logit: the flow models y = logit(p) with
    p = α + (1 − α) · x̃       (the paper's form, α = 0.05),   p ∈ [α, 1)
    p = α + (1 − 2α) · x̃      (the official code's form),     p ∈ [α, 1 − α]
whose Jacobian is part of the model's density: log|dy/dx̃| = log k − log p − log(1 − p),
k = 1 − α or 1 − 2α.

Bits per dimension of an n-bit image (log p in nats, the density of x̃ on [0, 1]^D):
    bpd = (−log p(x̃) + D · n · ln 2) / (D · ln 2) = −log p(x̃) / (D · ln 2) + n
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .bijection import Bijection, sum_except_batch

LogitForm = Literal["paper", "official"]


class LogitTransform(Bijection):
    """Dequantised pixels x̃ ∈ [0, 1) → logit space, with the exact log-Jacobian."""

    def __init__(self, alpha: float = 0.05, form: LogitForm = "paper") -> None:
        super().__init__()
        if form not in ("paper", "official"):
            raise ValueError(f"logit form must be 'paper' or 'official', got {form!r}")
        if not 0 < alpha < 0.5:
            raise ValueError(f"logit alpha must be in (0, 0.5), got {alpha}")
        self.alpha = alpha
        self.form = form
        self.k = 1 - alpha if form == "paper" else 1 - 2 * alpha

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        p = self.alpha + self.k * x
        # 1 − p from 1 − x̃, not from p: for x̃ just below 1, p rounds to 1 in float32
        one_minus_p = (1 - self.alpha - self.k) + self.k * (1 - x)
        log_p, log_1mp = torch.log(p), torch.log(one_minus_p)
        return log_p - log_1mp, sum_except_batch(math.log(self.k) - log_p - log_1mp)

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        p = torch.sigmoid(y)
        log_p, log_1mp = -F.softplus(-y), -F.softplus(y)  # log σ(y), log(1 − σ(y)), stable
        return (p - self.alpha) / self.k, -sum_except_batch(math.log(self.k) - log_p - log_1mp)


def dequantize(x: Tensor, n_bits: int = 8, generator: torch.Generator | None = None, *,
               noise: Tensor | None = None) -> Tensor:
    """Integer pixels (any dtype) in {0, …, 2ⁿ − 1} → x̃ = (x + u) / 2ⁿ, u ~ U[0, 1), float32.

    ``u`` is drawn from ``generator``, or given as ``noise`` (values in [0, 1), x's shape).
    Non-integer, out-of-range or non-finite pixels are a ValueError (checking them reads values
    back from the device, except for uint8 pixels at 8 bits, which need no check).
    In float32, 255 + u rounds up to 256 for u within 2⁻¹⁷ of 1, which would put x̃ on the
    logit's pole at 1; x̃ is therefore capped at the largest float32 below 1.
    """
    _check_pixels(x, n_bits)
    x = x.float()
    if noise is None:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif noise.shape != x.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, the pixels {tuple(x.shape)}")
    elif noise.numel() and not (0 <= noise.min() and noise.max() < 1):
        raise ValueError("noise must lie in [0, 1) (a uniform dequantisation draw)")
    else:
        u = noise.to(x.device, x.dtype)
    return ((x + u) / 2**n_bits).clamp(max=1 - torch.finfo(x.dtype).eps / 2)


def _check_pixels(x: Tensor, n_bits: int) -> None:
    if not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be in 1..8, got {n_bits}")
    if x.is_floating_point():
        if not torch.isfinite(x).all():
            raise ValueError("pixels contain NaN or infinite values")
        if not torch.equal(x, x.round()):
            raise ValueError("pixels must be integer values (e.g. uint8), got non-integer "
                             "floats; for dequantised pixels in [0, 1] use log_prob directly")
    if (x.dtype != torch.uint8 or n_bits < 8) and x.numel():
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 2**n_bits - 1:
            raise ValueError(f"{n_bits}-bit pixel values must be in [0, {2**n_bits - 1}], got "
                             f"[{lo}, {hi}]")


def bits_per_dim(log_prob: Tensor, num_dims: int, n_bits: int = 8) -> Tensor:
    """Bits/dim from the log-density of x̃ ∈ [0, 1]^D in nats (see the module docstring)."""
    return (-log_prob + num_dims * n_bits * math.log(2)) / (num_dims * math.log(2))
