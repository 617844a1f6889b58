"""Dataset base classes, augmentation transforms and file helpers shared by the formats."""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps

SPLITS: tuple[str, ...] = ("train", "valid", "test")
RESAMPLE = Image.LANCZOS  # filter for every resize (antialiased when downsampling)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset file is missing, truncated, corrupt or wrongly formatted (message names it)."""


def crc32_digest(parts: Iterable[bytes | np.ndarray]) -> str:
    """zlib's CRC-32 (the checksum zip stores for every member) of ``parts`` in order, as 8 hex
    digits: about 2 GB/s, cheap next to training, and enough to notice data changed by accident
    (it is no defence against a deliberate collision). Arrays count by their bytes."""
    crc = 0
    for part in parts:
        crc = zlib.crc32(np.ascontiguousarray(part) if isinstance(part, np.ndarray) else part,
                         crc)
    return f"{crc:08x}"


EXIF_ORIENTATION = 0x0112  # EXIF tag: how the camera was held; values 5-8 turn by 90 degrees


def upright(image: Image.Image) -> Image.Image:
    """``image`` as a viewer shows it: turned and flipped as its EXIF orientation says (photos
    from phones and cameras are stored sideways with that tag)."""
    return ImageOps.exif_transpose(image)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of :func:`upright` ``(image)``, read from the header without decoding
    (an EXIF chunk after a PNG's pixel data is not seen: such an image fails its size check
    when decoded)."""
    width, height = image.size
    if image.format == "TIFF":  # Pillow's TIFF reader reports the upright size already
        return width, height
    # Image.getexif reads the header's EXIF, XMP and raw-profile tags; PNG's own getexif would
    # decode the whole file to look for an EXIF chunk after the pixels.
    if Image.Image.getexif(image).get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
        return height, width
    return width, height


# ---------------------------------------------------------------------------------------------
# Dataset classes
# ---------------------------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    """Base class: a split of an image dataset, with optional labels.

    Attributes:
        name, split: as given to :func:`load_dataset`.
        image_shape: ``(C, H, W)`` of images after :meth:`train_transform`/:meth:`eval_transform`.
        stored_shape: ``(C, H, W)`` of images returned by :meth:`get_batch` (differs from
            ``image_shape`` only for LSUN: the centre 96x96 of each image, 64x64 after the
            transforms).
        num_classes: class count, attribute count for attribute vectors, ``None`` if unlabelled.
        label_kind: ``"class"``, ``"attributes"`` or ``None``.
        labels: ``int64 (N,)``, ``float32 (N, A)`` or ``None``.
        source_indices: ``int64 (N,)`` numpy array, the position of each item in its source
            (e.g. in the 60,000 MNIST training images, or the CelebA partition file).
        class_names / attribute_names: names of the labels, when known.
        random_flip: whether :meth:`train_transform` flips images horizontally (p = 1/2 each).
        crop_size: side of the square crop made by the transforms, or ``None``.
    """

    def __init__(
        self,
        *,
        name: str,
        split: str,
        stored_shape: tuple[int, int, int],
        source_indices: np.ndarray,
        labels: torch.Tensor | None = None,
        label_kind: str | None = None,
        num_classes: int | None = None,
        random_flip: bool = False,
        crop_size: int | None = None,
        class_names: Sequence[str] | None = None,
        attribute_names: Sequence[str] | None = None,
    ) -> None:
        self.name = name
        self.split = split
        self.stored_shape = tuple(int(s) for s in stored_shape)
        channels = self.stored_shape[0]
        self.image_shape = (channels, crop_size, crop_size) if crop_size else self.stored_shape
        self.source_indices = np.asarray(source_indices, dtype=np.int64)
        self.labels = labels
        self.label_kind = label_kind if labels is not None else None
        self.num_classes = num_classes if labels is not None else None
        self.random_flip = random_flip
        self.crop_size = crop_size
        self.class_names = tuple(class_names) if class_names is not None else None
        self.attribute_names = tuple(attribute_names) if attribute_names is not None else None

    def __len__(self) -> int:
        return len(self.source_indices)

    def __repr__(self) -> str:
        labels = f"{self.label_kind}/{self.num_classes}" if self.label_kind else "none"
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"image_shape={self.image_shape}, labels={labels})")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image, label)`` with the image after :meth:`eval_transform`, uint8 ``image_shape``.

        The label is an int64 scalar tensor (class), a float32 ``(A,)`` tensor (attributes) or
        ``tensor(-1)`` when the dataset is unlabelled, so that default collation works.  The
        training loop should use :meth:`get_batch` and the transforms instead.
        """
        images, labels = self.get_batch(torch.tensor([index]))
        label = labels[0] if labels is not None else torch.tensor(-1, dtype=torch.int64)
        return self.eval_transform(images)[0], label

    def get_batch(self, indices: torch.Tensor | Sequence[int]) -> tuple[
            torch.Tensor, torch.Tensor | None]:
        """Images ``uint8 (B, *stored_shape)`` and labels (``int64 (B,)``, ``float32 (B, A)``
        or ``None``) of the items at ``indices`` (1-D, ints in ``[0, len)``); deterministic."""
        idx = self._check_indices(indices)
        return self._load_images(idx), self._labels(idx)

    def _labels(self, idx: np.ndarray) -> torch.Tensor | None:
        return None if self.labels is None else self.labels[torch.from_numpy(idx)]

    def train_batch(self, indices: torch.Tensor | Sequence[int], generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What training reads: the images at ``indices`` augmented, uint8 ``(B, *image_shape)``,
        and their labels. Draws only from ``generator``, and only once every image is decoded
        (a bad file raises :class:`DatasetError` with the generator untouched)."""
        images, labels = self.get_batch(indices)
        return self.train_transform(images, generator), labels

    def train_transform(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random augmentation of a uint8 ``(B, C, H, W)`` batch, drawing only from ``generator``.

        A random ``crop_size`` crop of each given image (LSUN's training batches crop the whole
        image instead: :meth:`RandomCropImageDataset.train_batch`) then, if ``random_flip``, a
        horizontal flip of each image with probability 1/2; the identity for the other
        datasets.  Works on any device (the random numbers are drawn on ``generator.device``).
        """
        if self.crop_size is not None:
            batch = _random_crop(batch, self.crop_size, generator)
        if self.random_flip:
            batch = _random_hflip(batch, generator)
        return batch

    def eval_transform(self, batch: torch.Tensor) -> torch.Tensor:
        """Deterministic evaluation transform: centre ``crop_size`` crop (LSUN), else identity."""
        if self.crop_size is not None:
            batch = _center_crop(batch, self.crop_size)
        return batch

    def content_digest(self) -> str:
        """A CRC-32 (:func:`crc32_digest`) of this split's images and their source positions:
        the stored pixels, or for files decoded on demand each file's name and size (a stat
        per file, about 4 µs: no decoding, but a file saved again with the same pixels and
        another size counts as changed, and one of a fixed-size format such as BMP replaced
        by another does not). A resumed run compares it with its checkpoint's
        (:func:`realnvp.train.data_fingerprint`), so that images replaced by as many others
        are noticed too."""
        return crc32_digest((*self._content_parts(), self.source_indices))

    def labels_digest(self) -> str | None:
        """A CRC-32 of the labels, None if the split has none (what a conditional run checks on
        resume besides :meth:`content_digest`)."""
        return None if self.labels is None else crc32_digest((self.labels.contiguous().numpy(),))

    def _content_parts(self) -> Iterable[bytes | np.ndarray]:
        raise NotImplementedError

    def _check_indices(self, indices: torch.Tensor | Sequence[int]) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            if indices.dtype.is_floating_point or indices.dtype == torch.bool:
                raise TypeError(f"indices must be integers, got {indices.dtype}")
            idx = indices.detach().cpu().numpy()
        else:
            idx = np.asarray(indices)
            if idx.size and not np.issubdtype(idx.dtype, np.integer):
                raise TypeError(f"indices must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {tuple(idx.shape)}")
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {self.name} {self.split} (size {len(self)})")
        return idx

    def _load_images(self, idx: np.ndarray) -> torch.Tensor:
        raise NotImplementedError


class TensorImageDataset(ImageDataset):
    """Images held in memory as one uint8 tensor ``(N, C, H, W)`` (MNIST, CIFAR-10, npz)."""

    def __init__(self, images: np.ndarray, **kwargs) -> None:
        super().__init__(stored_shape=images.shape[1:], **kwargs)
        self.images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
        if len(self.images) != len(self.source_indices):
            raise ValueError("images and source_indices differ in length")

    def _load_images(self, idx: np.ndarray) -> torch.Tensor:
        return self.images[torch.from_numpy(idx)]

    def _content_parts(self) -> Iterable[bytes | np.ndarray]:
        return (self.images.numpy(),)


def cache_limit_bytes() -> int:
    """The most a dataset caches by default: a quarter of the machine's memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


class LazyImageDataset(ImageDataset):
    """Image files decoded on demand (and cached) by ``decoder(PIL image, name) -> (C, H, W)``.

    The cache of decoded images is on when the whole split fits in :func:`cache_limit_bytes`
    (CelebA's training split at 64×64: 2.0 GB) and off for larger ones (LSUN bedroom at 96×96:
    84 GB), which are then decoded at every epoch; ``cache`` can be set either way."""

    # a decoded image holds at most this many times the bytes of ``stored_shape`` (for the
    # cache's size estimate)
    decoded_size_factor = 1

    def __init__(self, source: FileSource | ZipSource,
                 decoder: Callable[[Image.Image, str], np.ndarray], **kwargs) -> None:
        super().__init__(**kwargs)
        self.source = source
        self.decoder = decoder
        self.cache = (self.decoded_size_factor * len(source) * int(np.prod(self.stored_shape))
                      <= cache_limit_bytes())
        self._cache: dict[int, np.ndarray] = {}
        if len(source) != len(self.source_indices):
            raise ValueError("source and source_indices differ in length")

    @property
    def files(self) -> list[str]:
        """Names of the image files of this split (relative to the folder, or zip members)."""
        return list(self.source.names)

    def _content_parts(self) -> Iterable[bytes | np.ndarray]:
        return (self.source.manifest(),)

    def _load_images(self, idx: np.ndarray) -> torch.Tensor:
        out = np.empty((len(idx), *self.stored_shape), dtype=np.uint8)
        for k, i in enumerate(idx.tolist()):
            out[k] = self._decode(i)
        return torch.from_numpy(out)

    def _decode(self, i: int) -> np.ndarray:
        array = self._cache.get(i)
        if array is not None:
            return array
        name = self.source.describe(i)
        try:
            with Image.open(io.BytesIO(self.source.read(i))) as image:
                array = self.decoder(image, name)
        except DatasetError:
            raise
        except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as e:
            raise DatasetError(f"{name}: cannot decode image ({e})") from e
        self._check_decoded(array, name)
        if self.cache:
            self._cache[i] = array
        return array

    def _check_decoded(self, array: np.ndarray, name: str) -> None:
        if array.shape != self.stored_shape:
            raise DatasetError(f"{name}: decoded to shape {array.shape}, expected "
                               f"{self.stored_shape}")


class RandomCropImageDataset(LazyImageDataset):
    """Image files of varying size, decoded to ``(C, H, W)`` with ``min(H, W)`` equal to the
    stored side (LSUN: the smaller side resized to 96, the aspect ratio kept).

    Training takes a uniformly placed ``crop_size`` square anywhere in the whole decoded image,
    as the official LSUN pipeline does (``tf.random_crop`` of the full resized image), then a
    flip.  :meth:`get_batch`, which must return one shape, gives the centre ``stored_shape``
    square of each image, and :meth:`eval_transform` its centre ``crop_size`` crop.  The cache
    estimate allows for images up to twice as long as they are wide.
    """

    decoded_size_factor = 2  # images up to twice as long as they are wide

    def __init__(self, source: FileSource | ZipSource,
                 decoder: Callable[[Image.Image, str], np.ndarray], **kwargs) -> None:
        super().__init__(source, decoder, **kwargs)
        if self.crop_size is None or self.stored_shape[1] != self.stored_shape[2]:
            raise ValueError("a random-crop dataset needs crop_size and a square stored_shape")

    def _check_decoded(self, array: np.ndarray, name: str) -> None:
        channels, side = self.stored_shape[:2]
        if array.ndim != 3 or array.shape[0] != channels or min(array.shape[1:]) != side:
            raise DatasetError(f"{name}: decoded to shape {array.shape}, expected ({channels}, "
                               f"H, W) with min(H, W) = {side}")

    def _load_images(self, idx: np.ndarray) -> torch.Tensor:
        side = self.stored_shape[1]
        squares = [_centre(self._decode(i), side) for i in idx.tolist()]
        return torch.from_numpy(np.stack(squares) if squares
                                else np.empty((0, *self.stored_shape), np.uint8))

    def train_batch(self, indices: torch.Tensor | Sequence[int], generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = self._check_indices(indices)
        full = [self._decode(i) for i in idx.tolist()]  # every file read before any draw
        # Crop corners as fractions of the free range: the draws do not depend on image sizes.
        corner = torch.rand((len(idx), 2), generator=generator, device=generator.device,
                            dtype=torch.float64).cpu()
        size = self.crop_size
        crops = np.empty((len(idx), self.stored_shape[0], size, size), np.uint8)
        for k, (array, (u, v)) in enumerate(zip(full, corner.tolist(), strict=True)):
            top = int(u * (array.shape[1] - size + 1))
            left = int(v * (array.shape[2] - size + 1))
            crops[k] = array[:, top:top + size, left:left + size]
        images = torch.from_numpy(crops)
        if self.random_flip:
            images = _random_hflip(images, generator)
        return images, self._labels(idx)


ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def _centre(array: ArrayT, side: int) -> ArrayT:
    """The centre ``side`` x ``side`` square of the last two axes of an array or tensor."""
    top, left = (array.shape[-2] - side) // 2, (array.shape[-1] - side) // 2
    return array[..., top:top + side, left:left + side]


class FileSource:
    """Image files ``root / name`` for the names of one split."""

    def __init__(self, root: Path, names: Sequence[str]) -> None:
        self.root = Path(root)
        self.names = list(names)

    def __len__(self) -> int:
        return len(self.names)

    def describe(self, i: int) -> str:
        return str(self.root / self.names[i])

    def manifest(self) -> bytes:
        """Every file's name and size in bytes, one per line (a stat each, no reading)."""
        lines = []
        for i, name in enumerate(self.names):
            try:
                lines.append(f"{name}\t{(self.root / name).stat().st_size}")
            except OSError as e:
                raise DatasetError(f"{self.describe(i)}: cannot read file ({e})") from e
        return "\n".join(lines).encode()

    def read(self, i: int) -> bytes:
        try:
            return (self.root / self.names[i]).read_bytes()
        except OSError as e:
            raise DatasetError(f"{self.describe(i)}: cannot read file ({e})") from e


class ZipSource:
    """Members of a zip archive, read without unpacking; the handle is reopened per process."""

    def __init__(self, path: Path, names: Sequence[str]) -> None:
        self.path = Path(path)
        self.names = list(names)
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None, "_pid": -1}

    def describe(self, i: int) -> str:
        return f"{self.path}:{self.names[i]}"

    def manifest(self) -> bytes:
        """Every member's name, size and CRC-32, one per line, from the archive's central
        directory (no member is read)."""
        try:
            with zipfile.ZipFile(self.path) as archive:
                info = {member.filename: member for member in archive.infolist()}
        except (OSError, zipfile.BadZipFile) as e:
            raise DatasetError(f"{self.path}: cannot read the archive's directory ({e})") from e
        missing = next((name for name in self.names if name not in info), None)
        if missing is not None:
            raise DatasetError(f"{self.path} has no member {missing!r} (the archive changed "
                               "since it was listed)")
        return "\n".join(f"{name}\t{info[name].file_size}\t{info[name].CRC:08x}"
                         for name in self.names).encode()

    def read(self, i: int) -> bytes:
        try:
            if self._zip is None or self._pid != os.getpid():
                self._zip, self._pid = zipfile.ZipFile(self.path), os.getpid()
            return self._zip.read(self.names[i])
        except (OSError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise DatasetError(f"{self.describe(i)}: cannot read zip member ({e})") from e


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------


def _check_batch(batch: torch.Tensor, crop: int | None = None) -> None:
    if batch.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(batch.shape)}")
    if crop is not None and (batch.shape[-2] < crop or batch.shape[-1] < crop):
        raise ValueError(f"cannot crop {crop}x{crop} from images of shape {tuple(batch.shape)}")


