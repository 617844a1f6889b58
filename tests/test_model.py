"""Whole models: exact inverse, log-det against the Jacobian, normalisation, bits/dim, errors."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import calibrate, perturb, small_image_model
from torch.autograd.functional import jacobian

from realnvp import (
    CheckpointError,
    LogitTransform,
    RealNVP,
    RealNVPConfig,
    flatten_latents,
    standard_normal_log_prob,
    unflatten_latents,
)


def pixels(shape, n, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g, dtype=dtype) * 0.98 + 0.01


def model_logdet(model, x):
    """log|det| of the whole map x̃ → flat latents, from the model's own log-density."""
    latents = model.encode(x)
    return model.log_prob(x) - sum(standard_normal_log_prob(z) for z in latents)


MODELS = [
    ("1x8x8", lambda: small_image_model((1, 8, 8), 2)),
    ("3x8x8", lambda: small_image_model((3, 8, 8), 2)),
    ("3x8x8-official", lambda: small_image_model((3, 8, 8), 2, shift_then_scale=True,
                                                 logit_form="official", batch_norm="lagged")),
    ("3x8x8-bn-transformed", lambda: small_image_model((3, 8, 8), 2, bn_entries="transformed")),
    ("3x8x8-bn-official", lambda: small_image_model((3, 8, 8), 2, bn_entries="official",
                                                    batch_norm="lagged")),
    ("1x8x8-bn-official", lambda: small_image_model((1, 8, 8), 2, bn_entries="official")),
    ("vector-8", lambda: RealNVP(RealNVPConfig(input_shape=(8,), coupling_layers=4,
                                               features=16, res_blocks=2))),
]


@pytest.mark.parametrize("name,factory", MODELS, ids=[n for n, _ in MODELS])
def test_model_logdet_matches_jacobian(name, factory):
    model = perturb(factory().double(), seed=3).eval()
    shape = model.config.input_shape
    x = pixels(shape, 2) if model.config.is_image else torch.randn(2, *shape, dtype=torch.float64)
    logdet = model_logdet(model, x)
    for i in range(2):
        def f(v):
            return flatten_latents(model.encode(v.view(1, *shape)))[0]
        jac = jacobian(f, x[i].flatten())
        assert jac.shape == (x[i].numel(), x[i].numel())  # exactly D latent numbers
        expected = torch.linalg.slogdet(jac).logabsdet
        assert torch.allclose(logdet[i], expected, rtol=1e-6), (logdet[i], expected)


@pytest.mark.parametrize("name,factory", MODELS, ids=[n for n, _ in MODELS])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_model_decode_encode(name, factory, dtype, tol):
    model = perturb(factory().to(dtype), seed=4).eval()
    shape = model.config.input_shape
    x = pixels(shape, 5, dtype) if model.config.is_image else torch.randn(5, *shape, dtype=dtype)
    latents = model.encode(x)
    assert sum(z[0].numel() for z in latents) == x[0].numel()
    assert (model.decode(latents) - x).abs().max() <= tol
    flat = flatten_latents(latents)
    back = unflatten_latents(flat, model.latent_shapes())
    assert all(torch.equal(a, b) for a, b in zip(back, latents))


def test_cifar10_preset_roundtrip_float32():
    model = perturb(RealNVP.from_preset("cifar10"), seed=5, scale=0.05)
    calibrate(model, pixels((3, 32, 32), 16, torch.float32, seed=2))
    x = pixels((3, 32, 32), 4, torch.float32)
    latents = model.encode(x)
    assert [tuple(z.shape) for z in latents] == [(4, 6, 16, 16), (4, 6, 16, 16)]
    err = (model.decode(latents) - x).abs().max().item()
    assert err <= 1e-4, err
    assert (latents[0] - model.encode(x * 0.9 + 0.05)[0]).abs().max() > 1e-2  # not constant


