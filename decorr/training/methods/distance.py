"""``param``: members pushed to a set parameter distance from each other (SPEC section 2, P1 Fig. 1).

    L = sum_m CE_m + w * sum_{i < j} (||theta_i - theta_j||^2 - D)^2

P1 trains such pairs (D in {1000, ..., 3000}, w = 1e-5, 10 epochs) to show that the feature R^2 between
parallel models does not depend on their parameter distance. ``train/pair_classifiers.py --mode param`` is
this method with two members (:mod:`decorr.training.recipes`). The members must share an architecture.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from decorr.loss import parameter_distance
from decorr.training.methods.base import EnsembleTask, register_method
from decorr.distributed import unwrap

__all__ = ["DistanceTask", "distance_objective"]


def distance_objective(ce: Sequence[Tensor], models: Sequence[nn.Module], target: float,
                       weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """``sum_m CE_m + weight * sum_{i<j} (||theta_i - theta_j||^2 - target)^2`` and its terms."""
    plain = [unwrap(m) for m in models]
    loss = ce[0]
    for value in ce[1:]:
        loss = loss + value
    terms: dict[str, Tensor] = {f"ce{m}": value.detach() for m, value in enumerate(ce)}
    penalty: Tensor | None = None
    distances = []
    for i in range(len(plain)):
        for j in range(i + 1, len(plain)):
            distance = parameter_distance(plain[i], plain[j])
            distances.append(distance.detach())
            term = (distance - target) ** 2
            penalty = term if penalty is None else penalty + term
    terms["distance"] = torch.stack(distances).mean()
    if penalty is not None:
        loss = loss + weight * penalty
    terms["loss"] = loss.detach()
    return loss, terms


@register_method("param")
class DistanceTask(EnsembleTask):
    """Summed cross-entropy plus the squared gap of every pair's parameter distance to ``--param-distance``."""

    def loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        x, y = batch
        logits, _ = self.forward(x, features=False)
        return distance_objective(self.member_ce(logits, y), self.wrapped, self.config.param_distance,
                                  self.config.param_weight)

    def evaluate_epoch(self, epoch: int, terms: dict[str, float], seconds: float) -> dict[str, Any]:
        metrics = super().evaluate_epoch(epoch, terms, seconds)
        with torch.no_grad():
            plain = [unwrap(self.models[n]) for n in self.names]
            metrics["parameter_distance"] = float(torch.stack([parameter_distance(plain[i], plain[j])
                                                              for i in range(len(plain))
                                                              for j in range(i + 1, len(plain))]).mean())
        return metrics
