"""``dverge``: DVERGE (Yang et al., NeurIPS 2020) for N >= 2 members (SPEC section 5, P1 Fig. 4): the feature
distillation, the objective, and the task on the one loop.

Feature distillation: for a source batch ``xs`` and an unrelated target batch ``xt``, find ``x_d`` in
the Linf eps-ball of ``xs`` whose features at ``layer`` match those of ``xt``, by signed gradient
descent on ``||f^l(x_d) - f^l(xt)||^2``. That is PGD on the negated distance, so the distillation *is*
:func:`decorr.attacks.pgd` with a feature-matching loss closure (random start and MI momentum come
with it). Signed steps do not depend on the loss's positive scale, and the models are distilled in
eval mode where samples do not interact, so the sum over the batch used here gives exactly the steps
a per-sample mean would (checked in the tests).

One DVERGE step, for models ``f_1 .. f_N`` on ``(xs, ys)`` with targets ``xt``::

    x_d^i = distill(f_i, xs, xt)                                   for every i (eval mode)
    L_j   = mean_{i != j} CE(f_j(x_d^i), ys)  [+ w * CE(f_j(PGD_j(xs)), ys)  "plus adversarial"]
    L     = sum_j L_j                                              one Adam over all models

Each ``L_j`` depends only on model j's parameters (the distilled examples are constants), so one Adam
over all parameters takes exactly the steps of DVERGE's one Adam per model. DVERGE sums over ``i != j``
where we average: the same for a pair, and a constant factor N - 1 (which Adam nearly cancels) beyond.

Choices made here (DVERGE's code does not pin them down for our setting):

- Target batches come from a second, independently shuffled pass over the training set (DVERGE zips
  a second shuffled loader): ``iterate_batches`` with seed ``seed + TARGET_SEED_OFFSET``, so it is
  deterministic per ``(seed, epoch)`` and resumes exactly.
- Distillation and the plus-adversarial PGD run in eval mode (no batch-norm statistics are updated
  by the attack's forward passes); the training forward runs in train mode.
- The forward pass of the distillation stops at ``layer`` (:func:`layer_output`): the layers above
  it cost nothing.
- Random starts and the layer drawn for an epoch come from CPU generators seeded by
  ``(seed, epoch, stream)``. Momentum normalises each sample's gradient by its own L1 norm (MI-FGSM,
  as in ``pgd``), where DVERGE's code divides by the L1 norm of the whole batch.

From scratch (``--method dverge``) the members start freshly initialised; ``--init SPEC ...`` starts from
trained models (``train/dverge.py``, P1's recipe, is this method with its settings and a per-epoch transfer
evaluation: :mod:`decorr.training.recipes`). DVERGE on decorrelated members (the paper's ``dec+dverge``)
is two runs: ``--method dec`` into RUN_DIR, then ``--method dverge --init RUN_DIR``. Defaults are P1's MNIST
setting: eps 0.15, 20 steps of 3/255 at each member's feature layer; DVERGE's own CIFAR-10 setting is
``--dverge-eps 0.07 --dverge-steps 10 --dverge-step-size 0.007 --dverge-layers L1 L2 ...``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from decorr.attacks import ce_loss, pgd
from decorr.attacks.losses import LossFn
from decorr.distributed import global_mean
from decorr.errors import DecorrError
from decorr.features import eval_mode, layer_output
from decorr.training.loop import train_step
from decorr.training.methods.base import EnsembleTask, register_method
from decorr.training.methods.shared import stream_generator
from decorr.distributed import unwrap

__all__ = ["Distillation", "DvergeTask", "TARGET_SEED_OFFSET", "choose_layer", "distil_batch", "dverge_loss",
           "dverge_objective", "dverge_step", "feature_distillation", "feature_matching_loss"]

#: Added to the run's seed for the target batches' shuffle: ``SeedSequence([seed + 2**32, epoch])``
#: can never equal the source stream ``SeedSequence([seed, epoch])``.
TARGET_SEED_OFFSET = 2**32
#: Streams of :func:`decorr.training.methods.shared.stream_generator` (per epoch).
STREAM_LAYER = 1
STREAM_DISTILL = 2


@dataclass(frozen=True)
class Distillation:
    """The settings of one DVERGE step: the distillation (eps, steps, step_size, random_start,
    momentum) and the optional plus-adversarial term (its weight, PGD radius, steps and step)."""

    eps: float = 0.15
    steps: int = 20
    step_size: float = 3 / 255
    random_start: bool = False
    momentum: float = 0.0
    plus_adv: bool = False
    adv_weight: float = 1.0
    adv_eps: float | None = None
    adv_steps: int = 10
    adv_step_size: float | None = None

    def __post_init__(self) -> None:
        if self.adv_eps is None:
            object.__setattr__(self, "adv_eps", self.eps)
        if self.adv_step_size is None:
            object.__setattr__(self, "adv_step_size", self.step_size)


# ------------------------------------------------------------------------------------------------
# Feature distillation


def feature_matching_loss(model: nn.Module, layer: str, target_features: Tensor) -> LossFn:
    """``-sum ||f^layer(x) - target||^2`` over the batch: what PGD maximises to distil features."""
    target = target_features.detach()

    def loss_fn(x: Tensor, _y: Tensor) -> Tensor:
        return -(layer_output(model, x, layer).float() - target.float()).pow(2).sum()

    return loss_fn


def feature_distillation(
    model: nn.Module,
    xs: Tensor,
    xt: Tensor,
    *,
    layer: str,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool = False,
    momentum: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``x_d`` in the Linf ``eps``-ball of ``xs`` (and in [0, 1]) whose ``layer`` features approach ``xt``'s.

    ``steps`` signed steps of ``step_size`` descending ``||f^layer(x_d) - f^layer(xt)||^2`` (PGD on its
    negation), each followed by projection to the ball and clipping to [0, 1]. ``xs`` and ``xt`` are
    batches of the same size. The model's train/eval mode is the caller's (use eval mode).
    """
    if xs.shape != xt.shape:
        raise DecorrError(f"source and target batches must have the same shape, got {tuple(xs.shape)} "
                          f"and {tuple(xt.shape)}")
    with torch.no_grad():
        target = layer_output(model, xt, layer)
    labels = torch.zeros(xs.shape[0], dtype=torch.long, device=xs.device)  # unused by the loss
    return pgd(feature_matching_loss(model, layer, target), xs, labels, eps=eps, steps=steps,
               step_size=step_size, norm="linf", random_start=random_start, momentum=momentum,
               generator=generator)


