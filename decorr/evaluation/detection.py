"""Disagreement detection: an ensemble flags an input when its members disagree.

The decorrelation paper's suggestion: adversarial examples that transfer poorly between members make the
members disagree, so disagreement is a detector. Per input, from the members' logits (K, N, classes):

- ``flag``: the members' predicted labels (argmax) are not all equal (binary; no threshold to choose);
- ``score``: the mean total-variation distance between each member's probability vector and the
  ensemble's mean probability, ``1/K sum_k 1/2 ||p_k - p_mean||_1``, in [0, 1 - 1/K]: 0 when the members
  agree exactly, continuous, so its ROC AUC does not depend on a threshold.

:func:`detection_summary` turns the flags and scores on natural inputs (negatives) and on adversarial
inputs (positives) into the numbers the transfer evaluation reports per attack source, epsilon and
ensemble (``by_eps[i]["detection"][source][ensemble]``):

- ``fpr``: the fraction of natural inputs flagged (the flag's false-positive rate; ``natural_flagged``
  of ``num_natural``), with its 95% Wilson interval;
- ``detection_rate``: the fraction of the adversarial examples flagged (``flagged`` of ``num_adversarial``);
- ``detection_rate_fooled``: the fraction flagged among the adversarial examples that fool the ensemble
  (``flagged_fooled`` of ``fooled``; null when none fools it) — the ones detection has to catch;
- ``auc`` / ``auc_fooled``: ROC AUC of ``score`` between the natural inputs and all (or the fooling)
  adversarial examples: ``P(score_adv > score_nat) + P(score_adv == score_nat) / 2``, the Mann-Whitney
  statistic over ``n_nat * n_adv``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from decorr.errors import DecorrError
from decorr.evaluation.stats import wilson_interval

__all__ = ["SCORE", "detection_summary", "disagreement", "roc_auc"]

#: The continuous score's name in the results.
SCORE = "mean_total_variation"


@torch.no_grad()
def disagreement(member_logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(flag, score)`` per input from stacked member logits (K, N, classes); see the module docstring."""
    if member_logits.dim() != 3:
        raise DecorrError(f"member logits must be shaped (members, N, classes), got {tuple(member_logits.shape)}")
    labels = member_logits.argmax(dim=2)
    flag = (labels != labels[:1]).any(dim=0)
    prob = member_logits.double().softmax(dim=2)
    score = 0.5 * (prob - prob.mean(dim=0, keepdim=True)).abs().sum(dim=2).mean(dim=0)
    return flag.cpu(), score.cpu()


def roc_auc(negative: np.ndarray | Tensor, positive: np.ndarray | Tensor) -> float | None:
    """ROC AUC of a score that should be higher on ``positive``: the Mann-Whitney U over ``n_neg * n_pos``
    (ties count one half), from average ranks; None when either side is empty."""
    neg = np.asarray(negative, dtype=np.float64).ravel()
    pos = np.asarray(positive, dtype=np.float64).ravel()
    if neg.size == 0 or pos.size == 0:
        return None
    if not (np.isfinite(neg).all() and np.isfinite(pos).all()):
        raise DecorrError("detection scores must be finite; check the models' outputs for NaN")
    values = np.concatenate([neg, pos])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    # Average rank (1-based) of each distinct value: the ranks it spans, averaged.
    ends = np.cumsum(counts)
    average = ends - (counts - 1) / 2.0
    rank_sum = average[inverse[neg.size:]].sum()
    u = rank_sum - pos.size * (pos.size + 1) / 2.0
    return float(u / (neg.size * pos.size))


def _rate(k: int, n: int) -> tuple[float | None, list[float] | None]:
    interval = wilson_interval(k, n)
    return (k / n if n else None), (list(interval) if interval is not None else None)


def detection_summary(natural_flag: Tensor, natural_score: Tensor, adv_flag: Tensor, adv_score: Tensor,
                      fooled: Tensor) -> dict[str, Any]:
    """The detection record of one ensemble on one source's adversarial examples (module docstring).

    ``fooled`` (bool, per adversarial example): the ensemble misclassifies it.
    """
    natural_flag, adv_flag, fooled = natural_flag.bool(), adv_flag.bool(), fooled.bool()
    if adv_flag.shape != fooled.shape or adv_score.shape != adv_flag.shape or natural_score.shape != natural_flag.shape:
        raise DecorrError("detection flags, scores and fooled indicators must have one shape per input set")
    n_nat, n_adv, n_fooled = len(natural_flag), len(adv_flag), int(fooled.sum())
    natural_flagged, flagged = int(natural_flag.sum()), int(adv_flag.sum())
    flagged_fooled = int((adv_flag & fooled).sum())
    fpr, fpr_ci = _rate(natural_flagged, n_nat)
    rate, rate_ci = _rate(flagged, n_adv)
    rate_fooled, rate_fooled_ci = _rate(flagged_fooled, n_fooled)
    return {
        "fpr": fpr, "fpr_ci95": fpr_ci, "natural_flagged": natural_flagged, "num_natural": n_nat,
        "detection_rate": rate, "detection_rate_ci95": rate_ci, "flagged": flagged, "num_adversarial": n_adv,
        "detection_rate_fooled": rate_fooled, "detection_rate_fooled_ci95": rate_fooled_ci,
        "flagged_fooled": flagged_fooled, "fooled": n_fooled,
        "score": SCORE,
        "auc": roc_auc(natural_score.numpy(), adv_score.numpy()),
        "auc_fooled": roc_auc(natural_score.numpy(), adv_score[fooled].numpy()),
    }
