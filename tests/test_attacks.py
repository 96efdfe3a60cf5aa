"""FGSM/PGD against hand-computed steps (numpy) and against torchattacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks
from scipy import signal

from decorr.attacks import (
    ce_loss,
    ensemble_ce_loss,
    eps_sweep,
    fgsm,
    gaussian_kernel,
    input_diversity,
    pgd,
)
from decorr.attacks.inputs import DIM
from decorr.errors import DecorrError

# ----------------------------------------------------------------------------------------------
# A linear model logits = W x + b, whose mean-CE input gradient is (softmax(z) - onehot(y)) W / N.


class Linear(nn.Module):
    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.from_numpy(weight))
        self.bias = nn.Parameter(torch.from_numpy(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_grad(weight, bias, x, y):
    """Input gradient of the mean cross-entropy, by hand. x: (N, d)."""
    p = np_softmax(x @ weight.T + bias)
    p[np.arange(len(y)), y] -= 1.0
    return p @ weight / len(y)


SHAPE = (4, 1, 2, 3)  # N=4 samples of d=6 "pixels"


@pytest.fixture
def linear():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(5, 6))
    bias = rng.normal(size=5)
    x = rng.uniform(0.05, 0.95, size=(4, 6))
    # Pixels at and near the box edges where the gradient pushes outwards, so clipping is exercised.
    x[0, 2], x[1, 0], x[2, 3], x[3, 4] = 0.0, 0.02, 1.0, 0.97
    y = np.array([0, 1, 2, 3])
    model = Linear(weight, bias).double()
    xt = torch.from_numpy(x).view(SHAPE)
    yt = torch.from_numpy(y)
    # Sign steps need gradient components well away from zero to be stable.
    assert np.abs(np_grad(weight, bias, x, y)).min() > 1e-4
    return model, weight, bias, x, y, xt, yt


def flat(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(t.shape[0], -1).numpy()


def np_l2_unit(g):
    return g / (np.linalg.norm(g, axis=1, keepdims=True) + 1e-10)


def test_fgsm_linf_by_hand(linear):
    model, w, b, x, y, xt, yt = linear
    expected = np.clip(x + 0.1 * np.sign(np_grad(w, b, x, y)), 0, 1)
    out = fgsm(ce_loss(model), xt, yt, eps=0.1)
    np.testing.assert_allclose(flat(out), expected, atol=1e-12)
    assert out.shape == xt.shape and not out.requires_grad


def test_fgsm_l2_by_hand_is_per_sample(linear):
    model, w, b, x, y, xt, yt = linear
    g = np_grad(w, b, x, y)
    expected = np.clip(x + 0.3 * np_l2_unit(g), 0, 1)
    out = fgsm(ce_loss(model), xt, yt, eps=0.3, norm="l2")
    np.testing.assert_allclose(flat(out), expected, atol=1e-12)
    # P1's bug (one norm for the whole batch) gives a different answer here.
    batch_normed = np.clip(x + 0.3 * g / np.linalg.norm(g), 0, 1)
    assert np.abs(flat(out) - batch_normed).max() > 1e-2


def test_pgd_linf_one_and_two_steps_by_hand(linear):
    model, w, b, x, y, xt, yt = linear
    eps, alpha = 0.1, 0.07
    # Step 1 stays inside the ball; step 2 overshoots it (0.14 > 0.1) where the sign repeats.
    raw1 = x + alpha * np.sign(np_grad(w, b, x, y))
    x1 = np.clip(raw1, 0, 1)
    raw2 = x1 + alpha * np.sign(np_grad(w, b, x1, y))
    projected2 = x + np.clip(raw2 - x, -eps, eps)
    x2 = np.clip(projected2, 0, 1)
    assert (np.abs(raw2 - x) > eps + 1e-9).any()  # projection is active
    assert ((raw1 < 0) | (raw1 > 1)).any() and ((projected2 < 0) | (projected2 > 1)).any()  # clipping too
    kwargs = dict(eps=eps, step_size=alpha, random_start=False)
    np.testing.assert_allclose(flat(pgd(ce_loss(model), xt, yt, steps=1, **kwargs)), x1, atol=1e-12)
    out = pgd(ce_loss(model), xt, yt, steps=2, **kwargs)
    np.testing.assert_allclose(flat(out), x2, atol=1e-12)
    assert np.abs(flat(out) - x).max() <= eps + 1e-12
    assert flat(out).min() >= 0 and flat(out).max() <= 1


def test_pgd_l2_two_steps_projects_each_sample_onto_its_own_ball(linear):
    model, w, b, x, y, xt, yt = linear
    eps, alpha = 0.3, 0.25

    def step(xa, per_sample: bool):
        raw = xa + alpha * np_l2_unit(np_grad(w, b, xa, y))
        delta = raw - x
        norms = np.linalg.norm(delta, axis=1, keepdims=True) if per_sample else np.linalg.norm(delta)
        return np.clip(x + delta * np.minimum(1.0, eps / norms), 0, 1)

    x1 = step(x, True)
    x2 = step(x1, True)
    out = pgd(ce_loss(model), xt, yt, eps=eps, steps=2, step_size=alpha, norm="l2", random_start=False)
    np.testing.assert_allclose(flat(out), x2, atol=1e-12)
    assert np.all(np.linalg.norm(flat(out) - x, axis=1) <= eps + 1e-12)
    # The projection matters here, and a batch-wide projection would give another answer.
    assert np.abs(np.linalg.norm(x1 + alpha * np_l2_unit(np_grad(w, b, x1, y)) - x, axis=1)).max() > eps
    assert np.abs(step(step(x, False), False) - x2).max() > 1e-3


class SineFeatures(nn.Module):
    """logits = W sin(omega x) + b: the gradient's sign changes along the path, so momentum matters."""

    def __init__(self, linear: Linear, omega: float) -> None:
        super().__init__()
        self.linear, self.omega = linear, omega

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.sin(self.omega * x))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_momentum_steps_by_hand(linear, norm):
    model, w, b, x, y, xt, yt = linear
    omega = 8.0
    model = SineFeatures(model, omega)

    def grad(xa):
        return omega * np.cos(omega * xa) * np_grad(w, b, np.sin(omega * xa), y)

    eps, alpha, mu, steps = 0.5, 0.15, 1.0, 4
    direction = np.sign if norm == "linf" else np_l2_unit
    xa, acc = x.copy(), np.zeros_like(x)
    for _ in range(steps):
        g = grad(xa)
        acc = mu * acc + g / np.abs(g).sum(axis=1, keepdims=True)  # MI: L1-normalised per sample
        raw = xa + alpha * direction(acc)
        delta = raw - x
        if norm == "linf":
            delta = np.clip(delta, -eps, eps)
        else:
            delta *= np.minimum(1.0, eps / np.linalg.norm(delta, axis=1, keepdims=True))
        xa = np.clip(x + delta, 0, 1)
    kwargs = dict(eps=eps, steps=steps, step_size=alpha, norm=norm, random_start=False)
    out = pgd(ce_loss(model), xt, yt, momentum=mu, **kwargs)
    np.testing.assert_allclose(flat(out), xa, atol=1e-12)
    plain = pgd(ce_loss(model), xt, yt, **kwargs)
    assert (out - plain).abs().max() > 1e-3  # momentum changed the path


