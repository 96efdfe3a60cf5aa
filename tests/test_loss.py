"""correlation_loss against an independent float64 least-squares oracle (numpy / scipy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from decorr.loss import (
    BatchTooSmallError,
    correlation_loss,
    parameter_distance,
    pca_pearson,
    pearson,
    r_squared,
)

EPS = 1e-3


def oracle_sums(z1: np.ndarray, z2: np.ndarray) -> tuple[float, float]:
    """SSres, SStot of z2 regressed on [z1, 1] by scipy's least squares (SVD-based, rank-revealing)."""
    x = np.hstack([z1, np.ones((z1.shape[0], 1))])
    beta, *_ = scipy.linalg.lstsq(x, z2, lapack_driver="gelsd")
    ss_res = float(((z2 - x @ beta) ** 2).sum())
    ss_tot = float(((z2 - z2.mean(axis=0)) ** 2).sum())
    return ss_res, ss_tot


def oracle_loss(z1: np.ndarray, z2: np.ndarray) -> float:
    ss_res, ss_tot = oracle_sums(z1.reshape(len(z1), -1), z2.reshape(len(z2), -1))
    return math.log(ss_tot + EPS) - math.log(ss_res + EPS)


def correlated(n: int, m1: int, m2: int, strength: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.relu(torch.randn(n, m1, generator=g)) + 0.1 * torch.randn(n, m1, generator=g)
    mix = torch.randn(m1, m2, generator=g) / math.sqrt(m1)
    z2 = strength * z1 @ mix + torch.randn(n, m2, generator=g)
    return z1, z2


@pytest.mark.parametrize(
    "n,m1,m2,strength",
    [(200, 30, 20, 2.0), (300, 16, 40, 0.3), (500, 64, 64, 5.0), (1000, 200, 100, 1.0), (64, 8, 1, 0.0)],
)
def test_value_matches_least_squares_oracle(n, m1, m2, strength):
    z1, z2 = correlated(n, m1, m2, strength)
    expected = oracle_loss(z1.double().numpy(), z2.double().numpy())
    got = float(correlation_loss(z1, z2))
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_inputs_of_any_shape_are_flattened():
    z1, z2 = correlated(400, 48, 12, 1.0)
    as_maps = z1.reshape(400, 3, 4, 4)
    assert float(correlation_loss(as_maps, z2.reshape(400, 3, 2, 2))) == pytest.approx(
        float(correlation_loss(z1, z2)), rel=1e-6
    )


def test_gradcheck_float64():
    z1, z2 = correlated(40, 6, 4, 1.0)
    z1 = z1.double().requires_grad_()
    z2 = z2.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: correlation_loss(a, b), (z1, z2))


def test_gradient_matches_autograd_through_dense_projection():
    # An independent route to the gradient: autograd through an explicit hat matrix in float64.
    z1, z2 = correlated(120, 10, 7, 1.5, seed=3)
    a = z1.double().requires_grad_()
    b = z2.double().requires_grad_()
    x = torch.cat([a, torch.ones(len(a), 1, dtype=torch.float64)], 1)
    hat = x @ torch.linalg.pinv(x)
    ss_res = (b - hat @ b).square().sum()
    ss_tot = (b - b.mean(0)).square().sum()
    reference = torch.log(ss_tot + EPS) - torch.log(ss_res + EPS)
    ga, gb = torch.autograd.grad(reference, (a, b))
    a2 = z1.clone().requires_grad_()
    b2 = z2.clone().requires_grad_()
    ours = correlation_loss(a2, b2)
    ga2, gb2 = torch.autograd.grad(ours, (a2, b2))
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    torch.testing.assert_close(ga2.double(), ga, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb2.double(), gb, rtol=1e-4, atol=1e-6)


def test_rank_deficient_inputs_equal_oracle_on_independent_columns():
    z1, z2 = correlated(200, 8, 5, 2.0, seed=1)
    deficient = torch.cat([z1, z1[:, :3], 2 * z1[:, 4:5] - z1[:, 0:1], torch.zeros(200, 2), torch.full((200, 1), 7.0)], 1)
    expected = oracle_loss(z1.double().numpy(), z2.double().numpy())
    got = correlation_loss(deficient.requires_grad_(), z2)
    assert torch.isfinite(got)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-4)
    (grad,) = torch.autograd.grad(got, deficient)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize(
    "z1,z2",
    [
        (torch.zeros(50, 6), torch.randn(50, 4)),
        (torch.randn(50, 6), torch.zeros(50, 4)),
        (torch.full((50, 6), 3.0), torch.full((50, 4), -1.0)),
        (torch.zeros(50, 6), torch.zeros(50, 4)),
    ],
)
def test_finite_on_zero_and_constant_features(z1, z2):
    z1 = z1.clone().requires_grad_()
    z2 = z2.clone().requires_grad_()
    loss = correlation_loss(z1, z2)
    assert torch.isfinite(loss)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)  # nothing of z2 is explained
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    assert torch.isfinite(g1).all() and torch.isfinite(g2).all()


def test_affine_image_gives_large_loss_and_unrelated_gives_small():
    z1, _ = correlated(500, 20, 5, 1.0)
    affine = z1 @ torch.randn(20, 10) + 3.0
    unrelated = torch.randn(500, 10)
    assert float(correlation_loss(z1, affine)) > 10.0
    assert float(correlation_loss(z1, unrelated)) < 0.1


def test_small_batch_is_a_clear_error():
    with pytest.raises(BatchTooSmallError, match="batch of 100 for 784 features"):
        correlation_loss(torch.randn(100, 784), torch.randn(100, 784))
    with pytest.raises(ValueError):  # BatchTooSmallError is a ValueError for library users
        correlation_loss(torch.randn(10, 9), torch.randn(10, 3))


def test_bf16_autocast_upcasts_and_equals_float32():
    z1, z2 = correlated(300, 24, 16, 1.0)
    z1b, z2b = z1.bfloat16(), z2.bfloat16()
    reference = correlation_loss(z1b.float(), z2b.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = correlation_loss(z1b, z2b)
    assert under_autocast.dtype == torch.float32
    assert float(under_autocast) == pytest.approx(float(reference), rel=1e-6)


def test_r_squared_matches_oracle():
    z1, z2 = correlated(400, 12, 6, 1.0)
    ss_res, ss_tot = oracle_sums(z1.double().numpy(), z2.double().numpy())
    assert r_squared(z1, z2) == pytest.approx(1 - ss_res / ss_tot, rel=1e-4)
    assert math.isnan(r_squared(z1, torch.ones(400, 3)))


def test_pearson_and_pca_pearson():
    a = torch.randn(1000, dtype=torch.float64)
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert pearson(a, -a) == pytest.approx(-1.0)
    b = a + torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert pearson(a, b) == pytest.approx(float(np.corrcoef(a.numpy(), b.numpy())[0, 1]))
    z = torch.randn(500, 1) * torch.tensor([[5.0, 1.0, 0.5]]) + 0.01 * torch.randn(500, 3)
    assert pca_pearson(z, -z @ torch.diag(torch.tensor([1.0, 2.0, 3.0]))) == pytest.approx(1.0, abs=1e-3)


def test_parameter_distance_is_squared_euclidean():
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    expected = sum(float(((p - q) ** 2).sum()) for p, q in zip(a.parameters(), b.parameters()))
    assert float(parameter_distance(a, b)) == pytest.approx(expected)
    with pytest.raises(ValueError):
        parameter_distance(a, torch.nn.Linear(3, 3))
