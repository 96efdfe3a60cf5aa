"""Image files as an evaluation split: decoded into memory when they fit the budget, else streamed.

:func:`file_split` decodes every file into an :class:`decorr.data.ImageSplit` (uint8 in memory) when
``N * C * H * W`` bytes fit ``memory_budget_mb``, and otherwise returns a :class:`StreamedSplit`, which
decodes batch by batch in ``torch.utils.data.DataLoader`` workers. Both offer what the transfer evaluation
uses: ``len()``, ``labels``, ``image_shape``, ``batches(batch_size)`` (uint8 images and labels, in order)
and ``subset(...)``; the batches are the same bytes either way, so the results are too.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from decorr.datasets.base import ImageSplit
from decorr.datasets.decode import Decoder, batch_bytes
from decorr.errors import DecorrError

__all__ = ["DEFAULT_MEMORY_BUDGET_MB", "StreamedSplit", "default_workers", "file_split"]

#: Decoded images up to this many MiB are kept in memory; larger sets are streamed.
DEFAULT_MEMORY_BUDGET_MB = 4096.0


def default_workers(n: int) -> int:
    """DataLoader workers for ``n`` files: none for a handful, else up to 4 (fewer on small machines)."""
    if n <= 64:
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


class _Batches(torch.utils.data.Dataset):
    """Item ``b`` is batch ``b`` decoded into one uint8 tensor (or the error message, so that a worker's
    DecorrError reaches the main process as one line rather than as a wrapped traceback)."""

    def __init__(self, files: Sequence[Path], decoder: Decoder, batch_size: int) -> None:
        self.files, self.decoder, self.batch_size = list(files), decoder, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.batch_size)

    def __getitem__(self, b: int) -> Tensor | str:
        try:
            part = self.files[b * self.batch_size : (b + 1) * self.batch_size]
            return torch.from_numpy(np.stack([self.decoder(f) for f in part]))
        except DecorrError as err:
            return str(err)


def decode_batches(files: Sequence[Path], decoder: Decoder, batch_size: int, workers: int) -> Iterator[Tensor]:
    """uint8 (B, C, H, W) batches of ``files`` in order, decoded by ``workers`` DataLoader processes."""
    if batch_size < 1:
        raise DecorrError(f"batch size must be >= 1, got {batch_size}")
    loader = torch.utils.data.DataLoader(_Batches(files, decoder, batch_size), batch_size=None, shuffle=False,
                                         num_workers=workers, persistent_workers=False)
    for batch in loader:
        if isinstance(batch, str):
            raise DecorrError(batch)
        yield batch


class StreamedSplit:
    """An evaluation split read from image files batch by batch (see the module docstring).

    ``images`` is refused with a one-line error: a tool that needs the whole split in memory says so.
    """

    def __init__(self, files: Sequence[Path], labels: Tensor, decoder: Decoder, *, workers: int,
                 memory_budget_mb: float, source: str = "") -> None:
        self.files = list(files)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        if len(self.files) != len(self.labels):
            raise ValueError(f"{len(self.files)} files but {len(self.labels)} labels")
        self.decoder, self.workers, self.memory_budget_mb, self.source = decoder, workers, memory_budget_mb, source

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.decoder.shape

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"StreamedSplit(n={len(self)}, image_shape={self.image_shape}, workers={self.workers})"

    @property
    def images(self) -> Tensor:
        raise DecorrError(
            f"the {len(self)} images of {self.source or 'the folder'} are streamed ({_mib(self)} MiB decoded, over "
            f"the memory budget of {self.memory_budget_mb:g} MiB) and this tool needs them in memory; raise "
            "--memory-budget-mb or take fewer with --num-samples")

    def budget_batch_size(self, largest: int = 256) -> int:
        """The most images (at least 1, at most ``largest``) whose decoded batch fits the memory budget: the
        batch size of passes over the split that have no batch size of their own (e.g. its fingerprint)."""
        per_image = batch_bytes(self.image_shape, 1)
        return max(1, min(largest, int(self.memory_budget_mb * 2**20 // per_image)))

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """uint8 images (B, C, H, W) and int64 labels, in order."""
        start = 0
        for images in decode_batches(self.files, self.decoder, batch_size, self.workers):
            yield images, self.labels[start : start + len(images)]
            start += len(images)

    def subset(self, indices_or_n: int | Sequence[int] | np.ndarray | Tensor) -> ImageSplit | StreamedSplit:
        """The first ``n`` files (an int) or those at ``indices``; in memory when they fit the budget."""
        if isinstance(indices_or_n, (int, np.integer)):
            n = int(indices_or_n)
            if not 0 <= n <= len(self):
                raise DecorrError(f"asked for the first {n} samples of a split of {len(self)}; use 0..{len(self)}")
            index = list(range(n))
        else:
            index = [int(i) for i in torch.as_tensor(np.asarray(indices_or_n)).flatten()]
            if any(not -len(self) <= i < len(self) for i in index):
                raise DecorrError(f"sample indices out of range for a split of {len(self)} samples")
        return file_split([self.files[i] for i in index], self.labels[index], self.decoder,
                          memory_budget_mb=self.memory_budget_mb, workers=self.workers, source=self.source)

    def load(self, batch_size: int = 256) -> ImageSplit:
        """The whole split decoded into memory."""
        parts = [images for images, _ in self.batches(batch_size)]
        images = torch.cat(parts) if parts else torch.empty((0, *self.image_shape), dtype=torch.uint8)
        return ImageSplit(images, self.labels.clone())


def _mib(split: StreamedSplit) -> str:
    return f"{batch_bytes(split.image_shape, len(split)) / 2**20:.0f}"


def file_split(files: Sequence[Path], labels: Sequence[int] | Tensor, decoder: Decoder, *,
               memory_budget_mb: float | None = None, workers: int | None = None,
               source: str = "") -> ImageSplit | StreamedSplit:
    """``files`` with ``labels``: an in-memory ImageSplit when they fit the budget, else a StreamedSplit."""
    budget = DEFAULT_MEMORY_BUDGET_MB if memory_budget_mb is None else float(memory_budget_mb)
    if not budget >= 0:
        raise DecorrError(f"--memory-budget-mb must be >= 0, got {memory_budget_mb}")
    if workers is not None and workers < 0:
        raise DecorrError(f"--workers must be >= 0, got {workers}")
    workers = default_workers(len(files)) if workers is None else int(workers)
    streamed = StreamedSplit(files, torch.as_tensor(labels, dtype=torch.int64), decoder, workers=workers,
                             memory_budget_mb=budget, source=source)
    if batch_bytes(decoder.shape, len(files)) <= budget * 2**20:
        return streamed.load()
    return streamed
