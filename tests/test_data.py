"""Tests of realnvp.data: the real MNIST/CIFAR-10/CelebA files, and small files in each format."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from realnvp.data import (
    DATASETS,
    RESAMPLE,
    TOY_DATASETS,
    DatasetError,
    ImageDataset,
    load_dataset,
    toy_dataset,
)

CELEBA_ZIP = "img_align_celeba_subset6000.zip"


def all_items(dataset: ImageDataset) -> tuple[torch.Tensor, torch.Tensor | None]:
    return dataset.get_batch(torch.arange(len(dataset)))


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ------------------------------------------------------------------------------------- MNIST


@pytest.fixture(scope="module")
def mnist(shared_data: Path) -> dict[str, ImageDataset]:
    root = shared_data / "mnist"
    return {split: load_dataset("mnist", root, split) for split in ("train", "valid", "test")}


def test_mnist_real_shapes_and_labels(mnist: dict[str, ImageDataset]) -> None:
    sizes = {"train": 55000, "valid": 5000, "test": 10000}
    for split, dataset in mnist.items():
        images, labels = all_items(dataset)
        assert len(dataset) == sizes[split]
        assert images.shape == (sizes[split], 1, 28, 28) and images.dtype == torch.uint8
        assert dataset.image_shape == (1, 28, 28)
        assert images.min() == 0 and images.max() == 255
        assert labels.dtype == torch.int64 and labels.shape == (sizes[split],)
        assert set(labels.tolist()) == set(range(10))
        assert dataset.label_kind == "class" and dataset.num_classes == 10
    # well-known first labels of the official files
    assert mnist["test"].get_batch(torch.arange(5))[1].tolist() == [7, 2, 1, 0, 4]
    image, label = mnist["test"][0]
    assert image.shape == (1, 28, 28) and label.item() == 7


def test_mnist_real_splits_disjoint_and_aligned(mnist: dict[str, ImageDataset],
                                                shared_data: Path) -> None:
    train, valid = mnist["train"].source_indices, mnist["valid"].source_indices
    assert len(np.intersect1d(train, valid)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, valid])), np.arange(60000))
    full = load_dataset("mnist", shared_data / "mnist", "train", valid_size=0)
    assert len(full) == 60000 and full.get_batch([0, 1, 2, 3])[1].tolist() == [5, 0, 4, 1]
    for split in ("train", "valid"):
        picked = torch.from_numpy(mnist[split].source_indices[:500])
        expected_images, expected_labels = full.get_batch(picked)
        images, labels = mnist[split].get_batch(torch.arange(500))
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


def test_mnist_split_is_seeded(mnist: dict[str, ImageDataset], shared_data: Path) -> None:
    again = load_dataset("mnist", shared_data / "mnist", "valid", seed=0)
    assert np.array_equal(again.source_indices, mnist["valid"].source_indices)
    assert torch.equal(all_items(again)[0], all_items(mnist["valid"])[0])
    other = load_dataset("mnist", shared_data / "mnist", "valid", seed=1)
    assert len(other) == 5000
    assert not np.array_equal(other.source_indices, mnist["valid"].source_indices)
    small = load_dataset("mnist", shared_data / "mnist", "valid", valid_size=100)
    assert len(small) == 100


def test_mnist_t10k(mnist: dict[str, ImageDataset], shared_data: Path) -> None:
    splits = {s: load_dataset("mnist-t10k", shared_data / "mnist", s)
              for s in ("train", "valid", "test")}
    assert (len(splits["train"]), len(splits["valid"]), len(splits["test"])) == (9000, 1000, 1000)
    assert np.array_equal(splits["valid"].source_indices, splits["test"].source_indices)
    assert len(np.intersect1d(splits["train"].source_indices, splits["valid"].source_indices)) == 0
    images, labels = all_items(splits["valid"])
    expected = mnist["test"].get_batch(torch.from_numpy(splits["valid"].source_indices))
    assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1])
    bundled = load_dataset("mnist-t10k", None, "valid")  # the package's copy of the files
    assert torch.equal(all_items(bundled)[0], images)
    with pytest.raises(ValueError, match="'mnist' needs data_dir"):
        load_dataset("mnist", None, "valid")


@pytest.fixture()
def t10k_plain(shared_data: Path, tmp_path: Path) -> Path:
    """The two t10k files, gunzipped, in a temporary folder."""
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(shared_data / "mnist" / f"{stem}.gz", "rb") as src:
            (tmp_path / stem).write_bytes(src.read())
    return tmp_path


def test_mnist_plain_idx_files(t10k_plain: Path, shared_data: Path) -> None:
    plain = load_dataset("mnist-t10k", t10k_plain, "train")
    gz = load_dataset("mnist-t10k", shared_data / "mnist", "train")
    assert len(plain) == 9000
    assert torch.equal(all_items(plain)[0], all_items(gz)[0])
    assert torch.equal(all_items(plain)[1], all_items(gz)[1])


def test_mnist_truncated_and_bad_magic(t10k_plain: Path, tmp_path: Path) -> None:
    images = t10k_plain / "t10k-images-idx3-ubyte"
    data = images.read_bytes()
    images.write_bytes(data[:-100])
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.*truncated"):
        load_dataset("mnist-t10k", t10k_plain)
    images.write_bytes(data[:3] + b"\x01" + data[4:])  # magic 2049 instead of 2051
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.*magic number 2049"):
        load_dataset("mnist-t10k", t10k_plain)
    images.unlink()
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.*not found"):
        load_dataset("mnist-t10k", t10k_plain)
    # a truncated gzip file
    gz_dir = tmp_path / "gz"
    gz_dir.mkdir()
    (gz_dir / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(data, compresslevel=1)[:50000])
    shutil.copy(t10k_plain / "t10k-labels-idx1-ubyte", gz_dir)
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist-t10k", gz_dir)


# ---------------------------------------------------------------------------------- CIFAR-10


@pytest.fixture(scope="module")
def cifar_npz(shared_data: Path) -> dict[str, np.ndarray]:
    with np.load(shared_data / "cifar10" / "cifar10_lossless_subset.npz") as archive:
        return {k: archive[k] for k in archive.files}


def write_cifar_batch(path: Path, images_nhwc: np.ndarray, labels: np.ndarray) -> None:
    """A batch in the format of cifar-10-batches-py (row: 1024 R, 1024 G, 1024 B values)."""
    batch = {
        b"batch_label": b"testing batch",
        b"labels": [int(v) for v in labels],
        b"data": images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), 3072),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


@pytest.fixture()
def cifar_dir(tmp_path: Path, cifar_npz: dict[str, np.ndarray]) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    x, y = cifar_npz["x_train"], cifar_npz["y_train"]
    for i in range(5):
        part = slice(20 * i, 20 * i + 20)
        write_cifar_batch(folder / f"data_batch_{i + 1}", x[part], y[part])
    write_cifar_batch(folder / "test_batch", cifar_npz["x_test"][:20], cifar_npz["y_test"][:20])
    return tmp_path


def test_cifar10_pickle_pixels_and_splits(cifar_dir: Path, cifar_npz: dict[str, np.ndarray]
                                          ) -> None:
    x = torch.from_numpy(cifar_npz["x_train"][:100]).permute(0, 3, 1, 2)
    y = torch.from_numpy(cifar_npz["y_train"][:100].astype(np.int64))
    train = load_dataset("cifar10", cifar_dir, "train", valid_size=10)
    valid = load_dataset("cifar10", cifar_dir / "cifar-10-batches-py", "valid", valid_size=10)
    test = load_dataset("cifar10", cifar_dir, "test")
    assert (len(train), len(valid), len(test)) == (90, 10, 20)
    assert train.image_shape == (3, 32, 32) and train.num_classes == 10
    assert len(np.intersect1d(train.source_indices, valid.source_indices)) == 0
    for dataset in (train, valid):
        images, labels = all_items(dataset)
        assert images.dtype == torch.uint8
        assert torch.equal(images, x[dataset.source_indices])
        assert torch.equal(labels, y[dataset.source_indices])
    images, labels = all_items(test)
    assert torch.equal(images, torch.from_numpy(cifar_npz["x_test"][:20]).permute(0, 3, 1, 2))
    assert labels.tolist() == cifar_npz["y_test"][:20].tolist()


def test_cifar10_numpy1_pickle_accepted(cifar_dir: Path) -> None:
    """The original batches (Python 2, numpy 1) name numpy.core.multiarray._reconstruct."""
    path = cifar_dir / "cifar-10-batches-py" / "test_batch"
    data = path.read_bytes()
    old = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert old != data or b"numpy.core.multiarray\n" in data
    before = all_items(load_dataset("cifar10", cifar_dir, "test"))[0]
    path.write_bytes(old)
    assert torch.equal(all_items(load_dataset("cifar10", cifar_dir, "test"))[0], before)


def test_cifar10_bad_files(cifar_dir: Path, tmp_path: Path) -> None:
    folder = cifar_dir / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_dataset("cifar10", cifar_dir, valid_size=10)
    assert len(load_dataset("cifar10", cifar_dir, "test")) == 20  # test needs only test_batch
    (folder / "data_batch_3").write_bytes(os.urandom(5000))
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_dataset("cifar10", cifar_dir, valid_size=10)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"labels": [1, 2]}, protocol=2))
    with pytest.raises(DatasetError, match="data_batch_3.*data"):
        load_dataset("cifar10", cifar_dir, valid_size=10)
    images = np.zeros((3, 32, 32, 3), np.uint8)
    write_cifar_batch(folder / "data_batch_3", images, np.array([0, 1, 2]))
    batch = pickle.loads((folder / "data_batch_3").read_bytes())
    batch[b"labels"] = [0, 1, 4.5]  # would be truncated to 4 by an int64 cast
    (folder / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DatasetError, match="data_batch_3.*non-integer"):
        load_dataset("cifar10", cifar_dir, valid_size=10)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar10_malicious_pickle_refused(cifar_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "exploited"
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Exploit(marker)}
    (cifar_dir / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DatasetError, match="test_batch.*refused.*system"):
        load_dataset("cifar10", cifar_dir, "test")
    assert not marker.exists()


def test_cifar10_random_flips(cifar_dir: Path) -> None:
    train = load_dataset("cifar10", cifar_dir, "train", valid_size=10)
    batch, _ = train.get_batch(torch.arange(64))
    before = batch.clone()
    out = train.train_transform(batch, torch.Generator().manual_seed(0))
    assert torch.equal(batch, before)  # the input is not modified
    flipped = torch.tensor([torch.equal(o, b.flip(-1)) and not torch.equal(o, b)
                            for o, b in zip(out, batch, strict=True)])
    kept = torch.tensor([torch.equal(o, b) for o, b in zip(out, batch, strict=True)])
    assert bool((flipped | kept).all())
    assert 10 < int(flipped.sum()) < 54
    again = train.train_transform(batch, torch.Generator().manual_seed(0))
    other = train.train_transform(batch, torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)
    assert torch.equal(train.eval_transform(batch), batch)
    # MNIST-style datasets without flips: identity
    assert not load_dataset("cifar10", cifar_dir, "test").crop_size


# ------------------------------------------------------------------------------------ CelebA


def test_celeba_real_zip(shared_data: Path) -> None:
    root = shared_data / "celeba"
    splits = {s: load_dataset("celeba", root, s) for s in ("train", "valid", "test")}
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [4560, 780, 660]
    valid = splits["valid"]
    assert valid.image_shape == (3, 64, 64) and valid.label_kind is None and valid.random_flip
    images, labels = valid.get_batch(torch.tensor([0, 1, 5]))
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.uint8 and labels is None
    with zipfile.ZipFile(root / CELEBA_ZIP) as archive, archive.open(valid.files[5]) as f:
        pixels = np.asarray(Image.open(f).convert("RGB"))
    assert pixels.shape == (218, 178, 3)
    expected = np.asarray(Image.fromarray(pixels[40:188, 15:163]).resize((64, 64), RESAMPLE))
    assert np.array_equal(images[2].permute(1, 2, 0).numpy(), expected)
    wrong = np.asarray(Image.fromarray(pixels[15:163, 40:188]).resize((64, 64), RESAMPLE))
    assert not np.array_equal(images[2].permute(1, 2, 0).numpy(), wrong)


def test_celeba_decodes_once(shared_data: Path) -> None:
    dataset = load_dataset("celeba", shared_data / "celeba", "test")
    calls = []
    decoder = dataset.decoder
    dataset.decoder = lambda image, name: calls.append(name) or decoder(image, name)
    first = dataset.get_batch(torch.tensor([3, 1, 3]))[0]
    second = dataset.get_batch(torch.tensor([1, 3]))[0]
    assert len(calls) == 2 and torch.equal(first[:2], second.flip(0))
    dataset.decoder = decoder
    copy = pickle.loads(pickle.dumps(dataset))  # e.g. for DataLoader workers: zip reopened
    assert torch.equal(copy.get_batch(torch.tensor([7]))[0], dataset.get_batch([7])[0])


@pytest.fixture()
def celeba_small(shared_data: Path, tmp_path: Path) -> tuple[Path, np.ndarray]:
    """Five real images in img_align_celeba/, a partition (3/1/1) and a 40-attribute file."""
    names = {"000002.jpg": 0, "000058.jpg": 0, "000086.jpg": 0, "162862.jpg": 1, "182739.jpg": 2}
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    with zipfile.ZipFile(shared_data / "celeba" / CELEBA_ZIP) as archive:
        for name in names:
            (folder / name).write_bytes(archive.read(name))
    (tmp_path / "list_eval_partition.txt").write_text(
        "".join(f"{n} {p}\n" for n, p in names.items()))
    values = np.random.default_rng(0).choice([-1, 1], size=(6, 40))
    rows = [*names, "000099.jpg"]  # an extra row for an image not used is fine
    lines = ["6", " ".join(f"Attr_{i}" for i in range(40))]
    lines += [f"{n}  " + " ".join(f"{v:2d}" for v in row) for n, row in zip(rows, values,
                                                                            strict=True)]
    (tmp_path / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    return tmp_path, (values > 0).astype(np.float32)


def test_celeba_attributes(celeba_small: tuple[Path, np.ndarray]) -> None:
    root, expected = celeba_small
    train = load_dataset("celeba", root, "train")
    test = load_dataset("celeba", root, "test")
    assert len(train) == 3 and len(test) == 1
    assert train.label_kind == "attributes" and train.num_classes == 40
    assert train.attribute_names[0] == "Attr_0"
    images, labels = all_items(train)
    assert images.shape == (3, 3, 64, 64)
    assert labels.dtype == torch.float32 and labels.shape == (3, 40)
    assert np.array_equal(labels.numpy(), expected[:3])
    assert np.array_equal(all_items(test)[1].numpy(), expected[4:5])
    _, label = test[0]
    assert label.shape == (40,)


def test_celeba_takes_the_zip_that_holds_the_partitions_files(
        celeba_small: tuple[Path, np.ndarray]) -> None:
    root, _ = celeba_small
    folder = root / "img_align_celeba"
    names = sorted(p.name for p in folder.iterdir())
    for zip_name, members in (("aligned_samples.zip", names[:1]),  # first by name, too few
                              ("my_celeba_copy.zip", names)):
        with zipfile.ZipFile(root / zip_name, "w") as archive:
            for name in members:
                archive.write(folder / name, f"img_align_celeba/{name}")
    expected = all_items(load_dataset("celeba", root, "train"))[0]
    shutil.rmtree(folder)
    assert torch.equal(all_items(load_dataset("celeba", root, "train"))[0], expected)
    (root / "my_celeba_copy.zip").unlink()
    with pytest.raises(DatasetError, match="aligned_samples.zip \\(4 listed files missing"):
        load_dataset("celeba", root, "train")


def test_celeba_without_attributes_cannot_train_conditionally(
        celeba_small: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    from realnvp import RealNVPConfig
    from realnvp.train import TrainConfig, Trainer

    root, _ = celeba_small
    (root / "list_attr_celeba.txt").unlink()
    with pytest.raises(ValueError, match="no labels \\(CelebA's labels are its attributes: "
                                         "list_attr_celeba.txt was not found"):
        Trainer(RealNVPConfig(input_shape=(3, 64, 64), scales=2, res_blocks=1, features=4),
                TrainConfig(dataset="celeba", data_dir=str(root), conditional=True,
                            run_dir=str(tmp_path / "run"), batch_size=2, progress=False))


def test_celeba_missing_files(celeba_small: tuple[Path, np.ndarray]) -> None:
    root, _ = celeba_small
    partition = root / "list_eval_partition.txt"
    text = partition.read_text()
    partition.write_text(text + "999999.jpg 1\n")
    with pytest.raises(DatasetError, match="999999.jpg"):
        load_dataset("celeba", root, "train")
    partition.write_text(text + "000001.jpg 5\n")
    with pytest.raises(DatasetError, match="list_eval_partition.txt.*line 6"):
        load_dataset("celeba", root, "train")
    partition.write_text(text + "000058.jpg 0\n")  # twice in train
    with pytest.raises(DatasetError, match="000058.jpg is listed on lines 2 and 6"):
        load_dataset("celeba", root, "train")
    partition.write_text(text + "000002.jpg 2\n")  # a training image in the test split
    with pytest.raises(DatasetError, match="000002.jpg is listed on lines 1 and 6"):
        load_dataset("celeba", root, "test")
    partition.write_text(text)
    attr = root / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    attr.write_text("\n".join(["5", lines[1], *lines[3:]]))  # drops 000002.jpg
    with pytest.raises(DatasetError, match="list_attr_celeba.txt.*000002.jpg"):
        load_dataset("celeba", root, "train")
    partition.unlink()
    with pytest.raises(DatasetError, match="list_eval_partition.txt.*not found"):
        load_dataset("celeba", root, "train")


# -------------------------------------------------------------------------------------- LSUN


LSUN_SIZES = [(120, 100), (100, 150), (96, 96), (200, 97), (130, 130), (97, 300)]


def lsun_resized(path: Path) -> torch.Tensor:
    """Smaller side resized to 96, aspect kept: CHW uint8."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    new = (96, round(h * 96 / w)) if w <= h else (round(w * 96 / h), 96)
    return torch.from_numpy(np.asarray(image.resize(new, RESAMPLE)).copy()).permute(2, 0, 1)


