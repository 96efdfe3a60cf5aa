"""Model-side attacks LinBP (linbp) and Ghost networks (ghost) against hand-written forward and backward passes.

LinBP's oracles: (1) a hand-written forward of the same weights whose branch ReLUs after the position
are a test-local ReLU with identity gradient (the linear backward, ``renormalize=False``); (2) the
authors' backward (qizhangli/linbp-attack ``linbp_backw_resnet50``) re-written as an explicit loop over
recorded tensors: per unit, the skip's and branch's gradients, the branch's true gradient through the
recorded ReLU masks, its linear gradient, and the rescaling. Ghost's oracle: a hand-written forward
with each skip path multiplied by the factors drawn in forward order from a generator seeded alike.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from decorr.attacks import Source, attack_class, parse_attack
from decorr.attacks.base import Context
from decorr.attacks.linear_backprop import default_position, linear_backprop
from decorr.attacks.skip_erosion import skip_erosion
from decorr.errors import DecorrError
from decorr.models.blocks import ResidualUnit
from decorr.models.cifar import CifarResNet, VGGSmall
from decorr.models.foreign import Preprocessed
from decorr.models.registry import create_model

# ----------------------------------------------------------------------------------------------
# Tiny models


def _randomise_batch_norms(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model


def cifar_resnet(shortcut: str = "zero_pad") -> nn.Module:
    """Three stages of two torchvision BasicBlocks (units layer1.0 ... layer3.1), in-place ReLUs."""
    torch.manual_seed(0)
    return _randomise_batch_norms(CifarResNet(blocks_per_stage=2, widths=(4, 6, 8), shortcut=shortcut)).double().eval()


def bottleneck_resnet() -> nn.Module:
    torch.manual_seed(1)
    model = torchvision.models.ResNet(torchvision.models.resnet.Bottleneck, [1, 2, 2, 1], num_classes=5,
                                      width_per_group=8)
    return _randomise_batch_norms(model).double().eval()


class PreActNet(nn.Module):
    """decorr ResidualUnits (pre-activation; identity and 1x1-convolution skips)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stage = nn.Sequential(ResidualUnit(4, 4), ResidualUnit(4, 6, stride=2), ResidualUnit(6, 6))
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.stage(self.stem(x)).mean(dim=(2, 3)))


def preact_net() -> nn.Module:
    torch.manual_seed(2)
    return _randomise_batch_norms(PreActNet()).double().eval()


def batch(size: int = 16, n: int = 3):
    g = torch.Generator().manual_seed(5)
    return torch.rand(n, 3, size, size, generator=g, dtype=torch.float64), torch.tensor([0, 3, 4])[:n]


# ----------------------------------------------------------------------------------------------
# Hand-written passes


class IdentityGradReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad


def authors_relu(x, record):
    """The authors' ``linbp_relu``: ReLU forward, identity backward; records the pre-activation."""
    record.append(x)
    return x + F.relu(-x).detach()


def torchvision_unit(block, h, inner_relu, branch_in=None):
    """One torchvision BasicBlock/Bottleneck: (skip output, branch output, next features); the branch
    runs on ``branch_in`` (default ``h``), the skip on ``h``."""
    out = inner_relu(block.bn1(block.conv1(h if branch_in is None else branch_in)))
    if hasattr(block, "conv3"):
        out = inner_relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    skip = block.downsample(h) if block.downsample is not None else h
    return skip, out, torch.relu(skip + out)


def preact_unit(unit, h, inner_relu, branch_in=None):
    b = unit.branch
    # [BN, ReLU, conv, BN, ReLU, conv]
    out = b[5](inner_relu(b[3](b[2](inner_relu(b[0](h if branch_in is None else branch_in))))))
    skip = unit.skip(h)
    return skip, out, skip + out


def units_and_head(model):
    """(name, unit, unit pass) in order, the stem and the head, for the three test architectures."""
    if isinstance(model, PreActNet):
        units = [(f"stage.{i}", u, preact_unit) for i, u in enumerate(model.stage)]
        return units, model.stem, lambda h: model.fc(h.mean(dim=(2, 3)))
    stages = [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, n)]
    units = [(f"{s}.{i}", u, torchvision_unit) for s in stages for i, u in enumerate(getattr(model, s))]
    if isinstance(model, CifarResNet):
        def stem(x):
            return torch.relu(model.bn1(model.conv1(model.normalize(x))))
    else:
        def stem(x):
            return model.maxpool(torch.relu(model.bn1(model.conv1(x))))
    return units, stem, lambda h: model.fc(torch.flatten(model.avgpool(h), 1))