def test_translation_kernel_smooths_the_gradient_by_hand():
    # Cross-correlation with an asymmetric kernel (as TI's code and torchattacks), per channel.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 5 * 5, 3)).double()
    x = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    y = torch.tensor([0, 2])
    kernel = torch.tensor([[0.0, 1.0, 0.0], [0.5, 2.0, 0.0], [0.0, 0.0, -1.0]], dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)
    smoothed = np.stack(
        [[signal.correlate2d(g[n, c].numpy(), kernel.numpy(), mode="same") for c in range(2)] for n in range(2)]
    )
    expected = np.clip(x.numpy() + 0.1 * np.sign(smoothed), 0, 1)
    out = pgd(ce_loss(model), x, y, eps=0.1, steps=1, step_size=0.1, random_start=False, translation_kernel=kernel)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-12)


def test_gaussian_kernel_is_tis_kernel():
    k = gaussian_kernel(7, nsig=3).double().numpy()
    t = np.linspace(-3, 3, 7)
    expected = np.outer(np.exp(-t**2 / 2), np.exp(-t**2 / 2))
    np.testing.assert_allclose(k, expected / expected.sum(), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Agreement with torchattacks on a small random CNN (float32, eval mode).


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()
    x = torch.rand(8, 3, 16, 16)
    y = torch.randint(0, 10, (8,))
    return model, x, y


def _assert_close(a, b):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_fgsm_matches_torchattacks(cnn):
    model, x, y = cnn
    _assert_close(fgsm(ce_loss(model), x, y, eps=8 / 255), torchattacks.FGSM(model, eps=8 / 255)(x, y))


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_linf_matches_torchattacks(cnn, random_start):
    model, x, y = cnn
    torch.manual_seed(1)  # the random start comes from the global RNG in both
    ours = pgd(ce_loss(model), x, y, eps=8 / 255, steps=7, step_size=2 / 255, random_start=random_start)
    torch.manual_seed(1)
    theirs = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=7, random_start=random_start)(x, y)
    _assert_close(ours, theirs)
    assert (ours - x).abs().max() > 7.9 / 255


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_l2_matches_torchattacks(cnn, random_start):
    model, x, y = cnn
    torch.manual_seed(2)
    ours = pgd(ce_loss(model), x, y, eps=0.5, steps=7, step_size=0.1, norm="l2", random_start=random_start)
    torch.manual_seed(2)
    theirs = torchattacks.PGDL2(model, eps=0.5, alpha=0.1, steps=7, random_start=random_start)(x, y)
    _assert_close(ours, theirs)
    assert (ours - x).flatten(1).norm(dim=1).max() > 0.49


