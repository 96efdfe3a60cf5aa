"""The built-in datasets: MNIST and Fashion-MNIST (idx files), CIFAR-10 and SVHN (torchvision's readers).

Each finds a local copy first (the folders of :func:`decorr.data.locate.search_roots`, then system
folders such as Debian's ``/usr/share/datasets/fashion-mnist``) and falls back to torchvision's downloader.
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from decorr.errors import DecorrError
from decorr.data.base import Augment, ImageDataset, ImageSplit, PathLike
from decorr.data.locate import DEFAULT_DOWNLOAD_ROOT, _candidate_folders, _download, _not_found, _short_error
from decorr.data.registry import DatasetLoader, register_dataset

__all__ = ["read_idx"]

# ----------------------------------------------------------------------------------------------
# MNIST-format idx files

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: PathLike) -> np.ndarray:
    """Read an idx file (the MNIST format), gzip-compressed or not, into a native-endian array."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DecorrError(f"{path} is a damaged gzip file ({err}); delete it and get it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DecorrError(
            f"{path} is not an idx file (bad magic number {raw[:4].hex()}); delete it and get it again"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DecorrError(f"{path} is truncated (no complete idx header); delete it and get it again")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise DecorrError(
            f"{path} holds {len(raw)} bytes but its idx header {shape} says {expected}; "
            "delete it and get it again"
        )
    # A writable copy in native byte order (torch.from_numpy warns on read-only buffers).
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


_IDX_PARTS = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}

#: The first ten training labels of the official files. MNIST and Fashion-MNIST share file names,
#: so a bare folder of idx files is checked not to be the *other* dataset.
_IDX_FINGERPRINTS = {
    "mnist": (5, 0, 4, 1, 9, 2, 1, 3, 1, 4),
    "fashion-mnist": (9, 0, 0, 3, 0, 2, 7, 2, 5, 5),
}


def _find_idx_files(folder: Path) -> dict[str, Path] | None:
    if not folder.is_dir():
        return None
    found: dict[str, Path] = {}
    for part, stems in _IDX_PARTS.items():
        # Uncompressed first: torchvision keeps both, and reading them skips the gunzip.
        candidates = [folder / (stem + suffix) for suffix in ("", ".gz") for stem in stems]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return None
        found[part] = path
    return found


def _load_idx_dataset(name: str, files: dict[str, Path], num_classes: int = 10) -> ImageDataset:
    splits = []
    for split in ("train", "test"):
        images = read_idx(files[f"{split}_images"])
        labels = read_idx(files[f"{split}_labels"])
        if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 or len(images) != len(labels):
            raise DecorrError(
                f"{files[f'{split}_images']} / {files[f'{split}_labels']}: expected uint8 images (N, H, W) "
                f"and N labels, got {images.dtype} {images.shape} and {labels.shape}; replace the files"
            )
        labels = torch.from_numpy(labels.astype(np.int64))
        splits.append(ImageSplit(torch.from_numpy(images).unsqueeze(1), labels))
    return ImageDataset(name, splits[0], splits[1], num_classes, source=str(files["train_images"].parent))


def _first_train_labels(files: dict[str, Path]) -> tuple[int, ...]:
    return tuple(int(v) for v in read_idx(files["train_labels"])[:10])


def _idx_loader(
    name: str, layouts: Sequence[str], system: Sequence[str], torchvision_class: str, how: str
) -> DatasetLoader:
    other = [k for k in _IDX_FINGERPRINTS if k != name]

    def loader(root: Path | None, *, download: bool = True) -> ImageDataset:
        folders = _candidate_folders(root, layouts, system)
        skipped = []
        for folder in folders:
            files = _find_idx_files(folder)
            if files is None:
                continue
            impostor = next((o for o in other if _first_train_labels(files) == _IDX_FINGERPRINTS[o]), None)
            if impostor is not None:
                skipped.append(f"{folder} holds {impostor}")
                continue
            return _load_idx_dataset(name, files)
        error = None
        if download:
            def fetch(download_root: Path) -> None:
                import torchvision.datasets

                dataset_class = getattr(torchvision.datasets, torchvision_class)
                dataset_class(str(download_root), train=True, download=True)

            error = _download(name, root, fetch, [f"{torchvision_class}/raw"])
            if error is None:
                download_root = Path(os.path.abspath(root if root is not None else DEFAULT_DOWNLOAD_ROOT))
                files = _find_idx_files(download_root / torchvision_class / "raw")
                if files is not None:
                    return _load_idx_dataset(name, files)
                error = "torchvision reported success but the files are not there"
        raise _not_found(name, folders, how, error, skipped)

    loader.__doc__ = f"{name}: MNIST-format idx files read with numpy; torchvision's {torchvision_class} downloads."
    return loader


