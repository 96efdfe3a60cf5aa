"""The registry of ensemble training methods and the task they share.

A method is one :class:`EnsembleTask` subclass registered by name::

    @register_method("ce")
    class IndependentTask(EnsembleTask):
        def loss(self, batch):
            x, y = batch
            logits, _ = self.forward(x, features=False)
            return sqrt_sum_of_squares(self.member_ce(logits, y))

The base class owns what every method shares: the members (fresh, in order, channels-last, or the
``--init`` models), one Adam over all of them, the batches of an epoch (drawn from ``(seed, epoch)``,
as the pair trainer draws them), one forward pass that records every member's feature layer, and the
evaluation after an epoch (every member's accuracy, ``active_features_<m>``, ``effective_rank_<m>``,
pairwise feature R^2, the ensemble's mean-softmax accuracy, seconds per epoch).
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, ClassVar, Iterable, Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from decorr.data import iterate_batches, num_batches
from decorr.distributed import global_mean
from decorr.errors import DecorrError
from decorr.training.loop import Built, Task, prefixed
from decorr.models import create_model
from decorr.distributed import unwrap
from decorr.features import DEAD_FEATURES_BELOW, dead_features_warning, r2_text, record_features
from decorr.training.epoch_metrics import evaluate_models
from decorr.training.run import TrainingRun

__all__ = ["METHODS", "EnsembleTask", "EpochMonitor", "Members", "Surrogate", "register_method", "method_class",
           "sqrt_sum_of_squares"]

#: Method name -> task class (filled by :func:`register_method`; ``decorr.training.methods`` imports them all).
METHODS: dict[str, type["EnsembleTask"]] = {}


def register_method(name: str) -> Callable[[type["EnsembleTask"]], type["EnsembleTask"]]:
    """Class decorator: register an :class:`EnsembleTask` subclass as ``--method name``."""

    def register(cls: type[EnsembleTask]) -> type[EnsembleTask]:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered ({METHODS[name].__name__})")
        cls.method = name
        METHODS[name] = cls
        return cls

    return register


def method_class(name: str) -> type["EnsembleTask"]:
    """The task class of ``--method name`` (a one-line error listing the methods otherwise)."""
    if name not in METHODS:
        raise DecorrError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


@dataclass
class Surrogate:
    """A frozen, independently trained model (``dec-frozen``): eval mode, no gradient."""

    module: nn.Module
    layer: str
    spec: str
    sha256: str


@dataclass
class Members:
    """What the task builds: per member name (``model0 ..``) its arch, kwargs and feature layer;
    ``initial`` the starting models (``--init``; None: fresh ones) and ``origins`` where each came from
    (a checkpoint and its epoch, or a weights file and its SHA-256); ``surrogate`` for dec-frozen."""

    archs: dict[str, str]
    kwargs: dict[str, dict[str, Any]]
    layers: dict[str, str]
    initial: dict[str, nn.Module] | None = None
    surrogate: Surrogate | None = None
    origins: list[dict[str, Any]] | None = None

    @property
    def names(self) -> list[str]:
        return list(self.archs)


class EpochMonitor(Protocol):
    """An evaluation of the members beyond the task's own, run before training and after every epoch
    (the DVERGE recipe's transfer rates: :mod:`decorr.evaluation.monitor`). Given to the trainer from
    above, so that training imports no evaluation code."""

    def before(self, models: dict[str, nn.Module]) -> dict[str, Any] | None:
        """Metrics of the starting models, saved as epoch 0 of a fresh run (None: nothing to save)."""

    def after(self, epoch: int, models: dict[str, nn.Module], metrics: dict[str, Any]) -> dict[str, Any]:
        """Metrics to add after 0-based ``epoch`` (``metrics``: the task's own)."""

    def start(self, task: "EnsembleTask", start_epoch: int) -> None:
        """Called once before training (``start_epoch`` > 0 on resume), with the task: its data
        (``task.dataset``), run (``task.run``), members and config."""

    def result(self, metrics: dict[str, Any]) -> Any:
        """What the run returns (None: the last epoch's metrics)."""


def sqrt_sum_of_squares(ce: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """``sqrt(sum_m CE_m^2)``: the pair trainer's ``sqrt(CE0^2 + CE1^2)`` for N members (same
    operations in the same order, so N = 2 gives the pair's loss bit for bit)."""
    total = ce[0] ** 2
    for value in ce[1:]:
        total = total + value ** 2
    terms = {f"ce{m}": value.detach() for m, value in enumerate(ce)}
    return torch.sqrt(total), terms


class EnsembleTask(Task):
    """N members, one Adam, the same batches; subclasses implement :meth:`loss`.

    Class attributes a method may set: ``min_models`` / ``max_models`` (the N it accepts),
    ``uses_correlation`` (the batch must exceed the regressors' feature width: checked before any
    work), ``min_batch`` (e.g. TRS's half-clean half-perturbed batch needs 2).
    """

    method: ClassVar[str] = ""
    min_models: ClassVar[int] = 2
    max_models: ClassVar[int | None] = None
    uses_correlation: ClassVar[bool] = False
    min_batch: ClassVar[int] = 1

    def __init__(self, config: Any, dataset: Any, members: Members, drop_last: bool, run: TrainingRun,
                 monitors: Sequence[EpochMonitor] = ()) -> None:
        self.config, self.dataset, self.members, self.drop_last, self.run = config, dataset, members, drop_last, run
        self.epochs = config.epochs
        self.names = members.names
        self.layers = dict(members.layers)
        self.monitors = list(monitors)

    @classmethod
    def regressors(cls, config: Any, names: list[str]) -> list[str]:
        """The members whose features are regressed on (their width bounds the batch from below)."""
        if config.corr_direction == "both":
            return list(names)
        return list(names[:-1])

    # -- models --------------------------------------------------------------------------------
    def build(self, run: TrainingRun) -> Built:
        if self.members.initial is not None:
            models = {n: m.to(memory_format=torch.channels_last) for n, m in self.members.initial.items()}
        else:  # in order, as the pair trainer creates model0 and model1 (the same RNG draws)
            models = {n: create_model(self.members.archs[n], **self.members.kwargs[n]).to(memory_format=torch.channels_last)
                      for n in self.names}
        parameters = [p for m in models.values() for p in m.parameters()]
        return Built(models, torch.optim.Adam(parameters, lr=self.config.lr))

    def start(self, models: dict[str, nn.Module], optimizer: torch.optim.Optimizer, start_epoch: int) -> None:
        super().start(models, optimizer, start_epoch)
        self.wrapped = [models[n] for n in self.names]
        for monitor in self.monitors:
            monitor.start(self, start_epoch)

    # -- batches -------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        steps = num_batches(len(self.dataset.train), self.config.batch_size, self.drop_last)
        limit = self.config.batches_per_epoch
        return steps if limit is None else min(steps, limit)

    def batches(self, epoch: int) -> Iterable[Any]:
        """The epoch's micro-batches (:meth:`epoch_batches`), cut at ``--batches-per-epoch``."""
        return islice(self.epoch_batches(epoch), self.steps_per_epoch())

    def epoch_batches(self, epoch: int) -> Iterable[Any]:
        return self.draw(epoch, self.config.seed)

    def draw(self, epoch: int, seed: int) -> Iterable[tuple[Tensor, Tensor]]:
        return iterate_batches(self.dataset.train, self.config.batch_size, shuffle=True, seed=seed, epoch=epoch,
                               shard=self.run.shard, device=self.run.device, drop_last=self.drop_last)

    # -- the forward pass ----------------------------------------------------------------------
    @staticmethod
    def channels_last(x: Tensor) -> Tensor:
        # Channels-last convolutions are ~1.6x faster with oneDNN on CPU for these small CNNs.
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

    def forward(self, x: Tensor, *, features: bool = True) -> tuple[list[Tensor], list[Tensor]]:
        """Every member's logits on ``x`` and (``features``) its feature-layer output, with graph."""
        x = self.channels_last(x)
        with ExitStack() as stack:
            recorded = [stack.enter_context(record_features(unwrap(m), self.layers[n]))
                        for n, m in zip(self.names, self.wrapped)] if features else []
            logits = [m(x) for m in self.wrapped]
        return logits, [r[self.layers[n]] for n, r in zip(self.names, recorded)]

    @staticmethod
    def member_ce(logits: list[Tensor], y: Tensor) -> list[Tensor]:
        """Each member's mean cross-entropy over the global batch (gathered with gradient)."""
        return [global_mean(F.cross_entropy(out, y, reduction="none")) for out in logits]

    # -- evaluation ----------------------------------------------------------------------------
    def evaluated_models(self) -> tuple[dict[str, nn.Module], dict[str, str]]:
        """The models (and their layers) evaluated after every epoch: the members."""
        return {n: self.models[n] for n in self.names}, self.layers

    def evaluate_before(self) -> dict[str, Any] | None:
        found = [m for m in (monitor.before(self.member_models()) for monitor in self.monitors) if m is not None]
        return {k: v for m in found for k, v in m.items()} if found else None

    def member_models(self) -> dict[str, nn.Module]:
        return {n: self.models[n] for n in self.names}

    def result(self, metrics: dict[str, Any]) -> Any:
        for monitor in self.monitors:
            value = monitor.result(metrics)
            if value is not None:
                return value
        return metrics

    def end_epoch(self, epoch: int, terms: dict[str, float], seconds: float) -> dict[str, Any]:
        metrics = self.evaluate_epoch(epoch, terms, seconds)
        for monitor in self.monitors:
            metrics.update(monitor.after(epoch, self.member_models(), metrics))
        return metrics

    def evaluate_epoch(self, epoch: int, terms: dict[str, float], seconds: float) -> dict[str, Any]:
        """The members' accuracy, feature statistics and the ensemble's accuracy; printed as one line."""
        config, run = self.config, self.run
        models, layers = self.evaluated_models()
        evaluation = evaluate_models(models, self.dataset.test, layers, batch_size=config.eval_batch_size,
                                     device=run.device, shard=run.shard, ensemble=len(self.names) > 1)
        r2 = [v for k, v in evaluation.items() if k.startswith("r2_") and not math.isnan(v)]
        metrics = {**prefixed("train", terms), **prefixed("test", evaluation), "time/train_epoch_s": seconds}
        if r2:
            metrics["test/r2_mean"] = sum(r2) / len(r2)
        accs = " / ".join(f"{evaluation[f'acc_{n}']:.4f}" for n in self.names)
        ensemble = f"  ensemble {evaluation['acc_ensemble']:.4f}" if "acc_ensemble" in evaluation else ""
        if r2:
            shown_r2 = f"  feature R^2 {metrics['test/r2_mean']:.3f}"
        elif any(k.startswith("r2_") for k in evaluation):  # too few test images for the regression
            first = self.names[0]
            shown_r2 = f"  feature R^2 {r2_text(math.nan, unwrap(models[first]), layers[first], self.dataset.input_shape)}"
        else:
            shown_r2 = ""
        run.print(f"{self.method} epoch {epoch + 1:3d}/{config.epochs}  loss {terms.get('loss', math.nan):.4f}  "
                  f"acc {accs}{ensemble}{shown_r2}  {seconds:.1f} s")
        for name in models:
            if evaluation[f"active_features_{name}"] < DEAD_FEATURES_BELOW:
                run.print(dead_features_warning(name, layers[name], evaluation[f"active_features_{name}"],
                                                correlation=self.uses_correlation and config.lambda_corr > 0,
                                                warmup_epochs=config.corr_warmup_epochs))
        return metrics