def lsun_reference(path: Path) -> np.ndarray:
    """Smaller side resized to 96, centre 96x96 crop: HWC uint8."""
    array = lsun_resized(path).permute(1, 2, 0).numpy()
    top, left = (array.shape[0] - 96) // 2, (array.shape[1] - 96) // 2
    return array[top:top + 96, left:left + 96]


def is_window(crop: torch.Tensor, image: torch.Tensor) -> bool:
    """Whether (C, s, s) ``crop`` is a square of (C, H, W) ``image``, as it is or flipped."""
    s = crop.shape[-1]
    windows = image.unfold(1, s, 1).unfold(2, s, 1).permute(1, 2, 0, 3, 4)
    return any((windows == c).flatten(2).all(-1).any().item() for c in (crop, crop.flip(-1)))


@pytest.fixture()
def lsun_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(LSUN_SIZES):
        sub = "a" if i % 2 else "b/c"
        write_png(tmp_path / "bedroom" / sub / f"{i}.png",
                  rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return tmp_path / "bedroom"


def test_lsun_shapes_and_transforms(lsun_dir: Path) -> None:
    train = load_dataset("lsun", lsun_dir, "train")
    valid = load_dataset("lsun", lsun_dir, "valid")
    assert (len(train), len(valid)) == (5, 1)
    assert set(train.files) | set(valid.files) == {f"{'a' if i % 2 else 'b/c'}/{i}.png"
                                                   for i in range(6)}
    assert train.image_shape == (3, 64, 64) and train.label_kind is None
    stored, labels = all_items(train)
    assert stored.shape == (5, 3, 96, 96) and labels is None
    centre = train.eval_transform(stored)
    assert centre.shape == (5, 3, 64, 64)
    for k, name in enumerate(train.files):
        expected = lsun_reference(lsun_dir / name)
        assert np.array_equal(stored[k].permute(1, 2, 0).numpy(), expected)
        assert np.array_equal(centre[k].permute(1, 2, 0).numpy(), expected[16:80, 16:80])
    assert torch.equal(train[0][0], centre[0]) and train[0][1].item() == -1

    crops = train.train_transform(stored, torch.Generator().manual_seed(0))  # of given batches
    assert crops.shape == (5, 3, 64, 64)
    assert torch.equal(crops, train.train_transform(stored, torch.Generator().manual_seed(0)))
    assert not torch.equal(crops, train.train_transform(stored, torch.Generator().manual_seed(1)))
    assert all(is_window(c, image) for c, image in zip(crops, stored, strict=True))

    # Training crops come from the whole resized image (official pipeline), not its centre.
    every = torch.arange(5)
    crops, labels = train.train_batch(every, torch.Generator().manual_seed(0))
    assert crops.shape == (5, 3, 64, 64) and crops.dtype == torch.uint8 and labels is None
    assert torch.equal(crops, train.train_batch(every, torch.Generator().manual_seed(0))[0])
    assert not torch.equal(crops, train.train_batch(every, torch.Generator().manual_seed(1))[0])
    full = [lsun_resized(lsun_dir / name) for name in train.files]
    assert all(is_window(c, image) for c, image in zip(crops, full, strict=True))
    wide = train.files.index("a/3.png")  # 200x97: 198x96 once resized
    assert full[wide].shape == (3, 96, 198)
    g = torch.Generator().manual_seed(2)
    draws = [train.train_batch([wide], g)[0][0] for _ in range(30)]
    assert all(is_window(c, full[wide]) for c in draws)
    assert sum(not is_window(c, stored[wide]) for c in draws) >= 10  # outside the centre 96
    (lsun_dir / "a" / "3.png").write_bytes(b"not an image")
    g = torch.Generator().manual_seed(2)
    before = g.get_state()
    with pytest.raises(DatasetError, match="3.png"):
        load_dataset("lsun", lsun_dir, "train").train_batch(every, g)
    assert torch.equal(g.get_state(), before)  # a bad file stops the batch before any draw


def test_lsun_split_folders(lsun_dir: Path) -> None:
    (lsun_dir / "b").rename(lsun_dir / "val")
    (lsun_dir / "a").rename(lsun_dir / "train")
    assert len(load_dataset("lsun", lsun_dir, "train")) == 3
    assert load_dataset("lsun", lsun_dir, "test").files == ["c/0.png", "c/2.png", "c/4.png"]
    for path in (lsun_dir / "val" / "c").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match="no image files"):
        load_dataset("lsun", lsun_dir, "valid")