def hand_linear_gradient(model, x, y, linear_from: str):
    """Input gradient with every branch ReLU of the units from ``linear_from`` on of identity gradient."""
    units, stem, head = units_and_head(model)
    x = x.clone().requires_grad_(True)
    h, linear = stem(x), False
    for name, unit, unit_pass in units:
        linear = linear or name == linear_from
        _, _, h = unit_pass(unit, h, IdentityGradReLU.apply if linear else torch.relu)
    logits = head(h)
    return torch.autograd.grad(F.cross_entropy(logits, y), x)[0], logits.detach()


def authors_gradient(model, x, y, linear_from: str):
    """The authors' LinBP backward (``linbp_backw_resnet50``) as an explicit loop, for any of the units."""
    units, stem, head = units_and_head(model)
    x = x.clone().requires_grad_(True)
    h, records = stem(x), []
    for name, unit, unit_pass in units:
        if records or name == linear_from:
            conv_in, pre = h + 0, []  # the branch runs on conv_in, the skip on h, as in the authors' block_func
            skip, branch, _ = unit_pass(unit, h, lambda t: authors_relu(t, pre), branch_in=conv_in)
            skip, branch = skip + 0, branch + 0
            h = torch.relu(skip + branch) if unit_pass is torchvision_unit else skip + branch
            records.append(dict(conv_in=conv_in, pre=pre, skip=skip, branch=branch))
        else:
            h = unit_pass(unit, h, torch.relu)[2]
    loss = F.cross_entropy(head(h), y)
    grad_skip = grad_main = None
    for i in range(len(records) - 1, -1, -1):
        r = records[i]
        if i == len(records) - 1:
            grad_skip, grad_branch = torch.autograd.grad(loss, (r["skip"], r["branch"]), retain_graph=True)
        else:
            after = records[i + 1]
            grad_skip, grad_branch = torch.autograd.grad((after["skip"], after["conv_in"]), (r["skip"], r["branch"]),
                                                         (grad_skip, grad_main), retain_graph=True)
        # The true branch gradient: back through the branch, multiplying by each ReLU's mask in turn.
        pre = r["pre"]
        g = torch.autograd.grad(r["branch"], pre[-1], grad_branch, retain_graph=True)[0] * (pre[-1] > 0)
        for j in range(len(pre) - 2, -1, -1):
            g = torch.autograd.grad(pre[j + 1], pre[j], g, retain_graph=True)[0] * (pre[j] > 0)
        true = torch.autograd.grad(pre[0], r["conv_in"], g, retain_graph=True)[0]
        main = torch.autograd.grad(r["branch"], r["conv_in"], grad_branch, retain_graph=True)[0]
        alpha = true.norm(p=2, dim=(1, 2, 3), keepdim=True) / main.norm(p=2, dim=(1, 2, 3), keepdim=True)
        grad_main = alpha * main
    first = records[0]
    return torch.autograd.grad((first["skip"], first["conv_in"]), x, (grad_skip, grad_main))[0]


def input_gradient(model, x, y):
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(model(x), y), x)[0]


def relu_flags(model):
    return [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)]


def hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


# ----------------------------------------------------------------------------------------------
# LinBP


def test_linbp_default_positions():
    assert default_position(cifar_resnet()) == "layer2.1"
    assert default_position(create_model("resnet20")) == "layer2.1"
    assert default_position(create_model("resnet18_small")) == "layer3.1"
    assert default_position(torchvision.models.resnet50(num_classes=3)) == "layer3.1"  # the authors' 3_1
    assert default_position(Preprocessed(torchvision.models.resnet18(num_classes=3))) == "net.layer3.1"
    assert default_position(preact_net()) == "stage.1"


@pytest.mark.parametrize("build,position", [(cifar_resnet, "layer2.1"), (lambda: cifar_resnet("projection"),
                                                                          "layer1.1"),
                                            (bottleneck_resnet, "layer2.1"), (preact_net, "stage.1")])
