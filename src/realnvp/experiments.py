"""What the paper shows with a trained model (SPEC section 5), as functions and as commands.

Every experiment is a function that takes a model and tensors and returns tensors; the figures
(:mod:`realnvp.figures`) and the ``realnvp`` subcommands at the end of this module are built on
them. All of them run the model in eval mode (running batch-norm statistics, the exact
bijection) without gradients and leave its mode as it was.

Images are float tensors (N, C, H, W) in the model's input space [0, 1) (dequantised pixels);
:func:`pixels_to_input` maps 8-bit pixels there (to the centre of each dequantisation bin).
Decoded images are clamped to [0, 1] for display, except in :func:`reconstruct`. Latents are
the model's per-scale lists [z_1, …, z_L], finest scale first (:meth:`RealNVP.encode`); an
experiment that mixes or resamples latents does so to every scale alike.

Labels (``cond``) of class-conditional models are int64 (N,) class indices, of attribute models
float (N, A) {0, 1} vectors; where one label serves a whole batch a single label (a 0-d class
tensor or an int, or an (A,) vector) is accepted too. Unconditional models take ``cond=None``.

==================  ===========================================================================
function            returns
==================  ===========================================================================
sample_temperatures (T, n, C, H, W): the same prior noise decoded at each temperature
manifold            (k, k, C, H, W): decode z(φ, φ') = cos φ (cos φ' z1 + sin φ' z2)
                    + sin φ (cos φ' z3 + sin φ' z4) over φ, φ' ∈ linspace(0, π/2, k)
extrapolate         [(n, C, f·H, f·W) for each factor f]: samples at f× the training size
resample_levels     (N, len(ks), C, H, W): latents of the finest k scales drawn from the prior
compress            (N, len(ks), C, H, W): latents of the finest k scales set to zero
swap_labels         (N, C, H, W): encoded with labels, decoded with labels[permutation]
relabel             (N, C, H, W): encoded with labels, decoded with new_labels
each_class          (N, K, C, H, W): encoded with labels, decoded with every class 0..K−1
reconstruct         ((N, C, H, W), max |x − decode(encode(x))|)
toy_experiment      ToyResult: data, latents, prior samples, their images, density grid
==================  ===========================================================================
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from .cli import load_model, png_argument, positive_int, require_classes, sampling_labels
from .data import DATASETS
from .figures import (
    labelled_grid,
    make_grid,
    manifold_figure,
    read_images,
    save_png,
    side_by_side,
    toy_figure,
    upscale,
)
from .model import RealNVP, eval_mode

DECODE_BATCH = 64  # images decoded at a time


# -- helpers --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _evaluating(model: RealNVP) -> Iterator[None]:
    """Eval mode and no gradients inside; the model's mode is restored afterwards."""
    with eval_mode(model), torch.no_grad():
        yield


def _device(model: RealNVP) -> torch.device:
    return model._device()


def _dtype(model: RealNVP) -> torch.dtype:
    return model._dtype()


def pixels_to_input(pixels: Tensor, n_bits: int = 8) -> Tensor:
    """Integer pixels in {0, …, 2ⁿ − 1}, (N, C, H, W) → the model's input space, the centre of
    each dequantisation bin: (x + ½) / 2ⁿ ∈ (0, 1), float32."""
    return (pixels.float() + 0.5) / 2**n_bits


def _images(model: RealNVP, images: Tensor) -> Tensor:
    """Check an image batch for ``model`` and move it to the model's device and dtype."""
    if not model.config.is_image:
        raise ValueError("this experiment needs an image model; the model is a vector model "
                         f"with input_shape {model.config.input_shape}")
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError("images must be a float tensor in [0, 1); for integer pixels use "
                        "pixels_to_input(pixels)")
    images = images.to(_device(model), _dtype(model))
    model._check_pixels(images)
    return images


def _labels(model: RealNVP, cond: Tensor | int | None, n: int) -> Tensor | None:
    """Labels for a batch of n: None for unconditional models; a single label is repeated."""
    if model.config.num_classes is None or cond is None:
        return cond  # the model reports a missing or superfluous label itself
    cond = torch.as_tensor(cond, device=_device(model))
    if model.config.label_kind == "class" and cond.dim() == 0:
        cond = cond.expand(n)
    elif model.config.label_kind == "attributes":
        if cond.dim() == 0:
            raise ValueError(f"this model is conditional on {model.config.num_classes} binary "
                             "attributes: give an attribute vector, not a class label")
        if cond.dim() == 1:
            cond = cond.expand(n, -1)
    return cond