# ------------------------------------------------------------------------------------------------
# The step


def choose_layer(layers: Sequence[str], seed: int, epoch: int) -> str | None:
    """The distillation layer of ``epoch``: None (each model's own) for no layers, the one given,
    or one drawn uniformly from several, reproducibly from ``(seed, epoch)``."""
    if not layers:
        return None
    if len(layers) == 1:
        return layers[0]
    index = int(torch.randint(len(layers), (1,), generator=stream_generator(seed, epoch, STREAM_LAYER)))
    return layers[index]


def dverge_objective(
    models: Sequence[nn.Module],
    distilled: Sequence[Tensor],
    ys: Tensor,
    *,
    adversarial: Sequence[Tensor] | None = None,
    adv_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``sum_j L_j`` with ``L_j = mean_{i != j} CE(f_j(x_d^i), ys) [+ adv_weight * CE(f_j(adv_j), ys)]``.

    ``distilled[i]`` was distilled with model i; ``adversarial[j]`` (plus adversarial) are PGD examples
    of model j itself. Each model sees its inputs in one forward pass (a concatenated batch), which is
    also what data-parallel wrappers need. CE means are over the global batch.
    """
    n = len(models)
    if n < 2 or len(distilled) != n:
        raise DecorrError(f"DVERGE needs at least 2 models and one distilled batch per model, got "
                          f"{n} models and {len(distilled)} batches")
    batch = ys.shape[0]
    total = ys.new_zeros((), dtype=torch.float32)
    terms: dict[str, Tensor] = {}
    for j, model in enumerate(models):
        inputs = [distilled[i] for i in range(n) if i != j]
        if adversarial is not None:
            inputs.append(adversarial[j])
        logits = model(torch.cat(inputs))
        ce = [global_mean(F.cross_entropy(chunk.float(), ys, reduction="none"))
              for chunk in logits.split(batch)]
        distill_ce = torch.stack(ce[: n - 1]).mean()
        loss = distill_ce
        terms[f"ce_distilled_model{j}"] = distill_ce.detach()
        if adversarial is not None:
            loss = loss + adv_weight * ce[-1]
            terms[f"ce_adv_model{j}"] = ce[-1].detach()
        total = total + loss
    terms["loss"] = total.detach()
    return total, terms


def distil_batch(
    models: Sequence[nn.Module],
    xs: Tensor,
    ys: Tensor,
    xt: Tensor,
    config: Distillation,
    layers: Sequence[str],
    *,
    generator: torch.Generator | None = None,
) -> tuple[list[Tensor], list[Tensor] | None]:
    """Every model's distilled batch (model i at ``layers[i]``) and, plus adversarial, its own PGD
    examples; computed in eval mode (each model's mode is restored after)."""
    plain = [unwrap(m) for m in models]
    distilled: list[Tensor] = []
    adversarial: list[Tensor] | None = [] if config.plus_adv else None
    with eval_mode(*plain):
        for i, m in enumerate(plain):
            x_d = feature_distillation(m, xs, xt, layer=layers[i], eps=config.eps, steps=config.steps,
                                       step_size=config.step_size, random_start=config.random_start,
                                       momentum=config.momentum, generator=generator)
            distilled.append(x_d)
            if adversarial is not None:
                adversarial.append(pgd(ce_loss(m), xs, ys, eps=config.adv_eps, steps=config.adv_steps,
                                       step_size=config.adv_step_size, random_start=True, generator=generator))
    return distilled, adversarial


def dverge_loss(
    models: Sequence[nn.Module],
    xs: Tensor,
    ys: Tensor,
    xt: Tensor,
    config: Distillation,
    layers: Sequence[str],
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Distil ``xs`` toward ``xt`` with every model, then :func:`dverge_objective` with the models in
    train mode (the training forward)."""
    distilled, adversarial = distil_batch(models, xs, ys, xt, config, layers, generator=generator)
    for m in models:
        m.train()
    return dverge_objective(models, distilled, ys, adversarial=adversarial, adv_weight=config.adv_weight)


def dverge_step(
    models: Sequence[nn.Module],
    optimizer: torch.optim.Optimizer,
    xs: Tensor,
    ys: Tensor,
    xt: Tensor,
    config: Distillation,
    layers: Sequence[str],
    *,
    generator: torch.Generator | None = None,
    backward: Callable[[Tensor], None] = Tensor.backward,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> dict[str, Tensor]:
    """One optimiser step on :func:`dverge_loss` (:func:`decorr.training.loop.train_step`); returns its loss
    terms (detached)."""
    return train_step(optimizer, [None],
                      lambda _: dverge_loss(models, xs, ys, xt, config, layers, generator=generator),
                      backward=backward, autocast=autocast)


# ------------------------------------------------------------------------------------------------
# The task


def distillation_of(config: Any) -> Distillation:
    """The :class:`Distillation` of an ensemble config's ``dverge_*`` fields."""
    return Distillation(eps=config.dverge_eps, steps=config.dverge_steps, step_size=config.dverge_step_size,
                        random_start=config.dverge_random_start, momentum=config.dverge_momentum,
                        plus_adv=config.dverge_plus_adv, adv_weight=config.dverge_adv_weight,
                        adv_eps=config.dverge_adv_eps, adv_steps=config.dverge_adv_steps,
                        adv_step_size=config.dverge_adv_step_size)


@register_method("dverge")
class DvergeTask(EnsembleTask):
    """N members, every source batch distilled by each member and learnt by the others."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.distillation = distillation_of(self.config)

    def begin_epoch(self, epoch: int) -> None:
        self.layer = choose_layer(self.config.dverge_layers, self.config.seed, epoch)
        self.distill_layers = [self.layer or self.layers[n] for n in self.names]
        self.generator = stream_generator(self.config.seed, epoch, STREAM_DISTILL)

    def epoch_batches(self, epoch: int) -> Iterable[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]:
        # Target batches: a second, independent shuffle of the training set (DVERGE zips a second loader).
        return zip(self.draw(epoch, self.config.seed), self.draw(epoch, self.config.seed + TARGET_SEED_OFFSET))

    def loss(self, batch: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, dict[str, Tensor]]:
        (xs, ys), (xt, _yt) = batch
        xs, xt = self.channels_last(xs), self.channels_last(xt)
        return dverge_loss(self.wrapped, xs, ys, xt, self.distillation, self.distill_layers, generator=self.generator)

    def evaluate_epoch(self, epoch: int, terms: dict[str, float], seconds: float) -> dict[str, Any]:
        metrics = super().evaluate_epoch(epoch, terms, seconds)
        metrics["layer"] = self.layer if self.layer is not None else ",".join(sorted(set(self.distill_layers)))
        return metrics
