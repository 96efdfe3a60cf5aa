"""Image files as an evaluation split: decoded into memory when they fit the budget, else streamed.

:func:`file_split` decodes every file into an :class:`decorr.data.ImageSplit` (uint8 in memory) when
``N * C * H * W`` bytes fit ``memory_budget_mb``, and otherwise returns a :class:`StreamedSplit`, which
decodes batch by batch in ``torch.utils.data.DataLoader`` workers. Both offer what the transfer evaluation
uses: ``len()``, ``labels``, ``image_shape``, ``batches(batch_size)`` (uint8 images and labels, in order)
and ``subset(...)``; the batches are the same bytes either way, so the results are too.

What "within the budget" means when streaming: the decoded images resident at once. A DataLoader with ``w``
workers keeps ``w * PREFETCH_PER_WORKER`` decoded chunks outstanding; the main process holds the chunk it
copies from, the batch it assembles and the batch its consumer still has. So ``batches(B)`` decodes in
chunks of ``c`` images and holds at most ``2 B + (w * PREFETCH_PER_WORKER + 1) c`` images
(:meth:`StreamedSplit.stream_plan`), ``c`` chosen as large as that bound allows within the budget (at most
``B``). When even ``c = 1`` does not fit (the attack batch alone is over the budget), it warns with the
largest batch size that fits. ``benchmarks/folder_eval.py`` counts the resident images of a real run.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from decorr.data.base import ImageSplit
from decorr.data.decode import Decoder, batch_bytes
from decorr.errors import DecorrError

__all__ = ["DEFAULT_MEMORY_BUDGET_MB", "PREFETCH_PER_WORKER", "StreamPlan", "StreamedSplit", "default_workers",
           "file_split"]

#: Decoded images up to this many MiB are kept in memory; larger sets are streamed.
DEFAULT_MEMORY_BUDGET_MB = 4096.0
#: Decoded chunks each DataLoader worker keeps ready (torch's default prefetch_factor).
PREFETCH_PER_WORKER = 2


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
    """uint8 (B, C, H, W) batches of ``files`` in order, decoded by ``workers`` DataLoader processes, each
    keeping :data:`PREFETCH_PER_WORKER` batches ready."""
    if batch_size < 1:
        raise DecorrError(f"batch size must be >= 1, got {batch_size}")
    prefetch = {"prefetch_factor": PREFETCH_PER_WORKER} if workers > 0 else {}
    loader = torch.utils.data.DataLoader(_Batches(files, decoder, batch_size), batch_size=None, shuffle=False,
                                         num_workers=workers, persistent_workers=False, **prefetch)
    for batch in loader:
        if isinstance(batch, str):
            raise DecorrError(batch)
        yield batch


@dataclass(frozen=True)
class StreamPlan:
    """How :meth:`StreamedSplit.batches` streams batches of ``batch_size``: decoded ``chunk`` images at a
    time, at most ``resident_images`` decoded images (``resident_bytes``) held at once."""

    batch_size: int
    chunk: int
    resident_images: int
    resident_bytes: int
    budget_bytes: int

    @property
    def within_budget(self) -> bool:
        return self.resident_bytes <= self.budget_bytes


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

    def _slots(self) -> int:
        """Decoded chunks alive at once besides the two batches: the workers' prefetch and the one copied."""
        return self.workers * PREFETCH_PER_WORKER + 1

    def _budget_images(self) -> int:
        return int(self.memory_budget_mb * 2**20 // batch_bytes(self.image_shape, 1))

    def stream_plan(self, batch_size: int) -> StreamPlan:
        """The chunk size and the resident bound of ``batches(batch_size)`` (module docstring)."""
        if batch_size < 1:
            raise DecorrError(f"batch size must be >= 1, got {batch_size}")
        batch_size = min(batch_size, max(1, len(self)))
        chunk = max(1, min(batch_size, (self._budget_images() - 2 * batch_size) // self._slots()))
        resident = 2 * batch_size + self._slots() * chunk
        return StreamPlan(batch_size, chunk, resident, batch_bytes(self.image_shape, resident),
                          int(self.memory_budget_mb * 2**20))

    def budget_batch_size(self, largest: int = 256) -> int:
        """The largest batch size (at least 1, at most ``largest``) whose stream stays within the memory
        budget: that of passes over the split with no batch size of their own (e.g. its fingerprint)."""
        return max(1, min(largest, (self._budget_images() - self._slots()) // 2))

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """uint8 images (B, C, H, W) and int64 labels, in order, decoded by :meth:`stream_plan`'s chunks."""
        plan = self.stream_plan(batch_size)
        if not plan.within_budget:
            fits = self.stream_plan(self.budget_batch_size(batch_size))
            fix = (f"give --batch-size {fits.batch_size} or raise the budget" if fits.within_budget else
                   f"raise it to {fits.resident_bytes / 2**20:.3g} MiB or use fewer --workers (now {self.workers})")
            warnings.warn(f"streaming batches of {plan.batch_size} images holds up to "
                          f"{plan.resident_bytes / 2**20:.3g} MiB of decoded images, over --memory-budget-mb "
                          f"{self.memory_budget_mb:g}; {fix}", stacklevel=2)
        start, batch, filled = 0, None, 0
        for chunk in decode_batches(self.files, self.decoder, plan.chunk, self.workers):
            if plan.chunk == batch_size:  # chunks are the batches: no copy
                yield chunk, self.labels[start : start + len(chunk)]
                start += len(chunk)
                continue
            pos = 0
            while pos < len(chunk):
                if batch is None:
                    batch, filled = torch.empty((min(batch_size, len(self) - start), *self.image_shape),
                                                dtype=torch.uint8), 0
                take = min(len(chunk) - pos, len(batch) - filled)
                batch[filled : filled + take] = chunk[pos : pos + take]
                filled, pos = filled + take, pos + take
                if filled == len(batch):
                    done, batch = batch, None
                    yield done, self.labels[start : start + len(done)]
                    start += len(done)
                    del done
            del chunk

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
        images, start = torch.empty((len(self), *self.image_shape), dtype=torch.uint8), 0
        for chunk in decode_batches(self.files, self.decoder, batch_size, self.workers):
            images[start : start + len(chunk)] = chunk
            start += len(chunk)
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
