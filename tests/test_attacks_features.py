"""Feature-level objectives (ila, fia, naa) against the papers' equations written out by hand.

The toy models are small conv nets in float64 whose derivatives are written out below without
autograd (tanh' = 1 - tanh^2; a convolution's adjoint is the transposed convolution), so the
objectives' gradients and whole attacks can be replayed step by step by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks
import torchvision

from decorr.attacks import Source, parse_attack, parse_attacks
from decorr.attacks.base import Context
from decorr.attacks.feature_level import (ILA, attack_layers, fia_aggregate_gradient, ila_projection,
                                          naa_integrated_gradient, naa_weighted_attribution)
from decorr.errors import DecorrError
from decorr.models.foreign import Preprocessed
from decorr.models.registry import create_model

EPS = 8 / 255


class Toy(nn.Module):
    """conv1 (3->4, 3x3, pad 1), tanh (``act1``), conv2 (4->6, 3x3, stride 2, pad 1), tanh, fc; or, with
    ``linear_head``, fc straight on ``act1`` (logits linear in the features)."""

    def __init__(self, linear_head: bool = False, size: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.linear_head = linear_head
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = nn.Tanh()
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.act2 = nn.Tanh()
        self.fc = nn.Linear(4 * size * size if linear_head else 6 * (size // 2) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.act1(self.conv1(x))
        if not self.linear_head:
            f = self.act2(self.conv2(f))
        return self.fc(f.flatten(1))


def make_toy(linear_head: bool = False, dtype=torch.float64):
    torch.manual_seed(0)
    model = Toy(linear_head).to(dtype).eval()
    with torch.no_grad():
        model.conv1.weight.mul_(3)  # tanh well away from linear
    x = torch.rand(3, 3, 8, 8, dtype=dtype)
    y = torch.tensor([0, 3, 4])
    return model, x, y


# -- the toy's derivatives, by hand ----------------------------------------------------------------


def act1(model, x):
    return torch.tanh(F.conv2d(x, model.conv1.weight, model.conv1.bias, padding=1)).detach()


def back_through_act1(model, x, grad_f):
    """d/dx of sum(grad_f * act1(x)): tanh' then conv1's adjoint."""
    return F.conv_transpose2d((1 - act1(model, x) ** 2) * grad_f, model.conv1.weight, padding=1).detach()


def logit_gradient_at_act1(model, f, y):
    """d logit_y / d act1 for the toy (non-linear head), per sample."""
    a2 = torch.tanh(F.conv2d(f, model.conv2.weight, model.conv2.bias, stride=2, padding=1))
    w = model.fc.weight[y].view(-1, 6, 4, 4)
    return F.conv_transpose2d((1 - a2**2) * w, model.conv2.weight, stride=2, padding=1, output_padding=1).detach()


def unit(t):
    return t / t.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def ifgsm_by_hand(x, grad_fn, eps, steps, momentum=False):
    """I-FGSM, or MI-FGSM (decay 1, gradient over its mean absolute value), steps of eps / steps."""
    alpha, x_adv, g = eps / steps, x.clone(), torch.zeros_like(x)
    for _ in range(steps):
        grad = grad_fn(x_adv)
        g = g + grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True) if momentum else grad
        x_adv = torch.min(torch.max(x_adv + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv


def context(attack, source, x, y, generator=None, eps=EPS):
    return Context(attack, source, x, y, eps=eps, norm="linf", scale=1.0, targeted=False, generator=generator)


# -- ILA ---------------------------------------------------------------------------------------------


def test_ila_projection_by_hand():
    rng = np.random.default_rng(0)
    f, c, b = (rng.normal(size=(3, 4, 2, 2)) for _ in range(3))
    expected = [np.dot((f[i] - c[i]).ravel(), (b[i] - c[i]).ravel()) / np.linalg.norm((b[i] - c[i]).ravel())
                for i in range(3)]
    got = ila_projection(*(torch.from_numpy(t) for t in (f, c, b)))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    # A sample whose baseline left its features alone contributes 0 (not NaN).
    assert ila_projection(torch.ones(1, 3), torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0


def test_ila_per_sample_projection_steps_like_transferattacks_batch_projection():
    """TransferAttack (and the authors) project the whole flattened batch and divide by ||d||^2; per
    sample, the gradients differ by a positive factor only, so every sign step is the same."""
    torch.manual_seed(0)
    f = torch.randn(4, 10, requires_grad=True)
    c, b = torch.randn(4, 10), torch.randn(4, 10)
    (ours,) = torch.autograd.grad(ila_projection(f, c, b).mean(), f)
    d = (b - c).reshape(1, -1)
    (theirs,) = torch.autograd.grad(((f - c).reshape(1, -1) @ (d / d.norm()).T / d.norm()).sum(), f)
    ratio = ours / theirs
    assert (ratio > 0).all()
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))


@pytest.fixture
def fixed_baseline(monkeypatch):
    """ILA with a fixed baseline x' (so the objective can be checked by hand)."""
    model, x, y = make_toy()
    x_prime = (x + EPS * torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype).sign()
               ).clamp(0, 1)
    monkeypatch.setattr(ILA, "prepare_batch", lambda self, ctx: x_prime)
    return model, x, y, x_prime


