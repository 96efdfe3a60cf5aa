"""Loss closures: the attacks maximise ``loss_fn(x_adv, y)``, a scalar tensor.

A closure hides what is attacked (one model, an ensemble, an autoencoder plus classifier) from the
attack, so FGSM/PGD/MI/DI/TI/SGM all work unchanged on any objective. For a targeted attack pass a
closure that returns minus the cross-entropy to the target labels.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from decorr.errors import DecorrError

#: ``loss_fn(x_adv, y) -> scalar``: what an attack maximises. ``x_adv`` is in pixel units [0, 1].
LossFn = Callable[[Tensor, Tensor], Tensor]


def ce_loss(model: nn.Module) -> LossFn:
    """Mean cross-entropy of ``model`` (torchattacks' convention).

    Mean and sum give the same attack: Linf steps use the gradient's sign and L2 steps normalise
    the gradient per sample. The model's train/eval mode is the caller's business (attack in eval
    mode, or batch norm couples the samples and updates its running statistics).
    """

    def loss_fn(x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x), y)

    return loss_fn


def ensemble_ce_loss(models: Sequence[nn.Module]) -> LossFn:
    """Mean cross-entropy of the ensemble's averaged logits (logit fusion; see also :func:`mean_ce_loss`)."""
    models = list(models)
    if not models:
        raise DecorrError("ensemble_ce_loss needs at least one model; pass a non-empty list")

    def loss_fn(x: Tensor, y: Tensor) -> Tensor:
        logits = torch.stack([model(x) for model in models]).mean(dim=0)
        return F.cross_entropy(logits, y)

    return loss_fn


def mean_ce_loss(models: Sequence[nn.Module]) -> LossFn:
    """Mean over the models of each one's mean cross-entropy: the loss-averaging ensemble attack of
    Liu et al. (ICLR 2017) as the transfer evaluation's ``--surrogate-ensemble`` uses it.

    ``sum(CE_k) / K``, so one model gives exactly :func:`ce_loss`. Every model sees the same input
    (after DI, when the attack applies it); SGM's ``skip_gradient`` on a module holding the models
    decays the residual branches of each.
    """
    models = list(models)
    if not models:
        raise DecorrError("mean_ce_loss needs at least one model; pass a non-empty list")

    def loss_fn(x: Tensor, y: Tensor) -> Tensor:
        return sum(F.cross_entropy(model(x), y) for model in models) / len(models)

    return loss_fn
