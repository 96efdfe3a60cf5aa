"""The input transformations (dim, tim, sim, admix, ssm, bsr) against independent oracles.

- dim, tim, sim: torchattacks DIFGSM, TIFGSM, SINIFGSM. With ``generator=None`` DI draws from the global
  RNG in torchattacks' order (size, pad top, pad left, apply?), so seeding the global RNG identically
  before each run aligns every draw; SI and TI draw nothing.
- admix: the paper's gradient written out by hand (mean over the 15 copies of the gradient at
  ``(x + eta x[perm_j]) / 2^i``, the admixed image held constant) in a plain MI-FGSM loop. Alignment: the
  attack draws only through ``ctx.randperm`` from the generator, one permutation per mix, in order, so a
  generator seeded the same and asked for ``randperm(N)`` in the same order gives the test the same
  permutations.
- ssm: the DCT matrix against scipy.fft.dctn(norm="ortho"); the gradient against the mean over copies
  computed with scipy's DCT, the draws (noise, then mask, per copy) re-derived from the same seed.
- bsr: rotation against torchvision's rotate; one copy rebuilt by hand from the same draws with
  torchvision's rotation; with max_angle 0 every copy a permutation of the image's pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pytest
import scipy.fft
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from decorr.attacks import Attack, Source, parse_attack
from decorr.attacks.base import Context, GradientTransform
from decorr.attacks.gradient import IFGSM
from decorr.attacks.inputs import BSR, SSM, Admix, SIM
from decorr.attacks.registry import attack_flags
from decorr.attacks.transforms import dct_2d, dct_matrix, idct_2d, rotate
from decorr.errors import DecorrError

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 4
ATOL = 1e-6  # float32 rounding; the measured differences are 0 unless a test says otherwise


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


def _craft(text, model, x, y, *, seed=0, overrides=None, generator=None):
    torch.manual_seed(seed)
    return parse_attack(text, overrides).craft(Source.of(model), x, y, eps=EPS, generator=generator)


def _oracle(attack, x, y, *, seed=0):
    torch.manual_seed(seed)
    return attack(x, y)


def _assert_agree(ours, theirs, x, atol=ATOL):
    diff = (ours - theirs).abs().max().item()
    assert diff <= atol, f"max abs difference {diff:.3g}"
    assert (ours - x).abs().max() > EPS / 2


@dataclass(frozen=True)
class Recorder(GradientTransform):
    """Not registered: keeps every gradient the optimizer receives (the mean over the input copies)."""

    name = "recorder"
    seen: list = field(default_factory=list)

    def apply(self, grad, ctx):
        self.seen.append(grad.clone())
        return grad


def _mean_gradient(inputs, model, x, y, seed):
    """The gradient one I-FGSM step receives at ``x`` with these input transforms and a seeded generator."""
    recorder = Recorder()
    attack = Attack(optimizer=IFGSM(steps=1), inputs=tuple(inputs), gradient_transforms=(recorder,))
    attack.craft(model, x, y, eps=EPS, generator=torch.Generator().manual_seed(seed))
    (grad,) = recorder.seen
    return grad


def _grad_at(model, image, y):
    image = image.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(image), y), image)
    return grad


def _context(attack_text, model, x, y, seed):
    return Context(parse_attack(attack_text), Source.of(model), x, y, eps=EPS, norm="linf", scale=1.0,
                   targeted=False, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# DI, TI, SI against torchattacks


@pytest.mark.parametrize("text, decay", [("ifgsm+dim", 0.0), ("dim", 1.0)])
def test_dim_matches_torchattacks_difgsm(cnn, text, decay):
    model, x, y = cnn
    assert parse_attack(text).optimizer.name == ("ifgsm" if decay == 0 else "mifgsm")  # dim's base: MI
    ours = _craft(text, model, x, y, seed=3, overrides={"--steps": STEPS, "--step-size": ALPHA})
    theirs = _oracle(torchattacks.DIFGSM(model, eps=EPS, alpha=ALPHA, steps=STEPS, decay=decay, resize_rate=0.9,
                                         diversity_prob=0.5), x, y, seed=3)
    _assert_agree(ours, theirs, x)


@pytest.mark.parametrize("text, decay, prob, kernel", [
    ("mifgsm+dim+tim(kernel=5)", 1.0, 0.5, 5),
    ("ifgsm+tim(kernel=5)", 0.0, 0.0, 5),
    ("tim", 1.0, 0.0, 15),  # the defaults: MI base, TI's 15 x 15 kernel of 3 sigmas
])
def test_tim_matches_torchattacks_tifgsm(cnn, text, decay, prob, kernel):
    model, x, y = cnn
    ours = _craft(text, model, x, y, seed=4, overrides={"--steps": STEPS, "--step-size": ALPHA})
    theirs = _oracle(torchattacks.TIFGSM(model, eps=EPS, alpha=ALPHA, steps=STEPS, decay=decay, len_kernel=kernel,
                                         nsig=3, resize_rate=0.9, diversity_prob=prob), x, y, seed=4)
    _assert_agree(ours, theirs, x)


@pytest.mark.parametrize("scales", [5, 3])
def test_sim_matches_torchattacks_sinifgsm(cnn, scales):
    model, x, y = cnn
    ours = _craft(f"nifgsm(steps={STEPS},step_size={ALPHA})+sim(scales={scales})", model, x, y)
    theirs = _oracle(torchattacks.SINIFGSM(model, eps=EPS, alpha=ALPHA, steps=STEPS, decay=1.0, m=scales), x, y)
    _assert_agree(ours, theirs, x)
    assert SIM().scales == 5 and parse_attack("sim").optimizer.name == "mifgsm"


# ----------------------------------------------------------------------------------------------
# Admix: the paper's gradient by hand


def test_admix_matches_the_papers_gradient_by_hand(cnn):
    model, x, y = cnn
    eta, mixes, scales, steps = 0.2, 3, 5, 3
    ours = parse_attack(f"mifgsm(steps={steps},step_size={ALPHA})+admix").craft(
        model, x, y, eps=EPS, generator=torch.Generator().manual_seed(5))

    draws = torch.Generator().manual_seed(5)
    x_adv, momentum = x.clone(), torch.zeros_like(x)
    for _ in range(steps):
        grad = torch.zeros_like(x)
        for _ in range(mixes):
            partner = x_adv[torch.randperm(len(x), generator=draws)]  # a constant: no gradient through it
            for i in range(scales):
                point = x_adv.clone().requires_grad_(True)
                loss = F.cross_entropy(model((point + eta * partner) / 2**i), y)  # the images' own labels
                grad += torch.autograd.grad(loss, point)[0]
        grad /= mixes * scales
        momentum = momentum + grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True)
        x_adv = torch.clamp(x + torch.clamp(x_adv + ALPHA * momentum.sign() - x, -EPS, EPS), 0, 1)
    _assert_agree(ours, x_adv, x)
    defaults = Admix()
    assert (defaults.scales, defaults.mixes, defaults.strength) == (5, 3, 0.2)


def test_chained_transforms_average_every_copy(cnn):
    # sim+admix: each SI copy is admixed twice; the copies share SI's graph (the engine keeps it).
    model, x, y = cnn
    ours = _mean_gradient([SIM(scales=2), Admix(scales=1, mixes=2, strength=0.3)], model, x, y, seed=2)
    draws = torch.Generator().manual_seed(2)
    expected = torch.zeros_like(x)
    for i in range(2):
        for _ in range(2):
            perm = torch.randperm(len(x), generator=draws)
            point = x.clone().requires_grad_(True)
            scaled = point / 2**i
            loss = F.cross_entropy(model(scaled + 0.3 * scaled[perm].detach()), y)
            expected += torch.autograd.grad(loss, point)[0] / 4
    torch.testing.assert_close(ours, expected, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# SSM


def test_dct_matrix_is_orthonormal_and_scipys_dct():
    for size in (1, 5, 8, 13):
        d = dct_matrix(size, dtype=torch.float64)
        torch.testing.assert_close(d @ d.T, torch.eye(size, dtype=torch.float64), atol=1e-12, rtol=0)
        np.testing.assert_allclose(d.numpy(), scipy.fft.dct(np.eye(size), axis=0, norm="ortho"), atol=1e-12)
    x = torch.rand(2, 3, 7, 10, dtype=torch.float64)
    np.testing.assert_allclose(dct_2d(x).numpy(), scipy.fft.dctn(x.numpy(), axes=(-2, -1), norm="ortho"),
                               atol=1e-12)
    torch.testing.assert_close(idct_2d(dct_2d(x)), x, atol=1e-12, rtol=0)


def test_ssm_without_noise_and_mask_copies_the_input(cnn):
    model, x, y = cnn
    ctx = _context("ssm(rho=0,sigma=0,copies=3)", model, x, y, seed=0)
    copies = SSM(copies=3, rho=0.0, sigma=0.0).expand([x], ctx)
    assert len(copies) == 3
    for copy in copies:
        torch.testing.assert_close(copy, x, atol=1e-6, rtol=0)
    # rho 0: copy = x + noise, the noise drawn with std eps (sigma's default) from the generator.
    copy = SSM(copies=1, rho=0.0).expand([x], _context("ssm", model, x, y, seed=1))[0]
    noise = torch.empty(x.shape).normal_(0.0, EPS, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(copy, x + noise, atol=1e-6, rtol=0)


@pytest.mark.parametrize("through_spectrum", [False, True])
def test_ssm_gradient_is_the_mean_over_copies_by_hand(cnn, through_spectrum):
    model, x, y = cnn
    copies, rho, sigma = 4, 0.5, 0.05
    ours = _mean_gradient([SSM(copies=copies, rho=rho, sigma=sigma, through_spectrum=through_spectrum)],
                          model, x, y, seed=6)
    draws = torch.Generator().manual_seed(6)
    axes = dict(axes=(-2, -1), norm="ortho")
    expected = np.zeros(x.shape)
    for _ in range(copies):
        noise = torch.empty(x.shape).normal_(0.0, sigma, generator=draws)
        mask = torch.empty(x.shape).uniform_(1 - rho, 1 + rho, generator=draws).double().numpy()
        spectral = scipy.fft.idctn(scipy.fft.dctn((x + noise).double().numpy(), **axes) * mask, **axes)
        grad = _grad_at(model, torch.from_numpy(spectral).float(), y).double().numpy()
        # The authors' code: the gradient at the transformed image. Exact: through IDCT(M * DCT(.)), a
        # symmetric linear map, so its transpose applied to that gradient is the same map.
        expected += scipy.fft.idctn(mask * scipy.fft.dctn(grad, **axes), **axes) if through_spectrum else grad
    expected /= copies
    scale = np.abs(expected).max()
    assert np.abs(ours.double().numpy() - expected).max() <= 1e-4 * scale
    other = _mean_gradient([SSM(copies=copies, rho=rho, sigma=sigma, through_spectrum=not through_spectrum)],
                           model, x, y, seed=6)
    assert (other - ours).abs().max() > 1e-2 * scale  # the two gradients really differ


# ----------------------------------------------------------------------------------------------
# BSR


def test_rotation_is_torchvisions_and_zero_is_identity():
    torch.manual_seed(0)
    for shape in [(2, 3, 9, 9), (1, 3, 5, 12), (2, 1, 12, 5)]:
        x = torch.rand(shape)
        assert torch.equal(rotate(x, 0.0), x)
        for angle in (17.0, -23.5, 90.0):
            expected = TF.rotate(x, angle, interpolation=InterpolationMode.BILINEAR, fill=None)
            torch.testing.assert_close(rotate(x, angle), expected, atol=1e-6, rtol=0)
    square = torch.rand(1, 1, 6, 6)
    torch.testing.assert_close(rotate(square, 90.0)[0, 0], torch.rot90(square[0, 0]), atol=1e-6, rtol=0)


def _bsr_copy_by_hand(x, blocks, max_angle, draws):
    """TransferAttack's BSR procedure with the draws of ``ctx`` (in the same order) and torchvision's rotation."""

    def cut_and_shuffle(t, dim):
        weights = torch.empty(blocks).uniform_(1.0, 2.0, generator=draws).double().numpy()
        sizes = np.round(weights / weights.sum() * t.shape[dim]).astype(int)
        sizes[sizes.argmax()] += t.shape[dim] - sizes.sum()
        pieces = t.split(sizes.tolist(), dim=dim)
        return [pieces[i] for i in torch.randperm(blocks, generator=draws).tolist()]

    first, second = (2, 3) if int(torch.randint(0, 2, (1,), generator=draws)) == 0 else (3, 2)
    rows = []
    for strip in cut_and_shuffle(x, first):
        angle = float(torch.empty(1).uniform_(-max_angle, max_angle, generator=draws))
        rotated = TF.rotate(strip, angle, interpolation=InterpolationMode.BILINEAR, fill=None)
        rows.append(torch.cat(cut_and_shuffle(rotated, second), dim=second))
    return torch.cat(rows, dim=first)


def test_bsr_copies_are_block_shuffles_and_rotations_by_hand(cnn):
    model, x, y = cnn
    ctx = _context("bsr", model, x, y, seed=8)
    copies = BSR(copies=3).expand([x], ctx)
    draws = torch.Generator().manual_seed(8)
    for copy in copies:
        torch.testing.assert_close(copy, _bsr_copy_by_hand(x, 3, 24.0, draws), atol=1e-6, rtol=0)
        assert copy.shape == x.shape and not torch.allclose(copy, x)
    assert not torch.equal(copies[0], copies[1])


def test_bsr_without_rotation_permutes_the_pixels(cnn):
    model, x, y = cnn
    ctx = _context("bsr", model, x, y, seed=9)
    for copy in BSR(copies=5, blocks=3, max_angle=0.0).expand([x], ctx):
        assert torch.equal(copy.flatten(2).sort(dim=2).values, x.flatten(2).sort(dim=2).values)
        assert not torch.equal(copy, x)


def test_bsr_refuses_images_smaller_than_its_blocks(cnn):
    model, _, _ = cnn
    x, y = torch.rand(2, 3, 16, 2), torch.tensor([0, 1])
    with pytest.raises(DecorrError, match="bsr-blocks"):
        parse_attack("bsr").craft(model, x, y, eps=EPS)


# ----------------------------------------------------------------------------------------------
# Combinations and contracts


@pytest.mark.parametrize("text", ["mifgsm+dim+tim", "vnifgsm(steps=2,neighbors=2)+sim", "admix+dim",
                                  "nifgsm(steps=2)+sim(scales=2)+admix(scales=2)+bsr(copies=2)+ssm(copies=2)"])
def test_combinations_craft_inside_the_ball(cnn, text):
    model, x, y = cnn
    out = parse_attack(text).craft(model, x, y, eps=EPS, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().max() <= EPS + 1e-6 and (out - x).abs().max() > EPS / 2


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("text", ["sim", "admix", "ssm(copies=4)", "bsr(copies=4)",
                                  "ssm(copies=2,through_spectrum=true)"])
@pytest.mark.parametrize("norm, eps", [("linf", EPS), ("l2", 0.5)])
def test_contract(cnn, text, norm, eps):
    model, x, y = cnn
    model.train()
    hooks = _hooks(model)
    attack = parse_attack(f"mifgsm(steps=3)+{text}")
    rng_state = torch.get_rng_state()
    runs = [attack.craft(model, x, y, eps=eps, norm=norm, generator=torch.Generator().manual_seed(s))
            for s in (0, 0, 1)]
    assert torch.equal(torch.get_rng_state(), rng_state)  # every draw came from the generator
    assert torch.equal(runs[0], runs[1])
    if text != "sim":  # SI draws nothing
        assert not torch.equal(runs[0], runs[2])
    assert all(m.training for m in model.modules()) and _hooks(model) == hooks
    assert all(p.grad is None for p in model.parameters())
    out = runs[0]
    assert not out.requires_grad and out.min() >= 0 and out.max() <= 1
    size = (out - x).abs().flatten(1).max(dim=1).values if norm == "linf" else (out - x).flatten(1).norm(dim=1)
    assert size.max() <= eps + 1e-5


@pytest.mark.parametrize("text, field_name", [
    ("sim(scales=0)", "scales"),
    ("admix(mixes=0)", "mixes"),
    ("admix(strength=-0.1)", "strength"),
    ("admix(scales=-1)", "scales"),
    ("ssm(copies=0)", "copies"),
    ("ssm(rho=1.5)", "rho"),
    ("ssm(sigma=-1)", "sigma"),
    ("bsr(blocks=0)", "blocks"),
    ("bsr(copies=0)", "copies"),
    ("bsr(max_angle=200)", "max_angle"),
])
def test_bad_settings_name_the_field(text, field_name):
    with pytest.raises(DecorrError, match=field_name):
        parse_attack(text)


def test_defaults_and_flags():
    assert (SSM().copies, SSM().rho, SSM().sigma, SSM().through_spectrum) == (20, 0.5, None, False)
    assert (BSR().copies, BSR().blocks, BSR().max_angle) == (20, 3, 24.0)
    flags = attack_flags()
    for flag, user in [("--sim-scales", "sim"), ("--admix-strength", "admix"), ("--ssm-rho", "ssm"),
                       ("--ssm-sigma", "ssm"), ("--bsr-max-angle", "bsr"), ("--bsr-blocks", "bsr")]:
        assert flags[flag]["users"] == [user]
    attack = parse_attack("ssm", {"--ssm-rho": 0.3, "--steps": 4})
    assert attack.inputs[0].rho == 0.3 and attack.optimizer.steps == 4
    assert dataclasses.is_dataclass(attack.inputs[0])
