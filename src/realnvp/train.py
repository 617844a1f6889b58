"""The training loop: the paper's recipe, atomic checkpoints and exact resume.

Recipe (SPEC section 3): Adam (lr 1e-3, betas 0.9/0.999), batch 64, loss = mean bits/dim of the
batch in train mode + 5e-5 · Σ v² over the weight-norm magnitudes and tanh scales, global
gradient-norm clipping at 100. A step whose loss or gradient norm is not finite is skipped
(parameters, optimiser and batch-norm statistics untouched) and counted; more than
``max_nonfinite`` of them abort the run. The skip is decided on the device, so a step never
waits for it (no host sync); the count is read where the loop reads the device anyway (every
``log_every`` steps and before evaluating or saving).

Run directory::

    RUN/config.toml            model and training configuration (reproduces the run)
    RUN/checkpoints/ckpt-STEP.pt, best.pt    the last ``keep_checkpoints`` and the best
    RUN/samples/step-STEP.png  sample grids
    RUN/metrics.jsonl          one JSON object per logged step / evaluation
    RUN/tensorboard/           with ``tensorboard = true``

Exact resume: the data order is a permutation per epoch seeded by (seed, epoch); the
dequantisation noise and the augmentations draw from two generators whose states, with the
model, the optimiser, the batch-norm statistics and the step, are in every checkpoint. A run
restarted from a checkpoint therefore takes bit-for-bit the same steps as one never stopped.

Several processes (``torchrun``, see :mod:`realnvp.distributed` and docs/distributed.md): each
step takes a global batch of ``batch_size`` × world size images from the epoch's permutation,
rank r using the r-th slice; the learning rate is not scaled. The data position is kept in
images (epoch, offset into the epoch's permutation), so a run resumed with another number of
processes continues at the same image. Rank 0's noise and augmentation generators are the
single-process ones and are checkpointed; rank r ≥ 1 reseeds its generators at every step from
(seed, rank, step). Resuming with the same number of processes is therefore exact; with another
number it continues with the same parameters, optimiser state and data position, but the images
meet other noise. Only rank 0 writes files (checkpoints, samples, metrics, config, TensorBoard).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from . import distributed
from .allocator import MALLOC_POLICIES, set_malloc_policy
from .checkpoint import (
    CheckpointError,
    atomic_save,
    atomic_write_text,
    check_can_create,
    load_state,
    safe_load,
)
from .data import DatasetError, ImageDataset, load_dataset
from .distributed import DistributedContext, batchnorm_buffers
from .evaluate import EVAL_BATCH_SIZE, EvaluationStopped, eval_batch_size, evaluate
from .figures import save_image_grid
from .memory import MEMORY_MODES
from .model import (
    MEMORY_FORMATS,
    MODEL_FILE_FORMATS,
    PRECISIONS,
    RealNVP,
    RealNVPConfig,
    check_field_types,
    config_from_payload,
    dataclass_from_dict,
)
from .preprocessing import bits_per_dim, dequantize

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CHECKPOINT_FORMAT = "realnvp-checkpoint"


@dataclass
class TrainConfig:
    """Everything about a run except the architecture (that is :class:`RealNVPConfig`)."""

    dataset: str = "mnist-t10k"
    data_dir: str | None = None     # None: the bundled t10k files for mnist-t10k
    run_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 64            # per process: the global batch is batch_size × processes
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    l2: float = 5e-5                # on weight-norm magnitudes and tanh scales
    grad_clip: float = 100.0        # global gradient-norm clipping
    warmup_steps: int = 0           # linear learning-rate warm-up
    lr_decay: str = "none"          # "none" or "cosine" (to 0 at the last step)
    conditional: bool = False       # condition on the dataset's labels
    valid_size: int | None = None   # size of the validation slice where the dataset has none;
    #                                 0: no validation at all, every training image trains
    random_flip: bool | None = None  # horizontal flips in training; None: the dataset's own
                                    # (on for cifar10, celeba, lsun; off for npz, folder, ...)
    eval_every: int = 500
    eval_images: int | None = None  # validation images per periodic evaluation (None: all)
    sample_every: int = 500
    sample_count: int = 64
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    max_nonfinite: int = 20
    seed: int = 0
    device: str = "auto"            # with torchrun: cuda → each process takes cuda:LOCAL_RANK
    sync_batchnorm: bool = True     # several processes: batch statistics over all of them
    precision: str = "fp32"         # "bf16": the s/t networks under autocast (model.set_precision)
    memory_mode: str = "none"       # "invertible" or "checkpoint": memory-saving backpropagation
    recompute_activations: bool | None = None  # s/t nets recompute BN → ReLU in backward:
                                    # 27–39 % less memory, speed within ±3 %;
                                    # None: on with memory_mode
    memory_format: str = "channels_last"  # or "contiguous" (NCHW): the s/t networks' layout
    malloc: str = "keep"            # CPU allocator (realnvp.allocator): glibc's malloc "keep"s
                                    # freed memory for reuse (no page faults per step), "release"s
                                    # it to the kernel (lowest peak, slower) or runs its "system"
                                    # defaults; or "jemalloc" (low peak at full speed; the CLI
                                    # restarts itself with it preloaded)
    compile: bool = False           # torch.compile the loss (minutes of compilation; on a 2-core
                                    # CPU 6 % slower to 4 % faster, docs/benchmarks.md)
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        # checked here, before any data is read or any step is taken
        check_field_types(self)  # types first: the checks below compare values
        at_least = {"steps": 1, "batch_size": 1, "eval_every": 1, "sample_every": 1,
                    "sample_count": 1, "checkpoint_every": 1, "keep_checkpoints": 1,
                    "log_every": 1, "warmup_steps": 0, "max_nonfinite": 0,
                    "valid_size": 0, "eval_images": 1}  # the last two may also be None
        for name, low in at_least.items():
            value, optional = getattr(self, name), name in ("valid_size", "eval_images")
            if not (optional and value is None) and value < low:
                raise ValueError(f"{name} must be {'None or ' if optional else ''}an integer "
                                 f">= {low}, got {value!r}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not (0 < self.lr < math.inf and 0 < self.grad_clip <= math.inf
                and 0 <= self.l2 < math.inf and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("need finite lr > 0, grad_clip > 0, finite l2 >= 0 and betas in "
                             "[0, 1); got "
                             f"lr={self.lr}, grad_clip={self.grad_clip}, l2={self.l2}, "
                             f"beta1={self.beta1}, beta2={self.beta2}")
        choices = {"lr_decay": ("none", "cosine"), "precision": tuple(PRECISIONS),
                   "memory_mode": MEMORY_MODES, "memory_format": MEMORY_FORMATS,
                   "malloc": MALLOC_POLICIES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got "
                                 f"{getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        if "keep_freed_memory" in d:  # the boolean that preceded `malloc`, in older run dirs
            d.setdefault("malloc", "keep" if d.pop("keep_freed_memory") else "system")
        return dataclass_from_dict(cls, d)


@dataclass
class RunState:
    """What a checkpoint holds beyond the model and the optimiser."""

    step: int = 0
    best_valid_bpd: float = math.inf
    nonfinite_steps: int = 0
    epoch: int = 0          # the data position: images [0, epoch_offset) of the epoch's
    epoch_offset: int = 0   # permutation are used (independent of the number of processes)
    # what the step still had to do ("evaluate", "sample", "checkpoint") when a bad image or a
    # stop request during its validation stopped the run after its checkpoint: the resumed
    # run does it first
    pending: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def from_checkpoint(cls, payload: dict, n: int) -> RunState:
        """The checkpoint's run state; checkpoints from before the data position was saved
        (written by one process) get it from their step and batch size."""
        saved = dict(payload["run_state"])
        if "epoch" not in saved:
            batch = payload.get("train_config", {}).get("batch_size", TrainConfig.batch_size)
            epoch, k = divmod(saved["step"], max(n // batch, 1))
            saved.update(epoch=epoch, epoch_offset=k * batch)
        return cls(**saved)


# -- configuration files ------------------------------------------------------------------------

def _toml_ready(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}  # TOML has no null: absent = default


def write_config(path: Path, model: RealNVPConfig, train: TrainConfig) -> None:
    # imported here, so that the trainer's objective and step (benchmarks/) also run from a
    # checkout under another Python that has PyTorch but not this writer (a lent GPU machine)
    import tomli_w

    atomic_write_text(path, tomli_w.dumps({"model": _toml_ready(model.to_dict()),
                                           "train": _toml_ready(train.to_dict())}))


def read_config_tables(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The [model] and [train] tables of a TOML configuration file as written: a key the file
    does not set is absent (so that a partial file overrides only what it names)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"{path}: cannot read the configuration ({error})") from error
    tables = data.get("model", {}), data.get("train", {})
    unknown = sorted(set(data) - {"model", "train"})
    if unknown or not all(isinstance(t, dict) for t in tables):
        raise ValueError(f"{path}: a configuration has a [model] and a [train] table only, "
                         f"found {sorted(data)}")
    return tables


def read_config(path: str | Path) -> tuple[RealNVPConfig, TrainConfig]:
    """Read a run's ``config.toml`` (sections [model] and [train]); unset fields get their
    defaults."""
    model, train = read_config_tables(path)
    return RealNVPConfig.from_dict(model), TrainConfig.from_dict(train)


def run_configs(path: str | Path) -> tuple[RealNVPConfig, TrainConfig] | None:
    """(model, training) configuration of the run that a run directory or a checkpoint file
    belongs to: its ``RUN/config.toml`` (a file counts as the run's when it lies in
    ``RUN/checkpoints/``), else what the checkpoint itself recorded; None for a model file
    written by :meth:`RealNVP.save`, which records no training."""
    path = Path(path)
    run = path if path.is_dir() else path.parent.parent if path.parent.name == "checkpoints" \
        else None
    if run is not None and (run / "config.toml").is_file():
        return read_config(run / "config.toml")
    checkpoint = resolve_checkpoint(path, prefer="latest")
    # the configs, not the weights
    return checkpoint_configs(safe_load(checkpoint, MODEL_FILE_FORMATS, mmap=True))


def _check_same_kind(name: str, train_set: Any, valid_set: Any, conditional: bool) -> None:
    """The validation split must hold what the training split holds (shape, and labels for a
    conditional run): a mismatch would otherwise surface only at the first evaluation or
    sample grid."""
    train_shape, valid_shape = tuple(train_set.image_shape), tuple(valid_set.image_shape)
    if train_shape != valid_shape:
        raise DatasetError(f"dataset {name!r}: validation images of shape {valid_shape}, "
                           f"training images of shape {train_shape}")
    kinds = (train_set.label_kind, valid_set.label_kind)
    if conditional and kinds[0] != kinds[1]:
        describe = [f"{k} labels" if k else "no labels" for k in kinds]
        raise DatasetError(f"dataset {name!r}: the training split has {describe[0]}, the "
                           f"validation split {describe[1]}")


def checkpoint_configs(payload: dict) -> tuple[RealNVPConfig, TrainConfig] | None:
    """(model, training) configuration a checkpoint recorded; None for a model file."""
    if "train_config" not in payload:
        return None
    return (RealNVPConfig.from_dict(payload["config"]),
            TrainConfig.from_dict(payload["train_config"]))


def run_split(run: tuple[RealNVPConfig, TrainConfig] | None, dataset: str
              ) -> tuple[int, int | None]:
    """(seed, valid_size) that a run (:func:`run_configs`) cut its validation slice with, where
    it trained on ``dataset``, so that evaluating ``valid`` (or the test split of a dataset
    whose test set is that slice) never scores the run's training images; (0, None), the
    defaults, otherwise."""
    if run is None or run[1].dataset != dataset:
        return 0, None
    return run[1].seed, run[1].valid_size


# (a run's dataset, another dataset, its split) where that split holds the run's training images
CONTAINS_TRAINING_IMAGES = {("mnist-t10k", "mnist", "test"): "MNIST's 10,000 test images"}


def load_run_dataset(checkpoint: str | Path, dataset: str | None, data_dir: str | Path | None,
                     split: str, *, valid_size: int | None = None,
                     split_seed: int | None = None) -> tuple[str, ImageDataset]:
    """(name, split) of a dataset for a checkpoint's commands, its validation slice cut as the
    run cut it (:func:`run_split`; ``valid_size`` and ``split_seed`` override). ``dataset``
    defaults to the run's, and ``data_dir`` to the run's where the dataset is the run's."""
    run = run_configs(checkpoint)
    if run is not None and dataset in (None, run[1].dataset):
        dataset, data_dir = run[1].dataset, data_dir or run[1].data_dir
    if dataset is None:
        raise ValueError("give --dataset and --data-dir: they default to the run's own only "
                         "when --checkpoint belongs to a training run")
    if run is not None and (run[1].dataset, dataset, split) in CONTAINS_TRAINING_IMAGES:
        raise ValueError(f"the run trained on {run[1].dataset}, whose images are "
                         f"{CONTAINS_TRAINING_IMAGES[run[1].dataset, dataset, split]}: "
                         f"--dataset {dataset} --split {split} would score its training images "
                         f"(evaluate --dataset {run[1].dataset} instead)")
    seed, size = run_split(run, dataset)
    seed = seed if split_seed is None else split_seed
    size = size if valid_size is None else valid_size
    return dataset, load_dataset(dataset, data_dir, split, seed=seed, valid_size=size)


