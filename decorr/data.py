"""Datasets as uint8 tensors in memory, float batches made on the fly, whole-batch augmentation.

``load_dataset(name)`` finds a dataset in the folders people actually keep it in (no network needed),
falls back to torchvision's downloader, and otherwise raises one :class:`DecorrError` listing every
folder it looked in. ``iterate_batches`` draws every batch from a generator seeded by ``(seed, epoch)``:
a resumed run sees the very batches an uninterrupted one would, and each of N processes takes its
contiguous shard of the same global batch (augmentation included), so N processes see what one does.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import socket
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import torch
import torch.nn.functional as F

from decorr.errors import DecorrError

__all__ = [
    "Augment",
    "AugmentDraw",
    "DATA_ROOT_ENV",
    "ImageDataset",
    "ImageSplit",
    "dataset_augment",
    "epoch_generator",
    "iterate_batches",
    "list_datasets",
    "load_dataset",
    "load_npz_dataset",
    "num_batches",
    "read_idx",
    "register_dataset",
    "require_training_images",
    "search_roots",
    "to_float",
]

PathLike = Union[str, os.PathLike]

#: Environment variable with extra data folders (``os.pathsep``-separated), searched after ``root``.
DATA_ROOT_ENV = "DECORR_DATA_ROOT"
#: torchvision's usual download root, relative to the working directory.
DEFAULT_DOWNLOAD_ROOT = Path("data")
#: Per-operation socket timeout around a download attempt, so that an offline machine whose network
#: drops packets (rather than failing DNS at once) does not hang; generous enough for real downloads.
DOWNLOAD_SOCKET_TIMEOUT_S = 20.0


# ----------------------------------------------------------------------------------------------
# Data types


@dataclass(repr=False)
class ImageSplit:
    """One split of a dataset: ``images`` uint8 (N, C, H, W) and ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dim() != 1 or self.labels.dtype.is_floating_point or self.labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be integers of shape (N,), got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        self.labels = self.labels.to(torch.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        shape = tuple(self.images.shape[1:])
        return f"ImageSplit(n={len(self)}, image_shape={shape}, device={self.images.device})"

    def subset(self, indices_or_n: int | Sequence[int] | np.ndarray | torch.Tensor) -> ImageSplit:
        """The first ``n`` samples (an int), or the samples at the given indices."""
        if isinstance(indices_or_n, (int, np.integer)):
            n = int(indices_or_n)
            if not 0 <= n <= len(self):
                raise DecorrError(
                    f"asked for the first {n} samples of a split of {len(self)}; use 0..{len(self)}"
                )
            return ImageSplit(self.images[:n], self.labels[:n])
        index = indices_or_n if torch.is_tensor(indices_or_n) else torch.as_tensor(np.asarray(indices_or_n))
        if index.dtype == torch.bool or index.dtype.is_floating_point or index.dim() != 1:
            raise ValueError(
                f"indices must be a 1-D sequence of integers, got {index.dtype} {tuple(index.shape)}"
            )
        index = index.to(torch.int64)
        if len(index) and (index.min() < -len(self) or index.max() >= len(self)):
            raise DecorrError(f"sample indices out of range for a split of {len(self)} samples")
        index = index.to(self.images.device)
        return ImageSplit(self.images[index], self.labels[index])

    def to(self, device: torch.device | str) -> ImageSplit:
        """The same split on ``device`` (e.g. to keep a small dataset on the GPU)."""
        return ImageSplit(self.images.to(device), self.labels.to(device))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image (a streamed split, ``decorr.datasets.StreamedSplit``, has it too)."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 images and labels in order, ``batch_size`` at a time (as a streamed split gives them)."""
        for start in range(0, len(self.labels), batch_size):
            yield self.images[start : start + batch_size], self.labels[start : start + batch_size]


@dataclass(repr=False)
class ImageDataset:
    """A named dataset: train and test splits of uint8 images and int64 labels."""

    name: str
    train: ImageSplit
    test: ImageSplit
    num_classes: int
    #: Where it was read from (a folder or file), for logs and reports.
    source: str = ""

    def __post_init__(self) -> None:
        if self.train.image_shape != self.test.image_shape:
            raise ValueError(
                f"train images {self.train.image_shape} and test images {self.test.image_shape} differ in shape"
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return self.test.image_shape

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, train={len(self.train)}, test={len(self.test)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes}, source={self.source!r})"
        )

    def subset(self, train: int | None = None, test: int | None = None) -> ImageDataset:
        """The first ``train`` training and first ``test`` test samples (None keeps a split whole)."""
        return ImageDataset(
            self.name,
            self.train if train is None else self.train.subset(train),
            self.test if test is None else self.test.subset(test),
            self.num_classes,
            self.source,
        )


