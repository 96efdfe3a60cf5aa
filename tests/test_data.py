"""Tests of decorr.data: idx files, finding datasets, npz files, deterministic sharded batches, augmentation."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from decorr import data
from decorr.data import builtin, locate
from decorr.data import (
    Augment,
    AugmentDraw,
    ImageDataset,
    ImageSplit,
    dataset_augment,
    iterate_batches,
    list_datasets,
    load_dataset,
    load_npz_dataset,
    num_batches,
    read_idx,
    register_dataset,
    to_float,
)
from decorr.errors import DecorrError

# CI clones the repository with shared/ beside it: <parent>/main (this repo) and <parent>/shared/data.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_RAW = SHARED_DATA / "MNIST" / "raw"
CIFAR_SUBSET = SHARED_DATA / "cifar10-subset" / "cifar10_subset.npz"
FASHION_SYSTEM = Path("/usr/share/datasets/fashion-mnist")

# Official class counts (published with the datasets).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def require(path: Path, how: str) -> Path:
    """Test data must be there: a missing file fails the test with the reason, never skips it."""
    assert path.exists(), f"test data missing: {path} ({how})"
    return path


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $DECORR_DATA_ROOT and a working directory whose ./data is empty."""
    monkeypatch.delenv(data.DATA_ROOT_ENV, raising=False)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return tmp_path


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    big_endian = array.astype(array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype)
    header = bytes([0, 0, codes[big_endian.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + big_endian.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_tiny_mnist(
    folder: Path, first_labels: list[int] | None = None, compress: bool = True
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 12).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 5).astype(np.uint8),
    }
    if first_labels is not None:
        arrays["train-labels-idx1-ubyte"][: len(first_labels)] = first_labels
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        write_idx(folder / (stem + (".gz" if compress else "")), array, compress)
    return arrays


# ---------------------------------------------------------------------------------------------- idx


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_matches_written_arrays(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "images", images, compress)
    out = read_idx(tmp_path / "images")
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, images)
    assert out.flags.writeable  # torch.from_numpy warns on read-only arrays

    # Multi-byte types are big-endian in idx files and come back in native order.
    ints = np.array([[1, -2, 70000], [2**31 - 1, 0, -(2**31)]], dtype=np.int32)
    write_idx(tmp_path / "ints", ints, compress)
    out = read_idx(tmp_path / "ints")
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, ints)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "notidx").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(DecorrError, match="bad magic number"):
        read_idx(tmp_path / "notidx")
    write_idx(tmp_path / "short", np.zeros((3, 4), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(DecorrError, match="delete it"):
        read_idx(tmp_path / "short")


# ------------------------------------------------------------------------------- finding datasets


@pytest.mark.parametrize("layout", ["MNIST/raw", "mnist", ""])
def test_tiny_mnist_found_in_each_layout(isolated, layout):
    root = isolated / "root"
    arrays = write_tiny_mnist(root / layout if layout else root, compress=(layout != "mnist"))
    ds = load_dataset("mnist", root, download=False)
    assert ds.name == "mnist" and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    np.testing.assert_array_equal(ds.train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_search_order_root_then_env_then_cwd_data(isolated, monkeypatch):
    explicit, env_a, env_b = isolated / "explicit", isolated / "env_a", isolated / "env_b"
    write_tiny_mnist(env_b / "MNIST" / "raw")
    write_tiny_mnist(isolated / "cwd" / "data" / "MNIST" / "raw")
    monkeypatch.setenv(data.DATA_ROOT_ENV, os.pathsep.join([str(env_a), str(env_b)]))
    assert load_dataset("mnist", download=False).source == str(env_b / "MNIST" / "raw")
    write_tiny_mnist(explicit / "mnist")
    assert load_dataset("mnist", explicit, download=False).source == str(explicit / "mnist")
    monkeypatch.delenv(data.DATA_ROOT_ENV)
    assert load_dataset("mnist", download=False).source == str(isolated / "cwd" / "data" / "MNIST" / "raw")


def test_bare_folder_of_the_other_dataset_is_not_taken(isolated):
    # MNIST and Fashion-MNIST share file names; a bare folder holding Fashion-MNIST is not MNIST.
    root = isolated / "root"
    write_tiny_mnist(root, first_labels=[9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
    with pytest.raises(DecorrError, match="holds fashion-mnist"):
        load_dataset("mnist", root, download=False)
    assert load_dataset("fashion-mnist", root, download=False).source == str(root)


def test_missing_dataset_lists_every_folder(isolated, monkeypatch):
    env_root = isolated / "env"
    monkeypatch.setenv(data.DATA_ROOT_ENV, str(env_root))
    root = isolated / "empty"
    with pytest.raises(DecorrError) as info:
        load_dataset("mnist", root, download=False)
    message = str(info.value)
    assert "\n" not in message
    expected = [root / "MNIST" / "raw", root / "mnist", root, env_root / "MNIST" / "raw", isolated / "cwd" / "data"]
    for folder in expected:
        assert str(folder) in message
    assert "--data-root" in message and data.DATA_ROOT_ENV in message

    with pytest.raises(DecorrError) as info:
        load_dataset("cifar10", root, download=False)
    assert str(root / "cifar-10-batches-py") in str(info.value)
    with pytest.raises(DecorrError) as info:
        load_dataset("svhn", root, download=False)
    assert str(root / "SVHN") in str(info.value)


def test_fashion_mnist_error_names_the_debian_package(isolated, monkeypatch):
    # Hide the system folder so that the error is raised even where the package is installed.
    real_candidates = locate._candidate_folders
    without_system = lambda root, layouts, system=(): real_candidates(root, layouts)  # noqa: E731
    monkeypatch.setattr(builtin, "_candidate_folders", without_system)
    with pytest.raises(DecorrError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist", isolated / "empty", download=False)


def test_failed_download_leaves_no_empty_folders(tmp_path):
    def fetch(download_root: Path) -> None:
        (download_root / "MNIST" / "raw").mkdir(parents=True)
        raise OSError("no network")

    (tmp_path / "kept").mkdir()
    error = locate._download("mnist", tmp_path / "dl", fetch, ["MNIST/raw"])
    assert error is not None and "no network" in error
    assert not (tmp_path / "dl").exists() and (tmp_path / "kept").exists()


def test_unknown_dataset_and_missing_npz(isolated):
    with pytest.raises(DecorrError, match="choose one of"):
        load_dataset("imagenet-9000", download=False)
    with pytest.raises(DecorrError, match="not found"):
        load_dataset("nope.npz", isolated / "empty")


# ---------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def mnist() -> ImageDataset:
    require(MNIST_RAW / "train-images-idx3-ubyte.gz", "the official MNIST files in shared/data/MNIST/raw")
    return load_dataset("mnist", SHARED_DATA, download=False)


def test_real_mnist(mnist):
    assert mnist.source == str(MNIST_RAW)
    assert mnist.train.images.shape == (60000, 1, 28, 28) and mnist.test.images.shape == (10000, 1, 28, 28)
    assert mnist.train.images.dtype == torch.uint8 and mnist.test.labels.dtype == torch.int64
    assert torch.bincount(mnist.train.labels).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(mnist.test.labels).tolist() == MNIST_TEST_COUNTS
    assert mnist.train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert int(mnist.train.images.max()) == 255 and int(mnist.train.images.min()) == 0
    # The widely used normalisation constants of MNIST: mean 0.1307, std 0.3081 of the training pixels.
    pixels = to_float(mnist.train.images).double()
    assert abs(pixels.mean().item() - 0.1307) < 1e-4 and abs(pixels.std().item() - 0.3081) < 1e-4


def test_real_fashion_mnist_from_system_folder(isolated):
    require(FASHION_SYSTEM / "train-images-idx3-ubyte.gz", "apt-get install -y dataset-fashion-mnist")
    ds = load_dataset("fashion-mnist", download=False)
    assert ds.source == str(FASHION_SYSTEM)
    assert ds.train.images.shape == (60000, 1, 28, 28) and ds.test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.train.labels).tolist() == [6000] * 10
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10
    assert ds.train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]


def test_cifar_subset_npz():
    path = require(CIFAR_SUBSET, "the CIFAR-10 subset in shared/data/cifar10-subset")
    ds = load_dataset(str(path))
    raw = np.load(path, allow_pickle=False)
    assert ds.name == "cifar10_subset" and ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    assert ds.train.images.shape == (8068, 3, 32, 32) and len(ds.test) == 1017
    np.testing.assert_array_equal(ds.train.images.permute(0, 2, 3, 1).numpy(), raw["x_train"])
    np.testing.assert_array_equal(ds.test.labels.numpy(), raw["y_test"])
    assert dataset_augment(ds) == Augment(crop_padding=4, flip=True)
    assert dataset_augment(str(path)) == Augment(crop_padding=4, flip=True)


def test_npz_found_relative_to_data_root():
    require(CIFAR_SUBSET, "the CIFAR-10 subset in shared/data/cifar10-subset")
    ds = load_dataset("cifar10-subset/cifar10_subset.npz", SHARED_DATA)
    assert ds.source == str(CIFAR_SUBSET)


# -------------------------------------------------------------------------------------------- npz


def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (7, 5, 6), dtype=np.uint8)
    labels = np.arange(7) % 3
    np.savez(tmp_path / "gray.npz", x_train=gray, y_train=labels, x_test=gray[:2], y_test=np.array([[0], [4]]))
    ds = load_npz_dataset(tmp_path / "gray.npz")
    assert ds.input_shape == (1, 5, 6) and ds.num_classes == 5 and ds.name == "gray"
    np.testing.assert_array_equal(ds.train.images[:, 0].numpy(), gray)
    assert ds.test.labels.tolist() == [0, 4] and ds.test.labels.dtype == torch.int64
    assert dataset_augment(ds) is None

    nchw = rng.integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    np.savez(
        tmp_path / "nchw.npz",
        x_train=nchw, y_train=np.zeros(4, np.int32), x_test=nchw, y_test=np.ones(4, np.uint8), num_classes=10,
    )
    ds = load_dataset(str(tmp_path / "nchw.npz"))
    assert ds.num_classes == 10 and torch.equal(ds.train.images, torch.from_numpy(nchw))


def test_npz_errors(tmp_path):
    x = np.zeros((2, 4, 4), np.float32)
    np.savez(tmp_path / "float.npz", x_train=x, y_train=np.zeros(2, int), x_test=x, y_test=np.zeros(2, int))
    with pytest.raises(DecorrError, match="uint8"):
        load_npz_dataset(tmp_path / "float.npz")
    np.savez(tmp_path / "partial.npz", x_train=x.astype(np.uint8))
    with pytest.raises(DecorrError, match="lacks y_train, x_test, y_test"):
        load_npz_dataset(tmp_path / "partial.npz")
    x8 = np.zeros((2, 4, 4), np.uint8)
    np.savez(tmp_path / "count.npz", x_train=x8, y_train=np.zeros(3, int), x_test=x8, y_test=np.zeros(2, int))
    with pytest.raises(DecorrError, match="expected 2 integer labels"):
        load_npz_dataset(tmp_path / "count.npz")


# -------------------------------------------------------------------------------- types and registry


def small_split(n: int = 10, shape=(3, 6, 5)) -> ImageSplit:
    images = torch.arange(n * int(np.prod(shape)), dtype=torch.int64).remainder(256).to(torch.uint8)
    return ImageSplit(images.view(n, *shape), torch.arange(n))


def test_split_subset_and_dataset_subset():
    split = small_split()
    assert len(split.subset(4)) == 4 and torch.equal(split.subset(4).labels, torch.arange(4))
    picked = split.subset([7, 2])
    assert picked.labels.tolist() == [7, 2] and torch.equal(picked.images[0], split.images[7])
    with pytest.raises(DecorrError):
        split.subset(11)
    ds = ImageDataset("tiny", split, small_split(6), 10)
    small = ds.subset(train=3)
    assert (len(small.train), len(small.test)) == (3, 6) and small.input_shape == (3, 6, 5)
    with pytest.raises(ValueError):
        ImageSplit(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))  # float images


def test_to_float_is_exact_and_in_unit_range():
    images = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_float(images)
    assert x.dtype == torch.float32
    assert torch.equal(x.flatten(), torch.arange(256, dtype=torch.float32) / 255)
    with pytest.raises(TypeError):
        to_float(x)


def test_register_custom_dataset():
    @register_dataset("tiny-test-set", augment=Augment(crop_padding=1))
    def tiny(root, *, download=True):
        return ImageDataset("tiny-test-set", small_split(), small_split(4), 10, source=str(root))

    try:
        assert "tiny-test-set" in list_datasets()
        ds = load_dataset("tiny-test-set", "/somewhere")
        assert len(ds.train) == 10 and ds.source == "/somewhere"
        assert dataset_augment("tiny-test-set") == Augment(crop_padding=1)
    finally:
        data.registry._DATASETS.pop("tiny-test-set")


def test_builtin_registry_and_default_augmentation():
    assert {"mnist", "fashion-mnist", "cifar10", "svhn"} <= set(list_datasets())
    assert dataset_augment("mnist") is None and dataset_augment("fashion_mnist") is None
    assert dataset_augment("cifar10") == Augment(crop_padding=4, flip=True)
    assert dataset_augment("svhn") == Augment(crop_padding=4, flip=False)


# ------------------------------------------------------------------------------------------ batches


def collect(split, batch_size, **kwargs):
    return list(iterate_batches(split, batch_size, **kwargs))


def test_num_batches():
    assert num_batches(10, 3) == 4 and num_batches(10, 3, drop_last=True) == 3 and num_batches(9, 3) == 3
    assert len(collect(small_split(10), 3, drop_last=True)) == 3
    with pytest.raises(DecorrError):
        num_batches(10, 0)


def test_batches_are_deterministic_per_seed_and_epoch():
    split = small_split(50)
    first = collect(split, 8, seed=3, epoch=2)
    again = collect(split, 8, seed=3, epoch=2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    labels = torch.cat([y for _, y in first])
    assert sorted(labels.tolist()) == list(range(50))  # each sample once per epoch
    assert not torch.equal(labels, torch.cat([y for _, y in collect(split, 8, seed=3, epoch=3)]))
    assert not torch.equal(labels, torch.cat([y for _, y in collect(split, 8, seed=4, epoch=2)]))
    in_order = torch.cat([y for _, y in collect(split, 8, shuffle=False)])
    assert torch.equal(in_order, torch.arange(50))
    # The images travel with their labels.
    x, y = first[0]
    assert torch.equal(x, to_float(split.images[y]))


@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_concatenate_to_the_global_batch(world_size):
    split = small_split(23, shape=(3, 8, 8))
    kwargs = dict(seed=1, epoch=5, augment=Augment(crop_padding=2, flip=True))
    whole = collect(split, 10, **kwargs)
    shards = [collect(split, 10, shard=(rank, world_size), **kwargs) for rank in range(world_size)]
    assert all(len(s) == len(whole) for s in shards)
    for b, (x, y) in enumerate(whole):
        parts = [shards[rank][b] for rank in range(world_size)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert [len(p[1]) for p in parts] == [len(t) for t in torch.tensor_split(y, world_size)]
    # The augmentation did change the images.
    plain = collect(split, 10, seed=1, epoch=5)
    assert not torch.equal(whole[0][0], plain[0][0]) and torch.equal(whole[0][1], plain[0][1])


# ------------------------------------------------------------------------------------- augmentation


def test_crop_equals_pad_and_slice_for_fixed_offsets():
    x = torch.rand(3, 2, 6, 7)
    augment = Augment(crop_padding=2)
    offsets = torch.tensor([[0, 4], [2, 2], [4, 1]])
    out = augment.apply(x, AugmentDraw(offsets, torch.zeros(3, dtype=torch.bool)))
    padded = F.pad(x, (2, 2, 2, 2))
    for k, (dy, dx) in enumerate(offsets.tolist()):
        assert torch.equal(out[k], padded[k, :, dy : dy + 6, dx : dx + 7])
    assert torch.equal(out[1], x[1])  # the centre offset is the identity
    assert torch.equal(out[0, :, 2:, :5], x[0, :, :4, 2:]) and out[0, :, :2].abs().sum() == 0


def test_flip_and_drawn_augmentation_match_hand_computation():
    x = torch.rand(64, 3, 8, 8)
    flip_only = Augment(flip=True)
    flips = torch.tensor([True, False] * 32)
    out = flip_only.apply(x, AugmentDraw(torch.zeros(64, 2, dtype=torch.int64), flips))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])

    augment = Augment(crop_padding=4, flip=True)
    draw = augment.draw(64, torch.Generator().manual_seed(7))
    out = augment(x, torch.Generator().manual_seed(7))  # same generator state -> same draw
    padded = F.pad(x, (4, 4, 4, 4))
    for k in range(64):
        dy, dx = draw.offsets[k].tolist()
        expected = padded[k, :, dy : dy + 8, dx : dx + 8]
        assert torch.equal(out[k], expected.flip(-1) if draw.flips[k] else expected)
    assert 0 < int(draw.flips.sum()) < 64 and draw.offsets.min() >= 0 and draw.offsets.max() <= 8
    assert len(set(map(tuple, draw.offsets.tolist()))) > 10  # every sample its own offset


def test_augmented_batches_stay_in_unit_range():
    split = small_split(40, shape=(3, 8, 8))
    for x, _ in iterate_batches(split, 16, augment=Augment(crop_padding=3, flip=True)):
        assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_on_cuda_equal_cpu_batches():
    split = small_split(30, shape=(3, 8, 8))
    kwargs = dict(seed=2, epoch=1, augment=Augment(crop_padding=2, flip=True))
    for (xc, yc), (xg, yg) in zip(collect(split, 8, **kwargs), collect(split, 8, device="cuda", **kwargs)):
        assert xg.is_cuda and torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)
    on_gpu = split.to("cuda")
    for (xc, _), (xg, _) in zip(collect(split, 8, **kwargs), collect(on_gpu, 8, **kwargs)):
        assert torch.equal(xg.cpu(), xc)