def test_ila_loss_and_gradient_with_a_fixed_baseline(fixed_baseline):
    model, x, y, x_prime = fixed_baseline
    attack = parse_attack("ila(layer=act1)")
    ctx = context(attack, Source.of(model), x, y)
    ctx.loss = attack.objective.prepare(ctx)
    point = (x + 0.02 * torch.randn(x.shape, dtype=x.dtype)).clamp(0, 1)
    d = act1(model, x_prime) - act1(model, x)
    d_norm = d.flatten(1).norm(dim=1)
    by_hand = ((act1(model, point) - act1(model, x)) * d).flatten(1).sum(1) / d_norm
    torch.testing.assert_close(ctx.loss_value(point), by_hand.mean(), atol=1e-12, rtol=0)
    grad_by_hand = back_through_act1(model, point, d / d_norm.view(-1, 1, 1, 1)) / len(x)
    torch.testing.assert_close(ctx.raw_gradient(point), grad_by_hand, atol=1e-12, rtol=0)


def test_ila_attack_is_ifgsm_on_the_projection_by_hand(fixed_baseline):
    model, x, y, x_prime = fixed_baseline
    d = act1(model, x_prime) - act1(model, x)
    ours = parse_attack("ila(layer=act1)+ifgsm(steps=4)").craft(Source.of(model), x, y, eps=EPS)
    by_hand = ifgsm_by_hand(x, lambda p: back_through_act1(model, p, unit(d)), EPS, 4)
    torch.testing.assert_close(ours, by_hand, atol=1e-12, rtol=0)
    assert parse_attack("ila").optimizer.name == "ifgsm"  # TransferAttack's second stage


def test_ila_baseline_is_torchattacks_mifgsm():
    model, x, y = make_toy(dtype=torch.float32)
    attack = parse_attack("ila(layer=act1)")
    x_prime = attack.objective.prepare_batch(context(attack, Source.of(model), x, y))
    theirs = torchattacks.MIFGSM(model, eps=EPS, alpha=EPS / 10, steps=10, decay=1.0)(x, y)
    torch.testing.assert_close(x_prime, theirs, atol=1e-6, rtol=0)


# -- FIA ---------------------------------------------------------------------------------------------


def test_fia_aggregate_gradient_of_fixed_masks_by_hand():
    model, x, y = make_toy()
    masks = [(torch.rand(x.shape, generator=torch.Generator().manual_seed(k), dtype=x.dtype) >= 0.3).to(x.dtype)
             for k in range(4)]
    total = sum(logit_gradient_at_act1(model, act1(model, x * m), y) for m in masks)
    got = fia_aggregate_gradient(model, "act1", x, y, masks)
    torch.testing.assert_close(got, unit(total), atol=1e-12, rtol=0)
    torch.testing.assert_close(got.flatten(1).norm(dim=1), torch.ones(3, dtype=x.dtype))