def require_training_images(dataset: ImageDataset) -> None:
    """One-line DecorrError when ``dataset`` has no training split (an image folder is evaluation data)."""
    if len(dataset.train) == 0:
        raise DecorrError(
            f"dataset {dataset.name!r} ({dataset.source}) has no training images: an image folder is evaluation "
            "data (its images are the test split); train on a registered dataset or an .npz with x_train, y_train"
        )


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, got {images.dtype}")
    return images.to(torch.float32).div_(255.0)


# ----------------------------------------------------------------------------------------------
# Augmentation on whole batches


@dataclass(frozen=True)
class AugmentDraw:
    """The random choices for a batch: crop ``offsets`` (N, 2) as (dy, dx) into the zero-padded
    image, in [0, 2 * padding], and horizontal ``flips`` (N,) bool. Index it to take a shard."""

    offsets: torch.Tensor
    flips: torch.Tensor

    def __len__(self) -> int:
        return len(self.flips)

    def __getitem__(self, index: slice | torch.Tensor) -> AugmentDraw:
        return AugmentDraw(self.offsets[index], self.flips[index])


@dataclass(frozen=True)
class Augment:
    """Random crop after zero padding and random horizontal flip (p = 0.5), on a whole float batch.

    ``draw`` takes the random choices for a batch from a generator and ``apply`` uses them, so that a
    process can draw for the global batch and apply only its shard's part.
    """

    crop_padding: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise DecorrError(f"crop padding must be >= 0, got {self.crop_padding}")

    def draw(self, n: int, generator: torch.Generator | None = None) -> AugmentDraw:
        # Only what is enabled consumes the generator; the order of the draws is fixed.
        p = self.crop_padding
        if p > 0:
            offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=generator)
        else:
            offsets = torch.full((n, 2), 0, dtype=torch.int64)
        if self.flip:
            flips = torch.rand(n, generator=generator) < 0.5
        else:
            flips = torch.zeros(n, dtype=torch.bool)
        return AugmentDraw(offsets, flips)

    def apply(self, x: torch.Tensor, draw: AugmentDraw) -> torch.Tensor:
        """Crop and flip the float batch ``x`` (N, C, H, W) as ``draw`` says."""
        if len(draw) != len(x):
            raise ValueError(f"draw for {len(draw)} samples applied to a batch of {len(x)}")
        if self.crop_padding == 0 and not self.flip:
            return x
        n, c, h, w = x.shape
        p = self.crop_padding
        offsets = draw.offsets.to(x.device)
        flips = draw.flips.to(x.device)
        # Output pixel (i, j) of sample k reads padded pixel (i + dy_k, j + dx_k); a flip reverses
        # the column order, so crop and flip are one gather from the flattened padded batch (several
        # times faster than advanced indexing with four index tensors).
        rows = torch.arange(h, device=x.device) + offsets[:, :1]  # (N, H)
        cols = torch.arange(w, device=x.device) + offsets[:, 1:]  # (N, W)
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        padded = F.pad(x, (p, p, p, p)) if p > 0 else x
        flat_index = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
        return padded.flatten(2).gather(2, flat_index).view(n, c, h, w)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(x, self.draw(len(x), generator))


# ----------------------------------------------------------------------------------------------
# Deterministic, sharded batches


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, epoch)``; distinct pairs give unrelated streams."""
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def num_batches(num_samples: int, batch_size: int, drop_last: bool = False) -> int:
    """How many (global) batches ``iterate_batches`` yields for a split of ``num_samples``."""
    if batch_size <= 0:
        raise DecorrError(f"batch size must be positive, got {batch_size}")
    return num_samples // batch_size if drop_last else math.ceil(num_samples / batch_size)


def last_batch_too_small(num_samples: int, batch_size: int, minimum: int) -> bool:
    """Whether an epoch's last, partial batch has fewer than ``minimum`` samples (and is to be dropped)."""
    remainder = num_samples % batch_size
    return 0 < remainder < minimum