# --------------------------------------------------------------------------------- ImageNet


@pytest.mark.parametrize("size", [32, 64])
def test_imagenet_png_folders(tmp_path: Path, size: int) -> None:
    rng = np.random.default_rng(size)
    train_pixels = rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    for i, pixels in enumerate(train_pixels):
        write_png(tmp_path / f"train_{size}x{size}" / f"{i:08d}.png", pixels)
    for i in range(3):
        write_png(tmp_path / f"valid_{size}x{size}" / f"{i:08d}.png",
                  rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    name = f"imagenet{size}"
    train = load_dataset(name, tmp_path, "train")
    valid, test = load_dataset(name, tmp_path, "valid"), load_dataset(name, tmp_path, "test")
    assert (len(train), len(valid), len(test)) == (4, 3, 3)
    assert train.image_shape == (3, size, size) and train.num_classes is None
    images, labels = all_items(train)
    assert labels is None
    assert torch.equal(images, torch.from_numpy(train_pixels).permute(0, 3, 1, 2))
    assert torch.equal(all_items(valid)[0], all_items(test)[0])

    write_png(tmp_path / f"train_{size}x{size}" / "zz_bad.png",
              np.zeros((size, size + 1, 3), np.uint8))
    bad = load_dataset(name, tmp_path, "train")  # only the first image is checked up front
    assert len(bad) == 5
    with pytest.raises(DatasetError, match=f"zz_bad.png.*expected {size}x{size}"):
        all_items(bad)
    write_png(tmp_path / f"valid_{size}x{size}" / "-gray.png", np.zeros((size, size), np.uint8))
    with pytest.raises(DatasetError, match="-gray.png.*mode L"):  # first file: checked up front
        load_dataset(name, tmp_path, "valid")


def test_imagenet_missing_folder(tmp_path: Path) -> None:
    np.savez(tmp_path / "train_data_batch_1.npz", data=np.zeros((1, 3072), np.uint8))
    with pytest.raises(DatasetError, match="train_32x32.*Chrabaszcz"):
        load_dataset("imagenet32", tmp_path, "train")


# -------------------------------------------------------------------------------------- npz


def test_npz_real_cifar_subset(shared_data: Path, cifar_npz: dict[str, np.ndarray]) -> None:
    path = shared_data / "cifar10" / "cifar10_lossless_subset.npz"
    test = load_dataset("npz", path, "test")
    images, labels = all_items(test)
    assert images.shape == (4593, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images, torch.from_numpy(cifar_npz["x_test"]).permute(0, 3, 1, 2))
    assert labels.tolist() == cifar_npz["y_test"].tolist() and test.num_classes == 10
    train = load_dataset("npz", path.parent, "train")
    valid = load_dataset("npz", path.parent, "valid")
    assert (len(train), len(valid)) == (3600, 400)
    assert np.array_equal(np.sort(np.concatenate([train.source_indices, valid.source_indices])),
                          np.arange(4000))
    x = torch.from_numpy(cifar_npz["x_train"]).permute(0, 3, 1, 2)
    assert torch.equal(all_items(valid)[0], x[valid.source_indices])


def test_npz_layouts_and_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (12, 8, 6, 3), dtype=np.uint8)
    nchw = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
    y = rng.integers(0, 5, 12)
    np.savez(tmp_path / "nhwc.npz", x_train=nhwc, y_train=y, x_test=nhwc[:2])
    np.savez(tmp_path / "nchw.npz", x_train=nchw, x_test=nchw[:2], x_valid=nchw[:3])
    a = load_dataset("npz", tmp_path / "nhwc.npz", "train", valid_size=2, seed=3)
    b = load_dataset("npz", tmp_path / "nchw.npz", "train")  # x_valid given: train is all
    assert a.image_shape == b.image_shape == (3, 8, 6)
    assert len(a) == 10 and len(b) == 12
    assert torch.equal(all_items(a)[0], torch.from_numpy(nchw[a.source_indices]))
    assert torch.equal(all_items(b)[0], torch.from_numpy(nchw))
    assert all_items(a)[1].tolist() == y[a.source_indices].tolist() and a.label_kind == "class"
    assert all_items(b)[1] is None and b.num_classes is None
    assert len(load_dataset("npz", tmp_path / "nchw.npz", "valid")) == 3
    with pytest.raises(DatasetError, match="exactly one"):
        load_dataset("npz", tmp_path, "train")

    np.savez(tmp_path / "gray.npz", x_train=nhwc[..., 0], x_test=nhwc[:2, ..., 0])
    gray = load_dataset("npz", tmp_path / "gray.npz", "test")
    assert torch.equal(all_items(gray)[0], torch.from_numpy(nhwc[:2, None, :, :, 0]))
    bad = {
        "float": (nhwc.astype(np.float32), "dtype float32.*uint8"),
        "ambiguous": (np.zeros((2, 3, 5, 3), np.uint8), "ambiguous"),
        "neither": (np.zeros((2, 5, 5, 5), np.uint8), "neither"),
        "rank": (np.zeros((2, 5), np.uint8), "shape"),
    }
    for name, (array, message) in bad.items():
        np.savez(tmp_path / f"{name}.npz", x_train=array, x_test=array)
        with pytest.raises(DatasetError, match=f"{name}.npz.*{message}"):
            load_dataset("npz", tmp_path / f"{name}.npz", "test")
    attributes = rng.integers(0, 2, (3, 4))
    np.savez(tmp_path / "kinds.npz", x_train=nhwc, y_train=y, x_valid=nhwc[:3],
             y_valid=attributes, x_test=nhwc[:2], y_test=y[:2])
    with pytest.raises(DatasetError, match="kinds.npz: the splits' labels are of different "
                                           "kinds \\(y_train class, y_valid attributes"):
        load_dataset("npz", tmp_path / "kinds.npz", "train")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    with pytest.raises(DatasetError, match="garbage.npz"):
        load_dataset("npz", tmp_path / "garbage.npz", "test")


