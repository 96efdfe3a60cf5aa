"""Accuracy and transfer rates on hand-made predictions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from decorr.errors import DecorrError
from decorr.evaluation.metrics import accuracy, error_rate, pair_average, predict, transfer_matrix, transfer_rate

Y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])


def wrong_at(indices: list[int]) -> torch.Tensor:
    """Predictions equal to Y except at ``indices``."""
    pred = Y.clone()
    pred[indices] = (pred[indices] + 1) % 10
    return pred


def test_accuracy_and_error_rate():
    assert accuracy(wrong_at([0, 5]), Y) == 6 / 8
    assert error_rate(wrong_at([0, 5]), Y) == 2 / 8
    assert accuracy(Y, Y) == 1.0
    assert math.isnan(accuracy(Y[:0], Y[:0]))
    with pytest.raises(DecorrError, match="same shape"):
        accuracy(Y[:3], Y)


def test_transfer_rate_counts_over_samples_where_the_source_is_fooled():
    # Source fooled on {0, 1, 2, 3}; target fooled on {1, 3, 5, 6}: 2 of 4 transfer. The target's
    # errors where the source is not fooled (5, 6) do not count.
    result = transfer_rate(wrong_at([0, 1, 2, 3]), wrong_at([1, 3, 5, 6]), Y)
    assert result == (0.5, 4, 2)
    assert result.rate == 0.5 and result.source_fooled == 4 and result.transferred == 2
    # Being wrong with a different wrong label still counts as fooled.
    other_wrong = Y.clone()
    other_wrong[[0, 1]] = 9
    assert transfer_rate(wrong_at([0, 1]), other_wrong, Y).rate == 1.0


def test_transfer_rate_is_nan_when_the_source_is_never_fooled():
    rate, count, transferred = transfer_rate(Y, wrong_at([1, 2]), Y)
    assert math.isnan(rate) and count == 0 and transferred == 0


def test_transfer_matrix():
    # preds[i, j]: model j's labels on examples crafted on model i.
    preds = torch.stack(
        [
            torch.stack([wrong_at([0, 1, 2, 3]), wrong_at([0, 1]), wrong_at([4, 5])]),  # source 0
            torch.stack([wrong_at([0, 1, 2]), wrong_at([0, 1, 2, 3, 4, 5]), wrong_at([0])]),  # source 1
            torch.stack([wrong_at([7]), wrong_at([7]), Y]),  # source 2: never fooled itself
        ]
    )
    matrix = transfer_matrix(preds, Y)
    assert matrix.dtype == torch.float64 and matrix.shape == (3, 3)
    expected = torch.tensor(
        [
            [4 / 8, 2 / 4, 0 / 4],  # diagonal: the source's own (white-box) error rate
            [3 / 6, 6 / 8, 1 / 6],
            [math.nan, math.nan, 0 / 8],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(matrix, expected, equal_nan=True)
    # Each off-diagonal entry is the pairwise transfer rate.
    for i in range(3):
        for j in range(3):
            if i != j:
                rate = transfer_rate(preds[i, i], preds[i, j], Y).rate
                assert (math.isnan(rate) and math.isnan(matrix[i, j])) or rate == matrix[i, j].item()

    pairs = pair_average(matrix)
    assert set(pairs) == {(0, 1), (0, 2), (1, 2)}
    assert pairs[(0, 1)] == pytest.approx((2 / 4 + 3 / 6) / 2)
    assert math.isnan(pairs[(0, 2)]) and math.isnan(pairs[(1, 2)])


def test_transfer_matrix_with_separate_sources_and_targets():
    # Two sources (their own labels given), three targets.
    source_preds = torch.stack([wrong_at([0, 1]), wrong_at([2, 3, 4, 5])])
    preds = torch.stack(
        [
            torch.stack([wrong_at([0]), wrong_at([0, 1, 6]), Y]),
            torch.stack([wrong_at([2]), wrong_at([2, 3]), wrong_at([0, 1, 2, 3, 4, 5, 6, 7])]),
        ]
    )
    matrix = transfer_matrix(preds, Y, source_preds=source_preds)
    expected = torch.tensor([[1 / 2, 2 / 2, 0 / 2], [1 / 4, 2 / 4, 4 / 4]], dtype=torch.float64)
    torch.testing.assert_close(matrix, expected)
    with pytest.raises(DecorrError, match="source_preds"):
        transfer_matrix(preds, Y)
    with pytest.raises(DecorrError, match="source_preds"):
        transfer_matrix(preds, Y, source_preds=source_preds[:1])
    with pytest.raises(DecorrError, match="labels"):
        transfer_matrix(preds, Y[:4], source_preds=source_preds)
    with pytest.raises(DecorrError, match="square"):
        pair_average(matrix)


def test_pair_average_by_hand():
    matrix = torch.tensor([[0.9, 0.2, 0.4], [0.6, 0.8, 0.1], [0.0, 0.3, 1.0]], dtype=torch.float64)
    assert pair_average(matrix) == pytest.approx({(0, 1): 0.4, (0, 2): 0.2, (1, 2): 0.2})


def test_predict_in_batches_matches_one_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).eval()
    x = torch.rand(23, 3, 2, 2)
    expected = model(x).argmax(dim=1)
    for batch_size in (1, 7, 23, 100):
        pred = predict(model, x, batch_size=batch_size)
        assert pred.dtype == torch.long and torch.equal(pred, expected)
    assert predict(model, x[:0]).shape == (0,)
    assert predict(nn.Flatten(), torch.rand(4, 6)).shape == (4,)  # a model without parameters
    with pytest.raises(DecorrError, match="batch size"):
        predict(model, x, batch_size=0)