def iterate_batches(
    split: ImageSplit,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    augment: Augment | None = None,
    shard: tuple[int, int] = (0, 1),
    device: torch.device | str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Float batches in [0, 1] and int64 labels of one epoch.

    ``batch_size`` is the global batch. The order and the augmentation come from
    ``epoch_generator(seed, epoch)`` and are drawn for the whole global batch; process ``rank`` of
    ``world_size`` (``shard``) then yields its contiguous part (``torch.tensor_split``: sizes differ
    by at most one; a rank may get an empty part of a last batch smaller than ``world_size``).
    """
    rank, world_size = shard
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    n = len(split)
    count = num_batches(n, batch_size, drop_last)
    generator = epoch_generator(seed, epoch)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for b in range(count):
        index = order[b * batch_size : (b + 1) * batch_size]
        draw = augment.draw(len(index), generator) if augment is not None else None
        start, stop = _shard_bounds(len(index), rank, world_size)
        index = index[start:stop]
        if split.images.device.type != "cpu":
            index = index.to(split.images.device)
        images = split.images[index]
        labels = split.labels[index]
        if device is not None:
            images = images.to(device)
            labels = labels.to(device)
        x = to_float(images)
        if augment is not None:
            x = augment.apply(x, draw[start:stop])
        yield x, labels


def _shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    # The same split as torch.tensor_split(range(n), world_size): the first n % world_size parts
    # hold one extra sample.
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# ----------------------------------------------------------------------------------------------
# Registry


#: A dataset loader: ``loader(root, download=...)``, ``root`` a Path or None.
DatasetLoader = Callable[..., ImageDataset]


@dataclass(frozen=True)
class _DatasetEntry:
    loader: DatasetLoader
    augment: Augment | None


_DATASETS: dict[str, _DatasetEntry] = {}


def register_dataset(
    name: str, *, augment: Augment | None = None
) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator registering ``loader(root: Path | None, *, download: bool) -> ImageDataset``.

    ``augment`` is the dataset's default training augmentation (see :func:`dataset_augment`). A loader
    can use :func:`search_roots` to look where the built-in datasets look.
    """

    def decorator(loader: DatasetLoader) -> DatasetLoader:
        if name in _DATASETS and _DATASETS[name].loader is not loader:
            raise ValueError(f"dataset {name!r} is registered twice")
        _DATASETS[name] = _DatasetEntry(loader, augment)
        return loader

    return decorator


def list_datasets() -> list[str]:
    """Registered dataset names (any ``.npz`` file path is accepted by :func:`load_dataset` too)."""
    return sorted(_DATASETS)


def _registered_name(name: str) -> str | None:
    if name in _DATASETS:
        return name
    normalised = name.lower().replace("_", "-")
    return normalised if normalised in _DATASETS else None


def load_dataset(name: str, root: PathLike | None = None, *, download: bool = True,
                 **folder_options: Any) -> ImageDataset:
    """Load a registered dataset (``list_datasets()``), a ``.npz`` file, or an image folder.

    A folder (or a labels ``.csv``/``.tsv``) is read by :func:`decorr.datasets.load_image_folder`, which
    takes ``folder_options`` (``image_size``, ``resize``, ``class_map``, ``label_offset``,
    ``memory_budget_mb``, ``workers``); its images are the test split, the train split is empty.

    Local copies are found in ``root``, then the folders in ``$DECORR_DATA_ROOT``, then ``./data``, then
    system folders. If none is found and ``download`` is true, torchvision downloads it into
    ``root or ./data``. Otherwise a :class:`DecorrError` lists the folders searched and how to get it.
    With several processes, let the main process load (download) first, e.g. inside accelerate's
    ``main_process_first()``, so that they do not download into the same folder at once.
    """
    key = _registered_name(name)
    folder = None if key is not None else _find_folder(name, root)
    if folder is not None:
        from decorr.datasets.folder import load_image_folder

        return load_image_folder(folder, **folder_options)
    given = sorted(k for k, v in folder_options.items() if v not in (None, 0))
    if given:
        raise DecorrError(f"{', '.join('--' + k.replace('_', '-') for k in given)} only apply to image folders; "
                          f"{name!r} is not a folder (nor a .csv/.tsv labels file)")
    if key is not None:
        dataset = _DATASETS[key].loader(None if root is None else Path(root), download=download)
        if not isinstance(dataset, ImageDataset):
            raise TypeError(
                f"the loader of dataset {key!r} returned {type(dataset).__name__}, not ImageDataset"
            )
        return dataset
    if name.endswith(".npz"):
        return load_npz_dataset(_find_npz(name, root))
    raise DecorrError(
        f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}, or give the path of a .npz "
        "file with x_train, y_train, x_test, y_test, or of an image folder"
    )


def _find_folder(name: str, root: PathLike | None) -> Path | None:
    from decorr.datasets.folder import is_image_dataset

    path = Path(os.path.expanduser(name))
    candidates = [path] + ([r / path for r in search_roots(root)] if not path.is_absolute() else [])
    return next((p for p in candidates if is_image_dataset(p)), None)