# What a resumed run cannot change: the validation split (dataset, seed, valid_size), the random
# streams (seed) and the model's inputs (conditional).
FIXED_ON_RESUME = ("dataset", "seed", "valid_size", "conditional")


def _fixed_changes(saved: TrainConfig, asked: TrainConfig) -> list[str]:
    return [f"{k} {getattr(saved, k)!r} → {getattr(asked, k)!r}" for k in FIXED_ON_RESUME
            if getattr(saved, k) != getattr(asked, k)]


def data_fingerprint(train_set: Any, valid_set: Any, conditional: bool = False
                     ) -> dict[str, Any]:
    """What a resumed run must find again in its data files: the number of training and
    validation images, which of the source's items the validation images are (a digest of
    their positions), a CRC-32 of each split's images (``content_digest``: the pixels, or the
    files' names and sizes) and, for a ``conditional`` run, of its labels (an unconditional
    run does not use them: labels added beside the images change nothing it does). Images
    added to a folder, or removed, change the epoch order and move the validation slice, so
    that a resume would score the run on images it trained on; images replaced by as many
    others would make it train on other data. The CRC of the CIFAR-10 training split's 150 MB
    takes about 0.1 s, a folder's about 4 µs a file (LSUN bedroom's 3 million: 13 s)."""
    positions = getattr(valid_set, "source_indices", None)
    digest = None if positions is None else hashlib.blake2b(
        np.ascontiguousarray(positions, dtype="<i8").tobytes(), digest_size=8).hexdigest()
    return {"train_images": len(train_set),
            "valid_images": 0 if valid_set is None else len(valid_set),
            "valid_positions": digest,
            "train_content": train_set.content_digest(),
            "valid_content": None if valid_set is None else valid_set.content_digest(),
            **({"train_labels": train_set.labels_digest(),
                "valid_labels": None if valid_set is None else valid_set.labels_digest()}
               if conditional else {})}