def test_linbp_linear_backward_is_identity_relu_backward(build, position):
    model = build()
    x, y = batch(32 if isinstance(model, torchvision.models.ResNet) else 16)
    flags, hooks = relu_flags(model), hook_counts(model)
    expected, hand_logits = hand_linear_gradient(copy.deepcopy(model), x, y, position)
    plain = input_gradient(model, x, y)
    with linear_backprop(model, position, renormalize=False) as resolved:
        assert resolved == position
        torch.testing.assert_close(model(x), hand_logits, atol=1e-12, rtol=0)  # forward unchanged
        got = input_gradient(model, x, y)
    assert (got - expected).abs().max() < 1e-12
    assert (got - plain).abs().max() > 0.1 * plain.abs().max()  # the linearisation changes the gradient
    assert relu_flags(model) == flags and any(flags) == (not isinstance(model, PreActNet))
    assert hook_counts(model) == hooks


@pytest.mark.parametrize("build,position", [(cifar_resnet, "layer2.1"), (cifar_resnet, "layer1.0"),
                                            (bottleneck_resnet, "layer3.0"), (preact_net, "stage.0")])
def test_linbp_renormalised_backward_is_the_authors(build, position):
    model = build()
    x, y = batch(32 if isinstance(model, torchvision.models.ResNet) else 16)
    expected = authors_gradient(copy.deepcopy(model), x, y, position)
    linear, _ = hand_linear_gradient(copy.deepcopy(model), x, y, position)
    with linear_backprop(model, position):
        got = input_gradient(model, x, y)
    assert (got - expected).abs().max() < 1e-12
    assert (got - linear).abs().max() > 0.1 * linear.abs().max()  # the rescaling matters


def test_linbp_changes_nothing_before_the_position():
    model = cifar_resnet()
    x, y = batch()
    with linear_backprop(model, "fc"):  # no residual unit starts after the classifier
        got = input_gradient(model, x, y)
    assert torch.equal(got, input_gradient(model, x, y))


def test_linbp_on_a_plain_network_linearises_relus_after_the_position():
    torch.manual_seed(3)
    model = _randomise_batch_norms(VGGSmall(width=2)).double().eval()
    x, y = batch()
    hand = copy.deepcopy(model)
    for i in (3, 4, 5, 6):  # the ReLUs after features.conv3
        setattr(hand.features, f"relu{i}", _IdentityGradModule())
    with linear_backprop(model, "features.conv3"):
        got = input_gradient(model, x, y)
    assert (got - input_gradient(hand, x, y)).abs().max() < 1e-12
    plain = input_gradient(model, x, y)
    assert (got - plain).abs().max() > 0.1 * plain.abs().max()


class _IdentityGradModule(nn.Module):
    def forward(self, x):
        return IdentityGradReLU.apply(x)


def test_linbp_attack_runs_and_restores_the_model():
    model = cifar_resnet().float().train()
    x, y = batch()
    x = x.float()
    attack = parse_attack("linbp")
    flags, hooks = relu_flags(model), hook_counts(model)
    out = attack.craft(Source(module=model, arch="resnet20"), x, y, eps=8 / 255)
    with torch.no_grad():
        again = attack.craft(model, x, y, eps=8 / 255)  # crafting enables gradients itself
    assert torch.equal(out, again)
    assert (out - x).abs().max() <= 8 / 255 + 1e-7 and out.min() >= 0 and out.max() <= 1
    assert all(m.training for m in model.modules()) and relu_flags(model) == flags and hook_counts(model) == hooks
    plain = parse_attack("mifgsm").craft(model, x, y, eps=8 / 255)
    assert not torch.equal(out, plain)


def test_linbp_refuses_what_it_cannot_run_on():
    x, y = batch()
    for model, words in [(create_model("densenet_small"), "dense layers"), (create_model("vgg_small"), "position"),
                         (cifar_resnet(), "no module")]:
        attack = parse_attack("linbp(position=layer9.9)" if words == "no module" else "linbp")
        with pytest.raises(DecorrError, match=words) as err:
            attack.check_source(Source.of(model, name="m"))
        assert "\n" not in str(err.value)
    with pytest.raises(DecorrError, match="position"):
        attack_class("linbp")(position=" ")


# ----------------------------------------------------------------------------------------------
# Ghost networks


def hand_ghost_logits(model, x, factors):
    """CifarResNet / PreActNet forward with each unit's skip times the next factor, in forward order."""
    units, stem, head = units_and_head(model)
    h = stem(x)
    for (_, unit, unit_pass), factor in zip(units, factors, strict=True):
        skip, branch, _ = unit_pass(unit, h, torch.relu)
        skip = skip * factor
        h = torch.relu(skip + branch) if unit_pass is torchvision_unit else skip + branch
    return head(h)


