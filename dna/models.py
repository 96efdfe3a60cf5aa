"""The dual-neck autoencoder (DNA), the plain autoencoder and their classifiers (SPEC section 6).

Every autoencoder here is one :class:`DualNeckAutoencoder`: six stages, of which the middle
``unshared`` are built once per path (the "bottlenecks") and the rest are shared::

    stage:      0        1     |   2 [latent]    3    |    4        5
    default:  encoder (shared) | bottleneck (per path) | decoder (shared)

``unshared=2`` is the SPEC's DNA (shared encoder, two bottleneck modules, shared decoder);
``unshared=4`` also gives each path its own stages 1 and 4, ``unshared=6`` is two separate
autoencoders (the Fig. 10 ablation). ``paths=1`` is the plain autoencoder.

Module names are stable in every variant: the shared stages live in ``encoder`` / ``decoder``, the
per-path stages in ``bottlenecks.<n>``, and each stage keeps its own name there, so the latent of
path n (the most compressed state of its bottleneck) is always ``bottlenecks.<n>.latent``
(see :func:`latent_layers`). The latents are read with forward hooks, never stored on the model.

Pixel range is [0, 1] in and out. The CIFAR-10 autoencoder works on [-1, 1] inside (as the paper's
code did): its first module maps x to 2x - 1 and its last maps the tanh output t to (t + 1) / 2,
so the reconstruction is again an image in [0, 1] that the classifier takes as it is.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn as nn

from decorr.errors import DecorrError
from decorr.features import record_features
from decorr.models.blocks import Normalize, ResidualUnit
from decorr.models.registry import register_model

NUM_STAGES = 6
#: Stage names, in order; ``latent`` is the stage whose output is the bottleneck's latent.
STAGE_NAMES = ("encode1", "encode2", "latent", "expand", "decode1", "decode2")
LATENT_STAGE = STAGE_NAMES.index("latent")

#: CIFAR-10 channel statistics used by the CIFAR classifier's input normalisation.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

StageBuilder = Callable[[], nn.Module]


class UnitRange(nn.Module):
    """Map a tanh output in [-1, 1] to pixel range [0, 1]: (t + 1) / 2."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return (t + 1.0) / 2.0


