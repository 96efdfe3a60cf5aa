"""``ce`` (independent members) and ``dec`` (decorrelated members): the paper's pairs for N members.

SPEC section 2 (Wiedeman & Wang 2022, the paper's MNIST recipe: Adam 5e-3, batch 1000, 20 epochs,
lambda 0.05)::

    ce:   L = sqrt(sum_m CE_m^2)
    dec:  L = sqrt(sum_m CE_m^2) + lambda * mean over pairs of L_corr(f_i, f_j)

``L_corr`` is :func:`decorr.loss.pairwise_correlation_loss` (one-way: member j regressed on member i
for i < j; both: every ordered pair; eps absolute (the paper's) or relative). ``train/pair_classifiers.py
--mode cor|dec`` is this trainer with two members (:mod:`decorr.training.recipes`). CE means and the
correlation loss are those of the global batch (gathered with gradient across processes).
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from decorr.loss import pairwise_correlation_loss
from decorr.training.methods.base import EnsembleTask, register_method, sqrt_sum_of_squares

__all__ = ["DecorrelatedTask", "IndependentTask", "decorrelated_objective", "independent_objective"]


def independent_objective(ce: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """``sqrt(sum_m CE_m^2)`` of the members' (global-batch mean) cross-entropies, and its terms."""
    loss, terms = sqrt_sum_of_squares(list(ce))
    terms["loss"] = loss.detach()
    return loss, terms


def decorrelated_objective(ce: Sequence[Tensor], features: Sequence[Tensor], lambda_corr: float, *,
                           direction: str = "one-way", eps_mode: str = "absolute") -> tuple[Tensor, dict[str, Tensor]]:
    """``sqrt(sum_m CE_m^2) + lambda * L_corr`` over the members' feature pairs, and its terms (no
    correlation term, nor its cost, when ``lambda_corr`` is 0: the warm-up)."""
    loss, terms = sqrt_sum_of_squares(list(ce))
    if lambda_corr > 0:
        corr = pairwise_correlation_loss(list(features), direction, "mean", eps_mode=eps_mode)
        terms["corr"] = corr.detach()
        loss = loss + lambda_corr * corr
    terms["loss"] = loss.detach()
    return loss, terms


@register_method("ce")
class IndependentTask(EnsembleTask):
    """Independent members on the same batches: ``sqrt(sum_m CE_m^2)`` (the pairs' ``cor``)."""

    def loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch
        logits, _ = self.forward(x, features=False)
        return independent_objective(self.member_ce(logits, y))


@register_method("dec")
class DecorrelatedTask(EnsembleTask):
    """``sqrt(sum_m CE_m^2) + lambda * L_corr`` over the pairs of members (the pairs' ``dec``)."""

    uses_correlation = True

    def begin_epoch(self, epoch: int) -> None:
        self.lambda_corr = self.config.lambda_at(epoch)

    def loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        x, y = batch
        logits, features = self.forward(x, features=self.lambda_corr > 0)
        return decorrelated_objective(self.member_ce(logits, y), features, self.lambda_corr,
                                      direction=self.config.corr_direction, eps_mode=self.config.corr_eps)
