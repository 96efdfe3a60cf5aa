"""Datasets as uint8 tensors in memory, float batches made on the fly, whole-batch augmentation.

``load_dataset(name)`` finds a dataset in the folders people actually keep it in (no network needed),
falls back to torchvision's downloader, and otherwise raises one :class:`DecorrError` listing every
folder it looked in. ``iterate_batches`` draws every batch from a generator seeded by ``(seed, epoch)``:
a resumed run sees the very batches an uninterrupted one would, and each of N processes takes its
contiguous shard of the same global batch (augmentation included), so N processes see what one does.

The types live in :mod:`decorr.datasets.base`, the registry and the built-in loaders in
:mod:`decorr.datasets` (re-exported here: ``from decorr.data import ImageSplit, load_dataset`` is the
one import most code needs).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from decorr.errors import DecorrError
from decorr.datasets.base import (Augment, AugmentDraw, ImageDataset, ImageSplit, PathLike, require_training_images,
                                  to_float)
from decorr.datasets.builtin import read_idx  # importing it registers mnist, fashion-mnist, cifar10, svhn
from decorr.datasets.folder import is_image_dataset, load_image_folder
from decorr.datasets.locate import DATA_ROOT_ENV, search_roots
from decorr.datasets.npz import _find_npz, _npz_image_shape, load_npz_dataset
from decorr.datasets.registry import _DATASETS, _registered_name, list_datasets, register_dataset

__all__ = ["Augment", "AugmentDraw", "DATA_ROOT_ENV", "ImageDataset", "ImageSplit", "dataset_augment", "epoch_generator", "iterate_batches", "last_batch_too_small", "list_datasets", "load_dataset", "load_npz_dataset", "num_batches", "read_idx", "register_dataset", "require_training_images", "search_roots", "to_float"]

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
# Loading by name, path or folder


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
