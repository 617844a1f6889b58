"""Readers of the on-disk formats: MNIST IDX, CIFAR-10 pickles, CelebA, image folders, npz.

Each ``load_*`` function validates the files it needs and returns one split as an
:class:`~realnvp.data.base.ImageDataset`; see :mod:`realnvp.data` for the rules.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import pickle
import re
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base import (
    RESAMPLE,
    SPLITS,
    DatasetError,
    FileSource,
    ImageDataset,
    LazyImageDataset,
    RandomCropImageDataset,
    TensorImageDataset,
    ZipSource,
    default_slice,
    list_images,
    nonempty_listing,
    split_positions,
    to_chw,
    upright,
    upright_size,
)

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

CELEBA_CROP_BOX = (15, 40, 163, 188)  # PIL (left, upper, right, lower): rows 40:188, cols 15:163
CELEBA_IMAGE_SIZE = (178, 218)  # (width, height) of img_align_celeba
CELEBA_SIZE = 64
LSUN_STORED = 96
LSUN_CROP = 64
MNIST_CLASSES = tuple(str(i) for i in range(10))
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


def _decode_celeba(image: Image.Image, name: str) -> np.ndarray:
    """Crop rows 40:188, cols 15:163 of a 178x218 image and resize to 64x64."""
    if image.size != CELEBA_IMAGE_SIZE:
        raise DatasetError(f"{name}: image is {image.size[0]}x{image.size[1]}, expected "
                           f"{CELEBA_IMAGE_SIZE[0]}x{CELEBA_IMAGE_SIZE[1]} (img_align_celeba)")
    image = image.convert("RGB").crop(CELEBA_CROP_BOX)
    return to_chw(image.resize((CELEBA_SIZE, CELEBA_SIZE), RESAMPLE))


# PIL modes whose pixels are 8-bit (or fewer): the others (16-bit "I;16", 32-bit "I", float "F")
# would be clipped at 255 by convert(), silently; models of them need n_bits > 8.
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
GRAY_MODES = ("1", "L", "LA")


# Raw modes of 16- and 32-bit samples ("RGB;16B": a 16-bit RGB PNG): Pillow opens such images
# as mode RGB(A) or LA and keeps the high byte of each sample, silently.
WIDE_RAW_MODE = re.compile(r";(16|32)[BLN]")


def check_eight_bit(image: Image.Image, name: str) -> None:
    """Refuse an image (just opened, not yet loaded) whose samples are wider than 8 bits."""
    if image.mode not in EIGHT_BIT_MODES:
        raise DatasetError(f"{name}: image mode {image.mode} does not hold 8-bit pixels (16-bit "
                           "or float images would be clipped at 255); convert it to 8-bit first")
    for tile in image.tile:
        raw = tile[3][0] if isinstance(tile[3], tuple) and tile[3] else tile[3]
        if isinstance(raw, str) and WIDE_RAW_MODE.search(raw):
            raise DatasetError(f"{name}: the image has 16-bit samples (raw mode {raw}; reading "
                               "it as 8-bit would keep only the high byte); convert it to "
                               "8-bit first")
        # a PPM/PGM whose maximum value is above 255: Pillow rescales it to 8 bits, silently
        if tile[0] == "ppm" and isinstance(tile[3], tuple) and len(tile[3]) > 1 \
                and isinstance(tile[3][1], int) and tile[3][1] > 255:
            raise DatasetError(f"{name}: the image's samples go up to {tile[3][1]} (more than "
                               "8 bits; reading it would rescale them); convert it to 8-bit "
                               "first")


def _decode_lsun(image: Image.Image, name: str) -> np.ndarray:
    """Resize so the smaller side is 96, the aspect ratio kept (the whole image is kept: the
    random 64x64 training crops are taken anywhere in it)."""
    check_eight_bit(image, name)
    image = image.convert("RGB")
    w, h = image.size
    scale = LSUN_STORED / min(w, h)
    nw, nh = max(LSUN_STORED, round(w * scale)), max(LSUN_STORED, round(h * scale))
    return to_chw(image.resize((nw, nh), RESAMPLE))


def _decode_sized(image: Image.Image, name: str, *, size: tuple[int, int], mode: str,
                  strict_mode: bool) -> np.ndarray:
    """Turn upright (EXIF), check the size (and with ``strict_mode`` the PIL mode), convert to
    ``mode``."""
    check_eight_bit(image, name)
    image = upright(image)
    if image.size != size or (strict_mode and image.mode != mode):
        raise DatasetError(f"{name}: image is {image.size[0]}x{image.size[1]} mode {image.mode},"
                           f" expected {size[0]}x{size[1]}" + (f" {mode}" if strict_mode else ""))
    return to_chw(image.convert(mode))


# ---------------------------------------------------------------------------------------------
# MNIST (IDX)
# ---------------------------------------------------------------------------------------------

_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 2051, 2049


def _read_file(path: Path) -> bytes:
    """Contents of ``path``, gunzipped if it ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: truncated or corrupt file ({e})") from e


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """A uint8 IDX array, checking the magic number and that the payload matches the header."""
    data = _read_file(path)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: only {len(data)} bytes, too short for an IDX header")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise DatasetError(f"{path}: bad magic number {found} (expected {magic} for a uint8 IDX "
                           f"file of {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        what = "truncated" if len(data) - header < expected else "has trailing bytes"
        raise DatasetError(f"{path}: {what}: header says {dims} = {expected} bytes of data, "
                           f"file has {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find_idx(data_dir: Path, stem: str, what: str) -> Path:
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{data_dir / stem}[.gz]: file not found (expected the {what} of MNIST, "
                       "IDX format, plain or gzipped)")


def _read_mnist(data_dir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 (N, 1, 28, 28)`` and labels ``(N,)`` of ``prefix`` ("train" or "t10k")."""
    images_path = _find_idx(data_dir, f"{prefix}-images-idx3-ubyte", f"{prefix} images")
    labels_path = _find_idx(data_dir, f"{prefix}-labels-idx1-ubyte", f"{prefix} labels")
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, 1)
    if images.shape[1:] != (28, 28):
        raise DatasetError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, "
                           "expected 28x28")
    if len(labels) != len(images):
        raise DatasetError(f"{labels_path}: {len(labels)} labels for {len(images)} images in "
                           f"{images_path.name}")
    if labels.size and labels.max() > 9:
        raise DatasetError(f"{labels_path}: label {labels.max()} outside 0..9")
    return images[:, None], labels


def load_mnist(data_dir: Path, split: str, seed: int, valid_size: int | None,
               t10k_only: bool) -> ImageDataset:
    """MNIST from IDX files; ``t10k_only`` splits the 10,000 t10k images into 9000/1000."""
    name = "mnist-t10k" if t10k_only else "mnist"
    if t10k_only or split != "test":
        images, labels = _read_mnist(data_dir, "t10k" if t10k_only else "train")
        default = 1000 if t10k_only else 5000
        pos = split_positions(len(images), split, default if valid_size is None else valid_size,
                              seed, name)
    else:
        images, labels = _read_mnist(data_dir, "t10k")
        pos = np.arange(len(images))
    return TensorImageDataset(
        images[pos], name=name, split=split, source_indices=pos,
        labels=torch.from_numpy(labels[pos].astype(np.int64)), label_kind="class",
        num_classes=10, class_names=MNIST_CLASSES)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (pickle batches)
# ---------------------------------------------------------------------------------------------


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as used by protocol-2 pickles of bytes, limited to latin-1."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
        raise pickle.UnpicklingError("refused _codecs.encode call")
    return codecs.encode(text, "latin1")


_PICKLE_ALLOWED: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only build numpy arrays, dicts, lists, strings and numbers."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 (N, 3, 32, 32)`` and labels ``(N,)`` of one CIFAR-10 pickle batch."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found (expected the CIFAR-10 python batch "
                           f"{path.name}, from cifar-10-python.tar.gz)")
    try:
        with path.open("rb") as f:
            batch = _RestrictedUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as e:
        raise DatasetError(f"{path}: refused to unpickle: the file references {e}, which a "
                           "CIFAR-10 batch never does") from e
    except Exception as e:  # unpickling garbage can raise almost any exception type
        raise DatasetError(f"{path}: not a CIFAR-10 pickle batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        raise DatasetError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
    try:
        found = np.asarray(labels)
        labels = found.astype(np.int64)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path}: 'labels' is not a list of integers") from e
    if found.dtype.kind not in "iub" and not np.array_equal(found, labels):
        raise DatasetError(f"{path}: 'labels' holds non-integer values")
    if labels.shape != (len(data),) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DatasetError(f"{path}: 'labels' must be {len(data)} integers in 0..9")
    # Each row is 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane.
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: Path, split: str, seed: int, valid_size: int | None) -> ImageDataset:
    """CIFAR-10 from the python pickle batches (train/valid need all five data batches)."""
    sub = data_dir / "cifar-10-batches-py"
    folder = sub if sub.is_dir() else data_dir
    if split == "test":
        images, labels = _read_cifar_batch(folder / "test_batch")
        pos = np.arange(len(images))
    else:
        parts = [_read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        pos = split_positions(len(images), split, 5000 if valid_size is None else valid_size,
                              seed, "cifar10")
    return TensorImageDataset(
        images[pos], name="cifar10", split=split, source_indices=pos,
        labels=torch.from_numpy(labels[pos]), label_kind="class", num_classes=10,
        random_flip=True, class_names=CIFAR10_CLASSES)


# ---------------------------------------------------------------------------------------------
# CelebA
# ---------------------------------------------------------------------------------------------


def _find_optional(data_dir: Path, filename: str) -> Path | None:
    for candidate in (data_dir / filename, data_dir / "Eval" / filename,
                      data_dir / "Anno" / filename):
        if candidate.is_file():
            return candidate
    return None


def _celeba_images(data_dir: Path, needed: set[str]) -> tuple[Path, bool, dict[str, str]]:
    """(folder or zip, is_zip, {file name: path within it}) of the CelebA JPEGs: the folder
    ``img_align_celeba``, else the first zip (``img_align_celeba.zip`` first, then by name)
    that holds every ``needed`` file, else the first zip of such JPEGs (whose missing files
    the caller names)."""
    folder = data_dir / "img_align_celeba"
    if folder.is_dir():
        return folder, False, {f: f for f in list_images(folder, (".jpg", ".jpeg", ".png"))
                               if "/" not in f}
    zips = sorted(data_dir.glob("*.zip"), key=lambda p: (p.name != "img_align_celeba.zip", p.name))
    partial = None
    for path in zips:
        try:
            with zipfile.ZipFile(path) as archive:
                members = archive.namelist()
        except (OSError, zipfile.BadZipFile) as e:
            raise DatasetError(f"{path}: not a readable zip file ({e})") from e
        found = {}
        for member in members:
            head, _, base = member.rpartition("/")
            if base.lower().endswith(".jpg") and (
                    head in ("", "img_align_celeba") or head.endswith("/img_align_celeba")):
                found[base] = member
        if needed <= found.keys():
            return path, True, found
        if partial is None and found:
            partial = path, True, found
    if partial is not None:
        return partial
    raise DatasetError(f"{folder}: folder not found, and no zip of img_align_celeba JPEGs in "
                       f"{data_dir} (expected the aligned CelebA images)")


def _read_text_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read text file ({e})") from e


def _read_partition(path: Path) -> list[tuple[str, int]]:
    """``(file name, 0/1/2)`` pairs of ``list_eval_partition.txt``, each file listed once."""
    entries, line_of = [], {}
    for number, line in enumerate(_read_text_lines(path), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DatasetError(f"{path}: line {number} is {line!r}, expected 'NNNNNN.jpg 0|1|2'")
        if fields[0] in line_of:  # twice in one split, or in two (a test image trained on)
            raise DatasetError(f"{path}: {fields[0]} is listed on lines {line_of[fields[0]]} "
                               f"and {number}")
        line_of[fields[0]] = number
        entries.append((fields[0], int(fields[1])))
    if not entries:
        raise DatasetError(f"{path}: empty partition file")
    return entries


def _read_attributes(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Attribute names and ``{file name: float32 (A,) in {0, 1}}`` of ``list_attr_celeba.txt``."""
    lines = _read_text_lines(path)
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise DatasetError(f"{path}: expected an image count on line 1 and attribute names on 2")
    count, names = int(lines[0]), lines[1].split()
    rows: dict[str, np.ndarray] = {}
    for number, line in enumerate(lines[2:], 3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(names) + 1 or any(v not in ("-1", "1", "0") for v in fields[1:]):
            raise DatasetError(f"{path}: line {number} should be a file name and {len(names)} "
                               "values -1/1 (or 0 for -1)")
        rows[fields[0]] = np.array([v == "1" for v in fields[1:]], dtype=np.float32)
    if len(rows) != count:
        raise DatasetError(f"{path}: header says {count} images, found {len(rows)} (truncated?)")
    return names, rows


def load_celeba(data_dir: Path, split: str) -> ImageDataset:
    """Aligned CelebA (folder or zip of JPEGs), split by list_eval_partition.txt."""
    partition_path = _find_optional(data_dir, "list_eval_partition.txt")
    if partition_path is None:
        raise DatasetError(f"{data_dir / 'list_eval_partition.txt'}: file not found (expected "
                           "CelebA's official train/valid/test partition)")
    entries = _read_partition(partition_path)
    root, is_zip, available = _celeba_images(data_dir, {f for f, _ in entries})
    missing = [f for f, _ in entries if f not in available]
    if missing:
        raise DatasetError(f"{partition_path}: lists {missing[0]}, which is not in {root}"
                           f" ({len(missing)} listed files missing)")
    code = SPLITS.index(split)
    pos = np.array([i for i, (_, p) in enumerate(entries) if p == code], dtype=np.int64)
    if len(pos) == 0:
        raise DatasetError(f"{partition_path}: no images in the {split} split")
    names = [entries[i][0] for i in pos]
    labels, attribute_names = None, None
    attr_path = _find_optional(data_dir, "list_attr_celeba.txt")
    if attr_path is not None:
        attribute_names, rows = _read_attributes(attr_path)
        absent = [f for f in names if f not in rows]
        if absent:
            raise DatasetError(f"{attr_path}: no attributes for {absent[0]} "
                               f"({len(absent)} images of the {split} split have none)")
        labels = torch.from_numpy(np.stack([rows[f] for f in names]))
    members = [available[f] for f in names]
    source = ZipSource(root, members) if is_zip else FileSource(root, members)
    return LazyImageDataset(
        source, _decode_celeba, name="celeba", split=split, source_indices=pos,
        stored_shape=(3, CELEBA_SIZE, CELEBA_SIZE), labels=labels, label_kind="attributes",
        num_classes=len(attribute_names) if attribute_names else None, random_flip=True,
        attribute_names=attribute_names)


# ---------------------------------------------------------------------------------------------
# Folders of images: LSUN, downsampled ImageNet, generic folder
# ---------------------------------------------------------------------------------------------


def load_lsun(data_dir: Path, split: str, seed: int, valid_size: int | None) -> ImageDataset:
    """One LSUN category exported as image files: the smaller side resized to 96, random 64x64
    crops of the whole image for training, the centre 64x64 for evaluation."""
    valid_dirs = [d for d in (data_dir / "valid", data_dir / "val") if d.is_dir()]
    if (data_dir / "train").is_dir() and valid_dirs:
        root = data_dir / "train" if split == "train" else valid_dirs[0]
        names = nonempty_listing(root, f"LSUN {split} images")
        pos = np.arange(len(names))
    else:
        root = data_dir
        all_names = nonempty_listing(root, "a folder of LSUN images")
        size = default_slice(len(all_names), 3000) if valid_size is None else valid_size
        pos = split_positions(len(all_names), split, size, seed, "lsun")
        names = [all_names[i] for i in pos]
    return RandomCropImageDataset(
        FileSource(root, names), _decode_lsun, name="lsun", split=split, source_indices=pos,
        stored_shape=(3, LSUN_STORED, LSUN_STORED), random_flip=True, crop_size=LSUN_CROP)


def load_imagenet(data_dir: Path, split: str, size: int) -> ImageDataset:
    """Downsampled ImageNet (van den Oord et al.) from ``train_SxS``/``valid_SxS`` PNG folders."""
    folder = data_dir / f"{'train' if split == 'train' else 'valid'}_{size}x{size}"
    if not folder.is_dir():
        hint = ""
        if any(data_dir.glob("*.npz")) or any(data_dir.glob("*data_batch*")):
            hint = ("; the npz batches of Chrabaszcz et al. are a different 'Imagenet32' (other "
                    "images, other numbers) and are not read by this library; to use them, "
                    "convert them to one npz with x_train and x_test for the 'npz' dataset")
        raise DatasetError(f"{folder}: folder not found (expected the PNG folder of van den "
                           f"Oord's downsampled ImageNet {size}x{size}){hint}")
    names = nonempty_listing(folder, f"{size}x{size} PNG images", (".png",))
    decoder = functools.partial(_decode_sized, size=(size, size), mode="RGB", strict_mode=True)
    first = FileSource(folder, names[:1])  # catch a wrong folder early; all checked on decode
    LazyImageDataset(first, decoder, name="", split=split, source_indices=np.zeros(1),
                     stored_shape=(3, size, size))._decode(0)
    return LazyImageDataset(
        FileSource(folder, names), decoder, name=f"imagenet{size}", split=split,
        source_indices=np.arange(len(names)), stored_shape=(3, size, size))


def load_folder(data_dir: Path, split: str, seed: int, valid_size: int | None) -> ImageDataset:
    """Any folder of same-sized images (recursive); reads every header up front."""
    all_names = nonempty_listing(data_dir, "a folder of images")
    size, first, gray = None, None, True
    for name in all_names:  # headers only: cheap, and errors come before training
        try:
            with Image.open(data_dir / name) as image:
                this_size, mode = upright_size(image), image.mode
                check_eight_bit(image, str(data_dir / name))
        except DatasetError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DatasetError(f"{data_dir / name}: cannot read image ({e})") from e
        if size is None:
            size, first = this_size, name
        elif this_size != size:
            raise DatasetError(f"{data_dir / name}: image is {this_size[0]}x{this_size[1]} but "
                               f"{first} is {size[0]}x{size[1]}; the folder dataset needs "
                               "images of one size")
        gray = gray and mode in GRAY_MODES
    n = len(all_names)
    pos = split_positions(n, split, default_slice(n, n) if valid_size is None else valid_size,
                          seed, "folder")
    mode = "L" if gray else "RGB"
    decoder = functools.partial(_decode_sized, size=size, mode=mode, strict_mode=False)
    return LazyImageDataset(
        FileSource(data_dir, [all_names[i] for i in pos]), decoder, name="folder", split=split,
        source_indices=pos, stored_shape=(1 if gray else 3, size[1], size[0]))


# ---------------------------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------------------------


def _npz_images(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    """uint8 NHWC, NCHW or (N, H, W) array -> contiguous NCHW."""
    if x.dtype != np.uint8:
        raise DatasetError(f"{path}: {key} has dtype {x.dtype}; uint8 pixels 0..255 are required")
    if x.ndim == 3:
        return np.ascontiguousarray(x[:, None])
    if x.ndim != 4:
        raise DatasetError(f"{path}: {key} has shape {x.shape}; expected (N, H, W), NHWC or NCHW")
    nhwc, nchw = x.shape[3] in (1, 3, 4), x.shape[1] in (1, 3, 4)
    if nhwc == nchw:
        which = "ambiguous between" if nhwc else "neither"
        raise DatasetError(f"{path}: {key} has shape {x.shape}: {which} NHWC or NCHW "
                           "(1, 3 or 4 channels)")
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if nhwc else x)


def _npz_labels(y: np.ndarray, n: int | None, path: Path, key: str
                ) -> tuple[torch.Tensor, str, int]:
    """(labels, kind, num_classes) from 1-D integer classes or 2-D {0, 1} attributes."""
    if n is not None and len(y) != n:
        raise DatasetError(f"{path}: {key} has {len(y)} entries for {n} images")
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer) and (y.size == 0 or y.min() >= 0):
        return torch.from_numpy(y.astype(np.int64)), "class", int(y.max()) + 1 if y.size else 0
    if y.ndim == 2 and np.isin(y, (0, 1)).all():
        return torch.from_numpy(y.astype(np.float32)), "attributes", y.shape[1]
    raise DatasetError(f"{path}: {key} must be non-negative integer classes (N,) or 0/1 "
                       f"attributes (N, A); got {y.dtype} {y.shape}")


def load_npz(data_dir: Path, split: str, seed: int, valid_size: int | None) -> ImageDataset:
    """Arrays ``x_train``/``x_valid``/``x_test`` (+ optional ``y_*``) of one .npz file."""
    path = data_dir
    if path.is_dir():
        found = sorted(path.glob("*.npz"))
        if len(found) != 1:
            raise DatasetError(f"{path}: expected exactly one .npz file, found {len(found)}")
        path = found[0]
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path}: cannot read npz file ({e})") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(f"{path}: a single .npy array, expected an .npz archive")
    with archive:
        keys = set(archive.files)

        def get(key: str) -> np.ndarray:
            if key not in keys:
                raise DatasetError(f"{path}: no array {key!r} (has {sorted(keys)})")
            try:
                return archive[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise DatasetError(f"{path}: cannot read array {key!r} ({e})") from e

        if split == "test":
            key = "x_test"
        else:
            key = "x_valid" if split == "valid" and "x_valid" in keys else "x_train"
        x = get(key)
        y_key = "y" + key[1:]
        y = get(y_key) if y_key in keys else None
        # label kind and class count over every y array, so all splits agree on num_classes
        labels_meta = {k: _npz_labels(get(k), None, path, k)[1:]
                       for k in ("y_train", "y_valid", "y_test") if k in keys}
    kinds = {k: kind for k, (kind, _) in labels_meta.items()}
    if len(set(kinds.values())) > 1:
        raise DatasetError(f"{path}: the splits' labels are of different kinds ("
                           f"{', '.join(f'{k} {v}' for k, v in kinds.items())})")
    images = _npz_images(x, path, key)
    if key == "x_train" and "x_valid" not in keys:
        size = default_slice(len(images), 5000) if valid_size is None else valid_size
        pos = split_positions(len(images), split, size, seed, f"npz {path.name}")
    else:
        pos = np.arange(len(images))
    labels, kind, num_classes = None, None, None
    if y is not None:
        labels, kind, _ = _npz_labels(y, len(images), path, y_key)
        labels = labels[torch.from_numpy(pos)]
        num_classes = max(count for _, count in labels_meta.values())
    return TensorImageDataset(images[pos], name="npz", split=split, source_indices=pos,
                              labels=labels, label_kind=kind, num_classes=num_classes)
