"""Counting the decoded images a streamed split holds at once: the check behind "within the budget".

Resident-set sizes cannot resolve a budget of tens of MiB (they move by that much between identical runs),
so the streaming bound of :meth:`decorr.data.stream.StreamedSplit.stream_plan` is checked by counting:
:class:`CountedSplit` decodes with a decoder that counts every image it decodes, in whichever DataLoader
worker, in shared memory, and counts an image released when its consumer asks for the batch after the one
holding it (a consumer that keeps only its current batch, as the transfer evaluation does). The peak of
decoded minus released, taken at every decode, is the most decoded images alive at once.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from torch import Tensor

from decorr.data.decode import batch_bytes
from decorr.data.stream import StreamedSplit

__all__ = ["CountedSplit"]


class _CountingDecoder:
    """The split's decoder, counting each decoded image and the peak of decoded minus released."""

    def __init__(self, decoder: Any, counts: Any) -> None:
        self.decoder, self.counts = decoder, counts

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.decoder.shape

    def __call__(self, path: Path) -> np.ndarray:
        image = self.decoder(path)
        with self.counts.get_lock():
            decoded, released, peak = self.counts[:]
            decoded += 1
            self.counts[:] = [decoded, released, max(peak, decoded - released)]
        return image


class CountedSplit(StreamedSplit):
    """``split`` streamed as it would be, counting its resident decoded images (``peak_images``, ``peak_bytes``)."""

    def __init__(self, split: StreamedSplit) -> None:
        self._counts = multiprocessing.Array("q", 3)  # decoded, released, peak
        super().__init__(split.files, split.labels, _CountingDecoder(split.decoder, self._counts),
                         workers=split.workers, memory_budget_mb=split.memory_budget_mb, source=split.source)

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        held = 0
        for images, labels in super().batches(batch_size):
            self._release(held)
            held = len(images)
            yield images, labels
        self._release(held)

    def _release(self, n: int) -> None:
        with self._counts.get_lock():
            self._counts[1] += n

    @property
    def peak_images(self) -> int:
        return int(self._counts[2])

    @property
    def peak_bytes(self) -> int:
        return batch_bytes(self.image_shape, self.peak_images)