def dataset_augment(dataset: str | ImageDataset) -> Augment | None:
    """The default training augmentation of a dataset (a name, a ``.npz`` path, or a loaded dataset).

    Registered datasets say theirs (MNIST-like: none; CIFAR-10: crop pad 4 + flip). Others are judged
    by their images: colour images get crop (pad H/8) + flip, grayscale ones nothing.
    """
    if isinstance(dataset, ImageDataset):
        key = _registered_name(dataset.name)
        if key is not None:
            return _DATASETS[key].augment
        return _augment_for_shape(dataset.input_shape)
    key = _registered_name(dataset)
    if key is not None:
        return _DATASETS[key].augment
    if dataset.endswith(".npz"):
        return _augment_for_shape(_npz_image_shape(_find_npz(dataset, None)))
    raise DecorrError(
        f"unknown dataset {dataset!r}; choose one of: {', '.join(list_datasets())}, or a .npz path"
    )


def _augment_for_shape(shape: tuple[int, int, int]) -> Augment | None:
    c, h, w = shape
    if c == 1:
        return None
    return Augment(crop_padding=max(1, round(min(h, w) / 8)), flip=True)


# ----------------------------------------------------------------------------------------------
# Where data lives


def search_roots(root: PathLike | None = None) -> list[Path]:
    """The data roots searched, in order: ``root``, ``$DECORR_DATA_ROOT`` entries, ``./data``."""
    roots: list[Path] = []
    if root is not None:
        roots.append(Path(root))
    roots += [Path(p) for p in os.environ.get(DATA_ROOT_ENV, "").split(os.pathsep) if p.strip()]
    roots.append(DEFAULT_DOWNLOAD_ROOT)
    return _unique([Path(os.path.abspath(os.path.expanduser(r))) for r in roots])


def _unique(paths: list[Path]) -> list[Path]:
    return list(dict.fromkeys(paths))  # first occurrence wins, order kept


def _candidate_folders(
    root: PathLike | None, layouts: Sequence[str], system: Sequence[str] = ()
) -> list[Path]:
    folders = [r / layout if layout else r for r in search_roots(root) for layout in layouts]
    return _unique(folders + [Path(s) for s in system])


def _not_found(
    name: str, looked_in: Sequence[Path], how: str, download_error: str | None, skipped: Sequence[str] = ()
) -> DecorrError:
    attempt = f"; the download failed ({download_error})" if download_error else ""
    ignored = f" (ignored: {'; '.join(skipped)})" if skipped else ""
    return DecorrError(
        f"dataset {name!r} not found; looked in: {', '.join(map(str, looked_in))}{ignored}{attempt}; "
        f"to get it: {how}, "
        f"or point --data-root DIR / ${DATA_ROOT_ENV} (or root=) at a folder that holds it"
    )