def test_fia_attack_by_hand_with_its_masks_drawn_from_the_generator():
    model, x, y = make_toy()
    drop, copies = 0.3, 5
    g = torch.Generator().manual_seed(7)
    masks = [(torch.empty(x.shape, dtype=x.dtype).uniform_(0, 1, generator=g) >= drop).to(x.dtype)
             for _ in range(copies)]
    weights = unit(sum(logit_gradient_at_act1(model, act1(model, x * m), y) for m in masks))
    by_hand = ifgsm_by_hand(x, lambda p: -back_through_act1(model, p, weights) / len(x), EPS, 3, momentum=True)
    attack = parse_attack(f"fia(layer=act1,copies={copies},drop={drop})+mifgsm(steps=3)")
    ours = attack.craft(Source.of(model), x, y, eps=EPS, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, by_hand, atol=1e-12, rtol=0)
    assert parse_attack("fia").optimizer.name == "mifgsm"
    ctx = context(attack, Source.of(model), x, y, generator=torch.Generator().manual_seed(7))
    loss = attack.objective.prepare(ctx)  # minus the importance-weighted feature sum, batch mean
    assert loss(x).item() == pytest.approx(-(weights * act1(model, x)).sum().item() / 3, abs=1e-12)


# -- NAA ---------------------------------------------------------------------------------------------


def naa_weights_by_hand(model, x, y, steps):
    """The integrated gradient for logits = W f + b: d p_y / d f = p_y (W_y - sum_c p_c W_c)."""
    w = model.fc.weight.detach()
    total = 0
    for k in range(1, steps + 1):
        f = act1(model, x * k / steps).flatten(1)
        p = F.softmax(f @ w.T + model.fc.bias.detach(), dim=1)
        total = total + p.gather(1, y[:, None]) * (w[y] - p @ w)
    return unit((total / steps).view(-1, 4, 8, 8))


def test_naa_attributions_of_a_linear_head_by_hand():
    model, x, y = make_toy(linear_head=True)
    weights = naa_integrated_gradient(model, "act1", x, y, steps=6)
    torch.testing.assert_close(weights, naa_weights_by_hand(model, x, y, 6), atol=1e-12, rtol=0)
    point = (x + 0.03 * torch.randn(x.shape, dtype=x.dtype)).clamp(0, 1)
    black = act1(model, torch.zeros_like(x))
    ia = ((act1(model, point) - black) * weights).flatten(1).numpy()
    by_hand = [sum(v for v in row if v >= 0) + 0.5 * sum(v for v in row if v < 0) for row in ia]
    got = naa_weighted_attribution(act1(model, point), black, weights, 0.5)
    np.testing.assert_allclose(got.numpy(), by_hand, rtol=1e-12)


def test_naa_attack_by_hand():
    model, x, y = make_toy(linear_head=True)
    weights = naa_weights_by_hand(model, x, y, 5)
    black = act1(model, torch.zeros_like(x))

    def grad(p):  # minus the weighted attribution: gamma scales the negative attributions' gradient
        scale = torch.where((act1(model, p) - black) * weights >= 0, 1.0, 0.5)
        return -back_through_act1(model, p, weights * scale) / len(x)

    by_hand = ifgsm_by_hand(x, grad, EPS, 3, momentum=True)
    attack = parse_attack("naa(layer=act1,path_steps=5,gamma=0.5)+mifgsm(steps=3)")
    torch.testing.assert_close(attack.craft(Source.of(model), x, y, eps=EPS), by_hand, atol=1e-12, rtol=0)
    assert parse_attack("naa").optimizer.name == "mifgsm"


