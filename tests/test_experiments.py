"""The paper's experiments (SPEC section 5) and their figure commands.

Two image models serve every test: ``model``, a random 3-scale MNIST model with perturbed weights
and batch-norm statistics calibrated on real digits (for the exactness checks), and
``cond_run``, a small class-conditional model trained for a few steps on real MNIST (for the
label experiments and the commands that read a run directory). ``toy_run`` is a 2-D model
trained on two moons.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import calibrate, perturb
from PIL import Image

from realnvp import RealNVP, RealNVPConfig
from realnvp.cli import main as cli_main
from realnvp.data import DEMO_DATA, load_dataset, toy_dataset
from realnvp.experiments import (
    compress,
    density_grid,
    each_class,
    extrapolate,
    manifold,
    manifold_weights,
    pixels_to_input,
    reconstruct,
    resample_levels,
    sample_temperatures,
    swap_labels,
    toy_experiment,
)
from realnvp.figures import GAP, LABEL_HEIGHT, ROW_LABEL_WIDTH
from realnvp.train import TrainConfig, Trainer

COMMANDS = ["sample", "interpolate", "extrapolate", "levels", "swap-labels", "reconstruct", "toy"]
DATA = ["--dataset", "mnist-t10k", "--data-dir", str(DEMO_DATA)]
PAD = 2  # make_grid's padding


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: on a busy machine, torch's thread pool makes their small matrix
    products up to a thousand times slower than one thread does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digits(n: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n held-out MNIST digits in the model's input space, and their labels."""
    data = load_dataset("mnist-t10k", DEMO_DATA, "valid")
    pixels, labels = data.get_batch(torch.arange(start, start + n))
    return pixels_to_input(pixels), labels


@pytest.fixture(scope="module")
def model() -> RealNVP:
    torch.manual_seed(1)
    m = RealNVP(RealNVPConfig(input_shape=(1, 28, 28), scales=3, res_blocks=1, features=4))
    perturb(m, seed=1)
    return calibrate(m, digits(64, start=100)[0])


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory) -> Path:
    """A run directory: a class-conditional model, 40 steps on real MNIST (mnist-t10k)."""
    run = tmp_path_factory.mktemp("cond_run")
    train = TrainConfig(run_dir=str(run), steps=40, batch_size=32, lr=2e-3, warmup_steps=5,
                        conditional=True, eval_every=1000, eval_images=32, sample_every=1000,
                        sample_count=4, checkpoint_every=1000, progress=False)
    Trainer(RealNVPConfig(input_shape=(1, 28, 28), scales=2, res_blocks=1, features=8),
            train).run()
    return run


@pytest.fixture(scope="module")
def cond_model(cond_run) -> RealNVP:
    return RealNVP.load(cond_run / "checkpoints" / "best.pt").eval()


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """A run directory: a 2-D model trained on two moons (realnvp train --dataset moons)."""
    run = tmp_path_factory.mktemp("toy_run")
    train = TrainConfig(dataset="moons", run_dir=str(run), steps=150, batch_size=256, lr=3e-3,
                        eval_every=1000, eval_images=500, checkpoint_every=1000, progress=False)
    Trainer(RealNVPConfig(input_shape=(2,), coupling_layers=6, res_blocks=2, features=32),
            train).run()
    return run


