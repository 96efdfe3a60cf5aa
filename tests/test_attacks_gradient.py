"""The registered gradient optimizers (ifgsm, mifgsm, nifgsm, vmifgsm, vnifgsm) against torchattacks.

torchattacks is the independent oracle: BIM, MIFGSM, NIFGSM, VMIFGSM and VNIFGSM with the same eps,
step, steps, decay, beta and neighbour count. The variance-tuning neighbours are random; with
``generator=None`` our VMI/VNI draw them from the global RNG exactly as torchattacks does
(``randn_like`` then ``uniform_`` in place), so seeding the global RNG identically before each run aligns
every draw. The agreement is to float rounding (float32; see ``ATOL``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchattacks

from decorr.attacks import Source, parse_attack
from decorr.errors import DecorrError

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 5
#: float32 rounding: a sign step can only differ where a gradient component is ~1e-7 of its scale, which
#: these draws never hit; the measured max abs difference is 0 for every comparison below.
ATOL = 1e-6


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()
    x = torch.rand(4, 3, 16, 16)
    y = torch.randint(0, 10, (4,))
    return model, x, y


def _ours(text: str, model, x, y, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return parse_attack(text).craft(Source.of(model), x, y, eps=EPS, generator=None, **kw)


def _theirs(attack, x, y, seed: int = 0):
    torch.manual_seed(seed)
    return attack(x, y)


def _assert_agree(ours, theirs, x):
    diff = (ours - theirs).abs().max().item()
    assert diff <= ATOL, f"max abs difference {diff:.3g}"
    assert (ours - x).abs().max() > EPS / 2  # the attack really moved


def test_ifgsm_matches_torchattacks_bim(cnn):
    # BIM's alpha is its own setting (default 2/255), not eps / steps, and steps=0 means its own
    # heuristic count; give both explicitly. BIM clips to [max(x - eps, 0), min(x + eps, 1)] with
    # comparisons instead of clamp: the same projection.
    model, x, y = cnn
    ours = _ours(f"ifgsm(steps={STEPS},step_size={ALPHA})", model, x, y)
    theirs = _theirs(torchattacks.BIM(model, eps=EPS, alpha=ALPHA, steps=STEPS), x, y)
    _assert_agree(ours, theirs, x)


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_mifgsm_matches_torchattacks(cnn, decay):
    model, x, y = cnn
    ours = _ours(f"mifgsm(steps={STEPS},step_size={ALPHA},decay={decay})", model, x, y)
    theirs = _theirs(torchattacks.MIFGSM(model, eps=EPS, alpha=ALPHA, steps=STEPS, decay=decay), x, y)
    _assert_agree(ours, theirs, x)


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_nifgsm_matches_torchattacks(cnn, decay):
    model, x, y = cnn
    ours = _ours(f"nifgsm(steps={STEPS},step_size={ALPHA},decay={decay})", model, x, y)
    theirs = _theirs(torchattacks.NIFGSM(model, eps=EPS, alpha=ALPHA, steps=STEPS, decay=decay), x, y)
    _assert_agree(ours, theirs, x)
    mi = _ours(f"mifgsm(steps={STEPS},step_size={ALPHA},decay={decay})", model, x, y)
    assert (ours - mi).abs().max() > 1e-3  # the look-ahead changed the path


@pytest.mark.parametrize("name, oracle", [("vmifgsm", torchattacks.VMIFGSM), ("vnifgsm", torchattacks.VNIFGSM)])
def test_variance_tuning_matches_torchattacks(cnn, name, oracle):
    model, x, y = cnn
    beta, neighbors = 1.5, 4
    ours = _ours(f"{name}(steps={STEPS},step_size={ALPHA},decay=1.0,beta={beta},neighbors={neighbors})",
                 model, x, y, seed=7)
    theirs = _theirs(oracle(model, eps=EPS, alpha=ALPHA, steps=STEPS, decay=1.0, N=neighbors, beta=beta), x, y,
                     seed=7)
    _assert_agree(ours, theirs, x)
    plain = _ours(f"{name[1:]}(steps={STEPS},step_size={ALPHA})", model, x, y)
    assert (ours - plain).abs().max() > 1e-3  # the variance term changed the path


def test_vmifgsm_generator_reproducible_and_seed_dependent(cnn):
    model, x, y = cnn
    attack = parse_attack("vmifgsm(steps=3,neighbors=3)")
    rng_state = torch.get_rng_state()
    runs = [attack.craft(model, x, y, eps=EPS, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(torch.get_rng_state(), rng_state)  # every draw came from the generator
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    assert (runs[0] - x).abs().max() <= EPS + 1e-6 and runs[0].min() >= 0 and runs[0].max() <= 1


@pytest.mark.parametrize("text", ["mifgsm", "nifgsm", "vmifgsm(neighbors=2)", "vnifgsm(neighbors=2)"])
def test_l2_stays_in_the_ball_and_modes_are_restored(cnn, text):
    model, x, y = cnn
    model.train()
    out = parse_attack(text).craft(model, x, y, eps=0.5, norm="l2", generator=torch.Generator().manual_seed(0))
    assert model.training and all(m.training for m in model.modules())
    assert (out - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("text, field", [
    ("mifgsm(decay=-1)", "decay"),
    ("nifgsm(steps=0)", "steps"),
    ("vmifgsm(beta=-0.5)", "beta"),
    ("vnifgsm(neighbors=0)", "neighbors"),
    ("ifgsm(step_size=-0.1)", "step_size"),
])
def test_bad_settings_name_the_field(text, field):
    with pytest.raises(DecorrError, match=field):
        parse_attack(text)
