"""Image datasets in their standard on-disk formats, and 2-D toy densities.

Every image dataset is an :class:`ImageDataset` whose :meth:`~ImageDataset.get_batch` returns
``uint8`` images ``(B, C, H, W)`` with values 0..255 (dequantisation and the logit transform are
the model's business) and labels: ``int64 (B,)`` class labels, ``float32 (B, A)`` binary
attribute vectors, or ``None`` for unlabelled data.  Augmentation is separate:
:meth:`~ImageDataset.train_batch` (the images at some indices, augmented by
:meth:`~ImageDataset.train_transform`) draws only from the ``torch.Generator`` it is given, so a
resumed run sees exactly the same crops and flips.

Formats (``load_dataset(name, data_dir, split)``) and split rules:

==============  ============================================================  =================
name            files in ``data_dir``                                         splits
==============  ============================================================  =================
``mnist``       IDX ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, train: 60k minus
                ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each  the valid slice
                plain or ``.gz``; (1, 28, 28), 10 classes                     (5000); test: t10k
``mnist-t10k``  only the two t10k files (the bundled demo data)               train: 9000;
                                                                              valid = test: the
                                                                              other 1000
``cifar10``     pickle batches ``data_batch_1..5`` and ``test_batch``, in     train: 50k minus
                ``data_dir`` or ``data_dir/cifar-10-batches-py``;             valid slice
                (3, 32, 32), 10 classes, random flips                         (5000); test:
                                                                              test_batch
``celeba``      ``img_align_celeba/*.jpg`` or a ``*.zip`` of them, with       official
                ``list_eval_partition.txt`` (0/1/2 = train/valid/test) and    partition
                optional ``list_attr_celeba.txt`` (40 attributes); crop rows
                40:188, cols 15:163, resize to (3, 64, 64); random flips
``lsun``        a folder of images (one category, recursive); smaller side    ``train/`` and
                resized to 96; (3, 64, 64): training crops anywhere in the    ``valid/`` (or
                whole image + flips (``train_batch``), the centre 64x64 for   ``val/``) if
                evaluation (``get_batch`` gives the centre 96x96)             present, else a
                                                                              slice (10%, max
                                                                              3000); test=valid
``imagenet32``  van den Oord downsampled ImageNet: PNG folders                train: train
``imagenet64``  ``train_32x32/`` and ``valid_32x32/`` (``_64x64``); every     folder; valid =
                image exactly 32x32 (64x64) RGB                               test: valid folder
``folder``      any folder of images of one size (recursive); all gray (modes slice (10%);
                "1", "L", "LA") gives 1 channel, anything else RGB            test = valid
``npz``         one ``.npz`` (``data_dir`` is the file or a folder holding    ``x_valid`` if
                exactly one) with uint8 ``x_train``, ``x_test``, optional     present, else a
                ``x_valid`` and ``y_*``; NHWC, NCHW or (N, H, W)              slice of
                                                                              ``x_train`` (10%,
                                                                              max 5000)
==============  ============================================================  =================

A "slice" is a seeded random subset: ``numpy.random.default_rng(seed).permutation(n)[:valid_size]``
of the training source is the validation split and the rest is the training split (both kept
in source order), so the same ``seed`` and ``valid_size`` always give the same, disjoint splits.
``valid_size`` overrides the default and is ignored where the format has its own validation
set (celeba, imagenet, lsun with split folders, npz with ``x_valid``).  The public test sets of
downsampled ImageNet and LSUN are not available, so their ``test`` split is the validation set.

Images of JPEG/PNG datasets are decoded lazily in :meth:`~ImageDataset.get_batch` and cached in
memory as uint8 arrays, so only the first epoch decodes, unless the split would take more than
a quarter of the machine's memory (``dataset.cache`` says which; it can be set either way).
:func:`load_dataset` checks the files up front (file lists, partition files, every
header of ``folder``, the first image of ``imagenet``) and raises :class:`DatasetError` for
missing, truncated, corrupt or malformed files; an image whose data cannot be decoded raises it
when its batch is first read, naming the file (the trainer checkpoints before it stops).
Resampling uses ``PIL.Image.LANCZOS`` (antialiased). Images of ``folder`` and ``imagenet``
are first turned upright as their EXIF orientation tag says (photos from cameras).

``dataset[i]`` (for a plain ``DataLoader``) gives ``(image, label)`` with the image after
:meth:`~ImageDataset.eval_transform` and ``label = tensor(-1)`` for unlabelled datasets.

Layout: :mod:`.base` (dataset classes, transforms, split helpers), :mod:`.formats` (one reader
per format), :mod:`.toy` (2-D toy densities); everything public is re-exported here.
"""

