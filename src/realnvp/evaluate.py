"""Test-set bits/dim in eval mode, as mean ± standard error over images (for vector models:
the negative log-likelihood in nats per example)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .data import ImageDataset
from .model import RealNVP, eval_mode


@dataclass
class EvalResult:
    """Bits/dim of a dataset split: ``mean`` ± ``stderr`` over ``n`` images, each image's value
    averaged over ``samples`` draws of the dequantisation noise. For vector data, ``unit`` is
    "nats" (negative log-likelihood per example) and ``samples`` is 1."""

    mean: float
    stderr: float
    n: int
    samples: int
    per_image: Tensor
    unit: str = "bits/dim"

    def to_dict(self) -> dict:
        key = "bits_per_dim" if self.unit == "bits/dim" else "nll_nats"
        stderr = self.stderr if math.isfinite(self.stderr) else None  # one image: JSON null
        return {key: self.mean, "stderr": stderr, "images": self.n,
                "dequantization_samples": self.samples}

    def __str__(self) -> str:
        if self.unit != "bits/dim":
            return f"{self.mean:.4f} ± {self.stderr:.4f} nats ({self.n} points)"
        return (f"{self.mean:.4f} ± {self.stderr:.4f} bits/dim ({self.n} images, "
                f"{self.samples} dequantisation sample{'s' if self.samples > 1 else ''})")


# The noise of a batch is drawn at once, image-major (B, samples, C, H, W); above this many bytes
# the batch is made smaller, which on the CPU changes no image's value (image-major noise).
NOISE_BYTES = 256 * 2**20


class EvaluationStopped(Exception):
    """:func:`evaluate` gave up between two batches because ``should_stop`` said so."""


EVAL_BATCH_SIZE = 256  # images scored at a time, by default


def eval_batch_size(model: RealNVP, dataset: ImageDataset, batch_size: int, samples: int
                    ) -> int:
    """The images :func:`evaluate` scores at a time: ``batch_size``, or fewer where the
    dequantisation noise of ``samples`` draws would exceed NOISE_BYTES."""
    if not model.config.is_image:
        return batch_size
    image_bytes = 4 * samples * math.prod(dataset.image_shape)
    return max(1, min(batch_size, NOISE_BYTES // image_bytes))


@torch.inference_mode()
def evaluate(
    model: RealNVP,
    dataset: ImageDataset,
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    samples: int = 1,
    max_images: int | None = None,
    seed: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> EvalResult:
    """Bits/dim of ``dataset`` under ``model`` in eval mode (running batch-norm statistics).

    The dequantisation noise comes from a generator seeded with ``seed``, so repeated
    evaluations of one model agree exactly; on the CPU each image's noise is the same for every
    ``batch_size`` (a CUDA generator's stream depends on the shape of each draw).
    Class-conditional models get the dataset's labels. The model is left in the mode it was in.
    ``should_stop``, asked before every batch: True raises :class:`EvaluationStopped` (the
    trainer's answer to a stop request, which would otherwise wait for the whole validation).
    """
    for name, value in (("samples", samples), ("batch_size", batch_size),
                        ("max_images", 1 if max_images is None else max_images)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if samples > 1 and not model.config.is_image:
        raise ValueError(f"samples={samples}: dequantisation samples are for image models; a "
                         "vector model's density is evaluated at the points themselves")
    samples, batch_size = int(samples), int(batch_size)
    max_images = None if max_images is None else int(max_images)
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    if tuple(dataset.image_shape) != tuple(model.config.input_shape):
        raise ValueError(f"the dataset's images are {tuple(dataset.image_shape)}, the model "
                         f"expects {tuple(model.config.input_shape)}")
    if model.config.num_classes is not None and dataset.num_classes is None:
        kind = "classes" if model.config.label_kind == "class" else "attributes"
        raise ValueError(f"the model is conditional on {model.config.num_classes} {kind}, but "
                         "the dataset has no labels")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    batch_size = eval_batch_size(model, dataset, batch_size, samples)
    values = []
    with eval_mode(model):
        for start in range(0, n, batch_size):
            if should_stop is not None and should_stop():
                raise EvaluationStopped(f"stopped after {start} of {n} images")
            index = torch.arange(start, min(start + batch_size, n))
            images, labels = dataset.get_batch(index)
            images = dataset.eval_transform(images).to(device)
            cond = labels.to(device) if model.config.num_classes else None
            if not model.config.is_image:  # vectors: negative log-likelihood in nats
                values.append(-model.log_prob(images.to(model._dtype()), cond)
                              .double().cpu())
                continue
            # Image-major noise, (B, samples, C, H, W): each image's draws follow the previous
            # image's in the generator's stream, so on the CPU they do not depend on batch_size.
            noise = torch.rand((len(images), samples, *images.shape[1:]), generator=generator,
                               device=device)
            bpd = sum(model.bits_per_dim(images, cond, noise=noise[:, s])
                      for s in range(samples)) / samples
            values.append(bpd.double().cpu())
    per_image = torch.cat(values)
    stderr = per_image.std().item() / math.sqrt(n) if n > 1 else float("nan")
    unit = "bits/dim" if model.config.is_image else "nats"
    return EvalResult(per_image.mean().item(), stderr, n, samples if unit != "nats" else 1,
                      per_image, unit)
