"""Float batches made on the fly from uint8 splits: deterministic per ``(seed, epoch)``, sharded over processes.

``iterate_batches`` draws every batch from a generator seeded by ``(seed, epoch)``: a resumed run sees the
very batches an uninterrupted one would, and each of N processes takes its contiguous shard of the same
global batch (augmentation included), so N processes see what one does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from decorr.data.base import Augment, ImageSplit, to_float
from decorr.errors import DecorrError

__all__ = ["epoch_generator", "iterate_batches", "last_batch_too_small", "num_batches", "shard_bounds"]

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
        start, stop = shard_bounds(len(index), rank, world_size)
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


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    # The same split as torch.tensor_split(range(n), world_size): the first n % world_size parts
    # hold one extra sample.
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
