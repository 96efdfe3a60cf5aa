"""Loss closures (the attacks maximise ``loss_fn(x_adv, y)``, a scalar tensor) and the suite's classification
objectives ``ce``, ``cw`` and ``logit``.

A closure hides what is attacked (one model, an ensemble, an autoencoder plus classifier) from the
attack, so FGSM/PGD/MI/DI/TI/SGM all work unchanged on any objective. For a targeted attack pass a
closure that returns minus the cross-entropy to the target labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from decorr.attacks.base import Context, LossFn, Objective
from decorr.attacks.registry import register_attack
from decorr.config import opt
from decorr.errors import DecorrError



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


# ------------------------------------------------------------------------------------------------
# The classification objectives of the suite: ce (default), cw, logit


@dataclass(frozen=True)
class _Classification(Objective):
    """A loss of the source's outputs and the labels (target labels when targeted); for an ensemble
    surrogate attacked on its members' mean loss (``combine="loss"``), the mean over members."""

    def value(self, logits: Tensor, y: Tensor, targeted: bool, log_probs: bool) -> Tensor:
        raise NotImplementedError

    def prepare(self, ctx: Context) -> Callable[[Tensor, int | None], Tensor]:
        source, y, targeted = ctx.source, ctx.y, ctx.targeted
        average_members = source.combine == "loss" and ctx.attack.ensemble is None

        def loss(x_in: Tensor, member: int | None = None) -> Tensor:
            if member is None and average_members:
                return sum(self.value(m(x_in), y, targeted, False) for m in source.members) / len(source.members)
            log_probs = member is None and ctx.attack.ensemble is None and source.log_probs
            return self.value(ctx.logits(x_in, member), y, targeted, log_probs)

        return loss


@register_attack("ce")
@dataclass(frozen=True)
class CrossEntropy(_Classification):
    """Cross-entropy (mean over the batch); targeted: minus the cross-entropy to the target class."""

    def value(self, logits: Tensor, y: Tensor, targeted: bool, log_probs: bool) -> Tensor:
        ce = F.nll_loss(logits, y) if log_probs else F.cross_entropy(logits, y)
        return -ce if targeted else ce


def _other_max(logits: Tensor, y: Tensor) -> Tensor:
    """The largest logit of a class other than ``y``, per sample."""
    masked = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return masked.max(dim=1).values


@register_attack("cw")
@dataclass(frozen=True)
class CarliniWagner(_Classification):
    """The CW margin (Carlini & Wagner 2017), capped at ``kappa``: untargeted ``min(max_{j != y} z_j - z_y,
    kappa)``, targeted ``min(z_t - max_{j != t} z_j, kappa)``, averaged over the batch. DVERGE's
    black-box evaluation uses kappa 0.1."""

    kappa: float = opt(0.0, "confidence: the margin stops counting beyond kappa (DVERGE: 0.1)", flag="--cw-kappa")

    def check(self) -> None:
        if not (isinstance(self.kappa, (int, float)) and self.kappa >= 0 and self.kappa < float("inf")):
            self.fail("kappa", f"must be a finite number >= 0, got {self.kappa!r}")

    def value(self, logits: Tensor, y: Tensor, targeted: bool, log_probs: bool) -> Tensor:
        own = logits.gather(1, y[:, None])[:, 0]
        margin = own - _other_max(logits, y) if targeted else _other_max(logits, y) - own
        return torch.clamp(margin, max=self.kappa).mean()


@register_attack("logit")
@dataclass(frozen=True)
class LogitLoss(_Classification):
    """The logit of the class (Zhao et al. 2021, "a second look at transferable targeted attacks"):
    targeted, the target's logit; untargeted, minus the true class's logit."""

    def value(self, logits: Tensor, y: Tensor, targeted: bool, log_probs: bool) -> Tensor:
        own = logits.gather(1, y[:, None])[:, 0]
        return own.mean() if targeted else -own.mean()