def _decode(model: RealNVP, latents: list[Tensor], cond: Tensor | None) -> Tensor:
    """Decode a large batch of latents DECODE_BATCH at a time."""
    n = latents[0].shape[0]
    parts = []
    for start in range(0, n, DECODE_BATCH):
        part = slice(start, min(start + DECODE_BATCH, n))
        parts.append(model.decode([z[part] for z in latents],
                                  None if cond is None else cond[part]))
    return torch.cat(parts)


def _levels(ks: Sequence[int] | int | None, num_scales: int) -> list[int]:
    if ks is None:
        return list(range(num_scales + 1))
    ks = [ks] if isinstance(ks, int) else [int(k) for k in ks]
    bad = [k for k in ks if not 0 <= k <= num_scales]
    if bad:
        raise ValueError(f"levels must be in 0..{num_scales} (the model has {num_scales} "
                         f"scales), got {bad}")
    return ks


# -- samples --------------------------------------------------------------------------------------

def sample_temperatures(model: RealNVP, n: int, temperatures: Sequence[float],
                        cond: Tensor | int | None = None,
                        generator: torch.Generator | None = None,
                        shape: tuple[int, int] | None = None) -> Tensor:
    """n samples at each temperature T (z ~ N(0, T² I)), the same noise scaled by every T →
    (len(temperatures), n, C, H, W) in [0, 1] (vectors: (len(temperatures), n, D)).

    ``cond``: (n,) labels or one label for all. At T = 0 every sample of a class is the same
    image, the decoding of z = 0."""
    if not temperatures:
        raise ValueError("give at least one temperature")
    if generator is None:
        seed = int(torch.randint(0, 2**62, (1,)))
        generator = torch.Generator(_device(model)).manual_seed(seed)
    state = generator.get_state()
    cond = _labels(model, cond, n)
    out = []
    for t in temperatures:
        generator.set_state(state)  # the same z for every temperature
        out.append(model.sample(n, float(t), cond=cond, shape=shape, generator=generator))
    return torch.stack(out)


def extrapolate(model: RealNVP, n: int, factors: Sequence[int] = (2, 10),
                temperature: float = 1.0, cond: Tensor | int | None = None,
                generator: torch.Generator | None = None) -> list[Tensor]:
    """Samples at ``f`` times the training size, one (n, C, f·H, f·W) tensor per factor: the
    s/t networks are convolutional, so latents of the larger shape decode to larger images
    (paper, Figure 7). Each size must survive the model's squeezes (even at every scale)."""
    if not model.config.is_image:
        raise ValueError("extrapolation needs an image model")
    _, h, w = model.config.input_shape
    out = []
    for f in factors:
        if int(f) != f or f < 1:
            raise ValueError(f"factors must be positive integers, got {f}")
        out.append(model.sample(n, temperature, cond=_labels(model, cond, n),
                                shape=(h * int(f), w * int(f)), generator=generator))
    return out


# -- the latent manifold --------------------------------------------------------------------------

def manifold_weights(k: int) -> Tensor:
    """(k, k, 4) float64 weights of z1..z4 at grid point (i, j), φ = φ_i (rows), φ' = φ_j
    (columns), φ_i = iπ / (2(k − 1)): [cos φ cos φ', cos φ sin φ', sin φ cos φ', sin φ sin φ']."""
    if k < 2:
        raise ValueError(f"the manifold grid needs k >= 2 points per side, got {k}")
    phi = torch.linspace(0, math.pi / 2, k, dtype=torch.float64)
    c, s = phi.cos(), phi.sin()
    c[-1], s[0] = 0.0, 0.0  # exact corners
    return torch.stack([c[:, None] * c, c[:, None] * s, s[:, None] * c, s[:, None] * s], dim=-1)


