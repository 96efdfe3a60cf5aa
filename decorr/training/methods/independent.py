"""``ce`` (independent members) and ``dec`` (decorrelated members): the pair trainer for N members.

SPEC section 2 (Wiedeman & Wang 2022, the paper's MNIST recipe: Adam 5e-3, batch 1000, 20 epochs,
lambda 0.05)::

    ce:   L = sqrt(sum_m CE_m^2)
    dec:  L = sqrt(sum_m CE_m^2) + lambda * mean over pairs of L_corr(f_i, f_j)

``L_corr`` is :func:`decorr.loss.pairwise_correlation_loss` (one-way: member j regressed on member i
for i < j; both: every ordered pair; eps absolute (the paper's) or relative). With N = 2, one-way and
absolute eps this is exactly ``train/pair_classifiers.py --mode dec`` (and ``ce`` is ``--mode cor``):
same model creation order, batches and arithmetic, so the weights are bit-identical
(``tests/test_ensemble_training.py``). CE means and the correlation loss are those of the global batch
(gathered with gradient across processes).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from decorr.loss import pairwise_correlation_loss
from decorr.training.methods.base import EnsembleTask, register_method, sqrt_sum_of_squares


@register_method("ce")
class IndependentTask(EnsembleTask):
    """Independent members on the same batches: ``sqrt(sum_m CE_m^2)`` (the pairs' ``cor``)."""

    def loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch
        logits, _ = self.forward(x, features=False)
        loss, terms = sqrt_sum_of_squares(self.member_ce(logits, y))
        terms["loss"] = loss.detach()
        return loss, terms


@register_method("dec")
class DecorrelatedTask(EnsembleTask):
    """``sqrt(sum_m CE_m^2) + lambda * L_corr`` over the pairs of members (the pairs' ``dec``)."""

    uses_correlation = True

    def begin_epoch(self, epoch: int) -> None:
        self.lambda_corr = self.config.lambda_at(epoch)

    def loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        x, y = batch
        logits, features = self.forward(x)
        loss, terms = sqrt_sum_of_squares(self.member_ce(logits, y))
        if self.lambda_corr > 0:
            corr = pairwise_correlation_loss(features, self.config.corr_direction, "mean",
                                             eps_mode=self.config.corr_eps)
            terms["corr"] = corr.detach()
            loss = loss + self.lambda_corr * corr
        terms["loss"] = loss.detach()
        return loss, terms
