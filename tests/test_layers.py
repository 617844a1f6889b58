"""Every bijection: exact inverse, and log-determinant equal to the brute-force Jacobian."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import perturb
from torch.autograd.functional import jacobian

from realnvp import (
    MLP,
    AffineCoupling,
    BatchNormFlow,
    LogitTransform,
    ResNet,
    Sequential,
    Squeeze,
    channel_mask,
    checkerboard_mask,
)


def checkerboard_coupling(parity: int, shift_then_scale: bool = False, cond: int = 0):
    net = ResNet(3, 6, 8, 1, extra_channels=1, cond_features=cond)
    return AffineCoupling(net, "checkerboard", parity, shift_then_scale=shift_then_scale)


def channel_coupling(parity: int, channels: int = 4, shift_then_scale: bool = False):
    first = (channels + 1) // 2
    passed = first if parity == 0 else channels - first
    net = ResNet(passed, 2 * (channels - passed), 8, 1)
    return AffineCoupling(net, "channel", parity, shift_then_scale=shift_then_scale)


def vector_coupling(parity: int, d: int = 5):
    passed = (d + 1) // 2 if parity == 0 else d // 2
    return AffineCoupling(MLP(passed, 2 * (d - passed), 16, 2), "channel", parity)


# (name, factory, input shape without batch)
LAYERS = [
    ("checkerboard-0", lambda: checkerboard_coupling(0), (3, 4, 4)),
    ("checkerboard-1", lambda: checkerboard_coupling(1), (3, 4, 4)),
    ("checkerboard-shift-then-scale", lambda: checkerboard_coupling(1, True), (3, 4, 4)),
    ("channel-0", lambda: channel_coupling(0), (4, 2, 2)),
    ("channel-1", lambda: channel_coupling(1), (4, 2, 2)),
    ("channel-odd-1", lambda: channel_coupling(1, channels=3), (3, 2, 2)),
    ("channel-shift-then-scale", lambda: channel_coupling(0, shift_then_scale=True), (4, 2, 2)),
    ("vector-0", lambda: vector_coupling(0), (5,)),
    ("vector-1", lambda: vector_coupling(1), (5,)),
    ("batchnorm", lambda: BatchNormFlow(3), (3, 2, 3)),
    ("batchnorm-lagged", lambda: BatchNormFlow(3, mode="lagged"), (3, 2, 3)),
    ("batchnorm-vector", lambda: BatchNormFlow(5), (5,)),
    ("batchnorm-checkerboard-0", lambda: BatchNormFlow(3, mask="checkerboard"), (3, 3, 3)),
    ("batchnorm-checkerboard-1",
     lambda: BatchNormFlow(3, mask="checkerboard", parity=1, mode="lagged"), (3, 3, 3)),
    ("batchnorm-checkerboard-official",
     lambda: BatchNormFlow(3, mask="checkerboard", parity=1, zeros_in_stats=True), (3, 3, 3)),
    ("batchnorm-channel-0", lambda: BatchNormFlow(4, mask="channel"), (4, 2, 2)),
    ("batchnorm-channel-odd-1", lambda: BatchNormFlow(3, mask="channel", parity=1), (3, 2, 2)),
    ("batchnorm-vector-channel-1", lambda: BatchNormFlow(5, mask="channel", parity=1), (5,)),
    ("logit-paper", lambda: LogitTransform(0.05, "paper"), (2, 3, 3)),
    ("logit-official", lambda: LogitTransform(0.05, "official"), (2, 3, 3)),
    ("squeeze", Squeeze, (2, 4, 4)),
    ("sequential", lambda: Sequential(checkerboard_coupling(0), BatchNormFlow(3),
                                      checkerboard_coupling(1)), (3, 4, 4)),
]


def make(factory, dtype, seed=0):
    layer = factory().to(dtype)
    return perturb(layer, seed, scale=0.1).eval()


def inputs(shape, n, dtype, pixels):
    g = torch.Generator().manual_seed(1)
    x = torch.rand((n, *shape), generator=g, dtype=dtype)
    return x * 0.98 + 0.01 if pixels else 2 * x - 1


@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=[n for n, _, _ in LAYERS])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_inverse_of_forward(name, factory, shape, dtype, tol):
    layer = make(factory, dtype)
    x = inputs(shape, 6, dtype, pixels=name.startswith("logit"))
    with torch.no_grad():
        y, logdet = layer(x)
        x_back, inv_logdet = layer.inverse(y)
    assert logdet.shape == (6,)
    assert (x_back - x).abs().max() <= tol
    assert (logdet + inv_logdet).abs().max() <= tol * max(1.0, logdet.abs().max().item())
    # The map is not the identity: perturbed weights make it move every example.
    if name != "squeeze":
        assert (y - x).abs().max() > 1e-3


@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=[n for n, _, _ in LAYERS])
def test_logdet_matches_jacobian(name, factory, shape):
    layer = make(factory, torch.float64)
    x = inputs(shape, 3, torch.float64, pixels=name.startswith("logit"))
    _, logdet = layer(x)
    for i in range(x.shape[0]):
        def f(v):
            return layer(v.view(1, *shape))[0].flatten()
        jac = jacobian(f, x[i].flatten())
        expected = torch.linalg.slogdet(jac).logabsdet
        assert torch.allclose(logdet[i], expected, rtol=1e-6, atol=1e-9), (logdet[i], expected)
    # The inverse's log-determinant is the log|det| of the inverse map.
    y = layer(x)[0].detach()
    _, inv_logdet = layer.inverse(y)
    jac = jacobian(lambda v: layer.inverse(v.view(1, *y.shape[1:]))[0].flatten(), y[0].flatten())
    assert torch.allclose(inv_logdet[0], torch.linalg.slogdet(jac).logabsdet, rtol=1e-6)


def test_checkerboard_coupling_passes_masked_pixels_unchanged():
    layer = make(lambda: checkerboard_coupling(1), torch.float64)
    x = inputs((3, 4, 4), 2, torch.float64, pixels=False)
    y, _ = layer(x)
    b = checkerboard_mask(4, 4, 1, dtype=torch.float64)
    assert torch.equal(y * b, x * b)  # i + j odd: passed through
    assert (y - x)[:, :, b[0, 0] == 0].abs().min() > 0  # i + j even: every entry changed


def test_masks():
    b = checkerboard_mask(3, 4, 1)
    assert b.shape == (1, 1, 3, 4)
    assert b[0, 0].tolist() == [[0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]
    assert torch.equal(checkerboard_mask(3, 4, 0), 1 - b)
    assert channel_mask(4, 0).flatten().tolist() == [1, 1, 0, 0]
    assert channel_mask(5, 1).flatten().tolist() == [0, 0, 0, 1, 1]


def test_squeeze_layout_mixes_checkerboard_colours():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y, _ = Squeeze()(x)
    assert y.shape == (1, 4, 2, 2)
    # channel 2i + j holds sub-pixel (i, j) of each 2×2 block
    assert y[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    colour = checkerboard_mask(4, 4, 0)
    squeezed_colour, _ = Squeeze()(colour)
    first_half = squeezed_colour[0, :2]
    assert 0 < first_half.mean() < 1  # the first channel half holds both colours
    with pytest.raises(ValueError, match="even"):
        Squeeze()(torch.zeros(1, 1, 3, 4))


def test_couplings_start_as_identity():
    for layer, shape in [(checkerboard_coupling(0), (3, 4, 4)), (channel_coupling(1), (4, 2, 2)),
                         (vector_coupling(0), (5,))]:
        x = inputs(shape, 4, torch.float32, pixels=False)
        y, logdet = layer.eval()(x)
        assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(4))


def test_bounded_scale_never_overflows():
    layer = checkerboard_coupling(0)
    with torch.no_grad():
        layer.net.out_conv.weight_g.fill_(1e6)  # raw_s enormous
    x = inputs((3, 4, 4), 2, torch.float32, pixels=False)
    y, logdet = layer.eval()(x)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    assert logdet.abs().max() <= 3 * 4 * 4 * layer.scale.abs().item() + 1e-3


def test_batchnorm_train_uses_batch_statistics_and_updates_running():
    bn = BatchNormFlow(2, momentum=0.1).double()
    x = torch.randn(64, 2, 3, 3, dtype=torch.float64) * 3 + 5
    y, logdet = bn.train()(x)
    assert y.mean(dim=(0, 2, 3)).abs().max() < 1e-10
    assert (y.var(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-3
    var = x.var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(logdet, (-0.5 * torch.log(var + 1e-4).sum() * 9).expand(64))
    assert torch.allclose(bn.running_mean, 0.1 * x.mean(dim=(0, 2, 3)))
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * var)
    # the lagged variant normalises with the blend of running and batch statistics
    lagged = BatchNormFlow(2, momentum=0.1, mode="lagged").double().train()
    y, _ = lagged(x)
    mean = 0.1 * x.mean(dim=(0, 2, 3))
    assert torch.allclose(y[:, :, 0, 0], (x[:, :, 0, 0] - mean) / torch.sqrt(0.9 + 0.1 * var
                                                                          + 1e-4))
    assert torch.allclose(lagged.running_mean, mean)
    assert torch.allclose(lagged.running_var, 0.9 + 0.1 * var)
    # the inverse always uses the running statistics
    bn.eval()
    z, _ = bn(x)
    assert torch.allclose(bn.inverse(z)[0], x)


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("mode", ["batch", "lagged"])
@pytest.mark.parametrize("parity", [0, 1])
def test_masked_batchnorm_normalises_only_what_the_coupling_transformed(parity, mode, zeros):
    """SPEC §1.5: after a checkerboard coupling the b = 0 positions of each channel are
    normalised and the passed b = 1 entries are left alone; the log-det counts the normalised
    entries only (5 of a 3×3 image's 9 for parity 1, 4 for parity 0). Statistics: of the
    b = 0 entries alone, or (``zeros_in_stats``, the official code) of (1 − b) ⊙ x over all
    9 positions."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 2, 3, 3, generator=g, dtype=torch.float64) * 3 + 5
    x[:, :, 0, 0] += 100  # a passed position (parity 0) far off: must not enter the statistics
    bn = BatchNormFlow(2, mask="checkerboard", parity=parity, mode=mode,
                       zeros_in_stats=zeros).double().train()
    y, logdet = bn(x)
    b = checkerboard_mask(3, 3, parity, dtype=torch.bool)[0, 0]
    assert torch.equal(y[:, :, b], x[:, :, b])  # passed entries: bit for bit
    count = int((~b).sum())
    assert count == (5 if parity == 1 else 4)
    if zeros:  # by hand: sums over every position, the passed ones as zeros
        masked = x * ~b
        mean = masked.sum((0, 2, 3)) / (64 * 9)
        var = (masked - mean.view(1, -1, 1, 1)).square().sum((0, 2, 3)) / (64 * 9)
    else:
        var, mean = torch.var_mean(x[:, :, ~b], dim=(0, 2), unbiased=False)  # b = 0 only
    if mode == "lagged":
        mean, var = 0.1 * mean, 0.9 + 0.1 * var
    elif not zeros:
        assert y[:, :, ~b].mean(dim=(0, 2)).abs().max() < 1e-10
    std = torch.sqrt(var + 1e-4)
    assert torch.allclose(y[:, :, ~b], (x[:, :, ~b] - mean[:, None]) / std[:, None])
    assert torch.allclose(logdet, (-count * torch.log(std).sum()).expand(64))
    assert torch.allclose(bn.running_mean, mean if mode == "lagged" else 0.1 * mean)
    # and the inverse (eval mode: the running averages) puts x back
    bn.eval()
    assert torch.allclose(bn.inverse(bn(x)[0])[0], x)


@pytest.mark.parametrize("channels,parity,changed", [(4, 0, [2, 3]), (4, 1, [0, 1]),
                                                      (5, 0, [3, 4]), (5, 1, [0, 1, 2])])
def test_masked_batchnorm_after_a_channel_coupling(channels, parity, changed):
    """After a channel-wise coupling only its transformed channels are normalised (the ones
    channel_mask marks 0); the running averages have one entry per normalised channel."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, channels, 2, 2, generator=g, dtype=torch.float64) * 2 + 3
    bn = BatchNormFlow(channels, mask="channel", parity=parity).double().train()
    assert bn.running_mean.shape == (len(changed),)
    assert torch.equal(channel_mask(channels, parity).flatten() == 0,
                       torch.isin(torch.arange(channels), torch.tensor(changed)))
    y, logdet = bn(x)
    passed = [c for c in range(channels) if c not in changed]
    assert torch.equal(y[:, passed], x[:, passed])
    var, mean = torch.var_mean(x[:, changed], dim=(0, 2, 3), unbiased=False)
    std = torch.sqrt(var + 1e-4)
    assert torch.allclose(y[:, changed], (x[:, changed] - mean.view(1, -1, 1, 1))
                          / std.view(1, -1, 1, 1))
    assert torch.allclose(logdet, (-4 * torch.log(std).sum()).expand(32))
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * var)
    with pytest.raises(ValueError, match=f"batch norm of {channels} channels"):
        bn(x[:, :3] if channels > 3 else x[:, :2])


def test_layers_refuse_bad_settings_and_degenerate_batches():
    for bad in (2, -1, 0.5):
        with pytest.raises(ValueError, match="parity must be 0 or 1"):
            checkerboard_mask(4, 4, bad)
        with pytest.raises(ValueError, match="parity must be 0 or 1"):
            channel_mask(4, bad)
        with pytest.raises(ValueError, match="parity must be 0 or 1"):
            AffineCoupling(ResNet(2, 4, 8, 1), "channel", bad)
    for kwargs, match in (({"momentum": 0}, "momentum"), ({"momentum": 1.5}, "momentum"),
                          ({"eps": 0}, "eps"), ({"eps": float("nan")}, "eps")):
        with pytest.raises(ValueError, match=match):
            BatchNormFlow(3, **kwargs)
    with pytest.raises(ValueError, match="batch norm mask must be"):
        BatchNormFlow(3, mask="checker")
    with pytest.raises(ValueError, match="parity must be 0 or 1"):
        BatchNormFlow(3, mask="checkerboard", parity=2)
    with pytest.raises(ValueError, match="zeros_in_stats is the official code's statistics"):
        BatchNormFlow(3, mask="channel", zeros_in_stats=True)
    with pytest.raises(ValueError, match="checkerboard batch norm needs"):
        BatchNormFlow(3, mask="checkerboard")(torch.randn(4, 3))
    # One value per channel: the batch variance is 0 and every input would map to 0.
    with pytest.raises(ValueError, match="more than one value per channel"):
        BatchNormFlow(3).train()(torch.randn(1, 3))
    with pytest.raises(ValueError, match="more than one value per channel"):
        BatchNormFlow(3).train()(torch.randn(1, 3, 1, 1))
    y, _ = BatchNormFlow(3, mode="lagged").train()(torch.randn(1, 3))  # defined: blends running
    assert torch.isfinite(y).all() and y.abs().sum() > 0
    BatchNormFlow(3).train()(torch.randn(2, 3))
    BatchNormFlow(3).train()(torch.randn(1, 3, 2, 1))


@pytest.mark.parametrize("factory", [checkerboard_coupling, channel_coupling])
def test_coupling_logdet_stays_float32_under_a_callers_autocast(factory):
    coupling = perturb(factory(0), scale=0.3).eval()
    x = torch.randn(2, 3, 8, 8) if factory is checkerboard_coupling else torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, logdet = coupling(x)
        s, t = coupling.s_t(coupling.conditioner(x))
    assert y.dtype == logdet.dtype == s.dtype == t.dtype == torch.float32
    reference = coupling(x)[1]  # the same layer without autocast: bf16 networks differ a little
    assert torch.allclose(logdet, reference, rtol=0.05, atol=0.5)


def test_conditional_network_needs_cond():
    layer = checkerboard_coupling(0, cond=3)
    x = inputs((3, 4, 4), 2, torch.float32, pixels=False)
    with pytest.raises(ValueError, match="conditional"):
        layer(x)
    perturb(layer, scale=0.1).eval()
    c1, c2 = torch.eye(3)[[0, 1]], torch.eye(3)[[2, 2]]
    assert not torch.allclose(layer(x, c1)[0], layer(x, c2)[0])


def test_masks_are_built_once_per_size(monkeypatch):
    """Training, evaluation and sampling reuse each checkerboard mask; a new image size (the
    fully convolutional model sampled at 2×) builds its own once."""
    from conftest import small_image_model

    import realnvp.masks as masks

    built = []
    real = masks.checkerboard_mask

    def counting(*args, **kwargs):
        built.append(args[:2])
        return real(*args, **kwargs)

    monkeypatch.setattr(masks, "checkerboard_mask", counting)
    model = small_image_model(shape=(3, 8, 8))
    x = torch.rand(4, 3, 8, 8)
    model.train()
    model.log_prob(x).mean().backward()
    first = len(built)
    assert first > 0 and set(built) <= {(8, 8), (4, 4)}
    model.log_prob(x).mean().backward()
    model.eval()
    with torch.inference_mode():
        model.log_prob(x)
        model.sample(2)
    assert len(built) == first  # nothing rebuilt
    with torch.inference_mode():
        model.sample(2, shape=(16, 16))
    assert len(built) > first and (16, 16) in built
    again = len(built)
    with torch.inference_mode():
        model.sample(2, shape=(16, 16))
    assert len(built) == again


@pytest.mark.parametrize("form,k", [("paper", 1 - 0.05), ("official", 1 - 2 * 0.05)])
def test_logit_forms_by_hand(form, k):
    """paper: p = α + (1 − α)x̃; official: p = α + (1 − 2α)x̃; y = logit p and
    log|dy/dx̃| = log k − log p − log(1 − p) per entry."""
    x = torch.tensor([[0.0, 0.25, 0.5, 0.9]], dtype=torch.float64)
    y, logdet = LogitTransform(0.05, form)(x)
    p = 0.05 + k * x
    assert torch.allclose(y, torch.log(p) - torch.log1p(-p))
    assert torch.allclose(logdet, (math.log(k) - torch.log(p) - torch.log1p(-p)).sum(1))