def ghost_context(model, x, y, seed, r=0.22):
    attack = parse_attack(f"ghost(random_range={r})")
    ctx = Context(attack, Source.of(model), x, y, eps=8 / 255, norm="linf", scale=1.0, targeted=False,
                  generator=torch.Generator().manual_seed(seed))
    return attack, ctx


@pytest.mark.parametrize("build", [cifar_resnet, lambda: cifar_resnet("projection"), preact_net])
def test_ghost_forward_is_the_hand_built_eroded_network(build):
    model = build()
    x, y = batch()
    attack, ctx = ghost_context(model, x, y, seed=7)
    units, _, _ = units_and_head(model)
    with attack.modifiers[0].applied(ctx):
        first, second = model(x), model(x)
    # The same draws by hand: per unit in forward order, one factor per channel of the skip path.
    g = torch.Generator().manual_seed(7)
    channels = [skip_channels(unit) for _, unit, _ in units]
    draws = [[torch.empty(1, c, 1, 1, dtype=x.dtype).uniform_(0.78, 1.22, generator=g) for c in channels]
             for _ in range(2)]
    assert (first - hand_ghost_logits(model, x, draws[0])).abs().max() < 1e-12
    assert (second - hand_ghost_logits(model, x, draws[1])).abs().max() < 1e-12  # a new ghost per pass
    assert (first - model(x)).abs().max() > 1e-4 and hook_counts(model) == 0


def skip_channels(unit):
    if isinstance(unit, ResidualUnit):
        return unit.branch[5].out_channels
    return (unit.bn3 if hasattr(unit, "bn3") else unit.bn2).num_features


def test_ghost_with_fixed_factors_and_identity_skips():
    model = cifar_resnet()
    x, _ = batch()
    factors = [torch.full((1, c, 1, 1), 0.5 + 0.1 * i, dtype=x.dtype) for i, c in enumerate([4, 4, 6, 6, 8, 8])]
    calls = iter(factors)
    with skip_erosion(model, lambda shape: next(calls)):
        eroded = model(x)
    assert (eroded - hand_ghost_logits(model, x, factors)).abs().max() < 1e-12


def test_ghost_with_zero_range_is_the_plain_attack():
    model = cifar_resnet().float()
    x, y = batch()
    x = x.float()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(parse_attack("ghost(random_range=0)").craft(model, x, y, eps=8 / 255, generator=g),
                       parse_attack("mifgsm").craft(model, x, y, eps=8 / 255))
    attack, ctx = ghost_context(model, x, y, seed=0, r=0.0)
    with attack.modifiers[0].applied(ctx):
        assert torch.equal(input_gradient(model, x, y), input_gradient(copy.deepcopy(model), x, y))


def test_ghost_draws_come_from_the_generator():
    model = cifar_resnet().float()
    x, y = batch()
    x = x.float()
    attack = parse_attack("ghost")
    rng = torch.get_rng_state()

    def craft(seed):
        return attack.craft(model, x, y, eps=8 / 255, generator=torch.Generator().manual_seed(seed))

    first, again, other = craft(1), craft(1), craft(2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), rng)
    assert (first - x).abs().max() <= 8 / 255 + 1e-7 and hook_counts(model) == 0


def test_ghost_refuses_non_residual_models_and_bad_ranges():
    with pytest.raises(DecorrError, match="dropout erosion") as err:
        parse_attack("ghost").check_source(Source.of(create_model("vgg_small"), name="vgg"))
    assert "\n" not in str(err.value)
    for r in ("1.5", "-0.1"):
        with pytest.raises(DecorrError, match="random_range"):
            parse_attack(f"ghost(random_range={r})")


def test_model_side_components_act_on_every_member():
    members = tuple(cifar_resnet().float() for _ in range(2))
    x, y = batch()
    x = x.float()
    source = Source(members=members, combine="loss")
    for text in ("linbp", "ghost", "sgm"):
        out = parse_attack(text).craft(source, x, y, eps=8 / 255, generator=torch.Generator().manual_seed(0))
        assert (out - x).abs().max() <= 8 / 255 + 1e-7
        assert all(hook_counts(m) == 0 for m in members)
