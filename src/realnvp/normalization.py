"""Batch normalisation as a bijection (paper, section 3.7 and appendix E).

Per channel, y = (x − μ) / √(σ² + ε), so log|det| = −½ Σ_c log(σ²_c + ε) · (entries per
channel and image). By default every entry of the coupling's output is normalised (the paper:
batch normalisation of the coupling layer's output). With the mask and parity of the coupling
before it, only the entries that coupling transformed (b = 0) are normalised and counted in the
log-determinant, the passed ones left alone (SPEC §1.5): after a channel-wise coupling the
transformed half of the channels with its own statistics; after a checkerboard coupling the
b = 0 positions of every channel, with μ and σ² either of those entries alone or, as the
official code computes them (``batch_norm_log_diff(res * (1 - mask))``), of (1 − b) ⊙ x over
every position, the passed entries counting as zeros (``zeros_in_stats``). In
training μ, σ² are the batch's statistics (gradients flow through them) and the
running averages move towards them: running ← (1 − m) · running + m · batch, with m = 0.1
(the official code's decay of 0.9). In evaluation and in the inverse, the running averages are
used: the model in train mode and in eval mode are two different bijections.

The "lagged" variant (appendix E, used by the paper for CIFAR-10) normalises in training with
(1 − m) · running + m · batch, the gradient flowing through the batch part only; it is robust to
tiny minibatches.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .bijection import Bijection
from .distributed import batch_mean_var
from .masks import (
    CheckerboardCache,
    MaskType,
    channel_halves,
    checkerboard_passed,
    merge_channels,
    split_channels,
)

BatchNormMode = Literal["batch", "lagged"]


class BatchNormFlow(Bijection):
    """Per-channel batch normalisation of (N, C, H, W) or (N, C) tensors, no affine part.

    ``mask=None``: every entry. ``mask="checkerboard"`` or ``"channel"`` with ``parity``: only
    the entries that an :class:`~realnvp.AffineCoupling` with that mask and parity transforms
    (b = 0), with their own statistics, or with those of (1 − b) ⊙ x over every position if
    ``zeros_in_stats`` (the official code; checkerboard masks only, for channel masks the two
    are the same). The running averages have one entry per normalised channel (all C for a
    checkerboard, the transformed half for channel-wise masks).
    """

    running_mean: Tensor
    running_var: Tensor
    # Training statistics over all processes of a distributed run (realnvp.distributed).
    sync_stats = False

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.1,
        eps: float = 1e-4,
        mode: BatchNormMode = "batch",
        mask: MaskType | None = None,
        parity: int = 0,
        zeros_in_stats: bool = False,
    ) -> None:
        super().__init__()
        if mode not in ("batch", "lagged"):
            raise ValueError(f"batch norm mode must be 'batch' or 'lagged', got {mode!r}")
        if mask not in (None, "checkerboard", "channel"):
            raise ValueError(f"batch norm mask must be None, 'checkerboard' or 'channel', got "
                             f"{mask!r}")
        if zeros_in_stats and mask != "checkerboard":
            raise ValueError("zeros_in_stats is the official code's statistics after a "
                             "checkerboard coupling; give mask='checkerboard'")
        self.num_features = num_features
        self.mask = mask
        self.parity = parity
        self.zeros_in_stats = zeros_in_stats
        self._checkerboard = CheckerboardCache(parity)  # checks the parity
        normalised = num_features
        if mask == "channel":
            _, changed = channel_halves(num_features, parity)
            normalised = changed.stop - changed.start
        if not 0 < momentum <= 1:
            raise ValueError(f"batch norm momentum must be in (0, 1], got {momentum}")
        if not eps > 0:
            raise ValueError(f"batch norm eps must be positive, got {eps}")
        self.momentum = momentum
        self.eps = eps
        self.mode = mode
        self.register_buffer("running_mean", torch.zeros(normalised))
        self.register_buffer("running_var", torch.ones(normalised))
        # When False, training-mode calls use batch statistics but leave the running averages
        # alone (used when a step recomputes a forward pass, so they move once per step).
        self.update_running_stats = True

    def _check_channels(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"batch norm of {self.num_features} channels got a tensor of shape "
                             f"{tuple(x.shape)}")
        if self.mask == "checkerboard" and x.dim() != 4:
            raise ValueError(f"a checkerboard batch norm needs (N, C, H, W) images, got a tensor "
                             f"of shape {tuple(x.shape)}")

    def _entries(self, x: Tensor) -> tuple[Tensor, list[int]]:
        """The tensor whose per-channel statistics this layer normalises with, and the
        dimensions those statistics reduce over (batch and positions)."""
        dims = [0] + list(range(2, x.dim()))
        if self.mask == "channel":  # the transformed half of the channels
            return split_channels(x, self.parity)[1], dims
        if self.mask == "checkerboard" and self.zeros_in_stats:  # (1 − b) ⊙ x, every position
            return torch.where(self._checkerboard.mask(x, torch.bool), 0, x), dims
        if self.mask == "checkerboard":  # the b = 0 positions only: (N, C, H·W − passed)
            flat = x.reshape(x.shape[0], x.shape[1], -1)
            return flat.index_select(2, self._checkerboard.transformed(x)), [0, 2]
        return x, dims

    def _count(self, x: Tensor) -> int:
        """Normalised entries per channel and image: the positions, or the b = 0 ones."""
        positions = x[0, 0].numel()  # H · W for images, 1 for vectors
        if self.mask == "checkerboard":
            return positions - checkerboard_passed(x.shape[-2], x.shape[-1], self.parity)
        return positions

    def _map(self, x: Tensor, mean: Tensor, log_std: Tensor, inverse: bool) -> Tensor:
        """x with its normalised entries mapped to (x − mean) / exp(log_std), or back with
        ``inverse``; the other entries unchanged."""
        view = [1, -1] + [1] * (x.dim() - 2)
        mean, log_std = mean.view(view), log_std.view(view)

        def affine(v: Tensor) -> Tensor:
            if inverse:
                return v * torch.exp(log_std) + mean
            return (v - mean) * torch.exp(-log_std)

        if self.mask == "channel":
            passed, changed = split_channels(x, self.parity)
            return merge_channels(passed, affine(changed), self.parity)
        if self.mask == "checkerboard":  # b = 1: passed by the coupling, left alone here
            return torch.where(self._checkerboard.mask(x, torch.bool), x, affine(x))
        return affine(x)

    def statistics(
        self, x: Tensor, running: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """The per-channel (mean, var) that this layer normalises ``x`` with, each with one entry
        per normalised channel (C, or the transformed half after a channel-wise coupling).

        Eval mode: the running averages. Train mode: the batch's statistics (blended with the
        running averages in lagged mode), and the running averages move towards them unless
        ``update_running_stats`` is False. ``running`` replaces the running averages the lagged
        blend starts from: a recomputation of an earlier forward pass (:mod:`realnvp.memory`)
        passes the values they had then.
        """
        self._check_channels(x)
        if not self.training or self._count(x) == 0:
            # count 0: after a parity-0 checkerboard coupling on a 1 × 1 image nothing was
            # transformed, so this layer is the identity (and an empty batch has no statistics)
            return self.running_mean, self.running_var
        entries, dims = self._entries(x)
        if (self.mode == "batch" and not self.sync_stats
                and entries.numel() <= entries.shape[1]):
            # One value per channel: σ² = 0 maps every input to 0 with a log-det of −½ log ε.
            raise ValueError(f"batch norm in train mode needs more than one value per channel, "
                             f"got a batch of shape {tuple(x.shape)} (use a larger batch, "
                             "batch_norm='lagged', or eval mode)")
        mean, var = batch_mean_var(entries, dims, sync=self.sync_stats)
        m = self.momentum
        if self.mode == "lagged":
            running_mean, running_var = running or (self.running_mean, self.running_var)
            mean = (1 - m) * running_mean + m * mean
            var = (1 - m) * running_var + m * var
            if self.update_running_stats:
                with torch.no_grad():
                    self.running_mean.copy_(mean)
                    self.running_var.copy_(var)
        elif self.update_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach(), m)
        return mean, var

    def normalize(self, x: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """y = (x − mean) / √(var + ε) per channel on the normalised entries, and its log|det|
        (N,)."""
        self._check_channels(x)
        log_std = 0.5 * torch.log(var + self.eps)
        logdet = -self._count(x) * log_std.sum()
        return self._map(x, mean, log_std, False), logdet.expand(x.shape[0]).to(x.dtype)

    def denormalize(self, y: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`normalize` with the same statistics: x = y · √(var + ε) + mean."""
        self._check_channels(y)
        log_std = 0.5 * torch.log(var + self.eps)
        logdet = self._count(y) * log_std.sum()
        return self._map(y, mean, log_std, True), logdet.expand(y.shape[0]).to(y.dtype)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.normalize(x, *self.statistics(x))

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.denormalize(y, self.running_mean, self.running_var)