def manifold(model: RealNVP, images: Tensor, k: int = 8,
             cond: Tensor | int | None = None) -> Tensor:
    """The paper's latent manifold (Figure 6): encode four images (4, C, H, W) to z1..z4 and
    decode z(φ, φ') = cos φ (cos φ' z1 + sin φ' z2) + sin φ (cos φ' z3 + sin φ' z4) at every
    scale, φ (rows) and φ' (columns) in linspace(0, π/2, k) → (k, k, C, H, W) in [0, 1].

    The corners [0, 0], [0, k−1], [k−1, 0], [k−1, k−1] are the reconstructions of images 0, 1,
    2, 3. Conditional models need one label for all four (``cond``: one label, or four equal).
    """
    images = _images(model, images)
    if images.shape[0] != 4:
        raise ValueError(f"manifold takes exactly 4 images, got {images.shape[0]}")
    cond = _labels(model, cond, 4)
    if cond is not None and not (cond == cond[:1]).all():
        raise ValueError("a conditional manifold needs the same label for all four images")
    weights = manifold_weights(k).reshape(k * k, 4)
    with _evaluating(model):
        latents = model.encode(images, cond)
        mixed = [torch.einsum("pm,m...->p...", weights.to(z), z) for z in latents]
        grid_cond = None if cond is None else cond[:1].expand(k * k, *cond.shape[1:])
        decoded = _decode(model, mixed, grid_cond)
    return decoded.clamp(0, 1).reshape(k, k, *images.shape[1:])


# -- what each scale encodes ----------------------------------------------------------------------

def resample_levels(model: RealNVP, images: Tensor, ks: Sequence[int] | int | None = None, *,
                    cond: Tensor | None = None, temperature: float = 1.0,
                    generator: torch.Generator | None = None) -> Tensor:
    """For each k in ``ks`` (default 0..L): encode the images, replace the latents of the finest
    k scales (z_1..z_k) by prior samples N(0, T² I) and decode → (N, len(ks), C, H, W).

    One draw of the noise serves every k (column k+1 differs from column k only at scale k+1).
    k = 0 reconstructs the images; k = L is a pure sample: with the same generator state it is
    the same for any input batch of the same size (and labels)."""
    return _replace_finest(
        model, images, ks, cond,
        lambda latents: [temperature * model.standard_normal(z.shape, generator) for z in latents])


def compress(model: RealNVP, images: Tensor, ks: Sequence[int] | int | None = None, *,
             cond: Tensor | None = None) -> Tensor:
    """The official code's "compression": encode, set the latents of the finest k scales to
    zero (their mode) and decode, for each k in ``ks`` (default 0..L) → (N, len(ks), C, H, W).
    k = 0 reconstructs the images; k = L is the temperature-0 sample."""
    return _replace_finest(model, images, ks, cond,
                           lambda latents: [torch.zeros_like(z) for z in latents])


def _replace_finest(model: RealNVP, images: Tensor, ks: Sequence[int] | int | None,
                    cond: Tensor | None, replacements) -> Tensor:
    """Encode, then for each k decode ``replacements(latents)[:k] + latents[k:]`` →
    (N, len(ks), C, H, W) in [0, 1]."""
    images = _images(model, images)
    cond = _labels(model, cond, images.shape[0])
    with _evaluating(model):
        latents = model.encode(images, cond)
        ks = _levels(ks, len(latents))
        fill = replacements(latents)
        out = [_decode(model, fill[:k] + latents[k:], cond) for k in ks]
    return torch.stack(out, dim=1).clamp(0, 1)


# -- class-conditional models ---------------------------------------------------------------------

def relabel(model: RealNVP, images: Tensor, labels: Tensor, new_labels: Tensor) -> Tensor:
    """Encode (N, C, H, W) images with their own labels and decode the latents with
    ``new_labels`` → (N, C, H, W) in [0, 1]: the same "style", another class or attributes."""
    if model.config.num_classes is None:
        raise ValueError("relabelling needs a class-conditional model (train with "
                         "--conditional)")
    if labels is None or new_labels is None:
        raise ValueError("relabel needs the images' labels and the new labels")
    images = _images(model, images)
    labels = _labels(model, labels, images.shape[0])
    new_labels = _labels(model, new_labels, images.shape[0])
    with _evaluating(model):
        return model.decode(model.encode(images, labels), new_labels).clamp(0, 1)


