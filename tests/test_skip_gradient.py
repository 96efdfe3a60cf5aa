"""SGM: the input gradient of a residual unit is g_skip + gamma * J_branch^T g; forward unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torchvision.models import DenseNet, resnet18
from torchvision.models.densenet import _DenseLayer
from torchvision.models.resnet import BasicBlock, Bottleneck

from decorr.attacks import ce_loss, pgd, register_residual_branch, residual_branches, skip_gradient
from decorr.errors import DecorrError
from decorr.models import ResidualUnit
from decorr.models.mnist import MnistCNN

GAMMA = 0.3


def randomise_batch_norm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Eval mode with non-trivial running statistics and affine parameters (also used by test_sgm_authors)."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.eval()


def vjp(fn, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """J_fn(x)^T g by autograd on fn alone (no hooks installed)."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x), x, g)
    return grad


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_decorr_residual_unit_gradient():
    torch.manual_seed(0)
    unit = randomise_batch_norm(ResidualUnit(4, 4)).double()
    x = torch.rand(2, 4, 5, 5, dtype=torch.float64)
    g = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    expected = g + GAMMA * vjp(unit.branch, x, g)
    with skip_gradient(unit, GAMMA) as branches:
        assert branches == [unit.branch]
        got = vjp(unit, x, g)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, vjp(unit, x, g))  # differs from the undecayed gradient
    assert no_hooks_left(unit)


def test_decorr_residual_unit_with_projection_skip():
    torch.manual_seed(0)
    unit = randomise_batch_norm(ResidualUnit(3, 5, stride=2)).double()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    g = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    expected = vjp(unit.skip, x, g) + GAMMA * vjp(unit.branch, x, g)
    with skip_gradient(unit, GAMMA):
        got = vjp(unit, x, g)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
def test_torchvision_basic_block_gradient(stride):
    # out = relu(bn2(conv2(relu(bn1(conv1(x))))) + identity), with in-place ReLU and in-place "+=".
    torch.manual_seed(0)
    downsample = None
    if stride != 1:
        downsample = nn.Sequential(nn.Conv2d(4, 4, 1, stride=stride, bias=False), nn.BatchNorm2d(4))
    block = randomise_batch_norm(BasicBlock(4, 4, stride=stride, downsample=downsample)).double()
    x = torch.rand(2, 4, 6, 6, dtype=torch.float64)
    out = block(x)
    g = torch.randn_like(out) * (out > 0)  # the gradient after the final ReLU

    def branch(t):
        return block.bn2(block.conv2(block.relu(block.bn1(block.conv1(t)))))

    skip = downsample if downsample is not None else (lambda t: t)
    expected = vjp(skip, x, g) + GAMMA * vjp(branch, x, g)
    with skip_gradient(block, GAMMA) as branches:
        assert branches == [block.bn2]
        torch.testing.assert_close(block(x), out, rtol=0, atol=0)
        got = vjp(block, x, g)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert no_hooks_left(block)


def test_torchvision_bottleneck_gradient():
    torch.manual_seed(0)
    downsample = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
    block = randomise_batch_norm(Bottleneck(8, 4, downsample=downsample)).double()
    x = torch.rand(2, 8, 5, 5, dtype=torch.float64)
    out = block(x)
    g = torch.randn_like(out) * (out > 0)

    def branch(t):
        t = block.relu(block.bn1(block.conv1(t)))
        t = block.relu(block.bn2(block.conv2(t)))
        return block.bn3(block.conv3(t))

    expected = vjp(downsample, x, g) + GAMMA * vjp(branch, x, g)
    with skip_gradient(block, GAMMA) as branches:
        assert branches == [block.bn3]
        got = vjp(block, x, g)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