# ----------------------------------------------------------------------------------- folder


def test_folder_dataset(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (10, 7, 5), dtype=np.uint8)
    for i, image in enumerate(pixels):
        write_png(tmp_path / "gray" / f"{i % 2}" / f"{i}.png", image)
    train = load_dataset("folder", tmp_path / "gray", "train")
    valid = load_dataset("folder", tmp_path / "gray", "valid")
    test = load_dataset("folder", tmp_path / "gray", "test")
    assert (len(train), len(valid)) == (9, 1) and valid.files == test.files
    assert train.image_shape == (1, 7, 5)
    for dataset in (train, valid):
        index = [int(Path(f).stem) for f in dataset.files]
        assert torch.equal(all_items(dataset)[0], torch.from_numpy(pixels[index, None]))

    write_png(tmp_path / "rgb" / "a.png", np.zeros((4, 4, 3), np.uint8))
    write_png(tmp_path / "rgb" / "b.png", np.zeros((4, 4), np.uint8))
    rgb = load_dataset("folder", tmp_path / "rgb", "train", valid_size=0)
    assert rgb.image_shape == (3, 4, 4) and len(rgb) == 2
    write_png(tmp_path / "rgb" / "c.png", np.zeros((5, 4, 3), np.uint8))
    with pytest.raises(DatasetError, match="c.png.*4x5.*one size"):
        load_dataset("folder", tmp_path / "rgb", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty.*no image files"):
        load_dataset("folder", tmp_path / "empty", "train")


def test_exif_orientation_turns_photos_upright(tmp_path: Path) -> None:
    from realnvp.figures import read_images

    rng = np.random.default_rng(1)
    upright_pixels = rng.integers(0, 256, (3, 6, 4, 3), dtype=np.uint8)  # 4 wide, 6 high
    for i, image in enumerate(upright_pixels[:2]):
        write_png(tmp_path / f"{i}.png", image)
    # A camera held sideways stores the pixels turned and tags them "rotate 90° clockwise" (6).
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(upright_pixels[2], k=1).copy()).save(tmp_path / "2.png", exif=exif)
    assert Image.open(tmp_path / "2.png").size == (6, 4)
    dataset = load_dataset("folder", tmp_path, "train", valid_size=0)
    assert dataset.image_shape == (3, 6, 4)
    images, _ = all_items(dataset)
    index = [int(Path(f).stem) for f in dataset.files]
    assert torch.equal(images, torch.from_numpy(upright_pixels[index]).permute(0, 3, 1, 2))
    read = read_images([tmp_path / "2.png", tmp_path / "0.png"], 3, (6, 4))
    assert torch.equal(read, torch.from_numpy(upright_pixels[[2, 0]]).permute(0, 3, 1, 2))
    # TIFF, whose reader reports the upright size itself
    tiff = tmp_path / "tiff"
    tiff.mkdir()
    Image.fromarray(upright_pixels[0]).save(tiff / "0.tif")
    Image.fromarray(np.rot90(upright_pixels[1], k=1).copy()).save(tiff / "1.tif", exif=exif)
    dataset = load_dataset("folder", tiff, "train", valid_size=0)
    assert dataset.image_shape == (3, 6, 4)
    assert torch.equal(all_items(dataset)[0],
                       torch.from_numpy(upright_pixels[:2]).permute(0, 3, 1, 2))


