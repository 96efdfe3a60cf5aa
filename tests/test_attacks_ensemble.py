"""Ensemble strategies ens and svre against the papers' equations written out by hand.

ens: the cross-entropy of the members' mean logits, and MI-FGSM on it as a plain loop. svre: Xiong et
al.'s Algorithm 1 (SVRE-MI-FGSM) as an explicit loop over the member indices drawn, in the same order,
from a generator seeded like the attack's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from decorr.attacks import Source, parse_attack
from decorr.attacks.base import Context
from decorr.errors import DecorrError
from decorr.evaluation.ensembles import Ensemble
from decorr.models.cifar import CifarResNet

EPS = 8 / 255


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).double().eval()


@pytest.fixture
def ensemble():
    members = tuple(cnn(seed) for seed in range(3))
    g = torch.Generator().manual_seed(9)
    x = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 4])
    return members, x, y


def mean_logits(members, x):
    return torch.stack([m(x) for m in members]).mean(dim=0)


def grad_of(fn, point):
    point = point.detach().clone().requires_grad_(True)
    return torch.autograd.grad(fn(point), point)[0]


def l1_normalised(g):
    return g / g.abs().mean(dim=(1, 2, 3), keepdim=True)


def step(x, point, direction, size, eps=EPS):
    return torch.clamp(x + torch.clamp(point + size * direction.sign() - x, -eps, eps), 0, 1)


def context(text, members, x, y, seed=0, **source):
    attack = parse_attack(text)
    ctx = Context(attack, Source(members=members, combine="loss", **source), x, y, eps=EPS, norm="linf", scale=1.0,
                  targeted=False, generator=torch.Generator().manual_seed(seed))
    ctx.loss = attack._loss(ctx)
    return attack, ctx


# ----------------------------------------------------------------------------------------------
# ens


def test_ens_loss_is_the_cross_entropy_of_the_mean_logits(ensemble):
    members, x, y = ensemble
    _, ctx = context("ens", members, x, y)
    expected = F.cross_entropy(mean_logits(members, x), y)
    assert (ctx.loss_value(x) - expected).abs() < 1e-14
    # Not the default, the members' mean cross-entropy.
    _, plain = context("mifgsm", members, x, y)
    assert (plain.loss_value(x) - sum(F.cross_entropy(m(x), y) for m in members) / 3).abs() < 1e-14
    assert (plain.loss_value(x) - expected).abs() > 1e-4


def test_ens_is_mifgsm_on_the_mean_logits(ensemble):
    members, x, y = ensemble
    out = parse_attack("ens").craft(Source(members=members, combine="loss"), x, y, eps=EPS)
    x_adv, momentum = x.clone(), torch.zeros_like(x)
    for _ in range(10):  # MI-FGSM: decay 1, 10 steps of eps/10
        g = grad_of(lambda p: F.cross_entropy(mean_logits(members, p), y), x_adv)
        momentum = l1_normalised(g) + momentum
        x_adv = step(x, x_adv, momentum, EPS / 10)
    assert (out - x_adv).abs().max() < 1e-12
    # An ensemble module (attacked on its own output without a strategy) gets the same with ens.
    module = Ensemble({f"m{i}": m for i, m in enumerate(members)}, rule="prob")
    assert torch.equal(parse_attack("ens").craft(Source.of(module), x, y, eps=EPS), out)


def test_ensemble_strategies_refuse_a_single_model(ensemble):
    members, x, y = ensemble
    for text in ("ens", "svre", "svre+dim"):
        with pytest.raises(DecorrError, match="single model") as err:
            parse_attack(text).craft(Source.of(members[0], name="one"), x, y, eps=EPS)
        assert "\n" not in str(err.value)


def test_ens_with_sgm_on_residual_members_runs():
    torch.manual_seed(0)
    members = tuple(CifarResNet(blocks_per_stage=2, widths=(4, 6, 8)).train() for _ in range(3))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 7])
    source = Source(members=members, combine="loss")
    out = parse_attack("ens+sgm").craft(source, x, y, eps=EPS)
    assert (out - x).abs().max() <= EPS + 1e-7 and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, parse_attack("ens").craft(source, x, y, eps=EPS))  # SGM changed the gradients
    assert all(m.training for member in members for m in member.modules())
    assert all(len(m._forward_hooks) == 0 for member in members for m in member.modules())


# ----------------------------------------------------------------------------------------------
# svre


def hand_svre(members, x, y, point, generator, inner_steps, inner_step):
    """Algorithm 1's inner loop at the outer iterate ``point``; returns G~_M."""
    K = len(members)

    def member_loss(k):
        return lambda p: F.cross_entropy(members[k](p), y)

    ensemble = grad_of(lambda p: F.cross_entropy(mean_logits(members, p), y), point)
    inner, accumulated = point.clone(), torch.zeros_like(point)
    for _ in range(inner_steps):
        k = int(torch.randint(0, K, (1,), generator=generator))
        g = grad_of(member_loss(k), inner) - (grad_of(member_loss(k), point) - ensemble)
        accumulated = l1_normalised(g) + 1.0 * accumulated
        inner = step(x, inner, accumulated, inner_step)
    return accumulated


def test_svre_gradient_is_the_papers_inner_loop(ensemble):
    members, x, y = ensemble
    point = step(x, x, torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype), EPS / 2)
    attack, ctx = context("svre", members, x, y, seed=3)
    got = attack.ensemble.gradient(ctx, point)
    expected = hand_svre(members, x, y, point, torch.Generator().manual_seed(3), inner_steps=12, inner_step=EPS / 10)
    assert (got - expected).abs().max() < 1e-10
    # The settings are used: 5 inner steps of 2/255 give another estimate.
    attack, ctx = context("svre(inner_steps=5,inner_step_size=2/255)", members, x, y, seed=3)
    short = hand_svre(members, x, y, point, torch.Generator().manual_seed(3), inner_steps=5, inner_step=2 / 255)
    assert (attack.ensemble.gradient(ctx, point) - short).abs().max() < 1e-10
    assert (short - expected).abs().max() > 1e-3 * expected.abs().max()


def test_svre_attack_is_svre_mifgsm(ensemble):
    members, x, y = ensemble
    source = Source(members=members, combine="loss")
    rng = torch.get_rng_state()
    out = parse_attack("svre(inner_steps=4)").craft(source, x, y, eps=EPS, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), rng)
    generator = torch.Generator().manual_seed(4)
    x_adv, momentum = x.clone(), torch.zeros_like(x)
    for _ in range(10):
        inner = hand_svre(members, x, y, x_adv, generator, inner_steps=4, inner_step=EPS / 10)
        momentum = l1_normalised(inner) + momentum  # the outer MI update on G~_M
        x_adv = step(x, x_adv, momentum, EPS / 10)
    assert (out - x_adv).abs().max() < 1e-12
    again = parse_attack("svre(inner_steps=4)").craft(source, x, y, eps=EPS, generator=torch.Generator().manual_seed(4))
    other = parse_attack("svre(inner_steps=4)").craft(source, x, y, eps=EPS, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, again) and not torch.equal(out, other)


@pytest.mark.parametrize("text,field", [("svre(inner_steps=0)", "inner_steps"),
                                        ("svre(inner_step_size=-1)", "inner_step_size"),
                                        ("svre(inner_decay=-0.5)", "inner_decay")])
def test_svre_bad_settings(text, field):
    with pytest.raises(DecorrError, match=field):
        parse_attack(text)
