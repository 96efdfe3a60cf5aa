"""The paper's MNIST-size classifiers (Wiedeman & Wang 2022, SPEC section 2)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from decorr.models.registry import register_model


class MnistCNN(nn.Module):
    """conv(1->8) pool conv(8->16) pool [feature layer ``pool2``: 16x7x7] conv(16->32) avgpool7 fc."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
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
                 widths: tuple[int, ...] = (500, 500, 200, 200, 100)) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        blocks = []
        width_in = in_features
        for width in widths:
            blocks.append(nn.Sequential(nn.Linear(width_in, width), nn.ReLU(), nn.BatchNorm1d(width)))
            width_in = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(width_in, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.flatten(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


@register_model(feature_layer="features.pool2", input_shape=(1, 28, 28))
def mnist_cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """The paper's small CNN for 28x28 inputs; feature layer 16x7x7 = 784."""
    return MnistCNN(in_channels, num_classes)


@register_model(feature_layer="blocks.3", input_shape=(1, 28, 28))
def mnist_fc(in_features: int = 784, num_classes: int = 10) -> nn.Module:
    """The paper's fully connected network with batch norm; feature layer 200 wide."""
    return MnistFC(in_features, num_classes)