def _random_hflip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image of ``(B, C, H, W)`` left-right with probability 1/2."""
    _check_batch(batch)
    flip = torch.rand(batch.shape[0], generator=generator, device=generator.device) < 0.5
    return torch.where(flip.to(batch.device).view(-1, 1, 1, 1), batch.flip(-1), batch)


def _random_crop(batch: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """An independent uniformly placed ``size`` x ``size`` crop of each image."""
    _check_batch(batch, size)
    b, _, h, w = batch.shape
    top = torch.randint(0, h - size + 1, (b,), generator=generator, device=generator.device)
    left = torch.randint(0, w - size + 1, (b,), generator=generator, device=generator.device)
    if b == 0:
        return batch[..., :size, :size]
    crops = [batch[k, :, y:y + size, x:x + size]
             for k, (y, x) in enumerate(zip(top.tolist(), left.tolist(), strict=True))]
    return torch.stack(crops)


def _center_crop(batch: torch.Tensor, size: int) -> torch.Tensor:
    _check_batch(batch, size)
    return _centre(batch, size)


# ---------------------------------------------------------------------------------------------
# Helpers: splits and files
# ---------------------------------------------------------------------------------------------


def split_positions(n: int, split: str, valid_size: int, seed: int, what: str) -> np.ndarray:
    """Sorted positions of ``split`` ("train" or "valid"/"test") in a source of ``n`` items."""
    if not 0 <= valid_size < n or (split != "train" and valid_size == 0):
        raise ValueError(f"valid_size={valid_size} is not possible for {what} with {n} training "
                         f"items (need 0 < valid_size < {n}, or 0 for the train split)")
    perm = np.random.default_rng(seed).permutation(n)
    chosen = perm[valid_size:] if split == "train" else perm[:valid_size]
    return np.sort(chosen).astype(np.int64)


def default_slice(n: int, cap: int) -> int:
    """10% of ``n`` (at least 1 when ``n`` >= 2), capped at ``cap``."""
    return min(cap, max(n // 10, 1 if n >= 2 else 0))


def list_images(root: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[str]:
    """Sorted relative paths of the image files under ``root`` (recursive, hidden ones skipped;
    symbolic links to folders are followed, each folder listed once)."""
    found = []
    seen: set[tuple[int, int]] = set()  # (device, inode) of the folders walked: no link loops
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        info = os.stat(dirpath)
        if (info.st_dev, info.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        found += [(rel / f).as_posix() for f in filenames
                  if not f.startswith(".") and f.lower().endswith(extensions)]
    return sorted(found)


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else a DatasetError saying it should hold ``what``."""
    if not path.is_dir():
        raise DatasetError(f"{path}: folder not found (expected {what})")
    return path


def to_chw(image: Image.Image) -> np.ndarray:
    """A PIL image of mode L or RGB as a uint8 ``(C, H, W)`` array."""
    array = np.asarray(image, dtype=np.uint8)
    return array[None].copy() if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


def nonempty_listing(root: Path, what: str,
                     extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[str]:
    """:func:`list_images` of the folder ``root``; DatasetError if missing or empty."""
    files = list_images(require_dir(root, what), extensions)
    if not files:
        raise DatasetError(f"{root}: no image files ({', '.join(extensions)}) found (expected "
                           f"{what})")
    return files