def test_naa_noise_comes_from_the_generator():
    model, x, y = make_toy(linear_head=True)
    attack = parse_attack("naa(layer=act1,path_steps=3,noise=0.1)+mifgsm(steps=2)")
    runs = [attack.craft(Source.of(model), x, y, eps=EPS, generator=torch.Generator().manual_seed(seed))
            for seed in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


# -- every objective: contract -------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    model = create_model("resnet20")
    return model, torch.rand(2, 3, 32, 32), torch.tensor([1, 7])


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("text", ["ila(baseline_steps=2)+ifgsm(steps=2)", "fia(copies=2)+mifgsm(steps=2)",
                                  "naa(path_steps=2)+mifgsm(steps=2)+dim"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_crafting_contract(resnet20, text, norm):
    model, x, y = resnet20
    model.train()
    model.layer1.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    hooks = _hooks(model)
    eps = EPS if norm == "linf" else 0.5
    source = Source.of(model, arch="resnet20")
    runs = [parse_attack(text).craft(source, x, y, eps=eps, norm=norm, generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    delta = runs[0] - x
    size = delta.abs().amax() if norm == "linf" else delta.flatten(1).norm(dim=1).max()
    assert 0 < size <= eps + 1e-6
    assert runs[0].min() >= 0 and runs[0].max() <= 1
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert _hooks(model) == hooks


def test_ensemble_objective_is_the_members_mean(resnet20):
    model, x, y = resnet20
    torch.manual_seed(1)
    other = create_model("resnet20").eval()
    model.eval()
    attack = parse_attack("naa(path_steps=2)")
    source = Source(members=(model, other), combine="loss", member_archs=("resnet20", "resnet20"))
    loss = attack.objective.prepare(context(attack, source, x, y))
    alone = [attack.objective.prepare(context(attack, Source.of(m, arch="resnet20"), x, y)) for m in (model, other)]
    point = (x + 0.01).clamp(0, 1)
    for k in range(2):
        torch.testing.assert_close(loss(point, k), alone[k](point))
    torch.testing.assert_close(loss(point), (alone[0](point) + alone[1](point)) / 2)


# -- layers ------------------------------------------------------------------------------------------


def _layer(attack, model, **source):
    ((_, name),) = attack_layers(attack, Source.of(model, **source), None)
    return name


def meta(builder):
    with torch.device("meta"):  # structure only: no memory, no initialisation
        return builder()


def test_default_layers():
    assert _layer("fia", create_model("resnet20"), arch="resnet20") == "layer2"
    resnet18, resnet50 = meta(torchvision.models.resnet18), meta(torchvision.models.resnet50)
    for attack in ("ila", "fia", "naa"):
        assert _layer(attack, resnet18, arch="torchvision.resnet18") == "layer2"
    assert _layer("fia", resnet50, arch="torchvision.resnet50") == "layer2"
    assert _layer("ila", resnet50, arch="torchvision.resnet50") == "layer3.0"  # TransferAttack's middle module
    vgg16 = meta(torchvision.models.vgg16)
    name = _layer("naa", vgg16, arch="torchvision.vgg16")
    index = int(name.split(".")[1])  # FIA's conv3_3/Relu: the ReLU before the third max pool
    pools = [i for i, m in enumerate(vgg16.features) if isinstance(m, nn.MaxPool2d)]
    assert isinstance(vgg16.features[index], nn.ReLU) and index + 1 == pools[2]
    wrapped = Preprocessed(resnet18, mean=[0.5] * 3, std=[0.5] * 3)
    assert _layer("fia", wrapped, arch="torchvision.resnet18") == "net.layer2"
    assert attack_layers("fia", Source.of(wrapped), "layer3")[0][1] == "net.layer3"
    assert _layer("fia", Toy(), arch="toy", feature_layer="act1") == "act1"  # the source's feature layer


def test_layer_errors_are_one_line_and_come_before_any_work(resnet20):
    model, x, y = resnet20
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        for text, source, words in [("fia(layer=layer9)", Source.of(model, arch="resnet20"), "layer9"),
                                    ("naa", Source.of(model, arch="mystery"), "--attack-layer"),
                                    ("ila", Source.of(Toy()), "--attack-layer")]:
            with pytest.raises(DecorrError, match=words) as err:
                parse_attack(text).craft(source, x, y, eps=EPS)
            assert "\n" not in str(err.value)
    finally:
        handle.remove()
    assert not calls


@pytest.mark.parametrize("text, field", [("fia(copies=0)", "copies"), ("fia(drop=1)", "drop"),
                                         ("naa(path_steps=0)", "path_steps"), ("naa(gamma=-1)", "gamma"),
                                         ("naa(noise=-0.1)", "noise"), ("ila(baseline=dim)", "baseline"),
                                         ("ila(baseline_steps=0)", "baseline_steps")])
def test_bad_settings_name_the_field(text, field):
    with pytest.raises(DecorrError, match=f"{text[:3]}: {field} "):
        parse_attack(text)
    with pytest.raises(DecorrError, match="layer must be a module name"):
        ILA(layer=" ")


def test_flags_and_targeted(resnet20):
    model, x, y = resnet20
    attacks = parse_attacks(["ila", "fia", "naa"], {"--attack-layer": "layer3", "--fia-copies": 3})
    assert [a.objective.layer for a in attacks] == ["layer3"] * 3 and attacks[1].objective.copies == 3
    with pytest.raises(DecorrError, match="untargeted"):
        parse_attack("fia").craft(Source.of(model, arch="resnet20"), x, y, eps=EPS, targeted=True)
