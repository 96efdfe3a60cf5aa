"""The passes of a transfer evaluation over the data: every model on the natural images, then every source
attacked with every attack at every epsilon and every target on its examples.

Work is divided by whole batches: batch ``b`` (images ``[b * B, (b + 1) * B)`` of the evaluated split) is
done by process ``b % world_size``, so a batch holds the same images whatever the number of processes, and
its randomness (:func:`batch_generator`, keyed by seed, source, attack, epsilon and batch index) is the
same too. Each pass returns, per model, tensors indexed by image, gathered from every process
(:func:`gather_rows`): N processes give what one process gives.
"""

from __future__ import annotations

import zlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from decorr.attacks import Attack, Source
from decorr.data import to_float
from decorr.distributed import rank, world_size
from decorr.errors import DecorrError
from decorr.evaluation.detection import disagreement
from decorr.features import record_features
from decorr.models.ensemble import Ensemble

__all__ = ["Batch", "Collected", "batch_generator", "batches", "gather_rows", "run_models"]

Data = Any  # an ImageSplit, a streamed split (decorr.data.StreamedSplit) or a pair (x, y)


@dataclass
class Batch:
    """One batch of the evaluated images: its index, the images' positions in the split, pixels, labels."""

    index: int
    positions: Tensor
    x: Tensor
    y: Tensor


def batches(data: Data, batch_size: int, device: torch.device, *, shard: tuple[int, int] | None = None
            ) -> Iterator[Batch]:
    """This process's batches of ``data`` (every ``world``-th batch from its ``rank``; ``shard`` overrides)."""
    me, world = shard if shard is not None else (rank(), world_size())
    if isinstance(data, (tuple, list)):
        x, y = data
        for index, start in enumerate(range(0, len(y), batch_size)):
            if index % world == me:
                stop = min(start + batch_size, len(y))
                yield Batch(index, torch.arange(start, stop), x[start:stop].to(device), y[start:stop].to(device))
        return
    split = data if world == 1 else _shard_split(data, batch_size, me, world)
    for index, (images, labels) in enumerate(split.batches(batch_size)):
        global_index = index if world == 1 else index * world + me
        start = global_index * batch_size
        yield Batch(global_index, torch.arange(start, start + len(labels)), to_float(images).to(device),
                    labels.to(device))


def _shard_split(data: Data, batch_size: int, me: int, world: int) -> Data:
    """The images of this process's batches, in order (a split of ``subset(indices)``)."""
    starts = range(me * batch_size, len(data), world * batch_size)
    indices = torch.cat([torch.arange(s, min(s + batch_size, len(data))) for s in starts]) if len(starts) else \
        torch.zeros(0, dtype=torch.long)
    return data.subset(indices)


def batch_generator(seed: int, source: str, attack: str, eps: float, batch_index: int) -> torch.Generator:
    """The CPU generator of one batch of one source's attack at one epsilon.

    Seeded from ``(seed, crc32(source), crc32(attack), round(eps * 1e9), batch index)``: a source's examples
    depend on its name, the attack, the data, the batch size and the settings only, not on which other
    models or attacks are evaluated with it, nor on how many processes share the work.
    """
    words = [int(seed), zlib.crc32(source.encode()), zlib.crc32(attack.encode()), int(round(float(eps) * 1e9)),
             int(batch_index)]
    state = np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


# ------------------------------------------------------------------------------------------------
# Running models


@dataclass
class Collected:
    """Per model: predicted labels, and when asked features and (ensembles) the members' disagreement,
    as lists of per-batch tensors with the images' positions."""

    positions: list[Tensor] = field(default_factory=list)
    preds: dict[str, list[Tensor]] = field(default_factory=dict)
    features: dict[str, list[Tensor]] = field(default_factory=dict)
    flags: dict[str, list[Tensor]] = field(default_factory=dict)
    scores: dict[str, list[Tensor]] = field(default_factory=dict)

    def gathered(self, count: int) -> dict[str, dict[str, Tensor]]:
        """Every list as one tensor over all ``count`` images, from every process, in image order."""
        positions = torch.cat(self.positions) if self.positions else torch.zeros(0, dtype=torch.long)
        out: dict[str, dict[str, Tensor]] = {}
        for kind in ("preds", "features", "flags", "scores"):
            out[kind] = {name: gather_rows(positions, torch.cat(parts) if parts else None, count)
                         for name, parts in getattr(self, kind).items()}
        return out


