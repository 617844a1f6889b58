"""2-D toy densities for testing flows on vectors."""

from __future__ import annotations

import numpy as np
import torch

from .base import crc32_digest

TOY_DATASETS: tuple[str, ...] = ("moons", "8gaussians", "checkerboard", "rings")


def toy_dataset(name: str, n: int, *, seed: int = 0) -> torch.Tensor:
    """``float32 (n, 2)`` samples of a 2-D toy density, deterministic given ``seed``.

    - ``moons``: two interleaving half circles of radius 1 (noise std 0.05), centred at 0.
    - ``8gaussians``: 8 equally weighted modes, std 0.1, on the circle of radius 2.
    - ``checkerboard``: uniform on the 8 "on" unit squares of a 4x4 board on [-2, 2]^2, those
      with ``floor(x) + floor(y)`` even.
    - ``rings``: 4 concentric circles of radii 0.5, 1, 1.5 and 2 (radial noise std 0.04),
      equally many points on each.
    """
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown toy dataset {name!r}; choose one of: {', '.join(TOY_DATASETS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng = np.random.default_rng(seed)
    if name == "moons":
        n_outer = (n + 1) // 2
        t = rng.uniform(0.0, np.pi, n)
        outer = np.stack([np.cos(t[:n_outer]), np.sin(t[:n_outer])], 1)
        inner = np.stack([1 - np.cos(t[n_outer:]), 0.5 - np.sin(t[n_outer:])], 1)
        x = np.concatenate([outer, inner]) + rng.normal(0.0, 0.05, (n, 2)) - [0.5, 0.25]
    elif name == "8gaussians":
        angles = rng.integers(0, 8, n) * (np.pi / 4)
        x = 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1) + rng.normal(0.0, 0.1, (n, 2))
    elif name == "checkerboard":
        col = rng.integers(0, 4, n)
        row = 2 * rng.integers(0, 2, n) + col % 2  # same parity as col: an "on" square
        x = np.stack([col, row], 1) - 2.0 + rng.uniform(0.0, 1.0, (n, 2))
    else:  # rings
        radii = np.repeat([0.5, 1.0, 1.5, 2.0], [len(a) for a in np.array_split(np.arange(n), 4)])
        r = radii + rng.normal(0.0, 0.04, n)
        t = rng.uniform(0.0, 2 * np.pi, n)
        x = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    x = x[rng.permutation(n)]  # mix the components so minibatches are not sorted by them
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


# Points per split of a toy dataset used for training (each split its own seed).
TOY_SPLIT_SIZES = {"train": 20_000, "valid": 2_000, "test": 2_000}


class VectorDataset(torch.utils.data.Dataset):
    """A split of a 2-D toy density with the interface the training loop uses.

    ``get_batch`` returns float32 points ``(B, 2)`` (no labels); the transforms are identities.
    ``image_shape`` is the shape of one example, ``(2,)``, as for images.
    """

    label_kind = None
    num_classes = None
    labels = None

    def __init__(self, name: str, split: str, seed: int = 0) -> None:
        self.name, self.split = name, split
        offset = {"train": 0, "valid": 1, "test": 2}[split]
        self.points = toy_dataset(name, TOY_SPLIT_SIZES[split], seed=seed * 3 + offset)
        self.image_shape = (2,)

    def __len__(self) -> int:
        return len(self.points)

    def content_digest(self) -> str:
        """A CRC-32 of the points (see :meth:`ImageDataset.content_digest`)."""
        return crc32_digest((self.points.numpy(),))

    def labels_digest(self) -> None:
        return None  # toy points have no labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.points[index], torch.tensor(-1)

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.points[torch.as_tensor(indices, dtype=torch.long)], None

    def train_batch(self, indices: torch.Tensor, generator: torch.Generator
                    ) -> tuple[torch.Tensor, None]:
        return self.get_batch(indices)

    def train_transform(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return batch

    def eval_transform(self, batch: torch.Tensor) -> torch.Tensor:
        return batch