def _short_error(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "no message"
    text = f"{type(err).__name__}: {text}"
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def _download_lock(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock for downloads into ``folder``, shared by the processes of this host.

    The lock file lives in the temporary folder, not in ``folder``, so that a failed download still
    leaves the data folder as it was.
    """
    import fcntl
    import hashlib
    import tempfile

    key = hashlib.sha1(str(folder).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"decorr-download-{key}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download(
    name: str, root: PathLike | None, fetch: Callable[[Path], None], created: Sequence[str]
) -> str | None:
    """Run torchvision's downloader ``fetch(download_root)``; return None, or why it failed.

    One process at a time: a file lock in the download root makes the processes of a data-parallel
    run (or two runs) that all miss the data wait while the first downloads and extracts; the others
    then find the files (torchvision's downloaders verify and skip what is already there).
    On failure, the empty folders the attempt created (``created``, relative to the download root)
    are removed again, so that an offline attempt leaves no litter in ``./data``.
    """
    download_root = Path(os.path.abspath(root if root is not None else DEFAULT_DOWNLOAD_ROOT))
    folders = [download_root] + [download_root / c for c in created]
    for c in created:
        parts = Path(c).parts
        folders += [download_root.joinpath(*parts[:i]) for i in range(1, len(parts))]
    new_folders = sorted({f for f in folders if not f.exists()}, key=lambda f: len(f.parts), reverse=True)
    previous_timeout = socket.getdefaulttimeout()
    try:
        if previous_timeout is None:
            socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
        with _download_lock(download_root):
            fetch(download_root)
        return None
    except Exception as err:  # noqa: BLE001 - URLError, RuntimeError, OSError, timeouts: all "no data"
        for folder in new_folders:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when empty
        return _short_error(err)
    finally:
        socket.setdefaulttimeout(previous_timeout)


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


# ----------------------------------------------------------------------------------------------
# .npz files

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_CHANNELS = (1, 3, 4)


def _find_npz(name: PathLike, root: PathLike | None) -> Path:
    path = Path(os.path.expanduser(name))
    if path.is_file():
        return path
    looked_in = [path.absolute()]
    if not path.is_absolute():
        for r in search_roots(root):
            if (r / path).is_file():
                return r / path
            looked_in.append(r / path)
    raise DecorrError(
        f"dataset file {str(name)!r} not found; looked for: {', '.join(map(str, _unique(looked_in)))}; "
        f"give an existing .npz path, or point --data-root DIR / ${DATA_ROOT_ENV} at the folder that holds it"
    )


def _images_to_nchw(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise DecorrError(
            f"{path}: {key} is {x.dtype}, expected uint8 pixels 0..255; "
            "save (x * 255).round().astype(np.uint8)"
        )
    if x.ndim == 3:  # N, H, W grayscale
        return x[:, None]
    if x.ndim == 4:
        hwc = x.shape[3] in _CHANNELS
        chw = x.shape[1] in _CHANNELS
        if hwc and chw:  # e.g. (N, 3, 3, 3): decide by square images
            hwc, chw = x.shape[1] == x.shape[2], x.shape[2] == x.shape[3]
        if hwc != chw:
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if hwc else x
    raise DecorrError(
        f"{path}: {key} has shape {x.shape}; expected (N, H, W) grayscale, (N, H, W, C) or (N, C, H, W) "
        "with C in 1, 3, 4"
    )


def load_npz_dataset(path: PathLike, name: str | None = None, num_classes: int | None = None) -> ImageDataset:
    """A dataset from a ``.npz`` file with ``x_train, y_train, x_test, y_test``.

    Images are uint8, (N, H, W), (N, H, W, C) or (N, C, H, W); labels integers 0..K-1. The number of
    classes is ``num_classes``, else the file's ``num_classes`` entry, else the largest label + 1.
    """
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DecorrError(
            f"cannot read {path} as a .npz file ({_short_error(err)}); save it with numpy.savez"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):  # np.save's .npy under an .npz name
        raise DecorrError(
            f"{path} holds a single array, not x_train, y_train, x_test, y_test; save it with numpy.savez"
        )
    with archive:
        missing = [k for k in _NPZ_KEYS if k not in archive.files]
        if missing:
            raise DecorrError(
                f"{path} lacks {', '.join(missing)} (it has {', '.join(archive.files) or 'nothing'}); "
                "save x_train, y_train, x_test, y_test with numpy.savez"
            )
        try:
            arrays = {k: archive[k] for k in _NPZ_KEYS}
            stored_classes = int(archive["num_classes"]) if "num_classes" in archive.files else None
        except ValueError as err:  # object arrays need pickle, which is never allowed here
            raise DecorrError(f"{path}: {_short_error(err)}; store plain numeric arrays") from None
    splits = []
    for split in ("train", "test"):
        images = _images_to_nchw(arrays[f"x_{split}"], path, f"x_{split}")
        labels = arrays[f"y_{split}"]
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images):
            raise DecorrError(
                f"{path}: y_{split} is {labels.dtype} {labels.shape}; expected {len(images)} integer labels"
            )
        if len(labels) and labels.min() < 0:
            raise DecorrError(f"{path}: y_{split} has negative labels; labels must be 0..K-1")
        splits.append(ImageSplit(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))))
    for split, part in zip(("train", "test"), splits):
        if len(part) == 0:
            raise DecorrError(f"{path}: x_{split} holds no images; store at least one image in each split")
    if splits[0].images.shape[1:] != splits[1].images.shape[1:]:
        raise DecorrError(
            f"{path}: train images {tuple(splits[0].images.shape[1:])} and test images "
            f"{tuple(splits[1].images.shape[1:])} differ in shape"
        )
    largest = max((int(s.labels.max()) for s in splits if len(s)), default=-1)
    classes = num_classes or stored_classes or largest + 1
    if largest >= classes:
        raise DecorrError(f"{path}: label {largest} does not fit {classes} classes; fix num_classes")
    return ImageDataset(name or path.stem, splits[0], splits[1], classes, source=str(path.absolute()))


def _npz_image_shape(path: Path) -> tuple[int, int, int]:
    """(C, H, W) of the training images of a .npz file, read from the array header only."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("x_train.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise DecorrError(
            f"cannot read x_train of {path} ({_short_error(err)}); save it with numpy.savez"
        ) from None
    probe = _images_to_nchw(np.empty((0, *shape[1:]), dtype=dtype), path, "x_train")
    c, h, w = probe.shape[1:]
    return int(c), int(h), int(w)