def swap_labels(model: RealNVP, images: Tensor, labels: Tensor, permutation: Tensor) -> Tensor:
    """The paper's label-change experiment: encode a batch with its own labels and decode it
    with the labels shuffled within the batch, ``labels[permutation]`` → (N, C, H, W). The
    identity permutation reproduces the images."""
    permutation = torch.as_tensor(permutation, dtype=torch.long, device=labels.device)
    n = images.shape[0]
    if sorted(permutation.tolist()) != list(range(n)):
        raise ValueError(f"permutation must be a permutation of 0..{n - 1}, got "
                         f"{permutation.tolist()}")
    return relabel(model, images, labels, labels[permutation])


def each_class(model: RealNVP, images: Tensor, labels: Tensor) -> Tensor:
    """Encode images with their own class labels and decode each with every class 0..K−1 →
    (N, K, C, H, W). Class-conditional models only."""
    if model.config.num_classes is None or model.config.label_kind != "class":
        raise ValueError("each_class needs a class-conditional model")
    if labels is None:
        raise ValueError("each_class needs the images' labels")
    images = _images(model, images)
    n = images.shape[0]
    labels = _labels(model, labels, n)
    with _evaluating(model):
        latents = model.encode(images, labels)  # once: only the decoding depends on the class
        out = [_decode(model, latents, torch.full((n,), c, dtype=torch.long,
                                                  device=_device(model)))
               for c in range(model.config.num_classes)]
    return torch.stack(out, dim=1).clamp(0, 1)


# -- exactness ----------------------------------------------------------------------------------

