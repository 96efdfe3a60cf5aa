"""Residual surrogates and non-residual targets for transfer experiments (SGM, SPEC section 4).

Four small-input classifiers, each taking pixel-unit inputs in [0, 1] of any size >= 28 (global
average pooling before the linear layer), 3 channels (CIFAR-10) or 1 (MNIST, Fashion-MNIST):

- ``resnet20``: the CIFAR ResNet-20 of He et al. (2016), built from torchvision ``BasicBlock``s.
- ``resnet18_small``: torchvision's ResNet-18 with a 3x3 stride-1 stem and no max pool.
- ``densenet_small``: torchvision's DenseNet-BC, ``growth_rate=12``, three dense blocks, 3x3 stem.
- ``vgg_small``: a VGG-11-like plain CNN with batch norm (no skip connections at all).

The residual ones are made of torchvision's own ``BasicBlock`` and ``_DenseLayer`` modules, the
units that SGM (``decorr.attacks.skip_gradient``) knows, so no extra registration is needed.

Each model applies :class:`~decorr.models.Normalize` first (``mean``/``std`` keyword arguments).
Defaults: CIFAR-10's channel statistics for 3 channels, MNIST's (as ``mnist_cnn`` uses) for 1 channel
(Fashion-MNIST's, 0.286/0.353, are close enough: every model here has batch norm right after its first
convolution, so the exact values matter little), 0.5/0.5 for any other channel count.

The registered feature layer of every model is its global average pool: the penultimate
representation, 64 to 512 values per image. The last stage's spatial output has 1024 (vgg_small)
to 8192 (resnet18_small) values for a 32x32 input, as many as the CIFAR-10 test subset has images:
a regression with that many regressors fits any target exactly (R^2 = 1 whatever the models are),
and ``decorr.loss`` refuses batches that small.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.densenet import DenseNet
from torchvision.models.resnet import BasicBlock, ResNet

from decorr.errors import DecorrError
from decorr.models.blocks import Normalize
from decorr.models.mnist import MNIST_MEAN, MNIST_STD
from decorr.models.registry import register_model

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CifarResNet",
    "SmallDenseNet",
    "SmallResNet18",
    "VGGSmall",
    "ZeroPadShortcut",
    "input_normalization",
]

#: Per-channel mean and standard deviation of the CIFAR-10 training images, pixel units.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def input_normalization(
    in_channels: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Normalize:
    """The :class:`Normalize` module for ``in_channels`` inputs (defaults: see the module docstring)."""
    if in_channels < 1:
        raise DecorrError(f"in_channels must be at least 1, got {in_channels}")
    if mean is None:
        mean = {3: CIFAR10_MEAN, 1: MNIST_MEAN}.get(in_channels, (0.5,) * in_channels)
    if std is None:
        std = {3: CIFAR10_STD, 1: MNIST_STD}.get(in_channels, (0.5,) * in_channels)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != in_channels or len(std) != in_channels:
        raise DecorrError(
            f"mean {mean} and std {std} need one value per input channel ({in_channels}); "
            "pass mean=/std= with that many values"
        )
    if min(std) <= 0:
        raise DecorrError(f"std {std} must be positive in every channel")
    return Normalize(mean, std)


def _init_conv(conv: nn.Conv2d) -> None:
    # torchvision's ResNet initialisation (He et al. 2015), used for the convolutions we replace.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


# --- ResNet-20 --------------------------------------------------------------------------------


class ZeroPadShortcut(nn.Module):
    """He et al.'s parameter-free CIFAR shortcut ("option A"): subsample by ``stride``, zero-pad channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("a zero-padding shortcut cannot reduce the channel count")
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016, section 4.2): depth 6n + 2, stages of 16/32/64 channels.

    Post-activation torchvision ``BasicBlock``s (``relu(bn2(conv2(...)) + shortcut(x))``), so the
    residual branch ends at each block's ``bn2`` and the shortcut is its ``downsample`` (None for the
    identity). ``shortcut="zero_pad"`` is the paper's option A for CIFAR (ResNet-20: 0.27M parameters);
    ``"projection"`` is option B, a 1x1 convolution and batch norm, as torchvision's ResNets use.
    Module names follow torchvision: ``conv1``, ``bn1``, ``layer1``..``layer3``, ``avgpool``, ``fc``.
    """

    def __init__(
        self,
        blocks_per_stage: int = 3,
        in_channels: int = 3,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64),
        shortcut: str = "zero_pad",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if shortcut not in ("zero_pad", "projection"):
            raise DecorrError(f"unknown shortcut {shortcut!r}; use 'zero_pad' or 'projection'")
        self.num_stages = len(widths)
        self.normalize = input_normalization(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        channels = widths[0]
        for stage, width in enumerate(widths):
            stride = 1 if stage == 0 else 2
            blocks = []
            for index in range(blocks_per_stage):
                block_stride = stride if index == 0 else 1
                downsample: nn.Module | None = None
                if block_stride != 1 or channels != width:
                    if shortcut == "zero_pad":
                        downsample = ZeroPadShortcut(channels, width, block_stride)
                    else:
                        downsample = nn.Sequential(
                            nn.Conv2d(channels, width, 1, stride=block_stride, bias=False),
                            nn.BatchNorm2d(width),
                        )
                blocks.append(BasicBlock(channels, width, block_stride, downsample))
                channels = width
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                _init_conv(module)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
        for stage in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --- ResNet-18 --------------------------------------------------------------------------------


class SmallResNet18(ResNet):
    """torchvision's ResNet-18 for small images: 3x3 stride-1 ``conv1`` and no max pool.

    Everything else (``BasicBlock``s, module names, initialisation) is torchvision's.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        self.normalize = input_normalization(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        _init_conv(self.conv1)
        self.maxpool = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.normalize(x))