@pytest.fixture(scope="module")
def toy_model(toy_run) -> RealNVP:
    return RealNVP.load(toy_run / "checkpoints" / "best.pt").eval()


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, after decoding all of it."""
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        return image.size


# -- the experiments as functions -----------------------------------------------------------------

def test_manifold_corners_are_the_reconstructions(model):
    images, _ = digits(4)
    k = 5
    grid = manifold(model, images, k)
    assert grid.shape == (k, k, 1, 28, 28)
    recon, error = reconstruct(model, images)
    assert error <= 1e-4
    corners = torch.stack([grid[0, 0], grid[0, k - 1], grid[k - 1, 0], grid[k - 1, k - 1]])
    assert (corners - recon).abs().max() <= 1e-4
    assert (grid[k // 2, k // 2] - recon).abs().max() > 0.05  # the middle is something else
    w = manifold_weights(k)
    assert torch.allclose(w.pow(2).sum(-1), torch.ones(k, k, dtype=torch.float64))


def test_conditional_manifold_uses_one_label(cond_model):
    images, _ = digits(4)
    grid = manifold(cond_model, images, 3, cond=7)
    recon, _ = reconstruct(cond_model, images, torch.full((4,), 7))
    assert (grid[-1, -1] - recon[3]).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="same label"):
        manifold(cond_model, images, 3, cond=torch.tensor([1, 2, 1, 1]))


def test_level_resampling_k0_reproduces_and_kL_ignores_the_inputs(model):
    a, _ = digits(3)
    b, _ = digits(3, start=10)
    levels = len(model.latent_shapes())
    assert levels == 3
    out_a = resample_levels(model, a, generator=torch.Generator().manual_seed(5))
    out_b = resample_levels(model, b, generator=torch.Generator().manual_seed(5))
    assert out_a.shape == (3, levels + 1, 1, 28, 28)
    assert (out_a[:, 0] - a).abs().max() <= 1e-4 and (out_b[:, 0] - b).abs().max() <= 1e-4
    assert torch.allclose(out_a[:, levels], out_b[:, levels], atol=1e-6)  # a pure sample
    assert (out_a[:, 1] - out_b[:, 1]).abs().max() > 0.05  # k < L still depends on the input
    other = resample_levels(model, a, [levels], generator=torch.Generator().manual_seed(6))
    assert (other[:, 0] - out_a[:, levels]).abs().max() > 0.05  # new noise, new sample


def test_compression_k0_reproduces_and_kL_is_the_temperature_zero_sample(model):
    images, _ = digits(2)
    out = compress(model, images)
    assert out.shape == (2, 4, 1, 28, 28)
    assert (out[:, 0] - images).abs().max() <= 1e-4
    mode = model.sample(1, temperature=0.0)
    assert torch.allclose(out[:, 3], mode.expand(2, -1, -1, -1), atol=1e-5)


def test_extrapolated_samples_have_the_requested_size(model):
    samples = extrapolate(model, 2, factors=(2, 10), generator=torch.Generator().manual_seed(0))
    assert [tuple(s.shape) for s in samples] == [(2, 1, 56, 56), (2, 1, 280, 280)]
    assert all(torch.isfinite(s).all() and s.min() >= 0 and s.max() <= 1 for s in samples)
    with pytest.raises(ValueError, match="positive integers"):
        extrapolate(model, 1, factors=(1.5,))


def test_temperature_zero_gives_one_image_per_class(model, cond_model):
    labels = torch.tensor([0, 0, 0, 5, 5, 5])
    samples = sample_temperatures(cond_model, 6, [0.0, 1.0], labels,
                                  torch.Generator().manual_seed(0))
    assert samples.shape == (2, 6, 1, 28, 28)
    cold, warm = samples
    assert torch.equal(cold[0], cold[1]) and torch.equal(cold[0], cold[2])
    assert torch.equal(cold[3], cold[5])
    assert not torch.allclose(cold[0], cold[3], atol=1e-6)  # the class changes the image
    assert (warm[0] - warm[1]).abs().max() > 0.05
    plain = sample_temperatures(model, 4, [0.0], generator=torch.Generator().manual_seed(0))[0]
    assert all(torch.equal(plain[0], plain[i]) for i in range(4))
    # every temperature decodes the same noise: one temperature equals model.sample
    same = sample_temperatures(model, 3, [0.5, 0.7], generator=torch.Generator().manual_seed(3))
    direct = model.sample(3, 0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(same[1], direct)


def test_conditional_log_prob_depends_on_the_label(cond_model):
    images, labels = digits(16)
    own = cond_model.log_prob(images, labels)
    other = cond_model.log_prob(images, (labels + 1) % 10)
    assert (own - other).abs().max() > 1e-2
    with pytest.raises(ValueError, match="conditional"):
        cond_model.log_prob(images)


def test_swap_labels_with_the_identity_reproduces_the_inputs(cond_model):
    images, labels = digits(6)
    same = swap_labels(cond_model, images, labels, torch.arange(6))
    assert (same - images).abs().max() <= 1e-4
    swapped = swap_labels(cond_model, images, labels, torch.tensor([1, 2, 3, 4, 5, 0]))
    changed = labels != labels[[1, 2, 3, 4, 5, 0]]
    assert changed.any()
    assert (swapped[changed] - images[changed]).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    with pytest.raises(ValueError, match="permutation"):
        swap_labels(cond_model, images, labels, torch.tensor([0, 0, 1, 2, 3, 4]))
    every = each_class(cond_model, images[:2], labels[:2])
    assert every.shape == (2, 10, 1, 28, 28)
    for i in range(2):  # decoding with the image's own class reconstructs it
        assert (every[i, int(labels[i])] - images[i]).abs().max() <= 1e-4


def test_toy_experiment(toy_model):
    m = toy_model
    data = toy_dataset("moons", 500, seed=1)
    result = toy_experiment(m, data, n_prior=300, grid=40,
                            generator=torch.Generator().manual_seed(0))
    assert result.latents.shape == (500, 2) and result.mapped.shape == (300, 2)
    assert result.density.shape == (40, 40)
    assert torch.allclose(m.decode([result.latents]), data, atol=1e-4)
    assert 0.5 < float(result.latents.std()) < 2.0  # roughly the prior's scale
    # the grid: row 0 at the top, pixel centres; and a density integrates to about 1
    x0, x1, y0, y1 = result.extent
    cell = (x1 - x0) / 40
    for i, j in [(0, 0), (5, 31), (39, 12)]:
        point = torch.tensor([[x0 + (j + 0.5) * cell, y1 - (i + 0.5) * cell]])
        assert torch.allclose(result.density[i, j], m.log_prob(point).exp()[0], rtol=1e-4)
    assert 0.8 < float(result.density.sum()) * cell**2 < 1.1
    assert torch.equal(density_grid(m, result.extent, 40), result.density)


# -- the commands ---------------------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: realnvp {command}" in out and "--checkpoint" in out and "--out" in out


def test_sample_command_several_temperatures_and_a_label(model_file, cond_run, tmp_path):
    out = tmp_path / "t.png"
    cli_main(["sample", "--checkpoint", str(model_file), "-n", "6", "--nrow", "3",
              "--temperature", "0", "0.5", "1", "--out", str(out)])
    panel_w, panel_h = 3 * (28 + PAD) + PAD, 2 * (28 + PAD) + PAD
    assert png_size(out) == (3 * panel_w + 2 * GAP, LABEL_HEIGHT + panel_h)
    out = tmp_path / "label.png"  # the original spelling: one temperature, a plain grid
    cli_main(["sample", "--checkpoint", str(cond_run), "-n", "4", "--label", "3",
              "--temperature", "0.7", "--nrow", "2", "--zoom", "2", "--out", str(out)])
    assert png_size(out) == (2 * (56 + PAD) + PAD, 2 * (56 + PAD) + PAD)


def test_interpolate_command(model_file, tmp_path, capsys):
    out = tmp_path / "manifold.png"
    cli_main(["interpolate", "--checkpoint", str(model_file), *DATA, "--indices", "0", "1", "2",
              "3", "--steps", "5", "--zoom", "2", "--out", str(out)])
    h = 56
    grid = 5 * (h + PAD) + PAD
    assert png_size(out) == (grid + 2 * (h + 2 * PAD) + 2 * GAP, grid)
    assert "latent manifold" in capsys.readouterr().out


def test_interpolate_from_image_files(model, model_file, tmp_path, capsys):
    images, _ = digits(4)
    files = []
    for i, image in enumerate(images):
        pixels = (image[0] * 256).floor().byte().numpy()
        path = tmp_path / f"digit{i}.png"
        mode = "RGB" if i == 0 else "L"  # any mode is converted to the model's channels
        Image.fromarray(pixels, mode="L").convert(mode).save(path)
        files.append(str(path))
    out = tmp_path / "files.png"
    cli_main(["interpolate", "--checkpoint", str(model_file), "--images", *files, "--steps",
              "3", "--out", str(out)])
    assert png_size(out) == (3 * 30 + PAD + 2 * 32 + 2 * GAP, 3 * 30 + PAD)
    Image.new("L", (30, 30)).save(tmp_path / "big.png")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["interpolate", "--checkpoint", str(model_file), "--images",
                  *files[:3], str(tmp_path / "big.png"), "--out", str(out)])
    assert exit_info.value.code == 2
    assert "big.png is 30x30 pixels; the model takes 28x28" in capsys.readouterr().err


def test_extrapolate_command(model_file, tmp_path):
    out = tmp_path / "big.png"
    cli_main(["extrapolate", "--checkpoint", str(model_file), "-n", "1", "--factors", "2", "10",
              "--out", str(out)])
    assert png_size(out) == ((56 + 2 * PAD) + (280 + 2 * PAD) + GAP, LABEL_HEIGHT + 280 + 2 * PAD)


def test_extrapolate_a_class_conditional_model_without_a_label(cond_run, tmp_path):
    """As sample does: the classes in turn, one per sample (the figure's first row 0, 1, 2)."""
    out = tmp_path / "classes.png"
    cli_main(["extrapolate", "--checkpoint", str(cond_run), "-n", "3", "--factors", "1",
              "--nrow", "3", "--out", str(out)])
    assert png_size(out) == (3 * 28 + 4 * PAD, LABEL_HEIGHT + 28 + 2 * PAD)


@pytest.mark.parametrize("compression", [False, True])
def test_levels_command(model_file, tmp_path, compression):
    out = tmp_path / "levels.png"
    cli_main(["levels", "--checkpoint", str(model_file), *DATA, "-n", "3", "--out", str(out),
              *(["--compression"] if compression else [])])
    assert png_size(out) == (4 * (28 + PAD) + PAD, LABEL_HEIGHT + 3 * (28 + PAD) + PAD)


def test_swap_labels_command(cond_run, model_file, tmp_path, capsys):
    out = tmp_path / "swap.png"  # the dataset defaults to the run's own (mnist-t10k)
    cli_main(["swap-labels", "--checkpoint", str(cond_run), "-n", "5", "--out", str(out)])
    assert png_size(out) == (ROW_LABEL_WIDTH + 5 * (28 + PAD) + PAD,
                             LABEL_HEIGHT + 2 * (28 + PAD) + PAD)
    out = tmp_path / "classes.png"
    cli_main(["swap-labels", "--checkpoint", str(cond_run), "-n", "2", "--all-classes",
              "--out", str(out)])
    assert png_size(out) == (11 * (28 + PAD) + PAD, LABEL_HEIGHT + 2 * (28 + PAD) + PAD)
    with pytest.raises(SystemExit):
        cli_main(["swap-labels", "--checkpoint", str(model_file), *DATA, "--out", str(out)])
    assert "class-conditional" in capsys.readouterr().err


def test_reconstruct_command(model_file, tmp_path, capsys):
    out = tmp_path / "recon.png"
    cli_main(["reconstruct", "--checkpoint", str(model_file), *DATA, "--max-images", "20",
              "--show", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    error = float(re.search(r"over 20 images: (\S+)", printed).group(1))
    assert error <= 1e-4
    assert png_size(out) == (ROW_LABEL_WIDTH + 4 * (28 + PAD) + PAD, 2 * (28 + PAD) + PAD)


def test_toy_command(toy_run, tmp_path):
    out = tmp_path / "toy.png"  # the toy density defaults to the run's own (moons)
    cli_main(["toy", "--checkpoint", str(toy_run), "-n", "300", "--grid", "32", "--size", "64",
              "--out", str(out)])
    assert png_size(out) == (5 * 64 + 4 * GAP, LABEL_HEIGHT + 64)
    with Image.open(out) as image:
        assert image.mode == "RGB"
        assert len(image.getcolors(maxcolors=1 << 16)) > 20  # points and a heat map, not blank


def test_math_of_the_weights():
    w = manifold_weights(3)
    assert torch.equal(w[0, 0], torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))
    assert torch.equal(w[2, 2], torch.tensor([0, 0, 0, 1.0], dtype=torch.float64))
    half = math.sqrt(0.5)
    assert torch.allclose(w[1, 1], torch.full((4,), half * half, dtype=torch.float64))


def test_label_and_input_errors_of_the_experiments(model, model_file, cond_model, toy_run,
                                                   tmp_path, capsys):
    """Found by review: each of these crashed with a traceback or did the wrong thing."""
    x, labels = digits(5)
    # one label for a whole batch, as every experiment accepts
    whole, _ = reconstruct(cond_model, x, labels[:5], batch_size=2)
    single, _ = reconstruct(cond_model, x, 3, batch_size=2)
    assert torch.allclose(single, reconstruct(cond_model, x, torch.full((5,), 3),
                                              batch_size=2)[0])
    assert not torch.allclose(whole, single)  # the label mattered
    attributes = RealNVP(RealNVPConfig(input_shape=(1, 28, 28), scales=2, res_blocks=1,
                                       features=4, num_classes=3, label_kind="attributes"))
    with pytest.raises(ValueError, match="attribute vector, not a class label"):
        manifold(attributes, x[:4], 2, cond=1)
    attribute_file = tmp_path / "attributes.pt"
    attributes.save(attribute_file)
    for command in (["interpolate", *DATA, "--label", "1"], ["extrapolate", "--label", "1"]):
        with pytest.raises(SystemExit):
            cli_main([command[0], "--checkpoint", str(attribute_file), *command[1:],
                      "--out", str(tmp_path / "x.png")])
        assert "conditional on attribute vectors" in capsys.readouterr().err
    # a conditional model on an unlabelled dataset
    unlabelled = tmp_path / "unlabelled.npz"
    pixels = load_dataset("mnist-t10k", DEMO_DATA, "valid").get_batch(torch.arange(8))[0]
    np.savez(unlabelled, x_train=pixels.numpy(), x_test=pixels.numpy())
    with pytest.raises(SystemExit):
        cli_main(["eval", "--checkpoint", str(attribute_file), "--dataset", "npz",
                  "--data-dir", str(unlabelled)])
    assert "conditional on 3 attributes, but the dataset has no labels" in capsys.readouterr().err
    # image commands on a vector model; indices outside the split; counts of zero
    for argv in (["reconstruct", "--checkpoint", str(toy_run), *DATA],
                 ["levels", "--checkpoint", str(model_file), *DATA, "--split", "test",
                  "--indices", "5000"]):
        with pytest.raises(SystemExit):
            cli_main([*argv, "--out", str(tmp_path / "x.png")])
        err = capsys.readouterr().err
        assert "needs an image model" in err or "outside the test split" in err, err
    with pytest.raises(SystemExit):  # no dequantisation samples for points in the plane
        cli_main(["eval", "--checkpoint", str(toy_run), "--samples", "4"])
    assert "dequantisation samples are for image models" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # toy on an image model says what toy needs
        cli_main(["toy", "--checkpoint", str(model_file), "--out", str(tmp_path / "x.png")])
    assert "it needs a model of 2-D vectors" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["levels", "--checkpoint", str(model_file), *DATA, "-n", "0",
                  "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2 and "must be a positive integer" in capsys.readouterr().err
    for out, message in [(tmp_path / "x.jpg", "written as PNG"), (tmp_path, "is a folder")]:
        with pytest.raises(SystemExit) as exit_info:  # refused before any work
            cli_main(["levels", "--checkpoint", str(model_file), *DATA, "--out", str(out)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    # 16-bit image files are refused, not clipped
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((28, 28), 40000, np.uint16)).save(deep)
    with pytest.raises(SystemExit):
        cli_main(["reconstruct", "--checkpoint", str(model_file), "--images", str(deep),
                  "--out", str(tmp_path / "x.png")])
    assert "mode I;16 does not hold 8-bit" in capsys.readouterr().err


def test_pixels_are_shown_as_the_bin_that_holds_them():
    """to_pil inverts the dequantisation x̃ = (k + u)/256: v in [k/256, (k+1)/256) shows as k
    (the ×255-and-round convention shows 200/256 as 199), and 8-bit values k/255 stay k."""
    from realnvp.figures import to_pil

    v = torch.tensor([0, 128, 200, 255, 255.9, 256]) / 256
    assert np.asarray(to_pil(v.view(1, 1, -1))).tolist() == [[0, 128, 200, 255, 255, 255]]
    k = torch.arange(256.0)
    assert np.array_equal(np.asarray(to_pil((k / 255).view(1, 16, 16))).ravel(), k.numpy())


def test_the_toy_figure_draws_points_no_split_was_drawn_from():
    from realnvp.data import VectorDataset
    from realnvp.experiments import fresh_toy_points

    splits = [VectorDataset("moons", split, run_seed).points[:200]
              for run_seed in range(4) for split in ("train", "valid", "test")]
    for seed in range(4):
        fresh = fresh_toy_points("moons", 200, seed)
        assert not any(torch.equal(points, fresh) for points in splits), seed
