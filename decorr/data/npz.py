"""Datasets from ``.npz`` files with ``x_train``, ``y_train``, ``x_test``, ``y_test`` (NCHW or NHWC images).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from decorr.errors import DecorrError
from decorr.data.base import ImageDataset, ImageSplit, PathLike
from decorr.data.locate import DATA_ROOT_ENV, _short_error, _unique, search_roots

__all__ = ["load_npz_dataset"]

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
        with open(path, "rb") as handle:
            head = handle.read(6)
    except OSError as err:
        raise DecorrError(f"cannot read {path} ({_short_error(err)}); give a readable .npz file") from None
    # numpy takes any file that is neither a zip archive (.npz) nor an .npy for a pickle, and says so.
    if not head.startswith((b"PK", b"\x93NUMPY")):
        kind = "is empty" if not head else "is not a .npz archive (not a zip file)"
        raise DecorrError(f"{path} {kind}; save the dataset with numpy.savez(x_train=..., y_train=..., x_test=..., "
                          "y_test=...)")
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