def test_momentum_matches_torchattacks_mifgsm(cnn):
    model, x, y = cnn
    ours = pgd(ce_loss(model), x, y, eps=8 / 255, steps=7, step_size=2 / 255, random_start=False, momentum=1.0)
    theirs = torchattacks.MIFGSM(model, eps=8 / 255, alpha=2 / 255, steps=7, decay=1.0)(x, y)
    _assert_close(ours, theirs)


def test_input_diversity_matches_torchattacks_difgsm(cnn):
    model, x, y = cnn
    kwargs = dict(eps=8 / 255, steps=7, random_start=False)
    torch.manual_seed(3)
    ours = pgd(ce_loss(model), x, y, step_size=2 / 255, input_diversity=0.5, **kwargs)
    torch.manual_seed(3)
    theirs = torchattacks.DIFGSM(model, alpha=2 / 255, resize_rate=0.9, diversity_prob=0.5, **kwargs)(x, y)
    _assert_close(ours, theirs)
    plain = pgd(ce_loss(model), x, y, step_size=2 / 255, **kwargs)
    assert (ours - plain).abs().max() > 1e-3  # the diversity really was applied


def test_mi_di_ti_matches_torchattacks_tifgsm(cnn):
    model, x, y = cnn
    torch.manual_seed(4)
    ours = pgd(ce_loss(model), x, y, eps=8 / 255, steps=7, step_size=2 / 255, random_start=False,
               momentum=1.0, input_diversity=0.5, translation_kernel=5)
    torch.manual_seed(4)
    theirs = torchattacks.TIFGSM(model, eps=8 / 255, alpha=2 / 255, steps=7, decay=1.0, len_kernel=5, nsig=3,
                                 resize_rate=0.9, diversity_prob=0.5, random_start=False)(x, y)
    _assert_close(ours, theirs)


# ----------------------------------------------------------------------------------------------
# Contracts: ranges, detachment, seeding, no gradient in the parameters.

COMBINATIONS = [
    dict(norm="linf"),
    dict(norm="l2"),
    dict(norm="linf", momentum=1.0, input_diversity=0.5, translation_kernel=3),
    dict(norm="l2", momentum=0.5, input_diversity=1.0, translation_kernel=torch.ones(3, 3) / 9),
    dict(norm="linf", input_diversity=DIM(prob=1.0, resize_rate=1.25)),
]


@pytest.mark.parametrize("options", COMBINATIONS)
def test_output_contract_for_every_combination(cnn, options):
    model, x, y = cnn
    eps = 0.1 if options["norm"] == "linf" else 0.8
    rng_state = torch.get_rng_state()
    out = pgd(ce_loss(model), x, y, eps=eps, steps=5, step_size=eps / 2,
              generator=torch.Generator().manual_seed(0), **options)
    again = pgd(ce_loss(model), x, y, eps=eps, steps=5, step_size=eps / 2,
                generator=torch.Generator().manual_seed(0), **options)
    other = pgd(ce_loss(model), x, y, eps=eps, steps=5, step_size=eps / 2,
                generator=torch.Generator().manual_seed(1), **options)
    assert torch.equal(torch.get_rng_state(), rng_state)  # all randomness came from the generator
    assert torch.equal(out, again) and not torch.equal(out, other)
    assert not out.requires_grad and out.grad_fn is None
    assert out.min() >= 0 and out.max() <= 1
    if options["norm"] == "linf":
        assert (out - x).abs().max() <= eps + 1e-6
    else:
        assert (out - x).flatten(1).norm(dim=1).max() <= eps + 1e-5
    assert all(p.grad is None for p in model.parameters())


