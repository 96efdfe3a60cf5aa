"""The paper's MNIST-size classifiers (Wiedeman & Wang 2022, SPEC section 2)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from decorr.models.blocks import Normalize
from decorr.models.registry import register_model

#: MNIST's pixel mean and standard deviation. Standardising inside the model matters for the
#: decorrelated pairs: on raw [0, 1] inputs this CNN's cross-entropy barely moves in its first steps,
#: and the correlation loss then wins by switching off one model's features for good (measured: one
#: model of the seed-0 dec pair stayed at chance).
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


class MnistCNN(nn.Module):
    """normalize, conv(1->8) pool conv(8->16) pool [feature layer ``pool2``: 16x7x7] conv(16->32) avgpool7 fc."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10,
                 mean: tuple[float, ...] = MNIST_MEAN, std: tuple[float, ...] = MNIST_STD) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                normalize=Normalize(mean, std),
                conv1=nn.Conv2d(in_channels, 8, 3, padding=1),
                relu1=nn.ReLU(),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(8, 16, 3, padding=1),
                relu2=nn.ReLU(),
                pool2=nn.MaxPool2d(2),
            )
        )
        self.head = nn.Sequential(
            OrderedDict(
                conv3=nn.Conv2d(16, 32, 3, padding=1),
                relu3=nn.ReLU(),
                pool3=nn.AvgPool2d(7),
                flatten=nn.Flatten(),
                fc=nn.Linear(32, num_classes),
            )
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MnistFC(nn.Module):
    """flatten, [linear, ReLU, BatchNorm1d] x (500, 500, 200, 200, 100), linear(100->10).

    The feature layer is the fourth block's output (``blocks.3``, 200 wide).
    """

    def __init__(self, in_features: int = 784, num_classes: int = 10,
                 widths: tuple[int, ...] = (500, 500, 200, 200, 100),
                 mean: tuple[float, ...] = MNIST_MEAN, std: tuple[float, ...] = MNIST_STD) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.flatten = nn.Flatten()
        blocks = []
        width_in = in_features
        for width in widths:
            blocks.append(nn.Sequential(nn.Linear(width_in, width), nn.ReLU(), nn.BatchNorm1d(width)))
            width_in = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(width_in, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.flatten(self.normalize(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


@register_model(feature_layer="features.pool2", input_shape=(1, 28, 28))
def mnist_cnn(in_channels: int = 1, num_classes: int = 10, mean: tuple[float, ...] = MNIST_MEAN,
              std: tuple[float, ...] = MNIST_STD) -> nn.Module:
    """The paper's small CNN for 28x28 inputs; feature layer 16x7x7 = 784."""
    return MnistCNN(in_channels, num_classes, tuple(mean), tuple(std))


@register_model(feature_layer="blocks.3", input_shape=(1, 28, 28))
def mnist_fc(in_features: int = 784, num_classes: int = 10, mean: tuple[float, ...] = MNIST_MEAN,
             std: tuple[float, ...] = MNIST_STD) -> nn.Module:
    """The paper's fully connected network with batch norm; feature layer 200 wide."""
    return MnistFC(in_features, num_classes, std=tuple(std), mean=tuple(mean))