def write_png16_rgb(path: Path, array: np.ndarray) -> None:
    """A 16-bit RGB PNG (Pillow cannot write one): HWC uint16 ``array``."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))
    h, w, _ = array.shape
    rows = b"".join(b"\0" + array[r].astype(">u2").tobytes() for r in range(h))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0,
                     0, 0)) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16_bit_rgb_images_are_refused_not_cut_to_their_high_byte(tmp_path: Path) -> None:
    from realnvp.figures import read_images

    wide = np.full((8, 8, 3), 1000, np.uint16)
    wide[0, 0] = (65535, 300, 7)
    write_png16_rgb(tmp_path / "f" / "b.png", wide)
    with Image.open(tmp_path / "f" / "b.png") as image:  # Pillow reads it as 8-bit RGB
        assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 1, 0)
    write_png(tmp_path / "f" / "a.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match="b.png: the image has 16-bit samples"):
        load_dataset("folder", tmp_path / "f", "train", valid_size=0)
    with pytest.raises(DatasetError, match="b.png: the image has 16-bit samples"):
        read_images([tmp_path / "f" / "b.png"], 3, (8, 8))
    write_png16_rgb(tmp_path / "lsun" / "0.png", np.full((100, 120, 3), 9, np.uint16))
    with pytest.raises(DatasetError, match="0.png: the image has 16-bit samples"):
        load_dataset("lsun", tmp_path / "lsun", "train", valid_size=0).get_batch([0])
    assert len(read_images([tmp_path / "f" / "a.png"], 3, (8, 8))) == 1  # 8-bit still read
    # a PPM with maxval 65535 or 4095: Pillow opens it as RGB and rescales it to 8 bits
    samples = np.random.default_rng(0).integers(0, 4096, (8, 8, 3)).astype(">u2")
    for maxval in (65535, 4095):
        (tmp_path / f"{maxval}.ppm").write_bytes(b"P6 8 8 %d\n" % maxval + samples.tobytes())
        with pytest.raises(DatasetError, match=f"samples go up to {maxval}"):
            read_images([tmp_path / f"{maxval}.ppm"], 3, (8, 8))
    pixels = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    (tmp_path / "255.ppm").write_bytes(b"P6 8 8 255\n" + pixels.tobytes())
    assert np.array_equal(read_images([tmp_path / "255.ppm"], 3, (8, 8))[0].numpy(),
                          pixels.transpose(2, 0, 1))


def test_exif_orientation_in_xmp_is_read_from_the_header(tmp_path: Path) -> None:
    from PIL import PngImagePlugin

    rng = np.random.default_rng(2)
    upright_pixels = rng.integers(0, 256, (2, 6, 4, 3), dtype=np.uint8)
    write_png(tmp_path / "0.png", upright_pixels[0])
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="6"/>'
                  '</x:xmpmeta>')
    Image.fromarray(np.rot90(upright_pixels[1], k=1).copy()).save(tmp_path / "1.png",
                                                                  pnginfo=info)
    dataset = load_dataset("folder", tmp_path, "train", valid_size=0)
    assert dataset.image_shape == (3, 6, 4)
    images, _ = all_items(dataset)
    assert torch.equal(images, torch.from_numpy(upright_pixels).permute(0, 3, 1, 2))


# -------------------------------------------------------------------------- API and errors


def test_argument_errors(tmp_path: Path) -> None:
    assert issubclass(DatasetError, ValueError)
    assert {"mnist", "cifar10", "celeba", "lsun", "imagenet32", "npz"} <= set(DATASETS)
    with pytest.raises(ValueError, match="mnist.*cifar10"):
        load_dataset("cifar100", tmp_path)
    moons = load_dataset("moons", None, "valid")  # generated: no files needed
    assert moons.image_shape == (2,) and len(moons) == 2000
    points, labels = moons.get_batch(torch.arange(5))
    assert points.shape == (5, 2) and points.dtype == torch.float32 and labels is None
    assert not torch.equal(points, load_dataset("moons", None, "train").get_batch(range(5))[0])
    with pytest.raises(ValueError, match="split"):
        load_dataset("mnist", tmp_path, "validation")
    with pytest.raises(DatasetError, match="nowhere"):
        load_dataset("mnist", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.*not found"):
        load_dataset("mnist", tmp_path)


def test_get_batch_index_checks(t10k_plain: Path) -> None:
    dataset = load_dataset("mnist-t10k", t10k_plain, "valid")
    with pytest.raises(IndexError):
        dataset.get_batch(torch.tensor([0, 1000]))
    with pytest.raises(TypeError):
        dataset.get_batch(torch.tensor([0.0]))
    images, labels = dataset.get_batch(torch.tensor([], dtype=torch.int64))
    assert images.shape == (0, 1, 28, 28) and labels.shape == (0,)


# -------------------------------------------------------------------------------------- toy


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_basics(name: str) -> None:
    x = toy_dataset(name, 1001, seed=0)
    assert x.shape == (1001, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, toy_dataset(name, 1001, seed=0))
    assert not torch.equal(x, toy_dataset(name, 1001, seed=1))
    assert 0.3 < x.std(0).min() and x.abs().max() < 3.0 and x.mean(0).abs().max() < 0.3


def test_toy_shapes_of_distributions() -> None:
    n = 4000
    x = toy_dataset("8gaussians", n).numpy()
    angles = np.arange(8) * np.pi / 4
    centres = 2 * np.stack([np.cos(angles), np.sin(angles)], 1)
    dist = np.linalg.norm(x[:, None] - centres[None], axis=-1)
    assert dist.min(1).max() < 0.6
    assert np.bincount(dist.argmin(1), minlength=8).min() > n / 8 * 0.8

    x = toy_dataset("checkerboard", n).numpy()
    assert np.abs(x).max() <= 2.0
    cells = np.floor(x).astype(int) + 2
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    assert len({tuple(c) for c in cells}) == 8

    x = toy_dataset("rings", n).numpy()
    r = np.linalg.norm(x, axis=1)
    nearest = np.abs(r[:, None] - np.array([0.5, 1.0, 1.5, 2.0])[None])
    assert nearest.min(1).max() < 0.25
    assert (np.bincount(nearest.argmin(1), minlength=4) == n // 4).all()

    x = toy_dataset("moons", n).numpy() + [0.5, 0.25]
    outer = np.abs(np.linalg.norm(x, axis=1) - 1) + np.maximum(-x[:, 1], 0)
    inner = np.abs(np.linalg.norm(x - [1.0, 0.5], axis=1) - 1) + np.maximum(x[:, 1] - 0.5, 0)
    assert np.minimum(outer, inner).max() < 0.3
    assert abs((outer < inner).mean() - 0.5) < 0.02


def test_folder_refuses_16_bit_images_and_follows_links(tmp_path: Path) -> None:
    deep = tmp_path / "deep"
    write_png(deep / "a.png", np.zeros((4, 4), np.uint8))
    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(deep / "b.png")  # mode I;16
    with pytest.raises(DatasetError, match="b.png: image mode I;16 does not hold 8-bit"):
        load_dataset("folder", deep, "train", valid_size=0)
    # a linked folder is listed like a real one, and a link loop does not recurse
    real = tmp_path / "real"
    for i in range(3):
        write_png(real / "cats" / f"{i}.png", np.full((4, 4), i, np.uint8))
    top = tmp_path / "top"
    write_png(top / "x.png", np.zeros((4, 4), np.uint8))
    (top / "cats").symlink_to(real / "cats", target_is_directory=True)
    (real / "cats" / "loop").symlink_to(real / "cats", target_is_directory=True)
    dataset = load_dataset("folder", top, "train", valid_size=0)
    assert dataset.files == ["cats/0.png", "cats/1.png", "cats/2.png", "x.png"]
    assert dataset.image_shape == (1, 4, 4)


def test_decoded_images_are_cached_only_where_they_fit(tmp_path: Path, monkeypatch) -> None:
    for i in range(4):
        write_png(tmp_path / f"{i}.png", np.full((4, 4), i, np.uint8))
    dataset = load_dataset("folder", tmp_path, "train", valid_size=0)
    assert dataset.cache  # 4 × 16 bytes
    dataset.get_batch(torch.arange(4))
    assert len(dataset._cache) == 4
    monkeypatch.setattr("realnvp.data.base.cache_limit_bytes", lambda: 4 * 16 - 1)
    dataset = load_dataset("folder", tmp_path, "train", valid_size=0)
    assert not dataset.cache
    pixels, _ = dataset.get_batch(torch.arange(4))
    assert len(dataset._cache) == 0 and pixels[:, 0, 0, 0].tolist() == [0, 1, 2, 3]


def test_content_digest_notices_images_replaced_by_as_many_others(tmp_path: Path) -> None:
    """The CRC-32 a resumed run compares: of the pixels, labels and positions in memory, of the
    files' names and sizes in a folder, of the members' names, sizes and CRCs in a zip."""
    from realnvp.data.base import ZipSource

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (20, 6, 6, 3), dtype=np.uint8), rng.integers(0, 3, 20)
    np.savez(tmp_path / "a.npz", x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])
    train = load_dataset("npz", tmp_path / "a.npz", "train")
    by_hand = zlib.crc32(train.source_indices.tobytes(), zlib.crc32(train.images.numpy()
                                                                      .tobytes()))
    assert train.content_digest() == f"{by_hand:08x}"
    assert train.labels_digest() == f"{zlib.crc32(train.labels.numpy().tobytes()):08x}"
    assert load_dataset("npz", tmp_path / "a.npz", "train").content_digest() == \
        train.content_digest()  # the same files: the same digest
    changed_pixel, changed_label = x.copy(), y.copy()
    changed_pixel[train.source_indices[3], 1, 2, 0] ^= 1
    changed_label[train.source_indices[5]] = (changed_label[train.source_indices[5]] + 1) % 3
    for name, (images, labels) in {"pixel": (changed_pixel, y),
                                   "label": (x, changed_label)}.items():
        np.savez(tmp_path / f"{name}.npz", x_train=images, y_train=labels, x_test=x[:2],
                 y_test=y[:2])
        other = load_dataset("npz", tmp_path / f"{name}.npz", "train")
        assert len(other) == len(train)
        assert (other.content_digest() != train.content_digest()) == (name == "pixel")
        assert (other.labels_digest() != train.labels_digest()) == (name == "label")

    for i in range(4):
        write_png(tmp_path / "folder" / f"{i}.png", np.full((4, 4), 10 * i, np.uint8))
    before = load_dataset("folder", tmp_path / "folder", "train", valid_size=0).content_digest()
    write_png(tmp_path / "folder" / "2.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    after = load_dataset("folder", tmp_path / "folder", "train", valid_size=0)
    assert len(after) == 4 and after.content_digest() != before
    write_png(tmp_path / "folder" / "2.png", np.full((4, 4), 20, np.uint8))  # as it was
    assert load_dataset("folder", tmp_path / "folder", "train",
                        valid_size=0).content_digest() == before

    members = {"a.bin": b"first member", "b.bin": b"other member"}
    for name, second in (("one.zip", b"other member"), ("two.zip", b"OTHER member")):
        with zipfile.ZipFile(tmp_path / name, "w") as archive:
            archive.writestr("a.bin", members["a.bin"])
            archive.writestr("b.bin", second)
    one, two = (ZipSource(tmp_path / n, ["a.bin", "b.bin"]).manifest()
                for n in ("one.zip", "two.zip"))
    assert one.decode().splitlines() == [f"{n}\t{len(b)}\t{zlib.crc32(b):08x}"
                                         for n, b in members.items()]
    assert one != two  # the same names and sizes, other bytes
    with pytest.raises(DatasetError, match=r"one.zip has no member 'c.bin' \(the archive "
                                           "changed since it was listed"):
        ZipSource(tmp_path / "one.zip", ["a.bin", "c.bin"]).manifest()
    (tmp_path / "bad.zip").write_bytes(b"not a zip archive")
    with pytest.raises(DatasetError, match="bad.zip: cannot read the archive's directory"):
        ZipSource(tmp_path / "bad.zip", ["a.bin"]).manifest()
