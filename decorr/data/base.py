"""Datasets as uint8 tensors: :class:`ImageSplit`, :class:`ImageDataset`, and whole-batch augmentation.

The leaf of the data modules: everything else in ``decorr.data`` and ``decorr.data`` builds on these
types, and this module imports none of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from decorr.errors import DecorrError

__all__ = ["Augment", "AugmentDraw", "ImageDataset", "ImageSplit", "PathLike", "require_training_images", "to_float"]


PathLike = Union[str, os.PathLike]


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
        """(C, H, W) of one image (a streamed split, ``decorr.data.StreamedSplit``, has it too)."""
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
