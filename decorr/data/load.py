"""Datasets by name, ``.npz`` path or image folder (:func:`load_dataset`), and their default augmentation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from decorr.data.base import Augment, ImageDataset, PathLike
from decorr.data.builtin import read_idx  # noqa: F401  (importing it registers mnist, fashion-mnist, cifar10, svhn)
from decorr.data.folder import is_image_dataset, load_image_folder
from decorr.data.locate import search_roots
from decorr.data.npz import _find_npz, _npz_image_shape, load_npz_dataset
from decorr.data.registry import _DATASETS, _registered_name, list_datasets
from decorr.errors import DecorrError

__all__ = ["check_dataset_name", "dataset_augment", "load_dataset"]

# ----------------------------------------------------------------------------------------------
# Loading by name, path or folder


def load_dataset(name: str, root: PathLike | None = None, *, download: bool = True,
                 **folder_options: Any) -> ImageDataset:
    """Load a registered dataset (``list_datasets()``), a ``.npz`` file, or an image folder.

    A folder (or a labels ``.csv``/``.tsv``) is read by :func:`decorr.data.load_image_folder`, which
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


def check_dataset_name(name: str, root: PathLike | None = None) -> None:
    """One-line DecorrError unless ``name`` is what :func:`load_dataset` takes (nothing is loaded): a
    registered name, an existing ``.npz`` file or an image folder / labels file (searched as it searches)."""
    if _registered_name(name) is not None or _find_folder(name, root) is not None:
        return
    if name.endswith(".npz"):
        _find_npz(name, root)  # a one-line error naming where it looked
        return
    raise DecorrError(
        f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}, or give the path of an existing "
        ".npz file or image folder"
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
