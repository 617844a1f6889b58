"""Memory-saving backpropagation: the same gradients and running statistics as ordinary
backpropagation, far fewer stored activations, and an exactly invertible model afterwards."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import perturb, small_image_model

from realnvp import RealNVP, RealNVPConfig, ResNet
from realnvp.memory import frozen_running_stats
from realnvp.networks import BatchNorm2d, WeightNormConv2d, norm_relu_conv

MODES = ["invertible", "checkpoint"]

CONFIGS = [
    ("image", lambda: small_image_model((3, 8, 8), 2, res_blocks=2)),
    ("image-official-lagged", lambda: small_image_model(
        (3, 8, 8), 2, shift_then_scale=True, logit_form="official", batch_norm="lagged")),
    ("image-3-scales-conditional", lambda: small_image_model((2, 8, 8), 3, num_classes=3)),
    ("vector", lambda: RealNVP(RealNVPConfig(input_shape=(6,), coupling_layers=4, features=16,
                                             res_blocks=2))),
]


def batch(model: RealNVP, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    shape = model.config.input_shape
    if model.config.is_image:
        x = torch.rand((n, *shape), generator=g, dtype=dtype) * 0.9 + 0.05
    else:
        x = torch.randn((n, *shape), generator=g, dtype=dtype)
    cond = torch.arange(n) % model.config.num_classes if model.config.num_classes else None
    return x, cond


def train_step(model: RealNVP, mode: str, x, cond, recompute: bool = True):
    """One training forward/backward (the mean negative log-likelihood, in train mode)."""
    model = copy.deepcopy(model).set_memory_mode(mode, recompute_activations=recompute).train()
    loss = -model.log_prob(x, cond, check=False).mean()
    loss.backward()
    return model, loss.detach()


@pytest.mark.parametrize("dtype,precision,memory_format", [
    (torch.float64, "fp32", "channels_last"), (torch.float32, "fp32", "channels_last"),
    (torch.float32, "fp32", "contiguous"), (torch.float32, "bf16", "channels_last")])
def test_recomputed_activations_are_backprop_bit_for_bit(dtype, precision, memory_format):
    # The backward pass recomputes relu(batch_norm(x)) with the forward pass's kernel, so the
    # loss, every gradient and every running statistic are identical, not just close; bf16
    # included (the convolution's dtype is the one autocast chose in the forward pass).
    model = perturb(small_image_model((3, 8, 8), 2, res_blocks=2, features=8, num_classes=3),
                    seed=5, scale=0.1).to(dtype)
    model.set_precision(precision).set_memory_format(memory_format)
    x, cond = batch(model, 8, dtype)
    ref, ref_loss = train_step(model, "none", x, cond, recompute=False)
    out, loss = train_step(model, "none", x, cond, recompute=True)
    assert out.recompute_activations and not ref.recompute_activations
    assert torch.equal(loss, ref_loss)
    for (n, p), p_ref in zip(out.named_parameters(), ref.parameters()):
        assert p.grad is not None and torch.equal(p.grad, p_ref.grad), n
    for (n, b), b_ref in zip(out.named_buffers(), ref.buffers()):
        assert torch.equal(b, b_ref), n


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,factory", CONFIGS, ids=[n for n, _ in CONFIGS])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-8), (torch.float32, 1e-3)])
def test_gradients_and_running_stats_match_backprop(mode, name, factory, dtype, rtol):
    model = perturb(factory().to(dtype), seed=2, scale=0.1)
    x, cond = batch(model, 8, dtype)
    ref, ref_loss = train_step(model, "none", x, cond, recompute=False)  # ordinary backprop
    out, loss = train_step(model, mode, x, cond)
    assert loss == ref_loss  # the forward pass itself is unchanged

    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    total = torch.sqrt(sum(g.pow(2).sum() for g in ref_grads.values()))
    assert total > 0
    for n, p in out.named_parameters():
        g, g_ref = p.grad, ref_grads[n]
        assert g is not None, n
        # Relative to the parameter's own gradient; gradients that vanish in exact arithmetic
        # (biases of convolutions that feed a train-mode batch norm) are rounding noise, and
        # are compared with the size of the whole gradient instead.
        scale = torch.maximum(g_ref.norm(), 1e-3 * total)
        assert (g - g_ref).norm() <= rtol * scale, (n, (g - g_ref).norm() / scale)

    # Running statistics moved once, exactly as in ordinary backpropagation.
    for (n, b), b_ref in zip(out.named_buffers(), ref.buffers()):
        assert torch.equal(b, b_ref), n
    moved = [not torch.equal(b, b0) for b, b0 in zip(out.buffers(), model.buffers())]
    assert any(moved)

    # The model after the step is still an exact bijection.
    out.eval()
    with torch.no_grad():
        latents = out.encode(x, cond)
        back = out.decode(latents, cond)
    assert (back - x).abs().max() <= (1e-10 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("mode", ["none", *MODES])
def test_a_retained_graph_backpropagates_twice(mode):
    """backward(retain_graph=True) and a second backward give the same gradients in every mode
    (checkpoint recomputes once per pass), and the running statistics still move once."""
    model = perturb(small_image_model((3, 8, 8), 2), seed=3, scale=0.1).to(torch.float64)
    x, _ = batch(model, 8, torch.float64)
    ref, _ = train_step(model, "none", x, None)
    model = copy.deepcopy(model).set_memory_mode(mode).train()
    loss = -model.log_prob(x, check=False).mean()
    first = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(model.parameters()))
    for g, g_again, p_ref in zip(first, second, ref.parameters()):
        assert torch.equal(g, g_again)
        assert torch.allclose(g, p_ref.grad, rtol=1e-8, atol=1e-12)
    for (n, b), b_ref in zip(model.named_buffers(), ref.buffers()):
        assert torch.equal(b, b_ref), n


def saved_bytes(model: RealNVP, mode: str, x: torch.Tensor, recompute: bool = True) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one training loss."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    model = copy.deepcopy(model).set_memory_mode(mode, recompute_activations=recompute).train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = -model.log_prob(x, check=False).mean()
    loss.backward()
    return total


def test_memory_modes_store_far_less():
    model = perturb(small_image_model((3, 16, 16), 2, res_blocks=4, features=16), seed=3)
    x, _ = batch(model, 4, torch.float32)
    stored = {mode: saved_bytes(model, mode, x) for mode in ["none", *MODES]}
    stored["ordinary"] = saved_bytes(model, "none", x, recompute=False)
    # Ordinary backprop keeps every s/t activation (tens of tensors of 16–32 channels per
    # coupling); the memory modes keep the flow's 3-channel tensors and the weights.
    assert stored["invertible"] < stored["ordinary"] / 10, stored
    assert stored["checkpoint"] < stored["ordinary"] / 5, stored
    # Recomputing BN → ReLU keeps one of the two 16-channel tensors of each of the residual
    # blocks' and the output's BN → ReLU → conv (and the stem's and skips' tensors as before).
    assert stored["none"] < 0.65 * stored["ordinary"], stored


def test_no_grad_and_eval_unaffected():
    model = perturb(small_image_model((3, 8, 8), 2), seed=4).eval()
    x, _ = batch(model, 4, torch.float32)
    ref = model.log_prob(x)
    for mode in MODES:
        model.set_memory_mode(mode)
        assert torch.equal(model.log_prob(x), ref)
        with torch.no_grad():
            assert torch.equal(model.log_prob(x), ref)
    with pytest.raises(ValueError, match="memory mode"):
        model.set_memory_mode("rematerialise")


def test_activation_recomputation_follows_the_memory_mode_unless_set():
    model = small_image_model((3, 8, 8), 2)
    nets = [m for m in model.modules() if isinstance(m, ResNet)]

    def state() -> tuple[bool, ...]:
        return (model.recompute_activations, *(net.recompute for net in nets))

    assert nets and not any(state())  # a new model stores everything: the fastest
    for mode in MODES:
        model.set_memory_mode(mode)
        assert all(state()), mode
    model.set_memory_mode("none")
    assert not any(state())
    model.set_memory_mode("none", recompute_activations=True)
    assert all(state())
    model.set_memory_mode("invertible", recompute_activations=False)
    assert not any(state())


def test_frozen_running_stats_restores_torch_batch_norm():
    bn = torch.nn.BatchNorm2d(3, momentum=None).train()  # cumulative average: uses the count
    x = torch.randn(4, 3, 2, 2)
    bn(x)
    before = [b.clone() for b in bn.buffers()]
    with frozen_running_stats(bn):
        y = bn(x * 2 + 1)
    assert all(torch.equal(b, b0) for b, b0 in zip(bn.buffers(), before))
    assert bn.momentum is None
    # and inside the block it still normalised with the batch's statistics
    assert y.mean(dim=(0, 2, 3)).abs().max() < 1e-5


@pytest.mark.parametrize("momentum", [0.1, None])
def test_norm_relu_conv_counts_batches_like_torch(momentum):
    # Two training steps of one BN → ReLU → conv, recomputed and stored: equal outputs,
    # gradients, running averages and batch counts (momentum None: the cumulative average).
    layers = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        layers[recompute] = (BatchNorm2d(4, momentum=momentum).train(), WeightNormConv2d(4, 3, 3))
    for step in range(2):
        x = torch.randn(5, 4, 6, 6) * 2 + step
        results = []
        for recompute, (norm, conv) in layers.items():
            xi = x.clone().requires_grad_()
            y = norm_relu_conv(xi, norm, conv, recompute)
            params = [xi, *norm.parameters(), *conv.parameters()]
            grads = torch.autograd.grad(y.square().sum(), params)
            results.append((y, *grads, *norm.buffers()))
        for a, b in zip(*results):
            assert torch.equal(a, b)
    assert all(int(norm.num_batches_tracked) == 2 for norm, _ in layers.values())


@pytest.mark.parametrize("mode", MODES)
def test_a_differentiable_condition_gets_the_same_gradient(mode):
    """flow_forward with a condition that requires grad (a learned label embedding, say): its
    gradient in each memory mode equals ordinary backpropagation's (summed over couplings)."""
    from realnvp.memory import flow_forward

    model = perturb(small_image_model((3, 8, 8), 2, num_classes=3), seed=4, scale=0.1).double()
    scale = model.scales[0].train()
    x = torch.rand(8, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = {}
    for name in ("none", mode):
        flow = copy.deepcopy(scale)
        cond = torch.randn(8, 3, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(3)).requires_grad_()
        y, logdet = flow_forward(flow, x, cond, name)
        (y.square().sum() + logdet.sum()).backward()
        grads[name] = cond.grad
    assert grads[mode].abs().max() > 0
    assert torch.allclose(grads[mode], grads["none"], rtol=1e-8, atol=1e-10)
