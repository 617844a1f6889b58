"""The one interface every layer of the flow implements.

A bijection maps ``x`` to ``y`` and reports ``log|det ∂y/∂x|`` per example, in nats:

    forward(x, cond=None) -> (y, logdet)      logdet: (N,)
    inverse(y, cond=None) -> (x, logdet)      logdet of the inverse map, = -forward logdet

``cond`` is an optional conditioning tensor (N, K) (an encoded class or attribute vector,
see :mod:`realnvp.model`); layers that do not use it ignore it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Bijection(nn.Module):
    """Base class: an invertible map with a tractable log-determinant."""

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class Sequential(Bijection):
    """Composition f_k ∘ … ∘ f_1: log-determinants add (chain rule)."""

    def __init__(self, *layers: Bijection) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, layer_logdet = layer(x, cond)
            logdet = logdet + layer_logdet
        return x, logdet

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = y.new_zeros(y.shape[0])
        for layer in reversed(self.layers):
            y, layer_logdet = layer.inverse(y, cond)
            logdet = logdet + layer_logdet
        return y, logdet

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> Bijection:
        return self.layers[index]


def sum_except_batch(x: Tensor) -> Tensor:
    """Sum over every dimension but the first: (N, ...) -> (N,)."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def zeros_logdet(x: Tensor) -> Tensor:
    """The (N,) log-determinant of a volume-preserving map."""
    return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
