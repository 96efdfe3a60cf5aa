"""DVERGE (Yang et al., NeurIPS 2020) fine-tuning of N >= 2 classifiers (SPEC section 5, P1 Fig. 4).

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
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from decorr.attacks import ce_loss, pgd
from decorr.attacks.losses import LossFn
from decorr.config import opt
from decorr.distributed import global_mean
from decorr.errors import DecorrError, pixel_value
from decorr.features import layer_output
from decorr.training.loop import train_step
from decorr.features import eval_mode
from decorr.config import check_at_least, check_finite, check_positive, check_seed, check_subset
from decorr.training.run import unwrap

__all__ = [
    "DvergeConfig",
    "TARGET_SEED_OFFSET",
    "choose_layer",
    "distil_batch",
    "dverge_loss",
    "dverge_objective",
    "dverge_step",
    "feature_distillation",
    "feature_matching_loss",
    "layer_output",
    "stream_generator",
]

#: Added to the run's seed for the target batches' shuffle: ``SeedSequence([seed + 2**32, epoch])``
#: can never equal the source stream ``SeedSequence([seed, epoch])``.
TARGET_SEED_OFFSET = 2**32
#: Streams of :func:`stream_generator` (per epoch).
STREAM_LAYER = 1
STREAM_DISTILL = 2
#: The transfer evaluation's epsilons, steps and step (SPEC sections 4 and 5).
DEFAULT_EVAL_EPS = (0.05, 0.10, 0.15)


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
# Configuration


@dataclass
class DvergeConfig:
    """Hyperparameters of a DVERGE run; the defaults are P1's MNIST setting (SPEC section 5).

    ``layers``: empty for each model's own feature layer (from its checkpoint), one name for a fixed
    layer, several to draw one at random at the start of every epoch (DVERGE's random layer).
    ``adv_*`` (plus adversarial) default to the distillation's eps and step size with 10 steps.
    ``batches_per_epoch`` stops each epoch after that many batches of its shuffle (each epoch then
    sees a different part of the training set); ``train_subset`` uses the first N images only.
    ``eval_subset`` evaluates the transfer rates on the first N test images (None: all of them),
    ``accuracy_subset`` the natural accuracy (None: all); ``eval_features`` adds the pairs' feature R^2.
    """

    epochs: int = opt(10, "number of epochs")
    batch_size: int = opt(1000, "global batch size")
    lr: float = opt(5e-3, "Adam learning rate")
    layers: tuple[str, ...] = opt((), "distillation layer; several: one drawn at random every epoch (default: each "
                                      "model's feature layer)", flag="--layer", metavar="MODULE")
    eps: float = opt(0.15, "distillation Linf radius (pixel units)", type=pixel_value)
    steps: int = opt(20, "distillation steps")
    step_size: float = opt(3 / 255, "distillation step (pixel units)", type=pixel_value)
    random_start: bool = opt(False, "start the distillation at a random point of the ball")
    momentum: float = opt(0.0, "MI momentum of the distillation")
    plus_adv: bool = opt(False, "also train each model on its own PGD examples")
    adv_weight: float = opt(1.0, "weight of the plus-adv cross-entropy")
    adv_eps: float | None = opt(None, "plus-adv PGD radius (default: --eps)", type=pixel_value)
    adv_steps: int = opt(10, "plus-adv PGD steps")
    adv_step_size: float | None = opt(None, "plus-adv PGD step (default: --step-size)", type=pixel_value)
    seed: int = opt(0, "seed of the batches, the layer draws and the random starts")
    dataset: str | None = opt(None, "dataset name or .npz (default: the checkpoints' dataset)")
    train_subset: int | None = opt(None, "train on the first N training images")
    batches_per_epoch: int | None = opt(None, "stop every epoch after N batches of its shuffle (a shorter epoch; "
                                              "default: all)")
    eval_subset: int | None = opt(None, "transfer rates on the first N test images (default all)")
    eval_eps: tuple[float, ...] = opt(DEFAULT_EVAL_EPS, "epsilons of the PGD transfer evaluation", type=pixel_value)
    eval_steps: int = opt(40, "PGD steps of the transfer evaluation")
    eval_step_size: float = opt(3 / 255, "PGD step of the transfer evaluation", type=pixel_value)
    eval_batch_size: int = opt(1000, "batch size of the evaluation")
    eval_seed: int = opt(0, "seed of the evaluation's PGD random starts")
    eval_features: bool = opt(True, "skip the pairs' feature R^2 in the evaluation", flag="--no-features")
    accuracy_subset: int | None = opt(None, "natural accuracy on the first N test images (default all)")

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        self.eval_eps = tuple(float(e) for e in self.eval_eps)
        check_at_least("epochs", self.epochs, 0)
        for name in ("batch_size", "eval_steps", "eval_batch_size", "adv_steps"):
            check_at_least(name, getattr(self, name), 1)
        check_at_least("steps", self.steps, 0)
        check_positive("lr", self.lr)
        check_positive("eval_step_size", self.eval_step_size)
        for name in ("eps", "step_size", "momentum", "adv_weight"):
            check_finite(name, getattr(self, name), minimum=0)
        for name in ("adv_eps", "adv_step_size"):
            if getattr(self, name) is not None:
                check_finite(name, getattr(self, name), minimum=0)
        for eps in self.eval_eps:
            check_finite("eval_eps", eps, minimum=0)
        check_seed(self.seed)
        check_seed(self.eval_seed, "eval_seed")
        for name in ("train_subset", "batches_per_epoch", "eval_subset", "accuracy_subset"):
            check_subset(name, getattr(self, name))
        if len(set(self.layers)) != len(self.layers):
            raise DecorrError("a layer is listed twice in --layer; list each once")
        if not self.eval_eps:
            raise DecorrError("no evaluation epsilon; pass e.g. --eval-eps 0.05 0.1 0.15")
        if self.adv_eps is None:
            self.adv_eps = self.eps
        if self.adv_step_size is None:
            self.adv_step_size = self.step_size


def stream_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator for one purpose (``stream``) in one epoch; unrelated across the three numbers."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(stream)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def choose_layer(layers: Sequence[str], seed: int, epoch: int) -> str | None:
    """The distillation layer of ``epoch``: None (each model's own) for no layers, the one given,
    or one drawn uniformly from several, reproducibly from ``(seed, epoch)``."""
    if not layers:
        return None
    if len(layers) == 1:
        return layers[0]
    index = int(torch.randint(len(layers), (1,), generator=stream_generator(seed, epoch, STREAM_LAYER)))
    return layers[index]


# ------------------------------------------------------------------------------------------------
# The training step



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
    config: DvergeConfig,
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
    config: DvergeConfig,
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
    config: DvergeConfig,
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
