"""pairwise_correlation_loss against a plain loop of correlation_loss calls over the pairs."""

from __future__ import annotations

import math

import pytest
import torch

from decorr.errors import DecorrError
from decorr.loss import BatchTooSmallError, _Regressor, correlation_loss, pairwise_correlation_loss


def members(n: int, widths: list[int], seed: int = 0, dtype=torch.float64) -> list[torch.Tensor]:
    """Feature sets that share a common part (so every pair is partly correlated), ReLU'd."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, generator=g, dtype=torch.float64)
    out = []
    for m in widths:
        mix = torch.randn(8, m, generator=g, dtype=torch.float64) / math.sqrt(8)
        out.append(torch.relu(base @ mix + 0.7 * torch.randn(n, m, generator=g, dtype=torch.float64)).to(dtype))
    return out


def pairs_of(count: int, direction: str) -> list[tuple[int, int]]:
    if direction == "one-way":
        return [(i, j) for i in range(count) for j in range(i + 1, count)]
    return [(i, j) for i in range(count) for j in range(count) if i != j]


def loop_loss(zs, direction, reduction):
    terms = [correlation_loss(zs[i], zs[j]) for i, j in pairs_of(len(zs), direction)]
    total = torch.stack(terms).sum()
    return total if reduction == "sum" else total / len(terms)


def value_and_grads(fn, zs):
    leaves = [z.clone().requires_grad_() for z in zs]
    loss = fn(leaves)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


# Thin basis (batch >= ~2x width) and full basis (batch close to the width), mixed widths.
SHAPES = {"thin": (300, [20, 35, 12, 40, 28]), "full": (60, [45, 50, 40, 52, 44])}


@pytest.mark.parametrize("basis", sorted(SHAPES))
@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("direction", ["one-way", "both"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_equals_loop_over_pairs(basis, count, direction, reduction):
    n, widths = SHAPES[basis]
    zs = members(n, widths[:count], seed=count)
    got, got_grads = value_and_grads(lambda z: pairwise_correlation_loss(z, direction, reduction), zs)
    want, want_grads = value_and_grads(lambda z: loop_loss(z, direction, reduction), zs)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("basis", sorted(SHAPES))
def test_the_basis_is_the_one_named(basis):
    n, widths = SHAPES[basis]
    z = members(n, widths[:1])[0]
    assert _Regressor(z - z.mean(0), z, 5e-4).full == (basis == "full")


def test_rank_deficient_member_equals_loop():
    zs = members(200, [10, 12, 9], seed=4)
    a = zs[0]
    # Duplicated, affinely dependent and constant columns: dropped from the regression, zero gradient.
    zs[0] = torch.cat([a, a[:, :3], 2 * a[:, 4:5] - a[:, 0:1], torch.zeros(200, 2), torch.full((200, 1), 7.0, dtype=a.dtype)], 1)
    for direction in ("one-way", "both"):
        got, got_grads = value_and_grads(lambda z: pairwise_correlation_loss(z, direction, "sum"), zs)
        want, want_grads = value_and_grads(lambda z: loop_loss(z, direction, "sum"), zs)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_two_members_one_way_is_correlation_loss_exactly(reduction):
    for dtype in (torch.float32, torch.float64):
        zs = members(400, [30, 25], seed=7, dtype=dtype)
        got, got_grads = value_and_grads(lambda z: pairwise_correlation_loss(z, "one-way", reduction), zs)
        want, want_grads = value_and_grads(lambda z: correlation_loss(z[0], z[1]), zs)
        assert torch.equal(got, want)
        assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))


@pytest.mark.parametrize("dead", [0, 1, 2])
@pytest.mark.parametrize("direction", ["one-way", "both"])
def test_constant_member_stays_finite(dead, direction):
    zs = members(150, [20, 20, 20], seed=2)
    zs[dead] = torch.full_like(zs[dead], 0.3) if dead else torch.zeros_like(zs[dead])
    got, grads = value_and_grads(lambda z: pairwise_correlation_loss(z, direction, "sum"), zs)
    assert torch.isfinite(got)
    assert all(torch.isfinite(g).all() for g in grads)
    want, want_grads = value_and_grads(lambda z: loop_loss(z, direction, "sum"), zs)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n,widths", [(14, [3, 4, 2]), (8, [5, 6, 5])])  # thin and full basis
@pytest.mark.parametrize("direction", ["one-way", "both"])
def test_gradcheck_float64(n, widths, direction):
    zs = [z.requires_grad_() for z in members(n, widths, seed=5)]
    assert torch.autograd.gradcheck(lambda *z: pairwise_correlation_loss(list(z), direction), tuple(zs))


def test_only_some_members_need_gradients():
    zs = members(120, [10, 11, 12], seed=9)
    leaves = [zs[0], zs[1].clone().requires_grad_(), zs[2]]
    (g1,) = torch.autograd.grad(pairwise_correlation_loss(leaves, "both"), [leaves[1]])
    _, want = value_and_grads(lambda z: loop_loss(z, "both", "mean"), zs)
    torch.testing.assert_close(g1, want[1], rtol=1e-9, atol=1e-12)


def test_bf16_autocast_upcasts_and_mixed_dtypes_use_float64():
    zs = [z.bfloat16() for z in members(300, [16, 24, 20], seed=3, dtype=torch.float32)]
    reference = pairwise_correlation_loss([z.float() for z in zs], "both")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = pairwise_correlation_loss(zs, "both")
    assert under.dtype == torch.float32
    assert float(under) == pytest.approx(float(reference), rel=1e-6)
    mixed = pairwise_correlation_loss([zs[0].float(), zs[1].double(), zs[2].float()])
    assert mixed.dtype == torch.float64


def test_feature_maps_are_flattened():
    zs = members(200, [48, 12, 27], seed=1)
    maps = [zs[0].reshape(200, 3, 4, 4), zs[1].reshape(200, 3, 2, 2), zs[2].reshape(200, 3, 3, 3)]
    torch.testing.assert_close(pairwise_correlation_loss(maps, "both"), pairwise_correlation_loss(zs, "both"))


def test_refusals():
    zs = members(50, [10, 10, 10])
    with pytest.raises(BatchTooSmallError, match="batch of 50 for 60 features"):
        pairwise_correlation_loss([zs[0], torch.randn(50, 60, dtype=torch.float64), zs[2]])
    # One-way: the last member is never a regressor, so it may be wider than the batch (as z2 of correlation_loss).
    assert torch.isfinite(pairwise_correlation_loss([zs[0], zs[1], torch.randn(50, 60, dtype=torch.float64)]))
    with pytest.raises(BatchTooSmallError):
        pairwise_correlation_loss([zs[0], zs[1], torch.randn(50, 60, dtype=torch.float64)], "both")
    nan = zs[1].clone()
    nan[3, 4] = math.nan
    with pytest.raises(DecorrError, match="NaN or inf"):
        pairwise_correlation_loss([zs[0], nan, zs[2]])
    with pytest.raises(DecorrError, match=r"features\[2\] has no features"):
        pairwise_correlation_loss([zs[0], zs[1], torch.zeros(50, 0)])
    with pytest.raises(DecorrError, match="same batch size"):
        pairwise_correlation_loss([zs[0], zs[1][:40]])
    with pytest.raises(DecorrError, match="at least 2 members"):
        pairwise_correlation_loss([zs[0]])
    with pytest.raises(DecorrError, match="sequence"):
        pairwise_correlation_loss(torch.stack(zs))
    with pytest.raises(DecorrError, match="direction"):
        pairwise_correlation_loss(zs, "forward")
    with pytest.raises(DecorrError, match="reduction"):
        pairwise_correlation_loss(zs, "both", "none")
    with pytest.raises(DecorrError, match="eta"):
        pairwise_correlation_loss(zs, eta=1.5)
    with pytest.raises(DecorrError, match="eps"):
        pairwise_correlation_loss(zs, eps=0.0)


@pytest.mark.slow
def test_split_batch_under_torchrun_equals_whole_batch(tmp_path):
    from pathlib import Path
    import sys

    from safetensors.torch import load_file

    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    from dist_pairwise_loss import batch
    from test_distributed import torchrun

    out = tmp_path / "dist.safetensors"
    torchrun(here / "dist_pairwise_loss.py", str(out))
    got = load_file(str(out))
    want, want_grads = value_and_grads(lambda z: pairwise_correlation_loss(z, "both"), batch())
    assert float(got["loss"]) == pytest.approx(float(want), rel=1e-6)
    for m, w in enumerate(want_grads):
        torch.testing.assert_close(got[f"grad_{m}"], w, rtol=1e-5, atol=1e-7)