class DualNeckAutoencoder(nn.Module):
    """Shared encoder, ``paths`` bottlenecks, shared decoder; returns one reconstruction per path.

    ``forward(x)`` returns a tuple ``(r_1, ..., r_P)`` (a 1-tuple for the plain autoencoder), each
    the shape of ``x`` and in [0, 1].

    Args:
        stages: six zero-argument builders, one per stage (see the module docstring); a stage that is
            per-path is built once for every path, a shared stage once.
        unshared: how many middle stages each path owns: 2 (the DNA), 4, or 6 (separate autoencoders).
        paths: number of bottlenecks (2 for the DNA, 1 for the plain autoencoder).
        input_map / output_map: parameter-free modules applied before the first and after the last
            stage (flatten/unflatten for MNIST, [0,1] <-> [-1,1] for CIFAR-10).
    """

    def __init__(
        self,
        stages: Sequence[StageBuilder],
        *,
        unshared: int = 2,
        paths: int = 2,
        input_map: nn.Module | None = None,
        output_map: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if len(stages) != NUM_STAGES:
            raise ValueError(f"expected {NUM_STAGES} stage builders, got {len(stages)}")
        if unshared not in (2, 4, 6):
            raise DecorrError(
                f"unshared={unshared} is not supported; use 2 (the DNA), 4, or 6 (separate autoencoders)"
            )
        if paths < 1:
            raise DecorrError(f"paths={paths} must be at least 1 (1 = plain autoencoder, 2 = DNA)")
        first = (NUM_STAGES - unshared) // 2
        last = first + unshared  # stages [first, last) are per path
        self.unshared = unshared
        self.input_map = input_map if input_map is not None else nn.Identity()
        self.encoder = nn.Sequential(OrderedDict((STAGE_NAMES[i], stages[i]()) for i in range(first)))
        self.bottlenecks = nn.ModuleList(
            nn.Sequential(OrderedDict((STAGE_NAMES[i], stages[i]()) for i in range(first, last)))
            for _ in range(paths)
        )
        self.decoder = nn.Sequential(
            OrderedDict((STAGE_NAMES[i], stages[i]()) for i in range(last, NUM_STAGES))
        )
        self.output_map = output_map if output_map is not None else nn.Identity()

    @property
    def paths(self) -> int:
        return len(self.bottlenecks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = self.encoder(self.input_map(x))
        # Each path runs the shared decoder on its own (not on a concatenated batch), so that batch
        # norm statistics in training mode are those of one path, as in "encoder -> neck n -> decoder".
        return tuple(self.output_map(self.decoder(neck(hidden))) for neck in self.bottlenecks)


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel (and accelerate's wrappers) keep the model in `.module`.
    while not isinstance(model, DualNeckAutoencoder) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def latent_layers(model: nn.Module) -> list[str]:
    """Module names of the bottleneck latents, one per path: ``["bottlenecks.0.latent", ...]``.

    The names are relative to the autoencoder itself (a wrapping DDP module is looked through).
    """
    inner = _unwrap(model)
    if not isinstance(inner, DualNeckAutoencoder):
        raise DecorrError(
            f"{type(model).__name__} is not a dual-neck autoencoder; build one with "
            "create_model('dna_mnist' | 'dna_cifar' | 'ae_mnist' | 'ae_cifar')"
        )
    return [f"bottlenecks.{n}.latent" for n in range(inner.paths)]


def forward_with_latents(
    model: nn.Module, x: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
    """Run the autoencoder once; return its reconstructions and each path's latent (with gradient).

    The latents are caught with forward hooks on :func:`latent_layers`; ``model`` may be wrapped
    (DDP), in which case the wrapper's forward is the one called.
    """
    names = latent_layers(model)
    with record_features(model, names) as recorded:
        recons = model(x)
    return recons, [recorded[name] for name in names]


# --- MNIST ------------------------------------------------------------------------------------

def _linear_stage(in_features: int, out_features: int, activation: type[nn.Module]) -> StageBuilder:
    return lambda: nn.Sequential(OrderedDict(fc=nn.Linear(in_features, out_features), act=activation()))


def mnist_stages() -> list[StageBuilder]:
    """The six stages of the MNIST autoencoder path (fully connected; SPEC section 6)."""
    return [
        _linear_stage(784, 100, nn.ReLU),
        _linear_stage(100, 128, nn.ReLU),
        _linear_stage(128, 64, nn.ReLU),  # latent: 64 wide, after the ReLU
        _linear_stage(64, 128, nn.ReLU),
        _linear_stage(128, 100, nn.ReLU),
        _linear_stage(100, 784, nn.Sigmoid),
    ]


def _mnist_autoencoder(unshared: int, paths: int) -> DualNeckAutoencoder:
    return DualNeckAutoencoder(
        mnist_stages(),
        unshared=unshared,
        paths=paths,
        input_map=nn.Flatten(),
        output_map=nn.Unflatten(1, (1, 28, 28)),
    )


@register_model(feature_layer="bottlenecks.0.latent", input_shape=(1, 28, 28))
def dna_mnist(unshared: int = 2, paths: int = 2) -> nn.Module:
    """Dual-neck autoencoder for 1x28x28 MNIST (fully connected, latent 64 per bottleneck)."""
    return _mnist_autoencoder(unshared, paths)


@register_model(feature_layer="bottlenecks.0.latent", input_shape=(1, 28, 28))
def ae_mnist() -> nn.Module:
    """Plain autoencoder for MNIST: the DNA with a single bottleneck."""
    return _mnist_autoencoder(unshared=2, paths=1)


class DnaClassifierMnist(nn.Module):
    """Three [conv3x3 pad 1, ReLU, maxpool2] with 8, 16, 32 channels, then linear(288->10)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels_in = 1
        for i, channels in enumerate((8, 16, 32), start=1):
            layers[f"conv{i}"] = nn.Conv2d(channels_in, channels, 3, padding=1)
            layers[f"relu{i}"] = nn.ReLU()
            layers[f"pool{i}"] = nn.MaxPool2d(2)  # 28 -> 14 -> 7 -> 3
            channels_in = channels
        self.features = nn.Sequential(layers)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(32 * 3 * 3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.features(x)))


@register_model(feature_layer="features.pool3", input_shape=(1, 28, 28))
def dna_classifier_mnist(num_classes: int = 10) -> nn.Module:
    """Classifier of the MNIST autoencoders' reconstructions; feature layer 32x3x3 = 288."""
    return DnaClassifierMnist(num_classes)


# --- CIFAR-10 ---------------------------------------------------------------------------------

def cifar_stages() -> list[StageBuilder]:
    """The six stages of the CIFAR-10 autoencoder path (SPEC section 6), on [-1, 1] images.

    encoder R(3->16) pool | R(16->32) pool || R(32->32) R(32->7) [latent 7x8x8] | R(7->32) R(32->32)
    || convT(32->32) R(32->16) | convT(16->16) R(16->3) tanh. Each encoder stage halves the
    resolution and each decoder stage doubles it, mirroring the MNIST grouping (two stages each).
    """
    return [
        lambda: nn.Sequential(OrderedDict(res=ResidualUnit(3, 16), pool=nn.MaxPool2d(2))),
        lambda: nn.Sequential(OrderedDict(res=ResidualUnit(16, 32), pool=nn.MaxPool2d(2))),
        lambda: nn.Sequential(OrderedDict(res1=ResidualUnit(32, 32), res2=ResidualUnit(32, 7))),
        lambda: nn.Sequential(OrderedDict(res1=ResidualUnit(7, 32), res2=ResidualUnit(32, 32))),
        lambda: nn.Sequential(
            OrderedDict(up=nn.ConvTranspose2d(32, 32, 2, stride=2), res=ResidualUnit(32, 16))
        ),
        lambda: nn.Sequential(
            OrderedDict(up=nn.ConvTranspose2d(16, 16, 2, stride=2), res=ResidualUnit(16, 3), act=nn.Tanh())
        ),
    ]


def _cifar_autoencoder(unshared: int, paths: int) -> DualNeckAutoencoder:
    return DualNeckAutoencoder(
        cifar_stages(),
        unshared=unshared,
        paths=paths,
        input_map=Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # [0, 1] -> [-1, 1]
        output_map=UnitRange(),  # tanh [-1, 1] -> [0, 1]
    )


@register_model(feature_layer="bottlenecks.0.latent", input_shape=(3, 32, 32))
def dna_cifar(unshared: int = 2, paths: int = 2) -> nn.Module:
    """Dual-neck autoencoder for 3x32x32 CIFAR-10 (residual units, latent 7x8x8 per bottleneck)."""
    return _cifar_autoencoder(unshared, paths)


@register_model(feature_layer="bottlenecks.0.latent", input_shape=(3, 32, 32))
def ae_cifar() -> nn.Module:
    """Plain autoencoder for CIFAR-10: the DNA with a single bottleneck."""
    return _cifar_autoencoder(unshared=2, paths=1)


class DnaClassifierCifar(nn.Module):
    """conv3x3(3->64) ReLU pool, R(64->128) pool, R(128->256) pool, R(256->512), maxpool4, linear(512->10).

    Inputs are [0, 1] images; they are normalised with the CIFAR-10 mean/std inside.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                normalize=Normalize(CIFAR10_MEAN, CIFAR10_STD),
                conv1=nn.Conv2d(3, 64, 3, padding=1),
                relu1=nn.ReLU(),
                pool1=nn.MaxPool2d(2),  # 32 -> 16
                res2=ResidualUnit(64, 128),
                pool2=nn.MaxPool2d(2),  # 16 -> 8
                res3=ResidualUnit(128, 256),
                pool3=nn.MaxPool2d(2),  # 8 -> 4
                res4=ResidualUnit(256, 512),
                pool4=nn.MaxPool2d(4),  # 4 -> 1
            )
        )
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.features(x)))


@register_model(feature_layer="features.pool4", input_shape=(3, 32, 32))
def dna_classifier_cifar(num_classes: int = 10) -> nn.Module:
    """Classifier of the CIFAR-10 autoencoders' reconstructions (residual); feature layer 512."""
    return DnaClassifierCifar(num_classes)


__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DnaClassifierCifar",
    "DnaClassifierMnist",
    "DualNeckAutoencoder",
    "STAGE_NAMES",
    "UnitRange",
    "ae_cifar",
    "ae_mnist",
    "cifar_stages",
    "dna_cifar",
    "dna_classifier_cifar",
    "dna_classifier_mnist",
    "dna_mnist",
    "forward_with_latents",
    "latent_layers",
    "mnist_stages",
]
