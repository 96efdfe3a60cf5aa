"""The one training loop: :func:`fit` runs a :class:`Task` on a :class:`~decorr.training.run.TrainingRun`.

A task says *what* a method trains (its models and optimiser, the batches of an epoch, the loss of
one batch, the evaluation after an epoch); the loop does the rest, the same way for every method::

    built = task.build(run)                          # plain models + optimiser, after set_seed
    start = run.restore(built.models); run.restore_optimizer(optimizer) after prepare
    models, optimizer = run.prepare(...)             # the trained models and the optimiser
    task.start(models, optimizer, start)
    [task.evaluate_before()  -> run.save(0, ...)]    # DVERGE measures its starting point
    for epoch in range(start, task.epochs):
        trained models .train(); task.begin_epoch(epoch)
        for each group of k micro-batches (k = gradient accumulation steps):
            task.before_step(epoch, index)            # e.g. the classifier's learning rate
            train_step(...)                           # accumulate / autocast / loss / backward / step
        terms = mean_terms(per-step terms)            # a NaN or inf term stops the run, nothing saved
        check_finite_weights(trained models)          # so do NaN or inf weights, before the evaluation
        metrics = task.end_epoch(epoch, terms, seconds)
        run.log_scalars(metrics); run.save(epoch + 1, models, optimizer, metrics)
    run.finish(); return task.result(metrics)

:func:`train_step` is accelerate's documented gradient-accumulation pattern, one micro-batch per
``accelerator.accumulate`` block: the loss sees one micro-batch, ``accelerator.backward`` divides it
by k, and the data-parallel all-reduce, ``optimizer.step()`` and ``zero_grad`` happen on the k-th
micro-batch only. It is the only place in the library that steps an optimiser.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import torch
import torch.nn as nn
from torch import Tensor

from decorr.training.run import TrainingRun, check_finite_weights, mean_terms, unwrap

__all__ = ["Built", "Task", "fit", "train_step", "groups"]

B = TypeVar("B")
LossFn = Callable[[Any], "tuple[Tensor, dict[str, Tensor]]"]


@dataclass
class Built:
    """What :meth:`Task.build` returns: the checkpoint's models (plain modules) and the optimiser.

    ``trained`` names the models that the optimiser trains; they are prepared by accelerate (moved
    to the device, wrapped for data parallelism) and put in train mode every epoch. Every model in
    ``models`` is restored on resume and saved in each checkpoint (default: all are trained).
    """

    models: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    trained: tuple[str, ...] | None = None


class Task:
    """One training method. Subclasses set ``epochs`` and implement :meth:`build`, :meth:`batches`,
    :meth:`loss` and :meth:`end_epoch`; the other hooks are optional."""

    #: Number of epochs to train (the loop runs ``range(start_epoch, epochs)``).
    epochs: int
    #: Names the epochs in the progress bar and in error messages ("autoencoder" -> "autoencoder 3/40").
    label: str = ""

    def build(self, run: TrainingRun) -> Built:
        raise NotImplementedError

    def start(self, models: dict[str, nn.Module], optimizer: torch.optim.Optimizer, start_epoch: int) -> None:
        """Called once after restore and prepare: ``models`` holds the prepared (trained) models and
        the others as built."""
        self.models, self.optimizer = models, optimizer

    def steps_per_epoch(self) -> int | None:
        """Optimiser steps per epoch, for the progress bar (None: unknown)."""
        return None

    def begin_epoch(self, epoch: int) -> None:
        """Called before the epoch's first batch (after the trained models are put in train mode)."""

    def batches(self, epoch: int) -> Iterable[Any]:
        """The micro-batches of ``epoch`` (with gradient accumulation, k of them per optimiser step)."""
        raise NotImplementedError

    def before_step(self, epoch: int, index: int) -> None:
        """Called before optimiser step ``index`` (0-based) of ``epoch``, e.g. to set the learning rate."""

    def loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one micro-batch (under autocast) and its detached terms for logging."""
        raise NotImplementedError

    def evaluate_before(self) -> dict[str, Any] | None:
        """Metrics of the starting point, saved as epoch 0 of a fresh run (None: no such evaluation)."""
        return None

    def end_epoch(self, epoch: int, terms: dict[str, float], seconds: float) -> dict[str, Any]:
        """Evaluate after ``epoch`` (0-based) given the mean training ``terms``; return the metrics
        to log and checkpoint."""
        raise NotImplementedError

    def result(self, metrics: dict[str, Any]) -> Any:
        """What :func:`fit` returns (default: the last epoch's metrics)."""
        return metrics


def groups(items: Iterable[B], k: int) -> Iterator[list[B]]:
    """Consecutive groups of ``k`` items; an incomplete last group is dropped."""
    group: list[B] = []
    for item in items:
        group.append(item)
        if len(group) == k:
            yield group
            group = []


def train_step(
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Any],
    loss_fn: LossFn,
    *,
    accelerator: Any = None,
    models: Sequence[nn.Module] = (),
    backward: Callable[[Tensor], None] | None = None,
    autocast: Callable[[], Any] | None = None,
) -> dict[str, Tensor]:
    """One optimiser step over ``micro_batches``; returns each loss term averaged over them.

    With an ``accelerator`` (prepared ``models`` and optimiser), every micro-batch runs in
    ``accelerator.accumulate(*models)``: gradients are synchronised and the optimiser steps on the
    last one (``len(micro_batches)`` must be the accelerator's gradient accumulation steps). Without
    one, a single micro-batch with plain ``loss.backward()`` (or ``backward``) and ``autocast``.
    """
    if accelerator is None and len(micro_batches) != 1:
        raise ValueError("gradient accumulation needs an accelerator; pass one micro-batch without it")
    if accelerator is not None:
        backward = backward or accelerator.backward
        autocast = autocast or accelerator.autocast
    backward = backward or Tensor.backward
    autocast = autocast or nullcontext
    totals: dict[str, Tensor] = {}
    for batch in micro_batches:
        with ExitStack() as stack:
            if accelerator is not None:
                stack.enter_context(accelerator.accumulate(*models))
            with autocast():
                loss, terms = loss_fn(batch)
            backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for key, value in terms.items():
            totals[key] = totals.get(key, 0) + value.float()
    if accelerator is not None and not accelerator.sync_gradients:
        raise RuntimeError(f"gradient accumulation out of step: {len(micro_batches)} micro-batches but accelerate "
                           f"accumulates {accelerator.gradient_accumulation_steps}")
    return {key: value / len(micro_batches) for key, value in totals.items()}