# --- DenseNet ---------------------------------------------------------------------------------


class SmallDenseNet(DenseNet):
    """torchvision's DenseNet-BC for small images: 3x3 stride-1 ``features.conv0``, no ``pool0``.

    The dense layers are torchvision ``_DenseLayer``s with their in-place ReLUs. Unlike torchvision's
    ``forward``, the final ReLU is not in place, so a hook on ``features`` or ``features.norm5`` sees
    that module's own output; the global pool is a module (``avgpool``) so that it can be hooked.
    The default, three blocks of 4 layers with growth rate 12 (depth 28), is a slimmer DenseNet-BC than
    Huang et al.'s (2017) smallest CIFAR one, BC-40 (``block_config=(6, 6, 6)``), which costs twice as
    much to train on a CPU.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        growth_rate: int = 12,
        block_config: Sequence[int] = (4, 4, 4),
        num_init_features: int = 24,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(
            growth_rate=growth_rate,
            block_config=tuple(block_config),
            num_init_features=num_init_features,
            bn_size=bn_size,
            drop_rate=drop_rate,
            num_classes=num_classes,
        )
        self.normalize = input_normalization(in_channels, mean, std)
        # Assigning to an existing name keeps its place in the Sequential.
        self.features.conv0 = nn.Conv2d(in_channels, num_init_features, 3, padding=1, bias=False)
        nn.init.kaiming_normal_(self.features.conv0.weight)  # torchvision's DenseNet initialisation
        del self.features.pool0
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(self.normalize(x))
        return self.classifier(torch.flatten(self.avgpool(self.relu(features)), 1))


# --- VGG --------------------------------------------------------------------------------------

#: Channel multiples of the base width, "M" a 2x2 max pool: VGG-11 without its last stage.
VGG_SMALL_CONFIG: tuple[int | str, ...] = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M")


class VGGSmall(nn.Sequential):
    """A VGG-11-like plain CNN with batch norm: [conv3x3, BN, ReLU] blocks and max pools, global
    average pool, one linear layer.

    With ``width=64`` the convolutions have 64, 128, 256, 256, 512, 512 channels (VGG-11 less its last
    stage, 4.5M parameters); the default ``width=32`` halves them (1.1M parameters, a quarter of the
    compute) so that it trains on a CPU in minutes. The model is an ``nn.Sequential`` of ``nn.Sequential``s, so it has no skip connections by
    construction. Module names: ``normalize``, ``features.conv<i>`` / ``bn<i>`` / ``relu<i>`` /
    ``pool<j>``, ``avgpool``, ``flatten``, ``fc``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 32,
        config: Sequence[int | str] = VGG_SMALL_CONFIG,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels, conv_index, pool_index = in_channels, 0, 0
        for item in config:
            if item == "M":
                pool_index += 1
                layers[f"pool{pool_index}"] = nn.MaxPool2d(2)
                continue
            conv_index += 1
            out_channels = int(item) * width
            layers[f"conv{conv_index}"] = nn.Conv2d(channels, out_channels, 3, padding=1, bias=False)
            layers[f"bn{conv_index}"] = nn.BatchNorm2d(out_channels)
            layers[f"relu{conv_index}"] = nn.ReLU()
            channels = out_channels
        super().__init__(
            OrderedDict(
                normalize=input_normalization(in_channels, mean, std),
                features=nn.Sequential(layers),
                avgpool=nn.AdaptiveAvgPool2d(1),
                flatten=nn.Flatten(),
                fc=nn.Linear(channels, num_classes),
            )
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                _init_conv(module)


# --- Registry ---------------------------------------------------------------------------------


@register_model(feature_layer="avgpool", input_shape=(3, 32, 32))
def resnet20(
    in_channels: int = 3,
    num_classes: int = 10,
    shortcut: str = "zero_pad",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """CIFAR ResNet-20 (He et al. 2016), post-activation torchvision BasicBlocks; 0.27M parameters."""
    return CifarResNet(blocks_per_stage=3, in_channels=in_channels, num_classes=num_classes,
                       shortcut=shortcut, mean=mean, std=std)


@register_model(feature_layer="avgpool", input_shape=(3, 32, 32))
def resnet56(
    in_channels: int = 3,
    num_classes: int = 10,
    shortcut: str = "zero_pad",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """CIFAR ResNet-56 (He et al. 2016): ResNet-20's design with 9 units per stage (27 in all); 0.85M parameters."""
    return CifarResNet(blocks_per_stage=9, in_channels=in_channels, num_classes=num_classes,
                       shortcut=shortcut, mean=mean, std=std)


@register_model(feature_layer="avgpool", input_shape=(3, 32, 32))
def resnet18_small(
    in_channels: int = 3,
    num_classes: int = 10,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """torchvision ResNet-18 with a 3x3 stride-1 stem and no max pool, for 32x32 inputs; 11.2M parameters."""
    return SmallResNet18(in_channels, num_classes, mean=mean, std=std)


@register_model(feature_layer="avgpool", input_shape=(3, 32, 32))
def densenet_small(
    in_channels: int = 3,
    num_classes: int = 10,
    growth_rate: int = 12,
    block_config: Sequence[int] = (4, 4, 4),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """torchvision DenseNet-BC (k = 12, three blocks of 4 layers) with a 3x3 stem, for 32x32 inputs."""
    return SmallDenseNet(in_channels, num_classes, growth_rate, block_config, mean=mean, std=std)


@register_model(feature_layer="avgpool", input_shape=(3, 32, 32))
def vgg_small(
    in_channels: int = 3,
    num_classes: int = 10,
    width: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """VGG-11-like plain CNN with batch norm (no skip connections), global average pool; 1.1M parameters."""
    return VGGSmall(in_channels, num_classes, width, mean=mean, std=std)
