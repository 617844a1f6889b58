"""Memory-saving backpropagation through the flow.

Ordinary backpropagation stores every intermediate activation of every s/t network until the
backward pass: for the ``cifar10`` preset that is 60–90 MB per image, while the flow's own
tensors (the inputs and outputs of the couplings) are 3072 numbers per image. Every layer of the
flow is invertible, so the backward pass can rebuild a layer's input from its output and
recompute that layer's activations when it needs them, one layer at a time. Two modes, chosen
with :meth:`realnvp.RealNVP.set_memory_mode` (a training option, not part of the architecture):

``"invertible"``
    One autograd function per scale (a :class:`~realnvp.Sequential` of couplings, batch norms
    and a squeeze) that keeps only the scale's output. Its backward walks the layers in reverse:
    it rebuilds the layer's input with the layer's inverse, recomputes the layer with autograd
    on, and backpropagates through it (RevNet, Gomez et al. 2017; i-RevNet; FrEIA and memcnn
    do the same). Memory: one s/t network's activations, whatever the depth. For a coupling the
    inverse and the recomputation share one evaluation of the s/t network, because the network
    sees the same passed-through entries in x and in y: the step costs about one extra forward
    pass of the network (4 forward-equivalents per training step instead of 3).
``"checkpoint"``
    :func:`torch.utils.checkpoint.checkpoint` around every coupling: the coupling's input is
    stored, its s/t network's activations are recomputed from it in the backward pass. Same
    extra cost, and it stores the flow's tensors (small) instead of rebuilding them.

Batch normalisation. A training step must move every running average exactly once, so all
recomputation runs under :func:`frozen_running_stats`. In train mode both kinds of batch norm
normalise with the statistics of the whole batch, which a recomputation on the same (rebuilt)
batch reproduces. The flow's :class:`~realnvp.BatchNormFlow` layers are only invertible given the
statistics they used, so the forward pass keeps those (C numbers per layer) for the backward
pass, together with the running averages before the update in "lagged" mode, whose
normalisation blends them in.

Rounding: in "invertible" mode the rebuilt inputs differ from the true ones by rounding errors
that grow with depth, so the gradients match ordinary backpropagation to about 1e-13 (float64)
and 1e-4 (float32) relative on the test models, not bitwise; "checkpoint" recomputes from the
stored inputs and matches exactly. Double backward is not supported.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .bijection import Bijection, Sequential, sum_except_batch
from .coupling import AffineCoupling
from .normalization import BatchNormFlow

MemoryMode = Literal["none", "invertible", "checkpoint"]
MEMORY_MODES: tuple[str, ...] = ("none", "invertible", "checkpoint")


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Within the block, batch norm layers in train mode still normalise with batch statistics,
    but their running averages (and ``num_batches_tracked``) end the block unchanged."""
    flow_bns = [m for m in module.modules() if isinstance(m, BatchNormFlow)]
    flow_saved = [m.update_running_stats for m in flow_bns]
    # nn.BatchNorm2d has no such switch. Momentum 0 makes its update running ← 1·running +
    # 0·batch, which is exact. (Dropping its running statistics instead would change what it
    # saves for backward, which torch.utils.checkpoint checks; writing the old values back
    # afterwards would trip autograd's check that saved tensors are unchanged.)
    torch_bns = [m for m in module.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    torch_saved = [(m.momentum, m.num_batches_tracked.clone()
                    if m.num_batches_tracked is not None else None) for m in torch_bns]
    try:
        for m in flow_bns:
            m.update_running_stats = False
        for m in torch_bns:
            m.momentum = 0.0
        yield
    finally:
        for m, saved in zip(flow_bns, flow_saved):
            m.update_running_stats = saved
        for m, (momentum, count) in zip(torch_bns, torch_saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def flow_forward(
    flow: Sequential, x: Tensor, cond: Tensor | None, mode: MemoryMode
) -> tuple[Tensor, Tensor]:
    """``flow(x, cond)`` → (y, logdet (N,)), backpropagated in memory mode ``mode``.

    The memory modes only change what happens when autograd records the call; without
    gradients (evaluation, sampling, ``torch.no_grad``) every mode is the plain forward pass.
    """
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory mode must be one of {', '.join(MEMORY_MODES)}, got {mode!r}")
    if mode == "none" or not torch.is_grad_enabled():
        return flow(x, cond)
    params = [p for p in flow.parameters() if p.requires_grad]
    if not (params or x.requires_grad or (cond is not None and cond.requires_grad)):
        return flow(x, cond)
    if mode == "checkpoint":
        return _checkpointed(flow, x, cond)
    return _InvertibleFlow.apply(flow, cond, x, *params)


# -- "checkpoint" ---------------------------------------------------------------------------


class _FrozenStatsEachTime(contextlib.AbstractContextManager):
    """:func:`frozen_running_stats` of ``layer``, entered afresh each time: torch.utils.checkpoint
    enters the recomputation's context once per backward pass through the graph, and a graph
    kept with ``retain_graph=True`` is traversed more than once."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer, self.entered = layer, []

    def __enter__(self) -> None:
        context = frozen_running_stats(self.layer)
        context.__enter__()
        self.entered.append(context)

    def __exit__(self, *exc_info: Any) -> bool | None:
        return self.entered.pop().__exit__(*exc_info)


def _recompute_contexts(layer: nn.Module) -> tuple[contextlib.AbstractContextManager, ...]:
    # (context of the first forward pass, context of the recomputation)
    return contextlib.nullcontext(), _FrozenStatsEachTime(layer)


def _checkpointed(flow: Sequential, x: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
    """The flow with every coupling checkpointed; its batch norms and squeezes are cheap and run
    normally (their running averages are therefore untouched by the recomputation)."""
    logdet = x.new_zeros(x.shape[0])
    for layer in flow.layers:
        if isinstance(layer, AffineCoupling):
            x, layer_logdet = checkpoint(
                layer, x, cond, use_reentrant=False,
                context_fn=functools.partial(_recompute_contexts, layer),
            )
        else:
            x, layer_logdet = layer(x, cond)
        logdet = logdet + layer_logdet
    return x, logdet


# -- "invertible" ---------------------------------------------------------------------------


@dataclass
class _BatchNormState:
    """What a train-mode BatchNormFlow needs to be inverted and recomputed exactly."""

    mean: Tensor  # (C,) the statistics it normalised with
    var: Tensor
    running: tuple[Tensor, Tensor] | None  # lagged mode: running averages before the update


def _forward_layer(
    layer: Bijection, x: Tensor, cond: Tensor | None
) -> tuple[Tensor, Tensor, _BatchNormState | None]:
    """One layer's forward pass (no autograd), and what its backward pass will need."""
    if isinstance(layer, BatchNormFlow) and layer.training:
        running = None
        if layer.mode == "lagged":
            running = (layer.running_mean.clone(), layer.running_var.clone())
        mean, var = layer.statistics(x)  # moves the running averages: the one update per step
        y, logdet = layer.normalize(x, mean, var)
        return y, logdet, _BatchNormState(mean, var, running)
    y, logdet = layer(x, cond)
    return y, logdet, None


def _rebuild_and_recompute(
    layer: Bijection, y: Tensor, cond: Tensor | None, state: _BatchNormState | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rebuild a layer's input from its output y, then recompute the layer with autograd on.

    Returns (x, leaf, y', logdet'): the rebuilt input x, the leaf tensor the recomputation
    depends on (its gradient is the gradient with respect to x), and the recomputed output
    and log-determinant (N,), equal to y and the forward log-det up to rounding.
    """
    if isinstance(layer, AffineCoupling):
        # The s/t network sees only the passed-through entries, which x and y share exactly, so
        # one evaluation of it (with autograd on) serves both to invert and to recompute. The
        # leaf stands for x: x = leaf + (x − y), and x − y is zero on the passed entries, so
        # conditioner(leaf) = conditioner(x) and d(output)/d(leaf) = d(output)/dx.
        leaf = y.detach().requires_grad_()
        with torch.enable_grad():
            s, t = layer.s_t(layer.conditioner(leaf), cond)
        with torch.no_grad():
            x = layer.affine_inverse(y, s, t)
        with torch.enable_grad():
            y_again = layer.affine(leaf + (x - y), s, t)
            return x, leaf, y_again, sum_except_batch(s)
    with torch.no_grad():
        if state is not None:  # a train-mode BatchNormFlow: invert with the batch's statistics
            x, _ = layer.denormalize(y, state.mean, state.var)
        else:
            x, _ = layer.inverse(y, cond)
    leaf = x.detach().requires_grad_()
    with torch.enable_grad():
        if state is not None:
            mean, var = layer.statistics(leaf, running=state.running)
            y_again, logdet = layer.normalize(leaf, mean, var)
        else:
            y_again, logdet = layer(leaf, cond)
    return x, leaf, y_again, logdet


class _InvertibleFlow(torch.autograd.Function):
    """A Sequential flow that stores only its output and rebuilds the rest in backward."""

    @staticmethod
    def forward(ctx, flow: Sequential, cond: Tensor | None, x: Tensor, *params: Tensor):
        # autograd.Function.forward runs without autograd: nothing inside is stored.
        logdet = x.new_zeros(x.shape[0])
        states = []
        for layer in flow.layers:
            x, layer_logdet, state = _forward_layer(layer, x, cond)
            logdet = logdet + layer_logdet
            states.append(state)
        ctx.flow, ctx.states, ctx.params = flow, states, params
        # An autocast region around the call (not the couplings' own) is not active in the
        # backward pass: record it so that the recomputation runs under the same one.
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device),
                        torch.get_autocast_dtype(device))
        ctx.save_for_backward(x, cond)
        return x, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor | None, grad_logdet: Tensor | None):
        y, cond = ctx.saved_tensors
        y = y.detach()  # the saved output would link the recomputation back to this very node
        grad_y = torch.zeros_like(y) if grad_y is None else grad_y
        grad_logdet = y.new_zeros(y.shape[0]) if grad_logdet is None else grad_logdet
        want_cond = cond is not None and ctx.needs_input_grad[1]
        grad_cond = torch.zeros_like(cond) if want_cond else None
        grads: dict[Tensor, Tensor] = {}  # parameter → gradient, accumulated over layers
        device, autocast, autocast_dtype = ctx.autocast
        for layer, state in zip(reversed(ctx.flow.layers), reversed(ctx.states)):
            with frozen_running_stats(layer), torch.autocast(device, autocast_dtype, autocast):
                x, leaf, y_again, logdet = _rebuild_and_recompute(layer, y, cond, state)
            layer_params = [p for p in layer.parameters() if p.requires_grad]
            inputs = [leaf, *layer_params] + ([cond] if want_cond else [])
            # A volume-preserving layer's log-det (zeros) depends on nothing.
            outputs, grad_outputs = [y_again], [grad_y]
            if logdet.requires_grad:
                outputs.append(logdet)
                grad_outputs.append(grad_logdet)
            layer_grads = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
            grad_y, y = layer_grads[0], x  # this layer's input is the previous layer's output
            for p, g in zip(layer_params, layer_grads[1:]):
                if g is not None:
                    grads[p] = grads[p] + g if p in grads else g
            if want_cond and layer_grads[-1] is not None:
                grad_cond = grad_cond + layer_grads[-1]
        return (None, grad_cond, grad_y, *(grads.get(p) for p in ctx.params))
