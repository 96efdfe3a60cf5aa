"""The records of a transfer evaluation (``results.json``) built from per-image predictions: one row per
attack and epsilon, the per-image worst case over attacks (and over sources), feature statistics of pairs.

Every accuracy and rate carries its count and a 95% Wilson interval; ``fooled`` holds the per-image
outcomes (packed bits, :func:`decorr.evaluation.compare.pack_outcomes`), so any later row can be derived
from them and runs can be compared paired.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from decorr.evaluation.compare import pack_outcomes
from decorr.evaluation.metrics import accuracy
from decorr.evaluation.stats import wilson_interval
from decorr.loss import BatchTooSmallError, pearson, r_squared

__all__ = ["ALL_SOURCES", "ANY_ATTACK", "FeatureSet", "eps_record", "first_pc_scores", "number", "interval",
           "pair_features", "worst_case_record"]

#: The ``attack`` of the per-image worst case over the run's attacks.
ANY_ATTACK = "any"
#: The key of the worst case over every source (and attack) of a run, per target.
ALL_SOURCES = "all_sources"


def number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def interval(successes: int, n: int) -> list[float] | None:
    """The 95% Wilson interval as ``[low, high]``; None when there is no sample."""
    found = wilson_interval(successes, n)
    return None if found is None else list(found)


# ------------------------------------------------------------------------------------------------
# Feature statistics


def first_pc_scores(z: Tensor) -> Tensor:
    """Scores of the samples on their first principal axis (float64), as in ``decorr.loss.pca_pearson``.

    The axis is the top eigenvector of the centred Gram matrix ``z^T z`` (the top right singular vector,
    found without a full SVD), so ``|pearson(first_pc_scores(a), first_pc_scores(b))|`` is
    ``pca_pearson(a, b)``; computed once per model and input set, it is shared by every pair.
    """
    z = z.reshape(z.shape[0], -1).double()
    z = z - z.mean(dim=0, keepdim=True)
    _, vectors = torch.linalg.eigh(z.T @ z)
    return z @ vectors[:, -1]


class FeatureSet:
    """One model's features on one input set, with its PCA scores computed at most once."""

    def __init__(self, features: Tensor) -> None:
        self.features = features
        self._scores: Tensor | None = None

    @property
    def scores(self) -> Tensor:
        if self._scores is None:
            self._scores = first_pc_scores(self.features)
        return self._scores


def r2_or_none(z1: Tensor, z2: Tensor, notes: set[str]) -> float | None:
    try:
        value = r_squared(z1, z2, gather=False)
    except BatchTooSmallError:
        notes.add(f"feature R^2 needs more than {z1[0].numel() + 1} samples for {z1[0].numel()} features; "
                  f"got {z1.shape[0]}, so it is null (use more samples)")
        return None
    return number(value)


def pca_or_none(a: FeatureSet, b: FeatureSet) -> float | None:
    value = pearson(a.scores, b.scores)
    return None if math.isnan(value) else abs(value)


def pair_features(za: FeatureSet, zb: FeatureSet, notes: set[str]) -> dict[str, Any]:
    """A pair's statistics on natural inputs (b regressed on a and the reverse, PCA Pearson)."""
    return {"r2": r2_or_none(za.features, zb.features, notes), "r2_reverse": r2_or_none(zb.features, za.features, notes),
            "pca_pearson": pca_or_none(za, zb), "num_features": int(za.features.shape[1]),
            "num_samples": int(za.features.shape[0])}


# ------------------------------------------------------------------------------------------------
# Rows


