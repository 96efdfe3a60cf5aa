"""The model registry and the models in it.

Generic checks run on every registered model (``list_models()``, so models added later are checked
too); specific checks compare architectures with the SPEC and with parameter counts worked out by
hand or taken from torchvision's own models.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.densenet import DenseNet, _DenseLayer
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from decorr.attacks import residual_branches, skip_gradient
from decorr.errors import DecorrError
from decorr.models import (
    Normalize,
    ResidualUnit,
    create_model,
    default_feature_layer,
    list_models,
    model_spec,
)
from decorr.models.cifar import CIFAR10_MEAN, CIFAR10_STD

ALL_MODELS = list_models()
SMALL_IMAGE_MODELS = ("resnet20", "resnet18_small", "densenet_small", "vgg_small")
#: Units that SGM decays the residual-branch gradient of.
RESIDUAL_UNITS = (ResidualUnit, BasicBlock, Bottleneck, _DenseLayer)
CIFAR_SUBSET = Path("/work/shared/data/cifar10-subset/cifar10_subset.npz")


def _accepts_num_classes(name: str) -> bool:
    return "num_classes" in inspect.signature(model_spec(name).builder).parameters


def _tensors(output: object) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    assert isinstance(output, (tuple, list)) and output, f"unexpected model output {type(output)}"
    assert all(isinstance(t, torch.Tensor) for t in output)
    return list(output)


def _count(model: nn.Module, kind: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _record(model: nn.Module, layer: str, x: torch.Tensor) -> tuple[object, list[torch.Tensor], list[torch.Tensor]]:
    """Run ``model(x)``; return its output, the outputs of ``layer`` and copies taken in the hook."""
    seen: list[torch.Tensor] = []
    copies: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        seen.append(output)
        copies.append(output.detach().clone())

    handle = dict(model.named_modules())[layer].register_forward_hook(hook)
    try:
        output = model(x)
    finally:
        handle.remove()
    return output, seen, copies


def conv_params(c_in: int, c_out: int, k: int, bias: bool = False) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def bn_params(c: int) -> int:
    return 2 * c


def linear_params(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


# --- every registered model ---------------------------------------------------------------------


def test_registry_holds_the_toolkits_models():
    assert {"mnist_cnn", "mnist_fc", *SMALL_IMAGE_MODELS} <= set(ALL_MODELS)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_shape(name):
    spec = model_spec(name)
    assert spec.input_shape is not None, f"{name} is registered without input_shape"
    torch.manual_seed(0)
    x = torch.rand(3, *spec.input_shape)
    if _accepts_num_classes(name):
        model = create_model(name, num_classes=7).eval()
        with torch.no_grad():
            output = model(x)
        assert isinstance(output, torch.Tensor) and output.shape == (3, 7)
    else:  # autoencoders: one or more reconstructions, one per input image
        model = create_model(name).eval()
        with torch.no_grad():
            outputs = _tensors(model(x))
        assert all(t.shape[0] == 3 for t in outputs)
        output = torch.cat([t.flatten(1) for t in outputs], 1)
    assert torch.isfinite(output).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_feature_layer_resolves_and_is_not_overwritten(name):
    spec = model_spec(name)
    assert spec.feature_layer is not None, f"{name} is registered without a feature layer"
    assert default_feature_layer(name) == spec.feature_layer
    torch.manual_seed(0)
    model = create_model(name).eval()
    assert spec.feature_layer in dict(model.named_modules())
    with torch.no_grad():
        _, seen, copies = _record(model, spec.feature_layer, torch.rand(3, *spec.input_shape))
    assert seen, f"{name}: {spec.feature_layer} is not used in forward"
    for output, copy in zip(seen, copies):
        assert output.shape[0] == 3 and output[0].numel() > 1
        # A later in-place op (e.g. ReLU(inplace=True)) would change the recorded features.
        assert torch.equal(output, copy), f"{name}: {spec.feature_layer} output is modified in place later"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_deterministic_with_fixed_seed(name):
    spec = model_spec(name)
    x = torch.rand(3, *spec.input_shape, generator=torch.Generator().manual_seed(1))
    states, outputs = [], []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        model = create_model(name).eval()
        states.append(model.state_dict())
        with torch.no_grad():
            outputs.append(torch.cat([t.flatten(1) for t in _tensors(model(x))], 1))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert torch.equal(outputs[0], outputs[1])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0]), "weights ignore the seed"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_input_gradient_in_training_mode(name):
    # Attacks differentiate with respect to the input; in-place ops must not break that.
    spec = model_spec(name)
    torch.manual_seed(0)
    model = create_model(name).train()
    x = torch.rand(4, *spec.input_shape, requires_grad=True)
    sum(t.square().sum() for t in _tensors(model(x))).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# --- the paper's MNIST classifiers (SPEC section 2) ----------------------------------------------


def test_mnist_cnn_architecture():
    model = create_model("mnist_cnn").eval()
    convs = [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [(1, 8, (3, 3), (1, 1), (1, 1)), (8, 16, (3, 3), (1, 1), (1, 1)),
                     (16, 32, (3, 3), (1, 1), (1, 1))]
    linears = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [(32, 10)]
    expected = (conv_params(1, 8, 3, bias=True) + conv_params(8, 16, 3, bias=True)
                + conv_params(16, 32, 3, bias=True) + linear_params(32, 10))
    assert expected == 80 + 1168 + 4640 + 330
    assert _n_params(model) == expected
    with torch.no_grad():
        output, seen, _ = _record(model, default_feature_layer("mnist_cnn"), torch.rand(5, 1, 28, 28))
    assert seen[0].shape == (5, 16, 7, 7) and seen[0][0].numel() == 784
    assert output.shape == (5, 10)


def test_mnist_fc_architecture():
    model = create_model("mnist_fc").eval()
    linears = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [(784, 500), (500, 500), (500, 200), (200, 200), (200, 100), (100, 10)]
    for block in model.blocks:  # [linear, ReLU, BatchNorm1d]
        assert [type(m) for m in block] == [nn.Linear, nn.ReLU, nn.BatchNorm1d]
    widths = (500, 500, 200, 200, 100)
    expected = sum(linear_params(a, b) + bn_params(b) for a, b in zip((784,) + widths[:-1], widths))
    expected += linear_params(100, 10)
    assert expected == 393500 + 251500 + 100600 + 40600 + 20300 + 1010
    assert _n_params(model) == expected
    with torch.no_grad():
        output, seen, _ = _record(model, default_feature_layer("mnist_fc"), torch.rand(5, 1, 28, 28))
    assert seen[0].shape == (5, 200)
    assert output.shape == (5, 10)


# --- surrogates and targets for transfer experiments ---------------------------------------------


def _cifar_resnet_params(projection: bool, blocks_per_stage: int = 3) -> int:
    total = conv_params(3, 16, 3) + bn_params(16)
    c_in = 16
    for width in (16, 32, 64):
        for block in range(blocks_per_stage):
            total += conv_params(c_in, width, 3) + conv_params(width, width, 3) + 2 * bn_params(width)
            if projection and c_in != width:
                total += conv_params(c_in, width, 1) + bn_params(width)
            c_in = width
    return total + linear_params(64, 10)


def test_resnet20_matches_he_et_al():
    model = create_model("resnet20")
    stages = [model.layer1, model.layer2, model.layer3]
    assert [len(stage) for stage in stages] == [3, 3, 3]
    assert all(isinstance(block, BasicBlock) for stage in stages for block in stage)
    assert [stage[-1].conv2.out_channels for stage in stages] == [16, 32, 64]
    # 19 3x3 convolutions and the linear layer are the 20 weighted layers; option A adds none.
    assert _count(model, nn.Conv2d) == 19 and _count(model, nn.Linear) == 1
    assert _n_params(model) == _cifar_resnet_params(projection=False)
    assert 0.265e6 < _n_params(model) < 0.275e6  # the paper's 0.27M
    projection = create_model("resnet20", shortcut="projection")
    assert _n_params(projection) == _cifar_resnet_params(projection=True)


def test_resnet56_has_27_units_per_he_et_al():
    model = create_model("resnet56")
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [9, 9, 9]
    assert _count(model, nn.Conv2d) == 55 and _count(model, nn.Linear) == 1
    assert _n_params(model) == _cifar_resnet_params(projection=False, blocks_per_stage=9)
    assert 0.845e6 < _n_params(model) < 0.86e6  # the paper's 0.85M
    assert len(residual_branches(model, "none")) == 27
    assert len(residual_branches(model)) == 24  # SGM's default leaves layer1.0, layer2.0, layer3.0 alone


def test_zero_pad_shortcut_subsamples_and_pads():
    model = create_model("resnet20")
    shortcut = model.layer2[0].downsample
    x = torch.rand(2, 16, 8, 8)
    y = shortcut(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2]) and not y[:, 16:].any()


def test_resnet18_small_is_torchvisions_with_a_small_stem():
    model = create_model("resnet18_small")
    assert isinstance(model, ResNet)
    assert _count(model, BasicBlock) == 8
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)
    reference = torchvision.models.resnet18(weights=None, num_classes=10)
    assert _n_params(model) == _n_params(reference) - conv_params(3, 64, 7) + conv_params(3, 64, 3)
    with torch.no_grad():
        _, seen, _ = _record(model.eval(), "layer4", torch.rand(2, 3, 32, 32))
    assert seen[0].shape == (2, 512, 4, 4)  # stride 8 overall (torchvision's stem and pool: 32)


def test_densenet_small_is_torchvisions_with_a_small_stem():
    model = create_model("densenet_small")
    assert isinstance(model, DenseNet)
    assert _count(model, _DenseLayer) == 12
    conv0 = model.features.conv0
    assert (conv0.in_channels, conv0.kernel_size, conv0.stride) == (3, (3, 3), (1, 1))
    assert "pool0" not in dict(model.features.named_children())
    # torchvision's in-place ReLUs are kept inside the dense layers.
    assert model.features.denseblock1.denselayer1.relu1.inplace
    with torch.no_grad():
        _, seen, _ = _record(model.eval(), "features.denseblock3", torch.rand(2, 3, 32, 32))
    # 24 initial maps, +4 x 12 per block, halved by each transition; stride 4 overall.
    assert seen[0].shape == (2, ((24 + 48) // 2 + 48) // 2 + 48, 8, 8)
    # torchvision's forward applies an in-place ReLU to norm5's output; ours must not.
    with torch.no_grad():
        _, seen, copies = _record(model, "features.norm5", torch.randn(2, 3, 32, 32))
    assert (seen[0] < 0).any() and torch.equal(seen[0], copies[0])


def test_vgg_small_has_no_skip_connections():
    model = create_model("vgg_small")
    assert _count(model, RESIDUAL_UNITS) == 0
    # Every container is a Sequential: the forward pass is a chain, so nothing can skip a layer.
    assert all(isinstance(m, nn.Sequential) for m in model.modules() if list(m.children()))
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [32, 64, 128, 128, 256, 256]
    assert _count(model, nn.BatchNorm2d) == 6 and _count(model, nn.MaxPool2d) == 4
    wide = create_model("vgg_small", width=64)
    assert [m.out_channels for m in wide.modules() if isinstance(m, nn.Conv2d)] == [64, 128, 256, 256, 512, 512]
    widths = (3, 64, 128, 256, 256, 512, 512)
    expected = sum(conv_params(a, b, 3) + bn_params(b) for a, b in zip(widths[:-1], widths[1:]))
    assert _n_params(wide) == expected + linear_params(512, 10)


@pytest.mark.parametrize(("name", "units", "decayed"),
                         [("resnet20", 9, 6), ("resnet18_small", 8, 4), ("densenet_small", 12, 12)])
def test_surrogates_are_made_of_residual_units(name, units, decayed):
    model = create_model(name).train()
    assert _count(model, RESIDUAL_UNITS) == units
    assert len(residual_branches(model, "none")) == units  # SGM finds every unit without registration
    assert len(residual_branches(model)) == decayed  # the default leaves the first block of each stage alone
    x = torch.rand(2, 3, 32, 32)
    grads = []
    for gamma in (1.0, 0.5):
        torch.manual_seed(0)
        x_adv = x.clone().requires_grad_(True)
        with skip_gradient(model, gamma):
            model(x_adv).logsumexp(1).sum().backward()
        grads.append(x_adv.grad)
    assert torch.isfinite(grads[1]).all() and not torch.allclose(grads[0], grads[1])


def test_sgm_finds_no_residual_unit_in_vgg_small():
    model = create_model("vgg_small")
    assert residual_branches(model) == []
    with pytest.raises(DecorrError):
        with skip_gradient(model, 0.5):
            pass


@pytest.mark.parametrize(("name", "width"), [("resnet20", 64), ("resnet18_small", 512),
                                             ("densenet_small", 90), ("vgg_small", 256)])
def test_feature_layer_is_the_pooled_representation(name, width):
    model = create_model(name).eval()
    with torch.no_grad():
        _, seen, _ = _record(model, default_feature_layer(name), torch.rand(2, 3, 32, 32))
    assert seen[0].flatten(1).shape == (2, width)


@pytest.mark.parametrize("name", SMALL_IMAGE_MODELS)
@pytest.mark.parametrize(("channels", "size"), [(3, 32), (3, 28), (3, 40), (1, 28)])
def test_small_image_models_take_any_size_and_grey_images(name, channels, size):
    torch.manual_seed(0)
    model = create_model(name, in_channels=channels, num_classes=10).train()
    x = torch.rand(2, channels, size, size, requires_grad=True)
    output = model(x)
    assert output.shape == (2, 10)
    output.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", SMALL_IMAGE_MODELS)
def test_inputs_are_normalised_before_the_first_convolution(name):
    model = create_model(name).eval()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    seen = []
    first_conv.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], (x - mean) / std)

    grey = create_model(name, in_channels=1)
    normalize = next(m for m in grey.modules() if isinstance(m, Normalize))
    torch.testing.assert_close(normalize.mean.flatten(), torch.tensor([0.1307]))
    torch.testing.assert_close(normalize.std.flatten(), torch.tensor([0.3081]))
    custom = create_model(name, in_channels=1, mean=(0.5,), std=(0.25,))
    normalize = next(m for m in custom.modules() if isinstance(m, Normalize))
    assert normalize.mean.flatten().tolist() == [0.5] and normalize.std.flatten().tolist() == [0.25]


def test_cifar10_statistics_match_the_data():
    if not CIFAR_SUBSET.exists():
        pytest.fail(f"CIFAR-10 subset missing: {CIFAR_SUBSET} (see /work/shared/data/README.md)")
    images = np.load(CIFAR_SUBSET)["x_train"].astype(np.float64) / 255.0
    np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), CIFAR10_MEAN, atol=5e-3)
    np.testing.assert_allclose(images.std(axis=(0, 1, 2)), CIFAR10_STD, atol=5e-3)


@pytest.mark.parametrize("kwargs", [{"in_channels": 1, "mean": (0.5, 0.5, 0.5)},
                                    {"std": (0.2, 0.0, 0.2)},
                                    {"shortcut": "option_c"},
                                    {"depth": 32}])
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(DecorrError):
        create_model("resnet20", **kwargs)
