"""Disagreement detection: AUC against a direct pair count, flags and rates on constructed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decorr.evaluation.detection import detection_summary, disagreement, roc_auc
from decorr.errors import DecorrError
from decorr.evaluation.stats import wilson_interval


def pair_count_auc(neg, pos) -> float:
    """O(n^2): the fraction of (negative, positive) pairs ordered right, ties one half."""
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for n in neg for p in pos)
    return total / (len(neg) * len(pos))


def test_auc_equals_pair_count():
    rng = np.random.default_rng(0)
    for trial in range(20):
        neg = rng.integers(0, 6, size=rng.integers(1, 40)).astype(float)  # many ties
        pos = rng.integers(0, 8, size=rng.integers(1, 40)).astype(float)
        assert roc_auc(neg, pos) == pytest.approx(pair_count_auc(neg, pos), abs=1e-12)
    neg, pos = rng.normal(size=300), rng.normal(0.5, 1, size=200)
    assert roc_auc(neg, pos) == pytest.approx(pair_count_auc(neg, pos), abs=1e-12)
    assert roc_auc([0.0, 0.1], [0.2, 0.3]) == 1.0 and roc_auc([0.2, 0.3], [0.0, 0.1]) == 0.0
    assert roc_auc([0.5, 0.5], [0.5]) == 0.5
    assert roc_auc([], [1.0]) is None and roc_auc([1.0], []) is None
    with pytest.raises(DecorrError, match="finite"):
        roc_auc([np.nan], [1.0])


def test_disagreement_flag_and_score_by_hand():
    # Two members, three inputs, two classes: agree exactly; agree on the label, not the probabilities; disagree.
    logits = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [3.0, 0.0]],
                           [[2.0, 0.0], [3.0, 0.0], [0.0, 3.0]]])
    flag, score = disagreement(logits)
    assert flag.tolist() == [False, False, True]
    p = torch.sigmoid(torch.tensor([1.0, 3.0], dtype=torch.float64))  # P(class 0) of each member on input 1
    # Two members: each is |p1 - p2| / 2 from the mean in each class, TV = |p1 - p2| / 2.
    assert score[0].item() == 0.0
    assert score[1].item() == pytest.approx(abs(p[0] - p[1]).item() / 2, abs=1e-12)
    q = torch.sigmoid(torch.tensor(3.0, dtype=torch.float64)).item()
    assert score[2].item() == pytest.approx(abs(q - (1 - q)) / 2, abs=1e-12)
    with pytest.raises(DecorrError, match="members, N, classes"):
        disagreement(logits[0])


def test_detection_summary_on_a_constructed_case():
    # 10 natural inputs, 2 flagged: FPR 0.2. 8 adversarial, 5 flagged; 4 fool the ensemble, 3 of those flagged.
    natural_flag = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    natural_score = torch.tensor([0.5, 0.4, 0.0, 0.0, 0.1, 0.0, 0.2, 0.0, 0.0, 0.05], dtype=torch.float64)
    adv_flag = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0], dtype=torch.bool)
    adv_score = torch.tensor([0.6, 0.5, 0.3, 0.0, 0.45, 0.7, 0.1, 0.0], dtype=torch.float64)
    fooled = torch.tensor([1, 1, 0, 1, 1, 0, 0, 0], dtype=torch.bool)
    d = detection_summary(natural_flag, natural_score, adv_flag, adv_score, fooled)
    assert (d["fpr"], d["natural_flagged"], d["num_natural"]) == (0.2, 2, 10)
    assert (d["detection_rate"], d["flagged"], d["num_adversarial"]) == (5 / 8, 5, 8)
    assert (d["detection_rate_fooled"], d["flagged_fooled"], d["fooled"]) == (3 / 4, 3, 4)
    assert d["fpr_ci95"] == pytest.approx(list(wilson_interval(2, 10)))
    assert d["detection_rate_fooled_ci95"] == pytest.approx(list(wilson_interval(3, 4)))
    assert d["auc"] == pytest.approx(pair_count_auc(natural_score.tolist(), adv_score.tolist()))
    assert d["auc_fooled"] == pytest.approx(pair_count_auc(natural_score.tolist(), adv_score[fooled].tolist()))
    none = detection_summary(natural_flag, natural_score, adv_flag, adv_score, torch.zeros(8, dtype=torch.bool))
    assert none["detection_rate_fooled"] is None and none["detection_rate_fooled_ci95"] is None
    assert none["auc_fooled"] is None