class OneDenseLayer(nn.Module):
    """What a torchvision _DenseBlock does with one layer: concatenate the new features."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = _DenseLayer(4, growth_rate=3, bn_size=2, drop_rate=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.layer([x])], dim=1)


def test_torchvision_dense_layer_gradient():
    torch.manual_seed(0)
    model = randomise_batch_norm(OneDenseLayer()).double()
    x = torch.rand(2, 4, 5, 5, dtype=torch.float64)
    g = torch.randn(2, 7, 5, 5, dtype=torch.float64)
    expected = g[:, :4] + GAMMA * vjp(model.layer, x, g[:, 4:])
    with skip_gradient(model, GAMMA):
        got = vjp(model, x, g)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def _input_gradient(model, x, y):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ce_loss(model)(x, y), x)
    return grad


@pytest.mark.parametrize(
    "build, n_units, n_default",
    [
        (lambda: resnet18(weights=None, num_classes=10), 8, 4),  # the default leaves layer1.0 ... layer4.0 alone
        (lambda: DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=10), 4, 4),
    ],
    ids=["resnet18", "densenet"],
)
def test_whole_torchvision_models(build, n_units, n_default):
    torch.manual_seed(0)
    model = randomise_batch_norm(build())
    x = torch.rand(2, 3, 32, 32)
    y = torch.tensor([1, 7])
    with torch.no_grad():
        logits = model(x)
    plain_grad = _input_gradient(model, x, y)
    assert len(residual_branches(model)) == n_default
    with skip_gradient(model, 0.5, exclude="none") as branches:
        assert len(branches) == n_units
        with torch.no_grad():
            assert torch.equal(model(x), logits)  # the forward pass is unchanged, bit for bit
        sgm_grad = _input_gradient(model, x, y)
    assert no_hooks_left(model)
    assert (sgm_grad - plain_grad).abs().max() > 1e-3 * plain_grad.abs().max()
    assert torch.equal(_input_gradient(model, x, y), plain_grad)  # back to normal after the context

    # gamma = 1 is plain PGD bit for bit; gamma < 1 is not.
    kwargs = dict(eps=8 / 255, steps=3, step_size=2 / 255)
    plain = pgd(ce_loss(model), x, y, generator=torch.Generator().manual_seed(0), **kwargs)
    with skip_gradient(model, 1.0):
        assert no_hooks_left(model)
        same = pgd(ce_loss(model), x, y, generator=torch.Generator().manual_seed(0), **kwargs)
    with skip_gradient(model, 0.2):
        sgm = pgd(ce_loss(model), x, y, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(plain, same)
    assert not torch.equal(plain, sgm)
    assert all(p.grad is None for p in model.parameters())


def test_model_without_residual_units_is_refused():
    with pytest.raises(DecorrError, match="no residual units"):
        with skip_gradient(MnistCNN(), 0.5):
            pass


@pytest.mark.parametrize("gamma", [0.0, -0.5, 1.5])
def test_gamma_out_of_range_is_refused(gamma):
    with pytest.raises(DecorrError, match="gamma"):
        with skip_gradient(ResidualUnit(2, 2), gamma):
            pass


def test_hooks_removed_after_an_exception():
    model = resnet18(weights=None, num_classes=10)
    with pytest.raises(RuntimeError, match="boom"):
        with skip_gradient(model, 0.5):
            assert not no_hooks_left(model)
            raise RuntimeError("boom")
    assert no_hooks_left(model)


class GatedUnit(nn.Module):
    """A user's unit: x + body(x), or just body(x) when ``residual`` is off."""

    def __init__(self, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.body = nn.Sequential(nn.Linear(3, 3), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class GatedUnitSubclass(GatedUnit):
    pass


def test_register_residual_branch_for_a_users_unit():
    torch.manual_seed(0)
    plain = nn.Sequential(GatedUnit(residual=False))
    with pytest.raises(DecorrError):  # not registered yet
        with skip_gradient(plain, 0.5):
            pass
    register_residual_branch(GatedUnit, lambda unit: unit.body if unit.residual else None)
    with pytest.raises(DecorrError):  # registered, but this instance has no skip path
        with skip_gradient(plain, 0.5):
            pass
    model = nn.Sequential(GatedUnit(residual=True), GatedUnitSubclass(residual=True), GatedUnit(residual=False))
    assert residual_branches(model, "none") == [model[0].body, model[1].body]  # subclasses inherit the entry
    assert residual_branches(model) == [model[1].body]  # "first-unit" by default: model[0] starts the stage
    register_residual_branch(GatedUnit, lambda unit: unit.body if unit.residual else None, first_of_stage="never")
    assert residual_branches(model) == [model[0].body, model[1].body]
    with pytest.raises(DecorrError, match="first_of_stage"):
        register_residual_branch(GatedUnit, lambda unit: unit.body, first_of_stage="first")
    x = torch.rand(4, 3, dtype=torch.float64)
    unit = model[0].double()
    g = torch.randn(4, 3, dtype=torch.float64)
    expected = g + GAMMA * vjp(unit.body, x, g)
    with skip_gradient(unit, GAMMA):
        got = vjp(unit, x, g)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(DecorrError):
        register_residual_branch(object, lambda unit: unit)