def test_cifar10_preset_train_step_and_sample():
    torch.manual_seed(0)
    model = RealNVP.from_preset("cifar10")
    # Parameter count stated in the README.
    assert model.num_parameters() == 19_741_820
    model.train()
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)  # batch 64: 57 s on Zen 1
    loss = model.bits_per_dim(x).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    samples = model.sample(16)
    assert samples.shape == (16, 3, 32, 32)
    assert torch.isfinite(samples).all() and samples.min() >= 0 and samples.max() <= 1
    assert model.training  # sample() leaves the mode as it was


def test_vector_density_integrates_to_one():
    torch.manual_seed(0)
    model = perturb(RealNVP(RealNVPConfig(input_shape=(2,), coupling_layers=6, features=32,
                                          res_blocks=2)).double(), seed=6, scale=0.15).eval()
    step = 0.02
    grid = torch.arange(-15, 15, step, dtype=torch.float64) + step / 2
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([xx.flatten(), yy.flatten()], dim=1)
    with torch.no_grad():
        density = torch.cat([model.log_prob(chunk).exp() for chunk in points.split(100_000)])
    total = density.sum().item() * step**2
    assert abs(total - 1) <= 0.01, total
    # and the flow is far from the identity: its density is not the standard normal's
    normal = standard_normal_log_prob(points).exp()
    assert (density - normal).abs().sum().item() * step**2 > 0.5


def hand_bits_per_dim(x: list[float], u: list[float], n_bits: int, alpha: float = 0.05) -> float:
    """Bits/dim of an identity flow after the paper's logit, written out term by term."""
    levels = 2**n_bits
    log_p = 0.0
    for xi, ui in zip(x, u):
        x_tilde = (xi + ui) / levels  # dequantisation
        p = alpha + (1 - alpha) * x_tilde
        y = math.log(p) - math.log(1 - p)  # logit
        log_p += -0.5 * y * y - 0.5 * math.log(2 * math.pi)  # standard normal prior
        log_p += math.log(1 - alpha) - math.log(p) - math.log(1 - p)  # logit Jacobian
    d = len(x)
    return (-log_p + d * math.log(levels)) / (d * math.log(2))


@pytest.mark.parametrize("n_bits,values", [(8, [0, 255, 128, 64]), (5, [0, 31, 7, 16]),
                                           (8, [0, 255, 128, 64, 3, 200, 17, 99, 1, 2, 250, 77])])
