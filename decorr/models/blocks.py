"""Building blocks shared by the toolkit's models."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class Normalize(nn.Module):
    """(x - mean) / std inside the model, so that attacks work in pixel units [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class ResidualUnit(nn.Module):
    """Pre-activation residual unit ``skip(x) + branch(x)`` (He et al. 2016, identity mappings).

    ``branch`` is [BN, ReLU, conv3x3] twice; ``skip`` is the identity when the shape is kept and a
    1x1 convolution otherwise. The two named submodules are what SGM (``skip_gradient``) hooks into.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            conv3x3(in_channels, out_channels, stride),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            conv3x3(out_channels, out_channels),
        )
        if in_channels == out_channels and stride == 1:
            self.skip: nn.Module = nn.Identity()
        else:
            self.skip = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.branch(x)