def reconstruct(model: RealNVP, images: Tensor, cond: Tensor | None = None,
                batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """decode(encode(x)) of (N, C, H, W) images in [0, 1) (or (N, D) vectors), unclamped, and
    the largest absolute difference from x (a 0-d tensor, in the units of x: for 8-bit images
    one level is 1/256)."""
    if model.config.is_image:
        images = _images(model, images)
    else:
        images = images.to(_device(model), _dtype(model))
    cond = _labels(model, cond, images.shape[0])
    parts = []
    with _evaluating(model):
        for start in range(0, images.shape[0], batch_size):
            part = slice(start, start + batch_size)
            c = None if cond is None else cond[part]
            parts.append(model.decode(model.encode(images[part], c), c))
    out = torch.cat(parts)
    return out, (out - images).abs().max()


# -- 2-D toy models -------------------------------------------------------------------------------

Extent = tuple[float, float, float, float]


class ToyResult(NamedTuple):
    """The paper's Figure 1 for a 2-D model (all tensors on the CPU)."""

    data: Tensor           # (N, 2) data points x
    latents: Tensor        # (N, 2) their latents z = f(x)
    prior: Tensor          # (M, 2) prior samples z ~ N(0, T² I)
    mapped: Tensor         # (M, 2) their images x = f⁻¹(z)
    density: Tensor        # (G, G) p(x) on a grid over ``extent``, row 0 at the top (y max)
    extent: Extent         # (x0, x1, y0, y1) of the data-space panels
    latent_extent: Extent  # (x0, x1, y0, y1) of the latent-space panels


def data_extent(points: Tensor, margin: float = 0.15) -> Extent:
    """A square (x0, x1, y0, y1) around (N, 2) points with a relative margin on each side."""
    lo, hi = points.min(0).values, points.max(0).values
    centre, half = (lo + hi) / 2, float((hi - lo).max()) / 2 * (1 + margin) + 1e-6
    return (float(centre[0]) - half, float(centre[0]) + half,
            float(centre[1]) - half, float(centre[1]) + half)


def density_grid(model: RealNVP, extent: Extent, size: int = 128,
                 cond: Tensor | int | None = None) -> Tensor:
    """exp(log p(x)) of a 2-D model at the centres of a size×size grid over ``extent`` →
    (size, size), row 0 at the top (the largest y), column 0 at the left."""
    if model.config.input_shape != (2,):
        raise ValueError(f"density_grid needs a 2-D vector model, got input_shape "
                         f"{model.config.input_shape}")
    x0, x1, y0, y1 = extent
    xs = x0 + (torch.arange(size, dtype=torch.float64) + 0.5) * (x1 - x0) / size
    ys = y1 - (torch.arange(size, dtype=torch.float64) + 0.5) * (y1 - y0) / size
    grid = torch.stack([xs.repeat(size), ys.repeat_interleave(size)], dim=1)
    grid = grid.to(_device(model), _dtype(model))
    values = []
    with _evaluating(model):
        for part in grid.split(16384):
            values.append(model.log_prob(part, _labels(model, cond, part.shape[0]),
                                         check=False).exp())
    return torch.cat(values).reshape(size, size).cpu()


def toy_experiment(model: RealNVP, data: Tensor, n_prior: int | None = None,
                   temperature: float = 1.0, grid: int = 128, extent: Extent | None = None,
                   latent_extent: Extent = (-4.0, 4.0, -4.0, 4.0),
                   generator: torch.Generator | None = None) -> ToyResult:
    """Data points (N, 2), their latents f(x), ``n_prior`` (default N) prior samples and their
    images f⁻¹(z), and the density on a grid×grid grid over ``extent`` (default: a square around
    the data), for an unconditional 2-D model."""
    if model.config.input_shape != (2,):
        raise ValueError(f"the toy figure needs a 2-D vector model, got input_shape "
                         f"{model.config.input_shape}")
    data = data.to(_device(model), _dtype(model))
    n_prior = n_prior or data.shape[0]
    extent = extent or data_extent(data.cpu())
    with _evaluating(model):
        latents = model.encode(data)[0]
        prior = temperature * model.standard_normal((n_prior, 2), generator)
        mapped = model.decode([prior])
    return ToyResult(data.cpu(), latents.cpu(), prior.cpu(), mapped.cpu(),
                     density_grid(model, extent, grid), extent, latent_extent)


# -- the command line -----------------------------------------------------------------------------

def _load(args: argparse.Namespace) -> RealNVP:
    return load_model(args.checkpoint, args.device)


def _generator(model: RealNVP, seed: int) -> torch.Generator:
    return torch.Generator(_device(model)).manual_seed(seed)


def _input_images(args: argparse.Namespace, model: RealNVP, count: int
                  ) -> tuple[Tensor, Tensor | None]:
    """(images in [0, 1), labels or None) from ``--images`` files or a dataset split."""
    if not model.config.is_image:
        raise ValueError(f"this command needs an image model; the model is a vector model with "
                         f"input_shape {model.config.input_shape} (for 2-D models: realnvp toy)")
    conditional = model.config.num_classes is not None
    c, h, w = model.config.input_shape
    if args.images:
        pixels = read_images(args.images, c, (h, w))
        labels = None
        if conditional:
            if model.config.label_kind != "class":
                raise ValueError("image files carry no attribute vectors: use --dataset with "
                                 "an attribute-conditional model")
            if args.labels is None or len(args.labels) != len(args.images):
                raise ValueError(f"this model is class-conditional: give one --labels value "
                                 f"per image ({len(args.images)})")
            labels = torch.tensor(args.labels, dtype=torch.long)
        return pixels_to_input(pixels), labels
    from .train import load_run_dataset

    # the run's own dataset and validation slice unless told otherwise
    dataset, data = load_run_dataset(Path(args.checkpoint), args.dataset, args.data_dir,
                                     args.split)
    indices = args.indices if args.indices else list(range(min(count, len(data))))
    if not indices:
        raise ValueError(f"the {args.split} split of {dataset} is empty")
    outside = [i for i in indices if not 0 <= i < len(data)]
    if outside:
        raise ValueError(f"--indices {outside} lie outside the {args.split} split of {dataset} "
                         f"(images 0..{len(data) - 1})")
    pixels, labels = data.get_batch(torch.tensor(indices))
    pixels = data.eval_transform(pixels)
    if tuple(pixels.shape[1:]) != model.config.input_shape:
        raise ValueError(f"{dataset} images are {tuple(pixels.shape[1:])}, the model takes "
                         f"{model.config.input_shape}")
    return pixels_to_input(pixels), labels if conditional else None


def _write(image: Tensor, args: argparse.Namespace, what: str) -> None:
    path = save_png(image, args.out)
    print(f"wrote {what} to {path} ({image.shape[2]}x{image.shape[1]} pixels)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a checkpoint or model file, or a run directory (uses its best.pt)")
    p.add_argument("--out", required=True, type=png_argument, help="PNG file to write")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    p.add_argument("--device", default="auto")


def _add_zoom(p: argparse.ArgumentParser) -> None:
    p.add_argument("--zoom", type=positive_int, default=1,
                   help="enlarge every image by this integer factor (nearest neighbour)")


def _add_image_source(p: argparse.ArgumentParser, count: str) -> None:
    g = p.add_argument_group(
        "input images", f"{count}, from a dataset split (by default the run's own dataset when "
        "--checkpoint is a run directory) or from image files of the model's size")
    g.add_argument("--dataset", default=None, choices=DATASETS, help="as for realnvp eval")
    g.add_argument("--data-dir", type=Path, default=None)
    g.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    g.add_argument("--indices", type=int, nargs="+", default=None, metavar="I",
                   help="indices of the images in the split")
    g.add_argument("--images", nargs="+", default=None, metavar="FILE",
                   help="image files instead of a dataset (converted to the model's channels)")
    g.add_argument("--labels", type=int, nargs="+", default=None, metavar="K",
                   help="class labels of the --images files (class-conditional models)")


def _class_label(model: RealNVP, label: int) -> Tensor:
    """``--label K`` as a 0-d class tensor, for class-conditional models only."""
    require_classes(model)
    return torch.tensor(label)


def cmd_interpolate(args: argparse.Namespace) -> None:
    model = _load(args)
    images, labels = _input_images(args, model, 4)
    if images.shape[0] != 4:
        raise ValueError(f"interpolate takes exactly 4 images, got {images.shape[0]}")
    cond = None
    if model.config.num_classes is not None:
        if args.label is not None:
            cond = _class_label(model, args.label)
        elif labels is not None and (labels == labels[:1]).all():
            cond = labels[:1].squeeze(0)
        elif model.config.label_kind == "attributes":
            raise ValueError("an attribute-conditional model interpolates between four images "
                             "with the same attribute vector: choose them with --indices")
        else:
            raise ValueError("a class-conditional model interpolates within one class: pass "
                             "--label K (or four images of the same label)")
    grid = manifold(model, images, args.steps, cond)
    figure = manifold_figure(upscale(grid, args.zoom), upscale(images.cpu(), args.zoom))
    _write(figure, args, f"the {args.steps}x{args.steps} latent manifold")


def cmd_extrapolate(args: argparse.Namespace) -> None:
    model = _load(args)
    cond = sampling_labels(model, args.n, args.label)  # the classes in turn, without --label
    samples = extrapolate(model, args.n, args.factors, args.temperature, cond,
                          _generator(model, args.seed))
    nrow = args.nrow or max(1, math.ceil(math.sqrt(args.n)))
    panels = [make_grid(upscale(s.cpu(), args.zoom), nrow) for s in samples]
    _write(side_by_side(panels, [f"{f}x ({s.shape[3]}x{s.shape[2]})"
                                 for f, s in zip(args.factors, samples)]),
           args, f"samples at {', '.join(f'{f}x' for f in args.factors)} the training size")


def cmd_levels(args: argparse.Namespace) -> None:
    model = _load(args)
    images, labels = _input_images(args, model, args.n)
    if args.compression:
        cells = compress(model, images, cond=labels)
        what = "compression (finest k scales zeroed)"
    else:
        cells = resample_levels(model, images, cond=labels, temperature=args.temperature,
                                generator=_generator(model, args.seed))
        what = "level resampling (finest k scales from the prior)"
    columns = [f"k={k}" for k in range(cells.shape[1])]
    _write(labelled_grid(upscale(cells, args.zoom), col_labels=columns), args, what)


def cmd_swap_labels(args: argparse.Namespace) -> None:
    model = _load(args)
    if model.config.num_classes is None:
        raise ValueError("swap-labels needs a class-conditional model (realnvp train "
                         "--conditional)")
    images, labels = _input_images(args, model, args.n)
    n = images.shape[0]
    if labels is None:
        raise ValueError("these images have no labels")
    if args.all_classes:
        cells = each_class(model, images, labels)
        cells = torch.cat([images.cpu()[:, None], cells.cpu()], dim=1)
        columns = ["input"] + [str(k) for k in range(model.config.num_classes)]
        _write(labelled_grid(upscale(cells, args.zoom), col_labels=columns), args,
               "every image decoded with every class")
        return
    if args.permutation is not None:
        permutation = torch.tensor(args.permutation)
    else:
        permutation = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    swapped = swap_labels(model, images, labels, permutation)
    cells = torch.stack([images.cpu(), swapped.cpu()])  # (2, N, C, H, W)
    columns = None
    if model.config.label_kind == "class":
        columns = [f"{int(a)}>{int(b)}" for a, b in zip(labels, labels[permutation])]
    _write(labelled_grid(upscale(cells, args.zoom), ["input", "swapped"], columns), args,
           "images decoded with swapped labels")


def cmd_reconstruct(args: argparse.Namespace) -> None:
    model = _load(args)
    images, labels = _input_images(args, model, args.max_images)
    recon, error = reconstruct(model, images, labels)
    print(f"max |x - decode(encode(x))| over {images.shape[0]} images: {float(error):.3g} "
          f"(in [0, 1] pixel units; {float(error) * 256:.3g} of one 8-bit level)")
    show = min(args.show, images.shape[0])
    cells = torch.stack([images[:show].cpu(), recon[:show].clamp(0, 1).cpu()])
    _write(labelled_grid(upscale(cells, args.zoom), ["input", "decoded"]), args,
           f"{show} images and their reconstructions")


def fresh_toy_points(name: str, n: int, seed: int) -> Tensor:
    """``n`` points of a toy density that no run's splits hold: the splits of a run with seed
    s are drawn with seeds 3s, 3s + 1 and 3s + 2, all below 3 · 2³² (seeds are below 2³²)."""
    from .data import toy_dataset

    return toy_dataset(name, n, seed=2**40 + seed)


def cmd_toy(args: argparse.Namespace) -> None:
    from .data import TOY_DATASETS
    from .train import run_configs

    model = _load(args)
    name = args.dataset
    if name is None:
        run = run_configs(Path(args.checkpoint))
        name = run[1].dataset if run is not None else None
    if model.config.input_shape != (2,):
        raise ValueError(f"toy draws 2-D densities: it needs a model of 2-D vectors (realnvp "
                         f"train --dataset moons, …), not of shape {model.config.input_shape}")
    if name not in TOY_DATASETS:
        raise ValueError(f"give --dataset, one of {', '.join(TOY_DATASETS)} (the run's dataset "
                         f"is {name!r})")
    data = fresh_toy_points(name, args.n, args.seed)
    result = toy_experiment(model, data, args.prior_samples, args.temperature, args.grid,
                            generator=_generator(model, args.seed))
    figure = toy_figure(result.data, result.latents, result.prior, result.mapped,
                        result.density, result.extent, result.latent_extent, args.size)
    _write(figure, args, f"the toy figure for {name}")


def add_figure_commands(sub: argparse._SubParsersAction) -> None:
    """Add the paper's figure commands to the ``realnvp`` parser."""
    p = sub.add_parser(
        "interpolate", help="the latent manifold spanned by four images",
        description="Encode four images z1..z4 and decode z(phi, phi') = cos(phi) (cos(phi') z1 "
        "+ sin(phi') z2) + sin(phi) (cos(phi') z3 + sin(phi') z4) on a k x k grid of phi (rows) "
        "and phi' (columns) in [0, pi/2], at every scale (the paper's Figure 6). The originals "
        "stand beside the corners that reconstruct them: z1 top left, z2 top right, z3 bottom "
        "left, z4 bottom right.")
    _add_common(p)
    _add_image_source(p, "exactly four images (default: the first four)")
    p.add_argument("--steps", type=positive_int, default=8, help="grid points per side, k")
    p.add_argument("--label", type=int, default=None,
                   help="class used to encode and decode (class-conditional models)")
    _add_zoom(p)
    p.set_defaults(handler=cmd_interpolate)

    p = sub.add_parser(
        "extrapolate", help="samples larger than the training images",
        description="Sample latents of a larger shape and decode them: the s/t networks are "
        "convolutional, so a model trained on HxW images samples (fH)x(fW) ones (the paper's "
        "Figure 7). One panel per factor.")
    _add_common(p)
    p.add_argument("-n", type=positive_int, default=4, help="samples per factor")
    p.add_argument("--factors", type=positive_int, nargs="+", default=[2, 10], metavar="F",
                   help="size factors (each size must survive the model's squeezes)")
    p.add_argument("--temperature", type=float, default=1.0, help="std of the prior, T")
    p.add_argument("--label", type=int, default=None, help="class (class-conditional models)")
    p.add_argument("--nrow", type=positive_int, default=None, help="images per row in each panel")
    _add_zoom(p)
    p.set_defaults(handler=cmd_extrapolate)

    p = sub.add_parser(
        "levels", help="what each scale encodes: resample (or zero) the finest k scales",
        description="Encode images, replace the latents of the finest k scales by prior "
        "samples and decode, for k = 0..L (L = number of scales): one row per image, one column "
        "per k. Column k=0 is the reconstruction, k=L a pure sample. With --compression the "
        "finest k latents are set to zero instead (the official code's compression view).")
    _add_common(p)
    _add_image_source(p, "the images (default: the first -n)")
    p.add_argument("-n", type=positive_int, default=6, help="number of images (without --indices)")
    p.add_argument("--compression", action="store_true",
                   help="set the fine latents to zero instead of resampling them")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="std of the prior for the resampled latents")
    _add_zoom(p)
    p.set_defaults(handler=cmd_levels)

    p = sub.add_parser(
        "swap-labels", help="class-conditional models: decode images with other labels",
        description="Encode a batch with its own labels and decode it with the labels shuffled "
        "within the batch (the paper's label-change experiment): top row the inputs, bottom row "
        "the decodings, columns titled 'own>new' for class labels. With --all-classes every "
        "image is decoded with every class instead (one row per image).")
    _add_common(p)
    _add_image_source(p, "the images (default: the first -n)")
    p.add_argument("-n", type=positive_int, default=8, help="number of images (without --indices)")
    p.add_argument("--permutation", type=int, nargs="+", default=None, metavar="I",
                   help="decode image i with the label of image permutation[i] (default: a "
                   "random permutation drawn with --seed)")
    p.add_argument("--all-classes", action="store_true",
                   help="decode every image with every class (class labels only)")
    _add_zoom(p)
    p.set_defaults(handler=cmd_swap_labels)

    p = sub.add_parser(
        "reconstruct", help="check exactness: encode, decode, print the largest error",
        description="Encode and decode images (eval mode) and print the largest absolute "
        "pixel difference, in [0, 1] units and in 8-bit levels (pixels enter at the centre of "
        "their dequantisation bin, (x + 0.5)/256). The PNG shows the first --show inputs above "
        "their reconstructions.")
    _add_common(p)
    _add_image_source(p, "the images (default: the first --max-images)")
    p.add_argument("--max-images", type=positive_int, default=64,
                   help="number of images to check (without --indices)")
    p.add_argument("--show", type=positive_int, default=8, help="images shown in the PNG")
    _add_zoom(p)
    p.set_defaults(handler=cmd_reconstruct)

    from .data import TOY_DATASETS

    p = sub.add_parser(
        "toy", help="the paper's Figure 1 for a 2-D model",
        description="For a model of a 2-D toy density (realnvp train --preset toy2d): data "
        "points x, their latents z = f(x), prior samples z, those samples mapped back "
        "x = f^-1(z) (points keep their colours through the map) and the learned density "
        "exp(log p(x)) as a heat map: five SIZE x SIZE panels side by side.")
    _add_common(p)
    p.add_argument("--dataset", choices=TOY_DATASETS, default=None,
                   help="toy density to draw the data from (default: the run's)")
    p.add_argument("-n", type=positive_int, default=1000, help="data points")
    p.add_argument("--prior-samples", type=positive_int, default=None, help="default: -n")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--grid", type=positive_int, default=128, help="heat-map resolution")
    p.add_argument("--size", type=positive_int, default=256, help="pixels per panel side")
    p.set_defaults(handler=cmd_toy)
