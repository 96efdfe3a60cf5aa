"""eps_mode="relative" of the correlation loss: scale invariance, exact gradients; the absolute numbers."""

from __future__ import annotations

import math

import pytest
import torch

from decorr.errors import DecorrError
from decorr.loss import correlation_loss, pairwise_correlation_loss, r_squared

D = torch.float64
EPS = 1e-3


def rand(*shape, seed=0, dtype=D):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def related(n=40, m1=3, m2=4, noise=0.5, seed=0, dtype=D):
    z1 = rand(n, m1, seed=seed, dtype=dtype)
    z2 = z1 @ rand(m1, m2, seed=seed + 1, dtype=dtype) + noise * rand(n, m2, seed=seed + 2, dtype=dtype)
    return z1, z2


def direct(z1, z2, eps, relative):
    """The loss by normal equations, differentiable by autograd (float64 reference)."""
    x = z1 - z1.mean(0)
    y = z2 - z2.mean(0)
    beta = torch.linalg.solve(x.T @ x, x.T @ y)
    ss_res = (y - x @ beta).square().sum()
    ss_tot = y.square().sum()
    e = eps * ss_tot if relative else eps
    return torch.log(ss_tot + e) - torch.log(ss_res + e)


def perfect_affine(scale):
    """512 x 512 unit-variance features, an exact affine image of 256 others."""
    z1 = rand(512, 256, seed=3)
    z2 = z1 @ rand(256, 512, seed=4) + rand(512, seed=5)
    z2 = (z2 - z2.mean(0)) / z2.std(0)
    return scale * z1, scale * z2


def test_absolute_default_scores_depend_on_scale():
    assert round(float(correlation_loss(*perfect_affine(1.0))), 1) == 19.4
    assert round(float(correlation_loss(*perfect_affine(1e-4))), 1) == 1.3
    assert round(float(correlation_loss(*perfect_affine(1.0), eps_mode="absolute")), 1) == 19.4


def test_relative_perfect_relation_scores_log_one_over_eps_at_any_scale():
    for scale in (1.0, 1e-4):
        value = float(correlation_loss(*perfect_affine(scale), eps_mode="relative"))
        assert abs(value - math.log((1 + EPS) / EPS)) < 1e-8


@pytest.mark.parametrize("dtype,tol", [(D, 1e-10), (torch.float32, 1e-5)])
def test_relative_is_scale_invariant(dtype, tol):
    z1, z2 = related(dtype=dtype)
    z3 = rand(40, 2, seed=9, dtype=dtype) + 0.3 * z2[:, :2]
    base = float(correlation_loss(z1, z2, eps_mode="relative"))
    base_pairs = float(pairwise_correlation_loss([z1, z2, z3], "both", eps_mode="relative"))
    for c in (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e2):
        assert abs(float(correlation_loss(c * z1, c * z2, eps_mode="relative")) - base) < min(tol, 1e-6)
        got = float(pairwise_correlation_loss([c * z1, c * z2, c * z3], "both", eps_mode="relative"))
        assert abs(got - base_pairs) < min(tol, 1e-6)
    # Only R^2 matters: log(1 + eps) - log(1 - R^2 + eps).
    if dtype == D:
        want = math.log(1 + EPS) - math.log(1 - r_squared(z1, z2) + EPS)
        assert abs(base - want) < 1e-10


@pytest.mark.parametrize("relative", [False, True])
def test_gradient_matches_direct_autograd(relative):
    mode = "relative" if relative else "absolute"
    z1, z2 = related()
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    ours = correlation_loss(a, b, eps_mode=mode)
    ga, gb = torch.autograd.grad(ours, (a, b))
    a2, b2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    ref = direct(a2, b2, EPS, relative)
    ra, rb = torch.autograd.grad(ref, (a2, b2))
    assert abs(ours.item() - ref.item()) < 1e-10
    assert torch.allclose(ga, ra, atol=1e-10, rtol=0) and torch.allclose(gb, rb, atol=1e-10, rtol=0)


@pytest.mark.parametrize("direction", ["one-way", "both"])
def test_pairwise_relative_gradient_matches_direct_autograd(direction):
    z1, z2 = related(n=30, seed=10)
    z3 = rand(30, 2, seed=20) + 0.5 * z1[:, :2]
    zs = [z.clone().requires_grad_(True) for z in (z1, z2, z3)]
    ours = pairwise_correlation_loss(zs, direction, "sum", eps_mode="relative")
    grads = torch.autograd.grad(ours, zs)
    refs = [z.clone().requires_grad_(True) for z in (z1, z2, z3)]
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j and (direction == "both" or i < j)]
    ref = sum(direct(refs[i], refs[j], EPS, True) for i, j in pairs)
    ref_grads = torch.autograd.grad(ref, refs)
    assert abs(ours.item() - ref.item()) < 1e-10
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-10, rtol=0)


def test_relative_gradcheck():
    z1, z2 = related(n=8, m1=2, m2=2, seed=30)
    z3 = rand(8, 2, seed=31)
    assert torch.autograd.gradcheck(lambda a, b: correlation_loss(a, b, eps_mode="relative"),
                                    (z1.requires_grad_(True), z2.requires_grad_(True)))
    zs = [z.detach().clone().requires_grad_(True) for z in (z1, z2, z3)]
    assert torch.autograd.gradcheck(lambda *z: pairwise_correlation_loss(list(z), "both", eps_mode="relative"), zs)


def test_relative_constant_response_scores_zero_with_finite_gradients():
    z1 = rand(10, 2).requires_grad_(True)
    z2 = torch.full((10, 3), 2.0, dtype=D, requires_grad=True)
    loss = correlation_loss(z1, z2, eps_mode="relative")
    ga, gb = torch.autograd.grad(loss, (z1, z2))
    assert loss.item() == 0.0 and bool(torch.isfinite(ga).all()) and bool(torch.isfinite(gb).all())
    z3 = rand(10, 2, seed=1).requires_grad_(True)
    loss = pairwise_correlation_loss([z1, z2, z3], "both", eps_mode="relative")
    grads = torch.autograd.grad(loss, (z1, z2, z3))
    assert math.isfinite(loss.item()) and all(bool(torch.isfinite(g).all()) for g in grads)


def test_unknown_eps_mode():
    z1, z2 = related()
    for call in (lambda: correlation_loss(z1, z2, eps_mode="scaled"),
                 lambda: pairwise_correlation_loss([z1, z2], eps_mode="Relative")):
        with pytest.raises(DecorrError) as err:
            call()
        assert "\n" not in str(err.value)