register_dataset("mnist")(
    _idx_loader(
        "mnist",
        layouts=("MNIST/raw", "MNIST", "mnist/raw", "mnist", ""),
        system=(),
        torchvision_class="MNIST",
        how="run once with internet access (torchvision downloads it into ROOT/MNIST/raw)",
    )
)
register_dataset("fashion-mnist")(
    _idx_loader(
        "fashion-mnist",
        layouts=(
            "FashionMNIST/raw",
            "FashionMNIST",
            "fashion-mnist",
            "fashion_mnist",
            "fashion-mnist/data/fashion",  # a clone of zalandoresearch/fashion-mnist
            "",
        ),
        system=("/usr/share/datasets/fashion-mnist",),  # Debian's dataset-fashion-mnist package
        torchvision_class="FashionMNIST",
        how="apt-get install -y dataset-fashion-mnist (files go to /usr/share/datasets/fashion-mnist), "
        "or run once with internet access (torchvision downloads it into ROOT/FashionMNIST/raw)",
    )
)



# ----------------------------------------------------------------------------------------------
# CIFAR-10 and SVHN through torchvision's readers

_CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


@register_dataset("cifar10", augment=Augment(crop_padding=4, flip=True))
def _load_cifar10(root: Path | None, *, download: bool = True) -> ImageDataset:
    """CIFAR-10 from torchvision's ``cifar-10-batches-py`` folder (read by torchvision's own reader)."""
    layouts = ("cifar-10-batches-py", "CIFAR10/cifar-10-batches-py", "cifar10/cifar-10-batches-py")
    folders = _candidate_folders(root, layouts)
    for folder in folders:
        if all((folder / f).is_file() for f in _CIFAR10_FILES):
            return _read_cifar10(folder.parent)
    error = None
    if download:
        def fetch(download_root: Path) -> None:
            import torchvision.datasets

            torchvision.datasets.CIFAR10(str(download_root), train=True, download=True)

        error = _download("cifar10", root, fetch, [])
        if error is None:
            return _read_cifar10(Path(os.path.abspath(root if root is not None else DEFAULT_DOWNLOAD_ROOT)))
    how = ("run once with internet access (torchvision downloads it into ROOT/cifar-10-batches-py), or train on "
           "an .npz of CIFAR images with --dataset PATH.npz (e.g. the CIFAR-10 subset)")
    raise _not_found("cifar10", folders, how, error)


def _read_cifar10(parent: Path) -> ImageDataset:
    import torchvision.datasets

    splits = []
    for train in (True, False):
        try:
            data = torchvision.datasets.CIFAR10(str(parent), train=train, download=False)
        except RuntimeError as err:
            raise DecorrError(
                f"CIFAR-10 in {parent / 'cifar-10-batches-py'} is damaged ({_short_error(err)}); "
                "delete it and download again"
            ) from None
        images = torch.from_numpy(np.ascontiguousarray(data.data.transpose(0, 3, 1, 2)))
        splits.append(ImageSplit(images, torch.as_tensor(data.targets, dtype=torch.int64)))
    return ImageDataset("cifar10", splits[0], splits[1], 10, source=str(parent / "cifar-10-batches-py"))


# Horizontal flips would turn digits into mirror images that are not digits (and 2 and 5 into each
# other's look-alikes), so SVHN gets the crop only.
@register_dataset("svhn", augment=Augment(crop_padding=4, flip=False))
def _load_svhn(root: Path | None, *, download: bool = True) -> ImageDataset:
    """SVHN (train and test, without "extra") from torchvision's ``.mat`` files."""
    folders = _candidate_folders(root, ("", "SVHN", "svhn"))
    for folder in folders:
        if (folder / "train_32x32.mat").is_file() and (folder / "test_32x32.mat").is_file():
            return _read_svhn(folder)
    error = None
    if download:
        def fetch(download_root: Path) -> None:
            import torchvision.datasets

            for split in ("train", "test"):
                torchvision.datasets.SVHN(str(download_root), split=split, download=True)

        error = _download("svhn", root, fetch, [])
        if error is None:
            return _read_svhn(Path(os.path.abspath(root if root is not None else DEFAULT_DOWNLOAD_ROOT)))
    how = "run once with internet access (torchvision downloads train_32x32.mat and test_32x32.mat into ROOT)"
    raise _not_found("svhn", folders, how, error)


def _read_svhn(folder: Path) -> ImageDataset:
    import torchvision.datasets

    splits = []
    for split in ("train", "test"):
        try:
            data = torchvision.datasets.SVHN(str(folder), split=split, download=False)
        except RuntimeError as err:
            raise DecorrError(
                f"SVHN in {folder} is damaged ({_short_error(err)}); delete it and download again"
            ) from None
        images = torch.from_numpy(np.ascontiguousarray(data.data))  # torchvision already gives N, C, H, W
        splits.append(ImageSplit(images, torch.as_tensor(data.labels, dtype=torch.int64)))
    return ImageDataset("svhn", splits[0], splits[1], 10, source=str(folder))