def test_input_diversity_transform():
    x = torch.rand(3, 2, 20, 20) + 0.5  # all pixels > 0, so zero padding is recognisable
    assert input_diversity(x, prob=0.0) is x
    for seed in range(5):
        out = input_diversity(x, prob=1.0, generator=torch.Generator().manual_seed(seed))
        assert out.shape == x.shape
        rows = (out[0, 0] != 0).any(dim=1).sum()
        assert 18 <= rows <= 19  # resized to a side in [int(0.9 * 20), 20) = [18, 20)
    big = input_diversity(x, prob=1.0, resize_rate=1.2, generator=torch.Generator().manual_seed(0))
    assert big.shape == (3, 2, 24, 24)
    rect = input_diversity(torch.rand(1, 1, 10, 20), prob=1.0, resize_rate=0.8)
    assert rect.shape == (1, 1, 10, 20)


def test_zero_steps_and_zero_eps(cnn):
    model, x, y = cnn
    assert torch.equal(pgd(ce_loss(model), x, y, eps=0.1, steps=0, step_size=0.1, random_start=False), x)
    for norm in ("linf", "l2"):
        assert torch.equal(pgd(ce_loss(model), x, y, eps=0.0, steps=2, step_size=0.1, norm=norm), x)


def test_attacks_work_under_no_grad(cnn):
    model, x, y = cnn
    kwargs = dict(eps=0.1, steps=2, step_size=0.05, random_start=False)
    expected = pgd(ce_loss(model), x, y, **kwargs)
    with torch.no_grad():
        assert torch.equal(pgd(ce_loss(model), x, y, **kwargs), expected)


def test_eps_sweep_is_one_attack_per_eps(cnn):
    model, x, y = cnn
    sweep = eps_sweep(pgd, ce_loss(model), x, y, eps_list=[0.05, 0.1], steps=3, step_size=0.02, random_start=False)
    assert list(sweep) == [0.05, 0.1]
    for eps, adv in sweep.items():
        assert torch.equal(adv, pgd(ce_loss(model), x, y, eps=eps, steps=3, step_size=0.02, random_start=False))
    fg = eps_sweep(fgsm, ce_loss(model), x, y, eps_list=[0.1], norm="l2")
    assert torch.equal(fg[0.1], fgsm(ce_loss(model), x, y, eps=0.1, norm="l2"))


def test_losses_by_hand():
    torch.manual_seed(0)
    models = [nn.Linear(4, 3).double() for _ in range(3)]
    x = torch.rand(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])

    def np_ce(logits):
        logits = logits.detach().numpy()
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return -logp[np.arange(5), y.numpy()].mean()

    assert ce_loss(models[0])(x, y).item() == pytest.approx(np_ce(models[0](x)), rel=1e-12)
    averaged = sum(m(x) for m in models) / 3
    assert ensemble_ce_loss(models)(x, y).item() == pytest.approx(np_ce(averaged), rel=1e-12)
    with pytest.raises(DecorrError):
        ensemble_ce_loss([])


def test_bad_arguments_raise(cnn):
    model, x, y = cnn
    loss = ce_loss(model)
    with pytest.raises(DecorrError, match=r"\[0, 1\]"):
        pgd(loss, x * 2 - 0.5, y, eps=0.1, steps=1, step_size=0.1)
    with pytest.raises(DecorrError, match="norm"):
        fgsm(loss, x, y, eps=0.1, norm="l1")
    with pytest.raises(DecorrError, match="epsilon"):
        fgsm(loss, x, y, eps=-0.1)
    with pytest.raises(DecorrError, match="labels"):
        fgsm(loss, x, y[:3], eps=0.1)
    with pytest.raises(DecorrError, match="scalar"):
        fgsm(lambda a, b: F.cross_entropy(model(a), b, reduction="none"), x, y, eps=0.1)
    with pytest.raises(DecorrError, match="probability"):
        pgd(loss, x, y, eps=0.1, steps=1, step_size=0.1, input_diversity=1.5)
    with pytest.raises(DecorrError, match="translation_kernel"):
        pgd(loss, x, y, eps=0.1, steps=1, step_size=0.1, translation_kernel=2.5)