def _same_data_everywhere(ranks: list[tuple[str | None, dict[str, Any]]]) -> dict[str, Any]:
    """Rank 0's data fingerprint, after checking that every rank's ``(data_dir, fingerprint)``
    has the same fingerprint: a DatasetError naming the first rank whose data differs, and
    how, raised by every rank alike."""
    (first_dir, first), *others = ranks
    for rank, (data_dir, data) in enumerate(others, start=1):
        changes = [f"{k.replace('_', ' ')} {first.get(k)} → {v}" for k, v in data.items()
                   if first.get(k) != v]
        if changes:
            where = "" if data_dir is None else f" in {data_dir}"
            there = "" if first_dir is None else f" in {first_dir}"
            raise DatasetError(f"rank {rank}'s data{where} differs from rank 0's{there} "
                               f"({', '.join(changes)}): every process must read the same "
                               "images (the same files on every node)")
    return first


def _data_changes(payload: dict, data: dict[str, Any]) -> list[str]:
    saved = payload.get("data")  # absent from checkpoints written before it was saved
    if not isinstance(saved, dict):
        return []
    # a key the checkpoint lacks (the contents' CRCs before 2026-12-02) is not compared
    return [f"{k.replace('_', ' ')} {saved[k]} → {v}" for k, v in data.items()
            if k in saved and saved[k] != v]


def _check_resume(path: Path, payload: dict, train: TrainConfig, data: dict[str, Any]) -> None:
    """Refuse a resume that would silently train another run: a changed split, seed,
    conditioning or data, or fewer steps than the checkpoint has already taken."""
    saved = checkpoint_configs(payload)
    if saved is not None:
        changed = _fixed_changes(saved[1], train)
        if changed:
            raise ValueError(f"resuming from {path}: {', '.join(changed)}. A run keeps its "
                             "dataset, seed, valid_size and conditioning (they fix its "
                             "validation split, random streams and model); start a new "
                             "run_dir to change them")
    changed_data = _data_changes(payload, data)  # the same split options, other files
    if changed_data:
        where = f" in {train.data_dir}" if train.data_dir else ""
        raise ValueError(f"resuming from {path}: the dataset {train.dataset!r}{where} has "
                         f"changed since the checkpoint ({', '.join(changed_data)}). A run "
                         "trains and validates on the images it started with (its epoch order "
                         "and validation split depend on them): restore them, or start a new "
                         "run_dir")
    step = int(payload["run_state"]["step"])
    if train.steps < step:
        raise ValueError(f"resuming from {path}: the run is at step {step} already, past "
                         f"steps={train.steps}; give steps >= {step}")


# -- checkpoints --------------------------------------------------------------------------------

def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


CHECKPOINT_NAME = re.compile(r"ckpt-(\d+)\.pt")


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's ``ckpt-STEP.pt`` files, oldest step first (by number: a copy named otherwise,
    such as ckpt-backup.pt, is not one of them, and step 10,000,000 comes after 9,999,999)."""
    found = [(int(m.group(1)), path) for path in checkpoint_dir(run_dir).glob("ckpt-*.pt")
             if (m := CHECKPOINT_NAME.fullmatch(path.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest ``ckpt-STEP.pt`` of a run, or None."""
    files = step_checkpoints(run_dir)
    return files[-1] if files else None


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint file, or a run directory → its ``best.pt`` (``prefer="best"``) or its
    latest checkpoint (its ``best.pt`` where it has only that)."""
    path = Path(path)
    if path.is_dir() and path.name == "checkpoints" and not checkpoint_dir(path).is_dir():
        path = path.parent  # RUN/checkpoints given for RUN
    if path.is_dir():
        best = checkpoint_dir(path) / "best.pt"
        latest = latest_checkpoint(path)
        chosen = best if best.is_file() and (prefer == "best" or latest is None) else latest
        if chosen is None:
            raise CheckpointError(f"{path}: a run directory with no checkpoint in "
                                  f"{checkpoint_dir(path)}")
        return chosen
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or run directory")
    return path


def _all_finite(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in [*module.parameters(), *module.buffers()]
               if t.is_floating_point())


def save_checkpoint(path: Path, model: RealNVP, optimizer: torch.optim.Optimizer,
                    state: RunState, train: TrainConfig, generators: dict[str, torch.Generator],
                    world_size: int = 1, data: dict[str, Any] | None = None) -> None:
    """Write a checkpoint atomically; refuses (raises) if the model holds a non-finite value, so
    a diverged state never replaces a good checkpoint. ``generators`` are rank 0's;
    ``world_size`` (the number of processes that trained) is informative only; ``data`` is
    the :func:`data_fingerprint` a resume checks."""
    if not _all_finite(model):
        raise FloatingPointError("the model holds non-finite parameters or statistics: "
                                 f"not writing {path}")
    atomic_save({
        "format": CHECKPOINT_FORMAT, "version": 1,
        "config": model.config.to_dict(), "state_dict": model.state_dict(),
        "train_config": _toml_ready(train.to_dict()),
        "optimizer": optimizer.state_dict(),
        "run_state": dataclasses.asdict(state),
        "rng": {name: g.get_state() for name, g in generators.items()},
        "world_size": world_size,
        **({} if data is None else {"data": data}),
    }, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read and check a training checkpoint (no arbitrary unpickling)."""
    payload = safe_load(path, CHECKPOINT_FORMAT, map_location)
    missing = {"config", "state_dict", "optimizer", "run_state", "rng"} - set(payload)
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {sorted(missing)}")
    return payload


