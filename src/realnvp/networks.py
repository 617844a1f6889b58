"""The s/t networks of the coupling layers (paper, section 4.1 and the official code).

They are never inverted and never differentiated for a log-determinant, so they can be any
network. Each maps the passed-through part of the input, shape (N, C_in, H, W) or (N, D_in),
to ``2 * C_out`` outputs: ``raw_s`` and ``t`` of the transformed part. Their last layer starts
at zero so that every coupling starts as the identity map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .distributed import batch_moments


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics can span every process of a distributed run
    (``sync_stats``, set by :func:`realnvp.distributed.sync_batch_norm`). Off (the default), it
    is exactly ``nn.BatchNorm2d``; the parameters, buffers and state-dict keys are the same."""

    sync_stats = False

    def count_batch(self) -> float:
        """Count one more training batch; return its weight in the running averages
        (nn.BatchNorm2d's rule: ``momentum``, or 1/k for the k-th batch if it is None)."""
        if not self.track_running_stats:
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def forward(self, x: Tensor) -> Tensor:
        if not (self.sync_stats and self.training):
            return super().forward(x)
        # Statistics in at least float32, as nn.BatchNorm2d computes them for bfloat16 inputs.
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        mean, var, n = batch_moments(h, (0, 2, 3))
        if self.track_running_stats:  # the update nn.BatchNorm2d makes (unbiased variance)
            with torch.no_grad():
                m = self.count_batch()
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        return (h * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)