def test_bits_per_dim_by_hand(n_bits, values):
    # No batch norm and identity couplings (their last layers start at zero): the flow after the
    # logit is exactly the identity, so the hand formula above is the whole model. D counts
    # every channel (the last case: 3 channels of 2×2).
    shape = (len(values) // 4, 2, 2)
    model = RealNVP(RealNVPConfig(input_shape=shape, scales=1, res_blocks=1, features=4,
                                  batch_norm="none")).double().eval()
    x = torch.tensor(values, dtype=torch.uint8).view(1, *shape)
    bpd = model.bits_per_dim(x, n_bits=n_bits, generator=torch.Generator().manual_seed(7))
    u = torch.rand((1, *shape), generator=torch.Generator().manual_seed(7)).flatten().tolist()
    expected = hand_bits_per_dim([float(v) for v in values], u, n_bits)
    assert bpd.shape == (1,)
    assert abs(bpd.item() - expected) < 1e-5, (bpd.item(), expected)


def test_evaluate_noise_is_per_image_whatever_the_batch_size():
    import numpy as np

    from realnvp.data.base import TensorImageDataset
    from realnvp.evaluate import evaluate

    model = perturb(small_image_model((3, 4, 4), 2).double()).eval()
    images = torch.randint(0, 256, (11, 3, 4, 4), generator=torch.Generator().manual_seed(3),
                           dtype=torch.uint8)
    data = TensorImageDataset(images.numpy(), name="t", split="test", source_indices=np.arange(11))
    # The definition: image i's k-th draw is u[i, k], u drawn image-major in one stream.
    u = torch.rand((11, 3, 3, 4, 4), generator=torch.Generator().manual_seed(5),
                   dtype=torch.float32)
    by_hand = sum(model.bits_per_dim(images, noise=u[:, k]) for k in range(3)) / 3
    for batch_size in (1, 4, 11, 64):
        result = evaluate(model, data, batch_size=batch_size, samples=3, seed=5)
        assert torch.allclose(result.per_image, by_hand, rtol=0, atol=1e-10), batch_size
    one = evaluate(model, data, batch_size=4, seed=5).per_image  # one draw: as bits_per_dim does
    whole = model.bits_per_dim(images, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(one, whole, rtol=0, atol=1e-10)
    assert not torch.allclose(one, by_hand, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        model.bits_per_dim(images, noise=u[:, 0] + 1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        model.bits_per_dim(images, noise=torch.full_like(u[:, 0], float("nan")))
    with pytest.raises(ValueError, match="noise has shape"):
        model.bits_per_dim(images, noise=u[:5, 0])
    # SPEC's known trap: evaluate scores in eval mode even when given a model in train mode,
    # and leaves its running statistics alone
    in_train_mode = copy.deepcopy(model).train()
    buffers = [b.clone() for b in in_train_mode.buffers()]
    trained = evaluate(in_train_mode, data, batch_size=4, seed=5).per_image
    assert in_train_mode.training and torch.equal(trained, one)
    assert all(torch.equal(b, b0) for b, b0 in zip(in_train_mode.buffers(), buffers))
    with torch.no_grad():  # the premise: train mode is another function of the batch
        train_mode = in_train_mode.bits_per_dim(images,
                                                generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(train_mode, one, rtol=0, atol=1e-3)
    for bad in (dict(batch_size=0), dict(max_images=-1), dict(samples=0), dict(batch_size=2.5)):
        with pytest.raises(ValueError, match="must be a positive integer"):
            evaluate(model, data, **bad)
    numpy_ints = evaluate(model, data, batch_size=np.int64(4), samples=np.int64(3), seed=5,
                          max_images=np.int32(11))
    assert torch.allclose(numpy_ints.per_image, by_hand, rtol=0, atol=1e-10)
    import realnvp.evaluate

    realnvp.evaluate.NOISE_BYTES, budget = 2 * 3 * 48 * 4, realnvp.evaluate.NOISE_BYTES
    try:  # many samples of big images: smaller batches, the same values
        small = evaluate(model, data, batch_size=64, samples=3, seed=5)
    finally:
        realnvp.evaluate.NOISE_BYTES = budget
    assert torch.allclose(small.per_image, by_hand, rtol=0, atol=1e-10)


def test_bits_per_dim_constant():
    from realnvp import bits_per_dim

    d = 3072
    assert bits_per_dim(torch.tensor([0.0]), d).item() == pytest.approx(8.0)
    assert bits_per_dim(torch.tensor([-d * math.log(2)]), d).item() == pytest.approx(9.0)
    assert bits_per_dim(torch.tensor([0.0]), d, n_bits=5).item() == pytest.approx(5.0)


def test_bad_inputs_raise_specific_errors():
    model = small_image_model((3, 8, 8), 2).eval()
    ok = pixels((3, 8, 8), 2, torch.float32)
    with pytest.raises(ValueError, match="shape"):
        model.log_prob(ok[0])
    with pytest.raises(ValueError, match="channels"):
        model.log_prob(ok[:, :1])
    with pytest.raises(ValueError, match="size"):
        model.log_prob(pixels((3, 16, 16), 2, torch.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        model.log_prob(ok * 2)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        model.log_prob(ok - 0.5)
    nan = ok.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.log_prob(nan)
    with pytest.raises(TypeError, match="bits_per_dim"):
        model.log_prob((ok * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="integer"):
        model.bits_per_dim(ok * 255)
    with pytest.raises(ValueError, match=r"\[0, 31\]"):
        model.bits_per_dim(torch.full((1, 3, 8, 8), 40, dtype=torch.uint8), n_bits=5)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        model.bits_per_dim(torch.full((1, 3, 8, 8), 300.0))
    with pytest.raises(ValueError, match="unconditional"):
        model.log_prob(ok, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="list of 2"):
        model.decode([torch.zeros(1, 6, 4, 4)])
    with pytest.raises(ValueError, match="even"):
        RealNVPConfig(input_shape=(1, 28, 28), scales=4)
    with pytest.raises(ValueError, match="unknown preset"):
        RealNVP.from_preset("cifar100")
    with pytest.raises(ValueError, match="unknown RealNVPConfig fields: depth"):
        RealNVP.from_preset("cifar10", depth=3)
    vector = RealNVP(RealNVPConfig(input_shape=(4,)))
    with pytest.raises(ValueError, match="D = 4"):
        vector.log_prob(torch.zeros(2, 4, 1))


def test_dequantize_checks_pixels_and_models_check_dtypes():
    from realnvp import dequantize

    half = torch.full((1, 1, 1, 2), 0.5)
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert torch.allclose(dequantize(x, noise=half), torch.tensor([0.5, 255.5]) / 256)
    for bad, n_bits, match in [(torch.tensor([[[[255, 300]]]]), 8, r"\[0, 255\]"),
                               (x, 5, r"\[0, 31\]"),
                               (torch.tensor([[[[0.3, 0.9]]]]), 8, "integer values"),
                               (torch.tensor([[[[0.0, math.nan]]]]), 8, "NaN or infinite"),
                               (x, 9, "n_bits")]:
        with pytest.raises(ValueError, match=match):
            dequantize(bad, n_bits, noise=half)
    model = small_image_model((3, 8, 8), 2).eval()
    ok = pixels((3, 8, 8), 2, torch.float32)
    for call in (model.log_prob, model.encode):
        with pytest.raises(TypeError, match="float64, the model's weights torch.float32"):
            call(ok.double())
    latents = model.encode(ok)
    with pytest.raises(TypeError, match="float64"):
        model.decode([z.double() for z in latents])
    with pytest.raises(ValueError, match="4 dimensions.*unflatten_latents"):
        model.decode([z.flatten(1) for z in latents])
    with pytest.raises(ValueError, match=r"different batch sizes: \[2, 1\]"):
        model.decode([latents[0], latents[1][:1]])
    vector = RealNVP(RealNVPConfig(input_shape=(4,)))
    with pytest.raises(TypeError, match="vectors are torch.float64"):
        vector.log_prob(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="bf16 autocast works on float32 weights"):
        small_image_model((3, 8, 8), 2).double().set_precision("bf16")


def test_eval_mode_leaves_each_submodule_in_its_own_mode():
    import numpy as np

    from realnvp import BatchNormFlow
    from realnvp.data.base import TensorImageDataset
    from realnvp.evaluate import evaluate

    model = small_image_model((1, 4, 4), 2).train()
    frozen = [m for m in model.modules() if isinstance(m, BatchNormFlow)]
    for m in frozen:  # a user's choice: fixed statistics in an otherwise training model
        m.eval()
    images = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)
    model.decode(model.encode(pixels((1, 4, 4), 2, torch.float32)))
    model.sample(2)
    evaluate(model, TensorImageDataset(images.numpy(), name="t", split="test",
                                       source_indices=np.arange(3)))
    modes = {m: m.training for m in model.modules()}
    assert frozen and not any(modes[m] for m in frozen)
    assert all(training for m, training in modes.items() if m not in frozen)


def test_non_finite_log_prob_raises():
    model = small_image_model((3, 8, 8), 2).eval()
    with torch.no_grad():
        model.scales[0][1].running_var.fill_(float("inf"))  # a diverged statistic
    with pytest.raises(FloatingPointError, match="non-finite"):
        model.log_prob(pixels((3, 8, 8), 2, torch.float32))


def test_conditional_model_labels():
    model = perturb(small_image_model((1, 8, 8), 2, num_classes=3), seed=8, scale=0.1).eval()
    x = pixels((1, 8, 8), 2, torch.float32)
    a = model.log_prob(x, torch.tensor([0, 0]))
    b = model.log_prob(x, torch.tensor([2, 2]))
    assert (a - b).abs().min() > 1e-4
    with pytest.raises(ValueError, match="pass cond"):
        model.log_prob(x)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        model.log_prob(x, torch.tensor([0, 3]))
    attributes = perturb(small_image_model((1, 8, 8), 2, num_classes=4, label_kind="attributes"),
                         seed=9, scale=0.1).eval()
    labels = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)
    latents = attributes.encode(x, labels)
    assert (attributes.decode(latents, labels) - x).abs().max() < 1e-4
    with pytest.raises(ValueError, match="0 or 1"):
        attributes.log_prob(x, labels * 0.5)


def test_save_load_roundtrip_and_config_mismatch(tmp_path):
    model = perturb(small_image_model((3, 8, 8), 2), seed=10).eval()
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = RealNVP.load(path).eval()
    x = pixels((3, 8, 8), 3, torch.float32)
    assert torch.equal(loaded.log_prob(x), model.log_prob(x))
    assert loaded.config == model.config
    other = small_image_model((3, 8, 8), 2, features=8)
    with pytest.raises(CheckpointError, match="another config.*features"):
        other.load_weights(path)
    same = small_image_model((3, 8, 8), 2)
    same.load_weights(path)
    assert torch.equal(same.eval().log_prob(x), model.log_prob(x))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        RealNVP.load(truncated)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a realnvp-model"):
        RealNVP.load(tmp_path / "foreign.pt")
    (tmp_path / "config.toml").write_text("[model]\nfeatures = 8\n")
    with pytest.raises(CheckpointError, match="config.toml: truncated or corrupt, or not a "
                                              "realnvp-model or realnvp-checkpoint file at all"):
        RealNVP.load(tmp_path / "config.toml")
    assert not RealNVP.load(path).training  # ready to evaluate with its running statistics


def test_bn_entries_choose_different_models_and_old_configs_load_as_all(tmp_path):
    """A config saved before ``bn_entries`` existed (every batch norm then normalised every
    entry) rebuilds that model: the default is "all". The three choices are three models:
    the same weights give three densities in train mode."""
    from realnvp.train import TrainConfig, read_config, write_config

    old = perturb(small_image_model((3, 8, 8), 2), seed=11).eval()
    payload = {"format": "realnvp-model", "version": 1,
               "config": {k: v for k, v in old.config.to_dict().items() if k != "bn_entries"},
               "state_dict": old.state_dict()}
    torch.save(payload, tmp_path / "old.pt")
    loaded = RealNVP.load(tmp_path / "old.pt")
    assert loaded.config.bn_entries == "all"
    x = pixels((3, 8, 8), 3, torch.float32)
    assert torch.equal(loaded.log_prob(x), old.log_prob(x))
    write_config(tmp_path / "config.toml", old.config, TrainConfig())
    text = (tmp_path / "config.toml").read_text()
    (tmp_path / "config.toml").write_text(text.replace('bn_entries = "all"\n', ""))
    assert "bn_entries" not in (tmp_path / "config.toml").read_text()
    assert read_config(tmp_path / "config.toml")[0].bn_entries == "all"
    densities = [old.train().log_prob(x).detach()]
    for entries in ("transformed", "official"):
        other = small_image_model((3, 8, 8), 2, bn_entries=entries)
        mine = other.state_dict()  # the same weights; the channel norms' buffers are smaller
        other.load_state_dict({k: v for k, v in old.state_dict().items()
                               if v.shape == mine[k].shape}, strict=False)
        densities.append(other.train().log_prob(x).detach())
    for i in range(3):
        for j in range(i):
            assert not torch.allclose(densities[i], densities[j])
    with pytest.raises(ValueError, match="bn_entries must be all, transformed or official"):
        RealNVPConfig(bn_entries="some")


@pytest.mark.parametrize("batch_norm", ["batch", "lagged"])
@pytest.mark.parametrize("entries", ["all", "transformed", "official"])
def test_masked_batch_norm_after_a_coupling_that_transformed_nothing(entries, batch_norm):
    """A 4×4 image with 3 scales ends at 1×1, where a parity-0 checkerboard coupling passes the
    only position: its batch norm then normalises nothing and is the identity (log-det 0), in
    train mode too, instead of taking the statistics of an empty batch (NaN) or refusing."""
    from realnvp import BatchNormFlow

    model = small_image_model((3, 4, 4), 3, bn_entries=entries, batch_norm=batch_norm)
    x = pixels((3, 4, 4), 8, torch.float32)
    model.train().log_prob(x).mean().backward()
    assert all(torch.isfinite(b).all() for b in model.buffers())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    last = [m for m in model.scales[-1].modules() if isinstance(m, BatchNormFlow)]
    z = torch.randn(8, 12, 1, 1)
    for norm in last:
        if norm.mask == "checkerboard" and norm.parity == 0:
            y, logdet = norm.train()(z)
            assert torch.equal(y, z) and torch.equal(logdet, torch.zeros(8))


@pytest.mark.parametrize("entries", ["transformed", "official"])
def test_masked_batch_norms_follow_their_couplings(entries):
    """bn_entries="transformed" / "official": every batch norm has its coupling's mask and
    parity; the official statistics (zeros included) only after checkerboard couplings."""
    from realnvp import AffineCoupling, BatchNormFlow

    model = small_image_model((3, 8, 8), 2, bn_entries=entries)
    pairs = [(a, b) for scale in model.scales for a, b in zip(scale.layers, scale.layers[1:])
             if isinstance(a, AffineCoupling)]
    assert len(pairs) == 10 and all(isinstance(b, BatchNormFlow) for _, b in pairs)
    for coupling, norm in pairs:
        assert (norm.mask, norm.parity) == (coupling.mask, coupling.parity)
        assert norm.zeros_in_stats == (entries == "official" and coupling.mask == "checkerboard")
        half = coupling.mask == "channel"
        assert norm.running_mean.numel() == norm.num_features // (2 if half else 1)


def test_sampling_other_sizes_and_temperature():
    model = perturb(small_image_model((3, 8, 8), 2), seed=11).eval()
    big = model.sample(3, shape=(16, 24))
    assert big.shape == (3, 3, 16, 24)
    cold = model.sample(4, temperature=0.0)
    assert torch.allclose(cold, cold[:1].expand_as(cold))
    vector = RealNVP(RealNVPConfig(input_shape=(3,)))
    assert vector.sample(5).shape == (5, 3)


def test_top_pixel_value_stays_finite_in_float32(monkeypatch):
    from realnvp import dequantize

    # (255 + u) / 256 rounds to exactly 1.0 in float32 for u near 1: the logit's pole.
    assert float((torch.tensor(255.0) + 0.99999994) / 256) == 1.0
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.full(shape, 0.99999994))
    x_tilde = dequantize(torch.full((1, 1, 2, 2), 255, dtype=torch.uint8))
    monkeypatch.undo()
    assert x_tilde.dtype == torch.float32 and x_tilde.max() < 1
    model = RealNVP(RealNVPConfig(input_shape=(1, 2, 2), scales=1, res_blocks=1, features=4))
    assert torch.isfinite(model.eval().log_prob(x_tilde)).all()
    for form in ("paper", "official"):
        y, logdet = LogitTransform(0.05, form)(x_tilde)
        assert torch.isfinite(y).all() and torch.isfinite(logdet).all()


def test_configs_take_numpy_and_torch_values_as_plain_python(tmp_path):
    """A config built from numpy or torch values holds Python numbers, so its checkpoints
    load with weights_only=True (which refuses numpy objects)."""
    config = RealNVPConfig(input_shape=np.array([1, 8, 8]), scales=np.int64(2),
                           res_blocks=torch.tensor(1), features=np.int32(4),
                           shift_then_scale=np.bool_(True), bn_momentum=np.float32(0.5))
    assert config == RealNVPConfig(input_shape=(1, 8, 8), scales=2, res_blocks=1, features=4,
                                   shift_then_scale=True, bn_momentum=0.5)
    assert all(type(v) in (int, float, bool, str, tuple, type(None))
               for v in dataclasses.asdict(config).values())
    RealNVP(config).save(tmp_path / "m.pt")
    assert RealNVP.load(tmp_path / "m.pt").config == config
    with pytest.raises(ValueError, match=r"scales must be an integer, got np.float64\(2.0\) "
                                         r"\(numpy.float64\)"):
        RealNVPConfig(scales=np.float64(2.0))


def test_encode_decode_sample_and_config_refuse_bad_values():
    """encode checks pixels as log_prob does (uint8 input would wrap around in 1 − x)."""
    model = small_image_model((3, 8, 8), 2).eval()
    ok = pixels((3, 8, 8), 2, torch.float32)
    range_error = (ValueError, r"\[0, 1\)")
    for bad, (error, match) in [(ok * 2, range_error), (ok - 0.5, range_error),
                                ((ok * 255).to(torch.uint8), (TypeError, "floats in")),
                                (ok.masked_fill(ok > 0.5, math.inf), range_error)]:
        with pytest.raises(error, match=match):
            model.encode(bad)
    assert [tuple(z.shape[1:]) for z in model.encode(pixels((3, 16, 8), 2, torch.float32))] == \
        [(6, 8, 4), (6, 8, 4)]  # other sizes still encode
    with pytest.raises(ValueError, match="infinite"):
        model.bits_per_dim(torch.full((1, 3, 8, 8), math.inf))
    latents = model.encode(ok)
    latents[1][0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.decode(latents)
    with pytest.raises(ValueError, match="finite number >= 0"):
        model.sample(2, temperature=math.nan)
    latents = model.encode(ok)
    for bad, match in [([latents[0], latents[1].long()], "floating point, got torch.int64"),
                       ([latents[0], latents[1].double()], "latents are torch.float64")]:
        with pytest.raises(TypeError, match=match):
            model.decode(bad)
    bf16 = small_image_model((3, 8, 8), 2).set_precision("bf16").double()
    with pytest.raises(TypeError, match="bf16 s/t networks need a float32 model"):
        bf16.log_prob(ok.double())  # not quietly fp64 while the setting says bf16
    conditional = small_image_model((1, 8, 8), 2, num_classes=3).eval()
    with pytest.raises(ValueError, match="integer tensor"):
        conditional.log_prob(pixels((1, 8, 8), 2, torch.float32), torch.tensor([True, False]))
    for bad in [dict(bn_eps=-1.0), dict(bn_eps=math.nan), dict(bn_momentum=1.5),
                dict(bn_momentum=0.0)]:
        with pytest.raises(ValueError, match="bn_momentum"):
            RealNVPConfig(**bad)
    for bad in [dict(logit_alpha=0.5), dict(logit_form="symmetric")]:
        with pytest.raises(ValueError, match="logit_alpha"):
            RealNVPConfig(**bad)
    vector = RealNVP(RealNVPConfig(input_shape=(4,))).eval()
    with pytest.raises(ValueError, match="infinite"):
        vector.encode(torch.tensor([[0.0, math.inf, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="shape= is for image models"):
        vector.sample(2, shape=(8, 8))
    assert vector.sample(2, shape=(4,)).shape == (2, 4)


def test_pixel_baseline_by_hand():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "pixel_baseline.py"
    spec = importlib.util.spec_from_file_location("pixel_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    train = torch.tensor([[0, 7], [0, 9], [3, 7]], dtype=torch.uint8)
    test = torch.tensor([[0, 7], [3, 200]], dtype=torch.uint8)
    bits = module.independent_pixel_bits(train, test, smoothing=0.5)
    total = 3 + 256 * 0.5  # counts plus pseudo-counts, per pixel
    expected = [-(math.log2(2.5 / total) + math.log2(2.5 / total)) / 2,
                -(math.log2(1.5 / total) + math.log2(0.5 / total)) / 2]
    assert torch.allclose(bits, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("name,scales,blocks,features,last_size", [
    ("cifar10", 2, 8, 64, 16), ("imagenet32", 4, 4, 32, 4), ("imagenet64", 5, 2, 32, 4),
    ("celeba64", 5, 2, 32, 4), ("lsun64", 5, 2, 32, 4), ("mnist", 3, 4, 32, 7)])
def test_presets_and_the_order_of_their_couplings(name, scales, blocks, features, last_size):
    """SPEC §1.3 and §3: each scale 3 checkerboard couplings (the first passing i + j odd,
    alternating) → squeeze → 3 channel couplings (first half first, alternating), the last
    scale 4 checkerboard couplings at 4×4 (CIFAR-10: "downscale only once"; MNIST stops at
    7×7); s/t widths features·2^i, doubled in channel couplings; a batch norm after each."""
    from realnvp import AffineCoupling, BatchNormFlow, Squeeze

    model = RealNVP.from_preset(name)
    c = model.config
    assert (c.scales, c.res_blocks, c.features) == (scales, blocks, features)
    assert model.latent_shapes()[-1][1:] == (last_size, last_size)
    for i, scale in enumerate(model.scales):
        layers = list(scale.layers)
        kinds = []
        for layer, after in zip(layers, layers[1:] + [None]):
            if isinstance(layer, AffineCoupling):
                assert isinstance(after, BatchNormFlow)
                assert after.mask is None  # bn_entries="all": the whole output
                width = layer.net.stem.weight_v.shape[0]
                double = 2 if layer.mask == "channel" else 1
                assert width == features * 2**i * double
                assert len(layer.net.blocks) == blocks
                kinds.append(f"{'b' if layer.mask == 'checkerboard' else 'c'}{layer.parity}")
            elif isinstance(layer, Squeeze):
                kinds.append("squeeze")
        last = i == scales - 1
        # b: checkerboard (parity 1: i + j odd passes), c: channel (parity 0: first half)
        assert kinds == (["b1", "b0", "b1", "b0"] if last else
                         ["b1", "b0", "b1", "squeeze", "c0", "c1", "c0"]), (i, kinds)


def test_pixel_range_boundaries_and_zero_noise():
    """n-bit pixels are 0 … 2ⁿ − 1: the top value is accepted, 2ⁿ refused; noise u ∈ [0, 1),
    so u = 0 is accepted and gives x̃ = x / 2ⁿ."""
    from realnvp import dequantize

    top = torch.tensor([[[[31, 0], [5, 31]]]], dtype=torch.uint8)
    assert torch.equal(dequantize(top, 5, noise=torch.zeros(1, 1, 2, 2)), top.float() / 32)
    with pytest.raises(ValueError, match="5-bit"):
        dequantize(top + 1, 5)
    assert dequantize(torch.full((1, 1, 2, 2), 255, dtype=torch.uint8)).max() < 1
    with pytest.raises(ValueError):
        dequantize(torch.full((1, 1, 2, 2), 256), 8)


def test_sampling_temperature_scales_the_latents():
    model = perturb(small_image_model((3, 8, 8), 2)).eval()
    samples = model.sample(3, temperature=0.5, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    z = [torch.randn((3, *s), generator=g) for s in model.latent_shapes()]
    with torch.no_grad():
        by_hand = model.decode([0.5 * zi for zi in z]).clamp(0, 1)
    assert torch.allclose(samples, by_hand, atol=1e-6)