# -- the loop -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def epoch_order(n: int, epoch: int, seed: int) -> Tensor:
    """The order in which epoch ``epoch`` visits the ``n`` training images, seeded by
    (seed, epoch). Cached: every step of an epoch slices the same permutation."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def check_batch_fits(n: int, batch_size: int, world_size: int = 1) -> None:
    if batch_size * world_size > n:
        processes = f" ({batch_size} × {world_size} processes)" if world_size > 1 else ""
        raise ValueError(f"the training split has {n} images, fewer than one batch of "
                         f"{batch_size * world_size}{processes}")


def batch_indices(n: int, batch_size: int, epoch: int, offset: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> tuple[Tensor, int, int]:
    """Rank ``rank``'s dataset indices for the training step at data position (epoch, offset),
    and the position after the step.

    The step takes the global batch of ``batch_size × world_size`` images that follows
    ``offset`` in the epoch's permutation (the next epoch's start if fewer images remain: the
    last partial batch is dropped); rank r takes its r-th slice of ``batch_size``. One process
    with batch 2B and two with batch B therefore use the same images at every step.
    """
    check_batch_fits(n, batch_size, world_size)
    size = batch_size * world_size
    if offset + size > n:
        epoch, offset = epoch + 1, 0
    start = offset + rank * batch_size
    return epoch_order(n, epoch, seed)[start:start + batch_size], epoch, offset + size


def learning_rate(train: TrainConfig, step: int) -> float:
    lr = train.lr
    if train.warmup_steps and step < train.warmup_steps:
        lr *= (step + 1) / train.warmup_steps
    if train.lr_decay == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * min(step / max(train.steps, 1), 1.0)))
    elif train.lr_decay != "none":
        raise ValueError(f"lr_decay must be 'none' or 'cosine', got {train.lr_decay!r}")
    return lr


class Objective(nn.Module):
    """The training loss of a batch, as a module: (loss, mean bits/dim) of dequantised images
    (nats for vectors), loss = bits/dim + l2 · Σ v². A module so that DistributedDataParallel
    can wrap it: DDP synchronises the gradients of what its wrapped module's forward computes."""

    def __init__(self, model: RealNVP, l2: float) -> None:
        super().__init__()
        self.model, self.l2 = model, l2
        self.l2_params = model.l2_parameters()

    def forward(self, x: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        model = self.model
        if model.config.is_image:  # minimise bits/dim of dequantised pixels
            bpd = bits_per_dim(model.log_prob(x, cond, check=False), x[0].numel()).mean()
        else:  # vectors: minimise the negative log-likelihood in nats
            bpd = -model.log_prob(x, cond, check=False).mean()
        loss = bpd + self.l2 * sum(p.pow(2).sum() for p in self.l2_params)
        return loss, bpd


def _data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``module``, without its broadcast of rank 0's buffers at
    every forward pass: synchronised running statistics are equal on every rank anyway, and
    unsynchronised ones are averaged when used (Trainer._agree_on_running_stats)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    no_broadcast = ("forward_sync_buffers"  # torch ≥ 2.13 (broadcast_buffers is deprecated)
                    if "forward_sync_buffers" in inspect.signature(ddp).parameters
                    else "broadcast_buffers")
    return ddp(module, device_ids=[device] if device.type == "cuda" else None,
               **{no_broadcast: False})


def to_device(batch: Tensor, device: torch.device) -> Tensor:
    """A CPU batch on ``device``. To a GPU from page-locked memory and without blocking: an
    ordinary copy from pageable memory waits for the stream to finish, a host sync at every
    step. (``pin_memory`` copies the batch into memory from PyTorch's caching host allocator,
    which does not hand it out again before the copy has finished.)"""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


class BufferSnapshot:
    """Buffers (batch-norm running averages and counters) saved before a training step and
    put back after it where a device-side flag says so: a few kernels whatever the number of
    buffers (560 in the ``cifar10`` model), and nothing that waits for the device."""

    def __init__(self, buffers: list[torch.Tensor]) -> None:
        self.views: dict[torch.dtype, list[torch.Tensor]] = {}  # 1-D views, per dtype
        for buffer in buffers:
            self.views.setdefault(buffer.dtype, []).append(buffer.view(-1))
        self.saved: dict[torch.dtype, torch.Tensor] = {}

    @torch.no_grad()
    def save(self) -> None:
        self.saved = {dtype: torch.cat(views) for dtype, views in self.views.items()}

    @torch.no_grad()
    def restore_where(self, flag: torch.Tensor) -> None:
        """Where ``flag`` (a boolean tensor) is true, every buffer gets its saved value back
        (torch.where, not arithmetic: the values to replace may be NaN)."""
        for dtype, views in self.views.items():
            kept = torch.where(flag, self.saved[dtype], torch.cat(views))
            torch._foreach_copy_(views, list(kept.split([v.numel() for v in views])))


class Trainer:
    """One run: builds or resumes everything from ``run_dir``, then :meth:`run` trains.

    Under torchrun (WORLD_SIZE > 1) every process builds a Trainer: they join one process group,
    resume from the checkpoint rank 0 chooses, and train with DistributedDataParallel.
    """

    def __init__(self, model_config: RealNVPConfig, train: TrainConfig,
                 resume: bool = True) -> None:
        if train.data_dir is not None:  # kept absolute, so that eval and resume work anywhere
            train = dataclasses.replace(train, data_dir=os.path.abspath(
                os.path.expanduser(train.data_dir)))
        self.train_config = train
        self.run_dir = check_can_create(train.run_dir, folder=True)
        if train.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("tensorboard logging needs the tensorboard package (pip install "
                             "tensorboard), or train without it")
        set_malloc_policy(train.malloc)
        self.dist: DistributedContext = distributed.setup(train.device)
        self.device = self.dist.device
        # Several processes: an error one of them meets while it reads its data or the
        # checkpoint stops them all there (the others would wait in the next collective).
        with _on_every_process(self.dist, "its data files"):
            self.train_set = load_dataset(train.dataset, train.data_dir, "train",
                                          seed=train.seed, valid_size=train.valid_size)
            # valid_size 0: every training image trains and no validation runs (the paper's
            # CIFAR-10 models saw all 50,000; score the test split afterwards, `realnvp eval`)
            self.valid_set = None if train.valid_size == 0 else load_dataset(
                train.dataset, train.data_dir, "valid", seed=train.seed,
                valid_size=train.valid_size)
            if self.valid_set is not None:
                _check_same_kind(train.dataset, self.train_set, self.valid_set,
                                 train.conditional)
            data = data_fingerprint(self.train_set, self.valid_set, train.conditional)
        # every process must train on the same images (a node's own copy of the data can
        # differ from rank 0's): each compares every rank's fingerprint, so all stop together
        self.data = _same_data_everywhere(
            distributed.gather_objects(self.dist, (train.data_dir, data)))
        if train.random_flip is not None:
            if not hasattr(self.train_set, "random_flip"):
                raise ValueError(f"random_flip is for images; {train.dataset!r} holds vectors")
            self.train_set.random_flip = train.random_flip
        # rank 0's choice, everywhere
        latest = distributed.broadcast_object(
            self.dist, latest_checkpoint(self.run_dir) if self.dist.is_main else None)
        if latest is not None and not resume:  # two runs' checkpoints must never mix
            raise ValueError(f"{self.run_dir} holds the checkpoints of an earlier run ("
                             f"{latest.name}): resume it, or start a new run in another "
                             "run_dir")
        with _on_every_process(self.dist, "the checkpoint to resume from"):
            if latest is not None and not latest.is_file():
                raise CheckpointError(f"rank {self.dist.rank} cannot see {latest}, from which "
                                      "rank 0 resumes: the run directory must be on a "
                                      "filesystem that every node shares")
            payload = self._load_latest(latest)
        if payload is not None:
            _check_resume(latest, payload, train, self.data)
            model_config = config_from_payload(payload, latest)
        elif train.conditional:
            model_config = self._conditional_config(model_config, self.train_set)
        elif model_config.num_classes is not None:
            raise ValueError(f"the model is conditional (num_classes={model_config.num_classes})"
                             " but the run is not: train with conditional=True (--conditional),"
                             " which takes the classes from the dataset")
        if tuple(self.train_set.image_shape) != model_config.input_shape:
            raise ValueError(f"dataset {train.dataset!r} has images of shape "
                             f"{tuple(self.train_set.image_shape)}, the model expects "
                             f"{model_config.input_shape}: choose a matching preset or set "
                             "input_shape")
        check_batch_fits(len(self.train_set), train.batch_size, self.dist.world_size)
        if payload is None:
            self._check_best_is_this_runs(model_config)
        torch.manual_seed(train.seed)  # the model's initial weights
        self.model = RealNVP(model_config).to(self.device)
        self.model.set_precision(train.precision).set_memory_mode(
            train.memory_mode, recompute_activations=train.recompute_activations)
        self.model.set_memory_format(train.memory_format)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=train.lr,
                                          betas=(train.beta1, train.beta2), fused=True)
        self.generators = {  # one stream for the dequantisation noise, one for augmentation
            "noise": torch.Generator(device=self.device).manual_seed(train.seed + 1),
            "augment": torch.Generator().manual_seed(train.seed + 2),
        }
        self.state = RunState()
        self.resumed_world_size: int | None = None
        if payload is not None:
            load_state(self.model, payload["state_dict"], latest)
            load_state(self.optimizer, payload["optimizer"], latest)
            self.state = RunState.from_checkpoint(payload, len(self.train_set))
            self.state.best_valid_bpd = min(self.state.best_valid_bpd, self._saved_best())
            for name, g in self.generators.items():
                self._restore_generator(name, g, payload["rng"][name])
            self.resumed_from: Path | None = latest
            self.resumed_world_size = payload.get("world_size", 1)
        else:
            self.resumed_from = None
        if self.dist.is_main:  # a run killed before its first checkpoint starts at step 0
            self._truncate_metrics(self.state.step)
            for partial in checkpoint_dir(self.run_dir).glob(".*.pt.*.tmp"):
                partial.unlink(missing_ok=True)  # a checkpoint being written when killed
            write_config(self.run_dir / "config.toml", model_config, train)
        # Several processes: batch statistics over all of them (unless turned off), and
        # gradients averaged by DistributedDataParallel around the loss.
        self.sync_batchnorm = self.dist.enabled and train.sync_batchnorm
        distributed.sync_batch_norm(self.model, self.sync_batchnorm)
        if self.sync_batchnorm and self.model.recompute_activations and self.dist.is_main:
            print("note: recompute_activations has no effect with synchronised batch norm (its "
                  "s/t-network layers store their BN → ReLU outputs); add --no-sync-batchnorm "
                  "to recompute them", file=sys.stderr)
        self.objective: nn.Module = Objective(self.model, train.l2)
        # running statistics restored after a skipped step (found once: load_state_dict and
        # the optimiser update tensors in place)
        self.bn_snapshot = BufferSnapshot(batchnorm_buffers(self.model))
        if self.dist.enabled:
            self.objective = _data_parallel(self.objective, self.device)
        if train.compile:  # around DDP, so that DDP's hooks split the graph at its buckets
            self.objective = torch.compile(self.objective)
        self.writer = None
        if train.tensorboard and self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency

            # a resumed run redoes the steps after its checkpoint: drop their old events
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"),
                                        purge_step=self.state.step + 1 if self.state.step else None)

    def _load_latest(self, latest: Path | None) -> dict | None:
        """The checkpoint to resume from, or None; a damaged one names the one before it."""
        if latest is None:
            return None
        try:
            return load_checkpoint(latest, self.device)
        except CheckpointError as error:
            earlier = step_checkpoints(self.run_dir)[:-1]
            if not earlier:
                raise
            raise CheckpointError(f"{error}. Move it out of {latest.parent} to resume from the "
                                  f"checkpoint before it, {earlier[-1].name}") from error

    def _saved_best(self) -> float:
        """The validation bits/dim of RUN/checkpoints/best.pt (inf if none, or if it is not this
        run's): with ``eval_every < checkpoint_every`` it can be newer, and better, than the
        checkpoint a run resumes from, and a resume that is not exact must not replace it by a
        worse model."""
        payload = self._best_payload()
        if payload is None or not self._is_this_runs(payload, self.model.config):
            return math.inf
        try:
            return float(payload["run_state"]["best_valid_bpd"])
        except (KeyError, TypeError):
            return math.inf  # unreadable: the next better evaluation rewrites it

    def _best_payload(self) -> dict | None:
        path = checkpoint_dir(self.run_dir) / "best.pt"
        try:
            return safe_load(path, CHECKPOINT_FORMAT, mmap=True) if path.is_file() else None
        except CheckpointError:
            return None

    def _is_this_runs(self, payload: dict, model_config: RealNVPConfig) -> bool:
        """Whether a checkpoint was written by a run of this architecture on the same data
        split and seed (such a run takes the same steps as this one)."""
        try:
            saved = checkpoint_configs(payload)
        except (KeyError, TypeError, ValueError):
            return False
        return saved is not None and saved[0] == model_config \
            and not _fixed_changes(saved[1], self.train_config) \
            and not _data_changes(payload, self.data)

    def _check_best_is_this_runs(self, model_config: RealNVPConfig) -> None:
        """A fresh start refuses a run directory whose best.pt another run wrote: it would be
        taken for this run's best model (by eval, and by a later resume)."""
        payload = self._best_payload()
        if payload is not None and not self._is_this_runs(payload, model_config):
            raise ValueError(f"{checkpoint_dir(self.run_dir) / 'best.pt'} is the best model of "
                             "another run (other architecture, data split, data or seed): "
                             "move it away, or start this run in another run_dir")

    def _restore_generator(self, name: str, generator: torch.Generator, state: Tensor) -> None:
        """The checkpoint's state of a random stream; a run moved to another kind of device
        (CPU and CUDA generators keep states of different sizes) gets a fresh stream seeded by
        (seed, step), so it continues, though no longer bit for bit as it would have."""
        try:
            generator.set_state(state.to("cpu"))
        except RuntimeError:
            seed = distributed.stream_seed(self.train_config.seed, 0, self.state.step, name)
            generator.manual_seed(seed)
            if self.dist.is_main:
                print(f"note: the checkpoint's {name!r} random stream was saved on another kind "
                      f"of device; continuing on {self.device.type} with a fresh stream",
                      file=sys.stderr)

    def _truncate_metrics(self, step: int) -> None:
        """Drop the records a killed run logged after its last checkpoint: they are redone.
        A line cut short by the kill is dropped too."""
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= step:
                    kept.append(line + "\n")
            atomic_write_text(path, "".join(kept))

    @staticmethod
    def _conditional_config(config: RealNVPConfig, dataset: ImageDataset) -> RealNVPConfig:
        if dataset.num_classes is None:
            where = {"celeba": " (CelebA's labels are its attributes: list_attr_celeba.txt "
                               "was not found beside list_eval_partition.txt)",
                     "npz": " (no y_train array)"}.get(getattr(dataset, "name", ""), "")
            raise ValueError(f"--conditional needs a labelled dataset; this one has no "
                             f"labels{where}")
        if config.num_classes not in (None, dataset.num_classes):
            raise ValueError(f"num_classes={config.num_classes}, but the dataset has "
                             f"{dataset.num_classes} {dataset.label_kind} labels (with "
                             "--conditional, leave num_classes out: it is the dataset's)")
        return dataclasses.replace(config, num_classes=dataset.num_classes,
                                   label_kind=dataset.label_kind or "class")

    @property
    def global_batch_size(self) -> int:
        """Images per optimiser step, over all processes."""
        return self.train_config.batch_size * self.dist.world_size

    def next_batch(self) -> tuple[Tensor, Tensor | None]:
        """This process's images and labels (on the device) for the next step, augmented; moves
        the data position on by one global batch."""
        t, state, ctx = self.train_config, self.state, self.dist
        if ctx.rank > 0:  # rank r's streams at step s: a function of (seed, r, s), see the top
            for name, g in self.generators.items():
                g.manual_seed(distributed.stream_seed(t.seed, ctx.rank, state.step, name))
        index, epoch, offset = batch_indices(
            len(self.train_set), t.batch_size, state.epoch, state.epoch_offset, t.seed,
            ctx.rank, ctx.world_size)
        # May raise DatasetError (a bad file), before drawing from the generator.
        with _on_every_process(ctx, "its training batch"):
            images, labels = self.train_set.train_batch(index, self.generators["augment"])
        state.epoch, state.epoch_offset = epoch, offset  # moved on only once the batch is read
        return to_device(images, self.device), (None if labels is None
                                                else to_device(labels, self.device))

    def training_step(self, images: torch.Tensor, labels: torch.Tensor | None, lr: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on a uint8 image batch (or float vectors); returns (the mean train
        bits/dim, or nats for vectors, and whether the step was skipped: a boolean tensor on
        the device). With several processes the bits/dim is the mean over the global batch and
        every process takes the same decision. Nothing here waits for the device."""
        model, opt, train = self.model, self.optimizer, self.train_config
        self.bn_snapshot.save()
        cond = labels if model.config.num_classes else None
        if model.config.is_image:
            x = dequantize(images, generator=self.generators["noise"])
        else:
            x = images
        loss, bpd = self.objective(x, cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        if self.dist.enabled:  # each process's loss is the mean over its part of the batch
            both = torch.stack([loss.detach(), bpd.detach()])
            dist.all_reduce(both)
            loss, bpd = both / self.dist.world_size
        skipped = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.bn_snapshot.restore_where(skipped)  # undo a bad forward pass's batch-norm update
        for group in opt.param_groups:
            group["lr"] = lr
        # Fused Adam leaves parameters, moments and step counts as they are where found_inf
        # is 1: the mechanism torch.amp.GradScaler uses, read by the kernel on the device.
        opt.found_inf = skipped.to(torch.float32)
        opt.step()
        return bpd.detach(), skipped

    def _count_skipped(self, skipped: torch.Tensor, check_limit: bool = True) -> None:
        """Add the device's count of skipped steps since the last call to the run state (a
        host sync, made only where the loop syncs anyway), log it, and (``check_limit``) stop
        the run if there are more than ``max_nonfinite``."""
        state, limit = self.state, self.train_config.max_nonfinite
        new = int(skipped)
        if not new:
            return
        skipped.zero_()
        state.nonfinite_steps += new
        self.log({"step": state.step, "skipped_nonfinite": state.nonfinite_steps})
        if check_limit and state.nonfinite_steps > limit:
            raise FloatingPointError(
                f"{state.nonfinite_steps} training steps had a non-finite loss or "
                f"gradient (limit {limit}); stopping. {self._last_checkpoint_words()}. Try a "
                "lower learning rate or a warm-up (--warmup-steps)."
            )

    def _agree_on_running_stats(self) -> None:
        """Without synchronised batch norm, each process's running averages follow its own
        batches; before they are used (evaluation, samples) or saved, every process replaces
        them by their mean over processes. Synchronised, they are equal by construction."""
        if self.dist.enabled and not self.sync_batchnorm:
            distributed.average_running_stats(self.dist, self.model)

    def log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        record = {"time": round(time.time(), 3), **record}
        # NaN and infinity are not JSON: strict readers (jq, JavaScript) would reject the file
        strict = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                  for k, v in record.items()}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(strict, allow_nan=False) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def evaluate(self, stop: StopRequest | None = None) -> float:
        """Mean validation bits/dim (eval mode). Several processes evaluate one shard each
        (images r, r + W, ...) and gather the per-image values: the mean is over the same images
        as on one process, with other dequantisation noise. A ``stop`` request on any process
        ends it after the batch being scored (:class:`EvaluationStopped` on every process)."""
        t, ctx = self.train_config, self.dist
        if not ctx.enabled:
            should_stop = None if stop is None else (lambda: stop.signum is not None)
            return evaluate(self.model, self.valid_set, max_images=t.eval_images,
                            seed=t.seed, should_stop=should_stop).mean
        n = len(self.valid_set) if t.eval_images is None else min(t.eval_images,
                                                                    len(self.valid_set))
        shard = distributed.Shard(self.valid_set, distributed.eval_shard(ctx, n))
        # Every process polls the others before each batch of the longest shard (a shorter
        # shard's process after its own) and once after the last: the same all-reduces
        # everywhere, from which each learns of a stop request or an error on any process.
        batch = eval_batch_size(self.model, self.valid_set, EVAL_BATCH_SIZE, samples=1)
        longest = math.ceil(n / ctx.world_size)
        rounds, polls, settled = math.ceil(longest / batch), 0, False

        def poll(error: Exception | None = None) -> bool:
            nonlocal polls, settled
            polls += 1
            asked = 0 if stop is None or stop.signum is None else stop.signum
            signum, kind = distributed.max_each_over_processes(ctx, [asked, _error_kind(error)])
            settled = kind > 0
            if error is not None:
                raise error
            _raise_for_another(kind, "its validation images")
            if signum and stop is not None:
                stop.signum = signum  # the process stops as the one that was asked to
            return signum > 0

        values = torch.zeros(0, dtype=torch.float64)
        try:
            if len(shard):
                seed = distributed.stream_seed(t.seed, ctx.rank, 0, "eval")
                values = evaluate(self.model, shard, batch_size=EVAL_BATCH_SIZE,  # type: ignore[arg-type]
                                  seed=seed, should_stop=poll).per_image
            while polls < rounds:
                if poll():
                    raise EvaluationStopped(f"stopped after {polls - 1} of {rounds} batches")
        except EvaluationStopped:
            raise
        except Exception as error:
            if settled:  # another process's error, learnt in a poll
                raise
            poll(error)  # this process's: the others learn it in their next poll
        poll()  # a stop asked for now waits for the end of the step: the validation is done
        return distributed.gather_shards(ctx, values, n).mean().item()

    def write_samples(self) -> Path:
        t = self.train_config
        g = torch.Generator(device=self.device).manual_seed(t.seed)  # the same z at every step
        cond = None
        if self.model.config.num_classes:  # the labels of the first validation images, cycled
            labelled = self.train_set if self.valid_set is None else self.valid_set
            index = torch.arange(t.sample_count) % len(labelled)
            cond = labelled.labels[index].to(self.device)  # labels only: no image decoded
        images = self.model.sample(t.sample_count, cond=cond, generator=g)
        return save_image_grid(images, self.run_dir / "samples" / f"step-{self.state.step:07d}.png")

    def _save(self, path: Path) -> None:
        save_checkpoint(path, self.model, self.optimizer, self.state, self.train_config,
                        self.generators, self.dist.world_size, self.data)

    @contextlib.contextmanager
    def _saved_if_stopped(self, skipped: torch.Tensor, bar: tqdm, what: str,
                          pending: list[str] | None = None) -> Iterator[None]:
        """Checkpoint the step reached if an image that cannot be decoded stops the run (it
        shows up when its batch is first read, in training or validation): the model is fine,
        so no step is lost, and the checkpoint records what the step had left to do
        (``pending``: its validation, grid or checkpoint) for the resumed run. A non-finite
        validation score stops the run without one (the model that gave it must not replace a
        good checkpoint), naming the last good checkpoint. The checkpoint on one process only:
        with several, every process stops with the error at once (:func:`_on_every_process`)
        and the run resumes from its last checkpoint."""
        try:
            yield
        except DatasetError:
            if not self.dist.enabled and self.state.step > 0:
                self._count_skipped(skipped, check_limit=False)  # the run stops anyway
                self.state.pending = list(pending or [])  # what the step had left to do
                try:
                    path = self.checkpoint()
                except FloatingPointError as not_saved:  # a diverged model is not saved
                    bar.write(f"not saved before stopping: {not_saved}")
                else:
                    bar.write(f"saved {path} before stopping; replace the bad file and rerun "
                              "to resume")
            raise
        except FloatingPointError as error:
            raise FloatingPointError(
                f"{what} at step {self.state.step}: {error}; not saved. "
                f"{self._last_checkpoint_words()}") from error

    def _last_checkpoint_words(self) -> str:
        latest = latest_checkpoint(self.run_dir)
        return "No checkpoint was written yet" if latest is None else \
            f"The last good checkpoint is {latest}"

    def checkpoint(self) -> Path:
        t, step = self.train_config, self.state.step
        path = checkpoint_dir(self.run_dir) / f"ckpt-{step:07d}.pt"
        self._save(path)
        for old in step_checkpoints(self.run_dir)[:-t.keep_checkpoints]:
            old.unlink()
        return path

    def run(self) -> RunState:
        t, state, main = self.train_config, self.state, self.dist.is_main
        self.model.train()
        bar = tqdm(total=t.steps, initial=state.step, disable=not (t.progress and main),
                   unit="step", dynamic_ncols=True)
        skipped = torch.zeros((), dtype=torch.int64, device=self.device)  # since last read
        try:
            # under torchrun (even with one process) a scheduler's signal can arrive twice
            under_torchrun = self.dist.enabled or "TORCHELASTIC_RUN_ID" in os.environ
            with _stop_requests(second_stops_at_once=not under_torchrun) as stop:
                if state.pending:  # what a bad image or a stop kept the checkpointed step from
                    self._finish_step(list(state.pending), skipped, bar, stop)
                    # a stop asked for meanwhile: before the next step, not after it
                    signum = distributed.agreed_signal(self.dist, stop.signum)
                    if signum is not None and state.step < t.steps:
                        self._stop_after_step(signum, skipped, bar, saved=False)
                self._loop(bar, skipped, stop)
        finally:  # also when a signal or bad data stops the run: flush what was logged
            bar.close()
            if self.writer is not None:
                self.writer.close()
        distributed.barrier(self.dist)  # rank 0's last files exist when run() returns anywhere
        return state

    def _loop(self, bar: tqdm, skipped: Tensor, stop: StopRequest) -> None:
        t, model, state = self.train_config, self.model, self.state
        images_seen, clock = 0, time.perf_counter()
        while state.step < t.steps:
            with self._saved_if_stopped(skipped, bar, "training data"):
                images, labels = self.next_batch()
            lr = learning_rate(t, state.step)
            bpd, skipped_now = self.training_step(images, labels, lr)
            skipped += skipped_now
            state.step += 1
            images_seen += self.global_batch_size
            last = state.step == t.steps
            log_now = state.step % t.log_every == 0 or last
            evaluate_now = (state.step % t.eval_every == 0 or last) and self.valid_set is not None
            sample_now = (state.step % t.sample_every == 0 or last) and model.config.is_image
            checkpoint_now = state.step % t.checkpoint_every == 0 or last
            if log_now or evaluate_now or sample_now or checkpoint_now:
                self._count_skipped(skipped)  # the loop's host syncs: here and below only
            if log_now:
                rate = images_seen / (time.perf_counter() - clock)
                images_seen, clock = 0, time.perf_counter()
                train_bpd = bpd.item()
                bar.set_postfix(bpd=f"{train_bpd:.3f}", img_s=f"{rate:.1f}")
                self.log({"step": state.step, "train_bpd": train_bpd, "img_per_s": rate,
                          "lr": lr})
            actions = [name for name, now in (("evaluate", evaluate_now),
                                              ("sample", sample_now),
                                              ("checkpoint", checkpoint_now)) if now]
            self._finish_step(actions, skipped, bar, stop)
            bar.update(1)
            # a scheduler's SIGTERM or a Ctrl-C, on any process: all stop after this step
            signum = None if last else distributed.agreed_signal(self.dist, stop.signum)
            if signum is not None:
                self._stop_after_step(signum, skipped, bar, saved=checkpoint_now)

    def _finish_step(self, actions: list[str], skipped: Tensor, bar: tqdm,
                     stop: StopRequest) -> None:
        """The step's ``actions``, in this order: "evaluate" (validation, and best.pt if it is
        the best so far), "sample" (the sample grid), "checkpoint". A checkpoint written
        because a bad image stopped validation or the grid, or a stop request came during
        validation (a scheduler's grace period can be shorter than a validation on the CPU:
        5,000 CIFAR-10 images take minutes), records those not yet done (``state.pending``),
        and the resumed run does them first (:meth:`run`)."""
        state, main, model = self.state, self.dist.is_main, self.model
        state.pending = []
        if actions:
            self._agree_on_running_stats()
        for i, action in enumerate(actions):
            if action == "evaluate":  # every process evaluates its shard
                try:
                    with self._saved_if_stopped(skipped, bar, "validation", actions[i:]):
                        valid_bpd = self.evaluate(stop)
                except EvaluationStopped:
                    state.pending = actions[i:]  # for the resumed run, with the checkpoint
                if state.pending:  # outside the except: the exit is not "during handling"
                    self._stop_after_step(stop.signum, skipped, bar, saved=False)
                self.log({"step": state.step, "valid_bpd": valid_bpd})
                unit = "bits/dim" if model.config.is_image else "nats"
                if main:
                    bar.write(f"step {state.step}: valid {valid_bpd:.4f} {unit}")
                if valid_bpd < state.best_valid_bpd:
                    state.best_valid_bpd = valid_bpd
                    if main:
                        self._save(checkpoint_dir(self.run_dir) / "best.pt")
            elif action == "sample" and main:
                with self._saved_if_stopped(skipped, bar, "the sample grid", actions[i:]):
                    self.write_samples()  # vector models: see `realnvp toy`
            elif action == "checkpoint" and main:
                self.checkpoint()

    def _stop_after_step(self, signum: int, skipped: Tensor, bar: tqdm, saved: bool) -> None:
        """Checkpoint the step reached unless it was just saved (every process takes part in
        agreeing on the running statistics, rank 0 writes, the others wait until the file
        exists), then exit as the signal would have."""
        if not saved:
            self._count_skipped(skipped, check_limit=False)
            self._agree_on_running_stats()
            if self.dist.is_main:
                self.checkpoint()
        distributed.barrier(self.dist)
        if self.dist.is_main:
            words = {"evaluate": "validation", "sample": "sample grid"}
            left = [words[a] for a in self.state.pending if a in words]
            left = f" (its {' and '.join(left)} left for the resumed run)" if left else ""
            bar.write(f"{signal.Signals(signum).name}: saved {latest_checkpoint(self.run_dir)} "
                      f"at step {self.state.step}{left}; rerun to resume")
        _stop_now(signum)


@contextlib.contextmanager
def _on_every_process(ctx: DistributedContext, what: str) -> Iterator[None]:
    """An error one process meets inside the block (which holds no collective) stops every
    process at the same point: that one raises it, the others a :class:`DatasetError` (the
    process met one: a file it cannot decode) or a RuntimeError (anything else), so that none
    waits for it in the next collective. One integer all-reduced per use with several
    processes; nothing on one."""
    error = None
    try:
        yield
    except Exception as e:
        if not ctx.enabled:
            raise
        error = e
    kind = distributed.max_over_processes(ctx, _error_kind(error))
    if error is not None:
        raise error
    _raise_for_another(kind, what)


def _error_kind(error: Exception | None) -> int:
    """What a process tells the others (:func:`_on_every_process`): 0 no error, 1 a
    DatasetError, 2 any other."""
    return 0 if error is None else 1 if isinstance(error, DatasetError) else 2


def _raise_for_another(kind: int, what: str) -> None:
    """The error a process raises when another met one of ``kind`` (:func:`_error_kind`)."""
    if kind == 1:
        raise DatasetError(f"another process could not read {what} (its error names the "
                           "file); this one stops with it")
    if kind == 2:
        raise RuntimeError(f"another process failed while reading {what}; this one stops "
                           "with it")


@dataclass
class StopRequest:
    """The signal that asked a run to stop (None: none yet)."""

    signum: int | None = None


@contextlib.contextmanager
def _stop_requests(second_stops_at_once: bool = True) -> Iterator[StopRequest]:
    """While training, SIGTERM and SIGINT ask the loop to stop after the current step (it then
    checkpoints); a second one stops at once, unless ``second_stops_at_once`` is off. It is off
    with several processes: a process signalled tells the others after the step, and a
    scheduler's signal may reach each process twice, directly and through torchrun (which
    kills them 30 s after passing it on). Off outside the main thread (no signals there)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def ask_to_stop(signum: int, frame: Any) -> None:
        if request.signum is not None and second_stops_at_once:  # no more waiting
            _stop_now(signum)
        request.signum = request.signum or signum

    # a signal the caller ignores (SIGINT of a background job) stays ignored
    caught = [s for s in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(s) != signal.SIG_IGN]
    previous = {s: signal.signal(s, ask_to_stop) for s in caught}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set in C


def _stop_now(signum: int) -> None:
    """What the signal would have done: KeyboardInterrupt for SIGINT, exit 128 + 15 for
    SIGTERM."""
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def train(model_config: RealNVPConfig, train_config: TrainConfig) -> Trainer:
    """Train (or resume, if ``run_dir`` has checkpoints) and return the finished trainer."""
    trainer = Trainer(model_config, train_config)
    trainer.run()
    return trainer