class ModelRunner:
    """Runs the evaluated models on a batch: labels, features at their layer (when asked) and, for an
    ensemble, the members' disagreement; checks that each model is a classifier of the labels' classes."""

    def __init__(self, models: Mapping[str, nn.Module], layers: Mapping[str, str], label_max: int) -> None:
        self.models, self.layers, self.label_max = models, layers, label_max
        #: The fewest outputs of any model run (the classes a targeted attack may aim at).
        self.classes: int | None = None

    @torch.no_grad()
    def run(self, name: str, x: Tensor, want_features: bool, out: Collected) -> Tensor:
        model = self.models[name]
        layer = self.layers.get(name) if want_features else None
        with record_features(model, layer) if layer else nullcontext({}) as recorded:
            if isinstance(model, Ensemble):
                member_logits = model.member_logits(x)
                logits = model.combine(member_logits)
                flag, score = disagreement(member_logits)
                out.flags.setdefault(name, []).append(flag)
                out.scores.setdefault(name, []).append(score)
            else:
                logits = model(x)
        self._check(name, logits)
        if layer:
            if layer not in recorded:
                raise DecorrError(f"feature layer {layer!r} of model {name} is not called in its forward pass; "
                                  "choose another feature layer")
            out.features.setdefault(name, []).append(recorded[layer].flatten(1).float().cpu())
        pred = logits.argmax(dim=1).cpu()
        out.preds.setdefault(name, []).append(pred)
        return pred

    def _check(self, name: str, logits: Any) -> None:
        if not torch.is_tensor(logits) or logits.dim() != 2:
            shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
            raise DecorrError(f"model {name} outputs {shape}, not logits (N, classes); the transfer evaluation "
                              "needs classifiers")
        self.classes = logits.shape[1] if self.classes is None else min(self.classes, logits.shape[1])
        if logits.shape[1] <= self.label_max:
            raise DecorrError(f"model {name} has {logits.shape[1]} outputs but the labels go up to {self.label_max}; "
                              "evaluate it on the dataset it was trained for")


def run_models(runner: ModelRunner, names: Sequence[str], featured: set[str], x: Tensor, out: Collected) -> None:
    for name in names:
        runner.run(name, x, name in featured, out)


@dataclass
class AttackJob:
    """One source attacked with one attack at one epsilon, and the models evaluated on its examples."""

    attack: Attack
    source_name: str
    source: Source
    eps: float
    evaluated: list[str]
    featured: set[str]
    norm: str = "linf"
    #: Linf-equivalent units to the norm's (TransferOptions.scale)
    scale: float = 1.0
    #: seeds every batch's generator with the source, attack, epsilon and batch index
    seed: int = 0
    #: one target class per image of the data (a targeted run), or None
    targets: Tensor | None = None


def attack_pass(job: AttackJob, runner: ModelRunner, data: Data, batch_size: int, device: torch.device, *,
                on_batch: Callable[[Batch, Tensor, Tensor], None] | None = None,
                progress: Callable[[int], None] | None = None, timing: dict[str, float]) -> Collected:
    """Craft ``job``'s adversarial examples batch by batch and run every evaluated model on each batch."""
    import time

    out = Collected()
    for batch in batches(data, batch_size, device):
        tick = time.perf_counter()
        generator = batch_generator(job.seed, job.source_name, job.attack.name, job.eps, batch.index)
        labels = batch.y if job.targets is None else job.targets[batch.positions].to(device)
        x_adv = job.attack.craft(job.source, batch.x, labels, eps=job.eps, norm=job.norm, scale=job.scale,
                                 targeted=job.targets is not None, generator=generator)
        timing["attack_s"] += time.perf_counter() - tick
        tick = time.perf_counter()
        out.positions.append(batch.positions)
        run_models(runner, job.evaluated, job.featured, x_adv, out)
        timing["evaluate_s"] += time.perf_counter() - tick
        if on_batch is not None:
            on_batch(batch, x_adv, out.preds[job.source_name][-1] if job.source_name in out.preds else None)
        if progress is not None:
            progress(len(batch.positions))
    return out


# ------------------------------------------------------------------------------------------------
# Gathering


def gather_rows(positions: Tensor, values: Tensor | None, count: int) -> Tensor | None:
    """``values`` (one row per position of this process) as one tensor over all ``count`` images, rows in
    image order, from every process. None stays None (on every process alike)."""
    if values is None:
        return None
    if world_size() == 1:
        order = torch.argsort(positions)
        return values[order] if not torch.equal(positions, torch.arange(len(positions))) else values
    import torch.distributed as dist

    pieces: list[Any] = [None] * world_size()
    dist.all_gather_object(pieces, (positions.cpu(), values.cpu()))
    all_positions = torch.cat([p for p, _ in pieces])
    all_values = torch.cat([v for _, v in pieces])
    if len(all_positions) != count:
        raise DecorrError(f"gathered {len(all_positions)} images' results from {world_size()} processes, expected "
                          f"{count}; every process must evaluate the same data")
    return all_values[torch.argsort(all_positions)]
