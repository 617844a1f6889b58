"""Batch normalisation as a bijection (paper, section 3.7 and appendix E).

Per channel, y = (x − μ) / √(σ² + ε), so log|det| = −½ Σ_c log(σ²_c + ε) · (positions per
channel). In training μ, σ² are the batch's statistics (gradients flow through them) and the
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

BatchNormMode = Literal["batch", "lagged"]


class BatchNormFlow(Bijection):
    """Per-channel batch normalisation of (N, C, H, W) or (N, C) tensors, no affine part."""

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
    ) -> None:
        super().__init__()
        if mode not in ("batch", "lagged"):
            raise ValueError(f"batch norm mode must be 'batch' or 'lagged', got {mode!r}")
        if not 0 < momentum <= 1:
            raise ValueError(f"batch norm momentum must be in (0, 1], got {momentum}")
        if not eps > 0:
            raise ValueError(f"batch norm eps must be positive, got {eps}")
        self.momentum = momentum
        self.eps = eps
        self.mode = mode
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        # When False, training-mode calls use batch statistics but leave the running averages
        # alone (used when a step recomputes a forward pass, so they move once per step).
        self.update_running_stats = True

    def _shape(self, x: Tensor) -> tuple[list[int], list[int], int]:
        dims = [0] + list(range(2, x.dim()))
        view = [1, -1] + [1] * (x.dim() - 2)
        positions = x[0, 0].numel()  # H · W for images, 1 for vectors
        return dims, view, positions

    def statistics(
        self, x: Tensor, running: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """The per-channel (mean, var), each (C,), that this layer normalises ``x`` with.

        Eval mode: the running averages. Train mode: the batch's statistics (blended with the
        running averages in lagged mode), and the running averages move towards them unless
        ``update_running_stats`` is False. ``running`` replaces the running averages the lagged
        blend starts from: a recomputation of an earlier forward pass (:mod:`realnvp.memory`)
        passes the values they had then.
        """
        if not self.training:
            return self.running_mean, self.running_var
        dims, _, _ = self._shape(x)
        if self.mode == "batch" and not self.sync_stats and x.numel() <= x.shape[1]:
            # One value per channel: σ² = 0 maps every input to 0 with a log-det of −½ log ε.
            raise ValueError(f"batch norm in train mode needs more than one value per channel, "
                             f"got a batch of shape {tuple(x.shape)} (use a larger batch, "
                             "batch_norm='lagged', or eval mode)")
        mean, var = batch_mean_var(x, dims, sync=self.sync_stats)
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
        """y = (x − mean) / √(var + ε) per channel, and its log|det| (N,)."""
        _, view, positions = self._shape(x)
        log_std = 0.5 * torch.log(var + self.eps)
        y = (x - mean.view(view)) * torch.exp(-log_std).view(view)
        logdet = -positions * log_std.sum()
        return y, logdet.expand(x.shape[0]).to(x.dtype)

    def denormalize(self, y: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`normalize` with the same statistics: x = y · √(var + ε) + mean."""
        _, view, positions = self._shape(y)
        log_std = 0.5 * torch.log(var + self.eps)
        x = y * torch.exp(log_std).view(view) + mean.view(view)
        logdet = positions * log_std.sum()
        return x, logdet.expand(y.shape[0]).to(y.dtype)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.normalize(x, *self.statistics(x))

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.denormalize(y, self.running_mean, self.running_var)