from __future__ import annotations

from pathlib import Path

from . import formats
from .base import (
    IMAGE_EXTENSIONS,
    RESAMPLE,
    SPLITS,
    DatasetError,
    ImageDataset,
    LazyImageDataset,
    RandomCropImageDataset,
    TensorImageDataset,
)
from .toy import TOY_DATASETS, TOY_SPLIT_SIZES, VectorDataset, toy_dataset

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "RESAMPLE",
    "SPLITS",
    "TOY_DATASETS",
    "TOY_SPLIT_SIZES",
    "DatasetError",
    "ImageDataset",
    "LazyImageDataset",
    "RandomCropImageDataset",
    "TensorImageDataset",
    "VectorDataset",
    "load_dataset",
    "toy_dataset",
]

DATASETS: tuple[str, ...] = (
    "mnist", "mnist-t10k", "cifar10", "celeba", "lsun", "imagenet32", "imagenet64", "folder", "npz",
)


#: MNIST's two t10k files, shipped with the package: ``mnist-t10k``'s data_dir unless given
DEMO_DATA = Path(__file__).resolve().parents[1] / "demo_data"


def load_dataset(name: str, data_dir: str | Path | None, split: str = "train", *, seed: int = 0,
                 valid_size: int | None = None) -> ImageDataset:
    """Load one split (``"train"``, ``"valid"`` or ``"test"``) of dataset ``name``.

    See the module docstring for the formats and split rules. The 2-D toy densities
    (:data:`TOY_DATASETS`) are generated: :class:`VectorDataset` splits of
    :data:`TOY_SPLIT_SIZES` points, ``data_dir`` ignored.  ``seed`` chooses the validation
    slice (where there is one) and ``valid_size`` its size.  Raises ``ValueError`` for an
    unknown name or split and :class:`DatasetError` for missing or malformed files.
    """
    if name not in DATASETS + TOY_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: "
                         f"{', '.join(DATASETS + TOY_DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if name in TOY_DATASETS:  # generated, no files: data_dir is ignored
        return VectorDataset(name, split, seed)  # type: ignore[return-value]
    if valid_size is not None and (isinstance(valid_size, bool) or not isinstance(valid_size, int)
                                   or valid_size < 0):
        raise ValueError(f"valid_size must be a non-negative int or None, got {valid_size!r}")
    if data_dir is None and name == "mnist-t10k":
        data_dir = DEMO_DATA
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs data_dir (--data-dir): the folder of its files")
    data_dir = Path(data_dir).expanduser()
    if not data_dir.exists():
        raise DatasetError(f"{data_dir}: not found (data_dir of dataset {name!r})")
    if name in ("mnist", "mnist-t10k"):
        return formats.load_mnist(data_dir, split, seed, valid_size, t10k_only=name == "mnist-t10k")
    if name == "npz":
        return formats.load_npz(data_dir, split, seed, valid_size)
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir}: not a folder (data_dir of dataset {name!r})")
    if name == "cifar10":
        return formats.load_cifar10(data_dir, split, seed, valid_size)
    if name == "celeba":
        return formats.load_celeba(data_dir, split)
    if name == "lsun":
        return formats.load_lsun(data_dir, split, seed, valid_size)
    if name in ("imagenet32", "imagenet64"):
        return formats.load_imagenet(data_dir, split, int(name[-2:]))
    return formats.load_folder(data_dir, split, seed, valid_size)