def eps_record(eps: float, attack_eps: float, attack: str, sources: Sequence[str], targets: Sequence[str],
               fooled: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Any]:
    """The metrics of one attack at one epsilon from ``fooled[src][model]``, per image, whether the model
    misclassifies the source's example (the source's own entry is its white-box outcome)."""
    n = len(next(iter(next(iter(fooled.values())).values())))
    correct = {src: {tgt: int((~fooled[src][tgt]).sum()) for tgt in targets} for src in sources}
    white = {src: int((~fooled[src][src]).sum()) for src in sources}
    row: dict[str, Any] = {
        "attack": attack, "eps": eps, "attack_eps": attack_eps,
        "white_box_accuracy": {s: number(white[s] / n) if n else None for s in sources},
        "white_box_accuracy_ci95": {s: interval(white[s], n) for s in sources},
        "white_box_correct": white,
        "accuracy": {s: {t: number(correct[s][t] / n) if n else None for t in targets} for s in sources},
        "accuracy_ci95": {s: {t: interval(correct[s][t], n) for t in targets} for s in sources},
        "correct": correct,
        "transfer": {}, "transfer_ci95": {}, "source_fooled": {}, "transferred": {},
        "fooled": {s: {name: pack_outcomes(bits.numpy()) for name, bits in fooled[s].items()} for s in sources},
    }
    for src in sources:
        source_fooled = fooled[src][src]
        row["source_fooled"][src] = int(source_fooled.sum())
        for key in ("transfer", "transfer_ci95", "transferred"):
            row[key][src] = {}
        for tgt in targets:
            if tgt == src:
                rate, hits = None, None
            else:
                hits = int((fooled[src][tgt] & source_fooled).sum())
                rate = number(hits / row["source_fooled"][src]) if row["source_fooled"][src] else None
            row["transfer"][src][tgt], row["transferred"][src][tgt] = rate, hits
            row["transfer_ci95"][src][tgt] = None if hits is None else interval(hits, row["source_fooled"][src])
    return row


def source_correct_record(source_correct: Tensor, preds: Mapping[str, Tensor], y: Tensor) -> dict[str, Any]:
    """Attack success over the images the source classifies correctly (``source_correct``, per image): their
    count, and per model the examples it misclassifies among them and that fraction (TransferAttack's figures
    are over all images: 1 - accuracy; this is the view that leaves out images the source already got wrong)."""
    images = int(source_correct.sum())
    fooled = {name: int(((pred != y) & source_correct).sum()) for name, pred in preds.items()}
    return {"images": images, "fooled": fooled,
            "success": {name: number(count / images) if images else None for name, count in fooled.items()}}


def worst_case_record(eps: float, attack_eps: float, sources: Sequence[str], targets: Sequence[str],
                      by_attack: Sequence[Mapping[str, Mapping[str, Tensor]]]) -> dict[str, Any]:
    """The per-image worst case at one epsilon: an image counts as fooled when any attack of the run fooled
    it (a row like :func:`eps_record`'s, attack ``any``), and under ``all_sources`` per target when any
    attack from any source fooled it (the defence's accuracy under the whole battery, DVERGE's "all")."""
    fooled = {src: {name: _any([f[src][name] for f in by_attack]) for name in by_attack[0][src]}
              for src in sources}
    row = eps_record(eps, attack_eps, ANY_ATTACK, sources, targets, fooled)
    everything: dict[str, Any] = {"accuracy": {}, "accuracy_ci95": {}, "correct": {}, "fooled": {}, "sources": list(sources)}
    for tgt in targets:
        hit = _any([fooled[src][tgt] for src in sources])
        n, correct = len(hit), int((~hit).sum())
        everything["correct"][tgt] = correct
        everything["accuracy"][tgt] = number(correct / n) if n else None
        everything["accuracy_ci95"][tgt] = interval(correct, n)
        everything["fooled"][tgt] = pack_outcomes(hit.numpy())
    row[ALL_SOURCES] = everything
    return row


def _any(outcomes: Sequence[Tensor]) -> Tensor:
    total = outcomes[0].clone()
    for other in outcomes[1:]:
        total |= other
    return total


def fooled_outcomes(preds: Mapping[str, Tensor], y: Tensor) -> dict[str, Tensor]:
    """Per model, per image, whether its label differs from the true one."""
    return {name: (pred != y) for name, pred in preds.items()}


def natural_record(pred: Tensor, y: Tensor) -> tuple[float | None, int, list[float] | None]:
    correct = int((pred == y).sum())
    return number(accuracy(pred, y)), correct, interval(correct, len(y))


__all__ += ["fooled_outcomes", "natural_record", "pca_or_none", "r2_or_none"]