class WeightNormConv2d(nn.Module):
    """Convolution with weight normalisation (Salimans & Kingma 2016): w = g · v / ‖v‖ per output
    channel. The magnitudes ``g`` are what the training recipe L2-penalises (5e-5 · Σ g²)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, zero_init: bool = False
    ) -> None:
        super().__init__()
        self.padding = kernel_size // 2
        v = torch.empty(out_channels, in_channels, kernel_size, kernel_size)
        nn.init.kaiming_normal_(v, nonlinearity="relu")
        self.weight_v = nn.Parameter(v)
        g = torch.zeros(out_channels, 1, 1, 1) if zero_init else v.flatten(1).norm(dim=1)
        self.weight_g = nn.Parameter(g.view(out_channels, 1, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def weight(self) -> Tensor:
        # g · v / ‖v‖ with the norm over all but the output dimension, as one fused kernel
        # (the one torch.nn.utils.weight_norm uses): about 4× cheaper forward and backward
        # than the same formula in separate operations, which for 270 small convolutions a
        # step is a measurable share.
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight(), self.bias, padding=self.padding)


class _NormReluConv(torch.autograd.Function):
    """conv(relu(batch_norm(x))) in training mode that stores x only.

    Ordinary backpropagation keeps both x (for batch norm's backward) and a = relu(batch_norm(x))
    (for the convolution's); here the backward pass recomputes a from x with the same kernel,
    bit for bit, which costs two memory-bound passes over x and no convolution. In a
    pre-activation ResNet that halves the stored activations. Batch norm normalises with the
    batch's statistics and moves its running averages once, in the forward pass.
    """

    @staticmethod
    def forward(ctx, x: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                eps: float, conv_weight: Tensor, conv_bias: Tensor, padding: int) -> Tensor:
        a, mean, invstd = torch.ops.aten.native_batch_norm(
            x, norm_weight, norm_bias, running_mean, running_var, True, momentum, eps)
        a = a.relu_()
        # The convolution in the dtype autocast gives it, cast explicitly (autocast then has
        # nothing left to cast) so that the backward pass, where autocast is off, can repeat it.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else a.dtype
        out = F.conv2d(a.to(dtype), conv_weight.to(dtype), conv_bias.to(dtype), padding=padding)
        ctx.save_for_backward(x, norm_weight, norm_bias, mean, invstd, conv_weight)
        ctx.eps, ctx.padding, ctx.dtype = eps, padding, dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, norm_weight, norm_bias, mean, invstd, conv_weight = ctx.saved_tensors
        a, _, _ = torch.ops.aten.native_batch_norm(  # momentum 0: running averages unchanged
            x, norm_weight, norm_bias, None, None, True, 0.0, ctx.eps)
        a = a.relu_()
        grad_a, grad_conv_weight, grad_conv_bias = torch.ops.aten.convolution_backward(
            grad_out.to(ctx.dtype), a.to(ctx.dtype), conv_weight.to(ctx.dtype),
            [conv_weight.shape[0]], [1, 1], [ctx.padding] * 2, [1, 1], False, [0, 0], 1,
            [True, True, True])
        grad_a = grad_a.to(a.dtype)  # ReLU's backward grad_a · [a > 0], in place
        grad_norm_out = torch.ops.aten.threshold_backward.grad_input(
            grad_a, a, 0, grad_input=grad_a)
        grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_batch_norm_backward(
            grad_norm_out, x, norm_weight, None, None, mean, invstd, True, ctx.eps,
            [True, True, True])
        return (grad_x, grad_norm_weight, grad_norm_bias, None, None, None, None,
                grad_conv_weight.to(conv_weight.dtype), grad_conv_bias.to(conv_weight.dtype),
                None)


def norm_relu_conv(
    x: Tensor, norm: BatchNorm2d, conv: WeightNormConv2d, recompute: bool = False
) -> Tensor:
    """conv(relu(norm(x))): (N, C, H, W) → (N, C_out, H, W).

    With ``recompute`` and autograd recording a train-mode, unsynchronised batch norm, through
    :class:`_NormReluConv`: the same values and gradients, about half the stored activations.
    Not under ``torch.compile``, whose partitioner makes its own choice of what to recompute
    (through the function instead, the compiled step was 15 % slower and needed 6.6 GiB).
    """
    if not (recompute and norm.training and not norm.sync_stats and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        return conv(F.relu(norm(x), inplace=True))
    return _NormReluConv.apply(x, norm.weight, norm.bias, norm.running_mean, norm.running_var,
                               norm.count_batch(), norm.eps, conv.weight(), conv.bias,
                               conv.padding)


class ResidualBlock(nn.Module):
    """Pre-activation block: BN → ReLU → 3×3 conv → BN → ReLU → 3×3 conv, plus the input."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.norm1 = BatchNorm2d(features)
        self.conv1 = WeightNormConv2d(features, features, 3)
        self.norm2 = BatchNorm2d(features)
        self.conv2 = WeightNormConv2d(features, features, 3)

    def forward(self, x: Tensor, recompute: bool = False) -> Tensor:
        """x (N, F, H, W) → (N, F, H, W); ``recompute``: see :func:`norm_relu_conv`."""
        # In place where autograd allows it (batch norm's and a convolution's backward need
        # their inputs, not their outputs): fewer fresh tensors means less memory and less
        # time spent by the allocator and the kernel zeroing new pages.
        h = norm_relu_conv(x, self.norm1, self.conv1, recompute)
        h = norm_relu_conv(h, self.norm2, self.conv2, recompute)
        return h.add_(x)


class ResNet(nn.Module):
    """The paper's convolutional s/t network.

    Input (official code): ``2 · BN(x)`` concatenated with its negation (CReLU once the ReLU is
    applied) and, for checkerboard couplings, the mask as one more channel. Then a 3×3
    convolution, ``blocks`` residual blocks, and a WaveNet-style sum of 1×1 "skip" convolutions
    of the stem and of every block's output, followed by BN → ReLU → 3×3 convolution to
    ``out_channels``. A conditioning vector (N, K) enters as a learned per-channel bias after the
    stem.

    ``channels_last`` (set by :meth:`realnvp.RealNVP.set_memory_format`) runs everything after
    the stem input in the channels-last memory format, which oneDNN's and cuDNN's convolutions
    prefer: on a 2-core AVX-512 CPU a 64-channel 3×3 convolution at 32×32 runs at about 225
    GFLOP/s forward and backward channels-last against about 150 in NCHW. The concatenation of
    the input parts would otherwise fall back to NCHW and take every later layer with it. The
    output is returned in the ordinary (contiguous) format either way.

    ``recompute`` (set by :meth:`realnvp.RealNVP.set_memory_mode`) recomputes every BN → ReLU
    in the backward pass instead of storing its output (:func:`norm_relu_conv`): the same
    values and gradients bit for bit; for the ``cifar10`` model at batch 64 on a 2-core CPU, a
    third less peak memory in training for 0–1 % more time in fp32 and 2–6 % in bf16
    (docs/benchmarks.md).

    Shapes: x (N, in_channels, H, W), extra (1 or N, extra_channels, H, W), cond (N, K)
    → (N, out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        features: int,
        blocks: int,
        *,
        extra_channels: int = 0,
        cond_features: int = 0,
    ) -> None:
        super().__init__()
        self.in_norm = BatchNorm2d(in_channels)
        self.stem = WeightNormConv2d(2 * in_channels + extra_channels, features, 3)
        self.cond_proj = nn.Linear(cond_features, features) if cond_features else None
        self.stem_skip = WeightNormConv2d(features, features, 1)
        self.blocks = nn.ModuleList(ResidualBlock(features) for _ in range(blocks))
        self.skips = nn.ModuleList(WeightNormConv2d(features, features, 1) for _ in range(blocks))
        self.out_norm = BatchNorm2d(features)
        self.out_conv = WeightNormConv2d(features, out_channels, 3, zero_init=True)
        self.channels_last = False
        self.recompute = False

    def forward(
        self, x: Tensor, cond: Tensor | None = None, extra: Tensor | None = None
    ) -> Tensor:
        h = 2.0 * self.in_norm(x)
        parts = [h, -h]
        if extra is not None:
            parts.append(extra.expand(x.shape[0], -1, -1, -1))
        h = F.relu(torch.cat(parts, dim=1), inplace=True)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        h = self.stem(h)
        if self.cond_proj is not None:
            if cond is None:
                raise ValueError("this network is conditional: pass cond")
            h = h + self.cond_proj(cond)[:, :, None, None]
        skip = self.stem_skip(h)
        for block, skip_conv in zip(self.blocks, self.skips):
            h = block(h, self.recompute)
            skip = skip.add_(skip_conv(h))
        return norm_relu_conv(skip, self.out_norm, self.out_conv, self.recompute).contiguous()


class MLP(nn.Module):
    """Fully connected s/t network for vector data: (N, in_features) → (N, out_features).

    ``layers`` hidden layers of width ``hidden`` with ReLU; the conditioning vector, if any, is
    concatenated to the input. The output layer starts at zero (identity coupling).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int,
        layers: int,
        *,
        cond_features: int = 0,
    ) -> None:
        super().__init__()
        self.cond_features = cond_features
        widths = [in_features + cond_features] + [hidden] * max(layers, 1)
        hidden_layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            hidden_layers += [nn.Linear(a, b), nn.ReLU()]
        self.hidden = nn.Sequential(*hidden_layers)
        self.out = nn.Linear(hidden, out_features)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self, x: Tensor, cond: Tensor | None = None, extra: Tensor | None = None
    ) -> Tensor:
        if self.cond_features:
            if cond is None:
                raise ValueError("this network is conditional: pass cond")
            x = torch.cat([x, cond], dim=1)
        return self.out(self.hidden(x))