def fit(run: TrainingRun, task: Task) -> Any:
    """Train ``task`` in ``run`` from its start (or its checkpoint, when resuming) to ``task.epochs``,
    checkpointing after every epoch; finish the run and return ``task.result(last metrics)``."""
    built = task.build(run)
    start_epoch = run.restore(built.models)
    names = list(built.trained if built.trained is not None else built.models)
    *wrapped, optimizer = run.prepare(*[built.models[n] for n in names], built.optimizer)
    run.restore_optimizer(optimizer)  # after prepare: see TrainingRun.restore
    trained = dict(zip(names, wrapped))
    models = {name: trained.get(name, module) for name, module in built.models.items()}
    task.start(models, optimizer, start_epoch)
    metrics: dict[str, Any] = run.history[-1] if run.history else {}
    if not run.history:
        before = task.evaluate_before()
        if before is not None:
            metrics = before
            run.log_scalars(metrics, step=0)
            run.save(0, models, optimizer, metrics)
    k = run.accelerator.gradient_accumulation_steps
    label = task.label or "epoch"
    where = f"{task.label} epoch" if task.label else "epoch"
    for epoch in range(start_epoch, task.epochs):
        started = time.perf_counter()
        for module in trained.values():
            module.train()
        task.begin_epoch(epoch)
        steps = run.progress(groups(task.batches(epoch), k), total=task.steps_per_epoch(),
                             desc=f"{label} {epoch + 1}/{task.epochs}")
        step_terms = []
        for index, group in enumerate(steps):
            task.before_step(epoch, index)
            step_terms.append(train_step(optimizer, group, task.loss, accelerator=run.accelerator,
                                         models=list(trained.values())))
        terms = mean_terms(step_terms, f"{where} {epoch + 1}")
        # Diverged weights are refused here, before the evaluation's linear algebra (an SVD of NaN
        # features fails with a traceback): the last step can turn finite losses into NaN weights.
        check_finite_weights({name: unwrap(module) for name, module in trained.items()}, f"after {where} {epoch + 1}",
                             run.history[-1]["epoch"] if run.history else None)
        metrics = task.end_epoch(epoch, terms, time.perf_counter() - started)
        run.log_scalars(metrics, step=epoch + 1)
        run.save(epoch + 1, models, optimizer, metrics)
    run.finish()
    return task.result(metrics)


def prefixed(prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """``{prefix/key: value}``, e.g. ``train/loss``."""
    return {f"{prefix}/{key}": value for key, value in values.items()}


__all__.append("prefixed")
