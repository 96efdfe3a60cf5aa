"""feature_diagnostics against numpy on constructed inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from decorr.errors import DecorrError
from decorr.features import feature_diagnostics


def numpy_effective_rank(z: np.ndarray) -> float:
    x = z - z.mean(axis=0, keepdims=True)
    s = np.linalg.svd(x, compute_uv=False)
    s = s[s > s.max() * max(x.shape) * np.finfo(np.float64).eps]
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def test_random_matrix_matches_numpy():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((300, 40)) * rng.uniform(0.1, 3.0, size=40)
    got = feature_diagnostics(torch.from_numpy(z).float())
    assert got["active_features"] == 40 and got["active_fraction"] == 1.0
    assert got["effective_rank"] == pytest.approx(numpy_effective_rank(z.astype(np.float32).astype(np.float64)), rel=1e-10)
    assert 1.0 < got["effective_rank"] <= 40


@pytest.mark.parametrize("k", [1, 2, 5, 12])
def test_rank_k_matrix_has_effective_rank_at_most_k(k):
    rng = np.random.default_rng(k)
    z = rng.standard_normal((200, k)) @ rng.standard_normal((k, 30)) + 4.0  # the offset is centred away
    got = feature_diagnostics(torch.from_numpy(z))["effective_rank"]
    assert got <= k + 1e-9
    assert got == pytest.approx(numpy_effective_rank(z), rel=1e-10)


def test_equal_singular_values_give_exactly_their_number():
    # Orthogonal centred columns of equal norm: k equal singular values, effective rank k.
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((100, 6)) - 0.0)
    q = q - q.mean(axis=0)
    q, _ = np.linalg.qr(q)
    z = np.hstack([q * 3.0, np.zeros((100, 4))])
    got = feature_diagnostics(torch.from_numpy(z))
    assert got["effective_rank"] == pytest.approx(6.0, rel=1e-9)
    assert got["active_features"] == 6 and got["active_fraction"] == pytest.approx(0.6)


def test_dead_columns_are_counted_and_do_not_change_the_rank():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((150, 10))
    padded = np.hstack([z, np.zeros((150, 5)), np.full((150, 3), 0.7)])
    got = feature_diagnostics(torch.from_numpy(padded).reshape(150, 2, 9))  # any shape after the batch
    assert got["active_features"] == 10 and got["active_fraction"] == pytest.approx(10 / 18)
    assert got["effective_rank"] == pytest.approx(numpy_effective_rank(z), rel=1e-10)


@pytest.mark.parametrize("value", [0.0, 0.1, -3.0])
def test_constant_matrix_has_no_active_features_and_effective_rank_zero(value):
    got = feature_diagnostics(torch.full((64, 16), value))
    assert got == {"active_features": 0, "active_fraction": 0.0, "effective_rank": 0.0}


def test_non_finite_features_give_nan_rank_and_empty_input_is_refused():
    z = torch.randn(20, 5)
    z[0, 0] = math.nan
    got = feature_diagnostics(z)
    assert math.isnan(got["effective_rank"]) and got["active_features"] == 4
    with pytest.raises(DecorrError):
        feature_diagnostics(torch.zeros(0, 5))
    with pytest.raises(DecorrError):
        feature_diagnostics(torch.zeros(5, 0))
