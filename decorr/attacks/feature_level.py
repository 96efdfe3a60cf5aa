"""Feature-level objectives: ILA (ila), FIA (fia), NAA (naa). Each maximises a function of one hidden
layer's output ``F_l(x_adv)`` instead of the classification loss, with per-batch quantities computed
once in :meth:`prepare` on the clean images (source in eval mode, the attack's model modifiers active).

- ``ila`` (Huang et al., ICCV 2019): a baseline attack gives ``x'``; then maximise, per sample, the
  projection ``(F(x_adv) - F(x)) . d / ||d||`` with ``d = F(x') - F(x)``.
- ``fia`` (Wang et al., ICCV 2021): the aggregate gradient ``w``: the gradient of the true-class logit
  with respect to ``F`` over ``copies`` inputs with random pixels dropped, summed, L2-normalised per
  sample; maximise ``-sum(w * F(x_adv))`` (suppress the important features, promote the others).
- ``naa`` (Zhang et al., CVPR 2022): neuron attributions ``IA = (F(x_adv) - F(x_b)) * IG`` with ``IG``
  the integrated gradient of the true-class probability with respect to ``F`` along the path from the
  black image ``x_b`` to ``x``; minimise the weighted attribution ``sum_{IA>=0} IA + gamma sum_{IA<0} IA``.

All three are untargeted. Every loss is a sum over the layer's features, averaged over the batch;
the scale is immaterial to the optimizers (sign steps, per-sample L1 or L2 normalised gradients).
An ensemble source is attacked on the mean of the objective over its members, each at its own layer
(``member=k`` gives member k's objective, for SVRE).

The layer: ``--attack-layer`` (``layer``) if given, else the architecture's entry in
:data:`DEFAULT_LAYERS` (``ila`` first looks in :data:`ILA_LAYERS`), else the source's own feature layer
(``--feature-layer``, a spec's ``feature_layer=``), else a one-line error asking for ``--attack-layer``.
A model loaded from a foreign file is wrapped in :class:`decorr.models.foreign.Preprocessed`, whose
network is its submodule ``net``: there ``layer2`` means ``net.layer2``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from decorr.attacks._common import per_sample_norm
from decorr.attacks.base import Attack, Context, Objective, Source
from decorr.attacks.registry import attack_class, register_attack
from decorr.config import opt
from decorr.errors import DecorrError
from decorr.features import layer_output, record_features
from decorr.models.foreign import Preprocessed

__all__ = ["DEFAULT_LAYERS", "FIA", "ILA", "ILA_LAYERS", "NAA", "attack_layers", "fia_aggregate_gradient",
           "ila_projection", "naa_integrated_gradient", "naa_weighted_attribution"]

_LAYER_HELP = ("the hidden layer of ila/fia/naa, a module name (default: the architecture's, from "
               "decorr.attacks.feature_level.DEFAULT_LAYERS, else the source's feature layer)")

#: A member's loss of the features of one input: ``x_in -> scalar``.
MemberLoss = Callable[[Tensor], Tensor]


# ------------------------------------------------------------------------------------------------
# Layers

#: A middle layer per architecture (torchvision's without the ``torchvision.`` prefix). ResNets: the
#: end of the second stage (FIA's and NAA's "block2/unit_8" of ResNet-152, TransferAttack FIA's
#: ``layer2``); for the CIFAR ResNets of three stages, the middle one. VGGs: the ReLU of the third
#: block's last convolution (FIA's ``conv3_3/Relu`` of VGG-16). Others: the middle stage.
DEFAULT_LAYERS: dict[str, str] = {
    "resnet20": "layer2", "resnet56": "layer2", "resnet18_small": "layer2",
    "densenet_small": "features.denseblock2", "vgg_small": "features.relu4",
    "mnist_cnn": "features.pool2", "mnist_fc": "blocks.2",
    **{name: "layer2" for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")},
    "vgg11": "features.9", "vgg13": "features.13", "vgg16": "features.15", "vgg19": "features.17",
    "vgg11_bn": "features.13", "vgg13_bn": "features.19", "vgg16_bn": "features.22", "vgg19_bn": "features.25",
}

#: ILA's own choices, where TransferAttack's differ: its module in the middle of the network's top-level
#: modules (Sequentials counted by their blocks), a block of ``layer3`` in the deeper torchvision ResNets.
#: (For VGGs that rule lands on a convolution that an in-place ReLU overwrites: the default table's used.)
ILA_LAYERS: dict[str, str] = {"resnet34": "layer3.0", "resnet50": "layer3.0", "resnet101": "layer3.8",
                              "resnet152": "layer3.13"}


def _module_name(model: nn.Module, name: str) -> str | None:
    """``name`` as a module of ``model`` (``net.``-prefixed inside a Preprocessed wrapper), or None."""
    modules = dict(model.named_modules())
    for candidate in (name, f"module.{name}"):
        if candidate in modules:
            return name
    if isinstance(model, Preprocessed) and f"net.{name}" in modules:
        return f"net.{name}"
    return None


def _default_layer(attack: str, arch: str | None) -> str | None:
    if not arch:
        return None
    key = arch.removeprefix("torchvision.")
    return (ILA_LAYERS.get(key) if attack == "ila" else None) or DEFAULT_LAYERS.get(key)


def attack_layers(attack: str, source: Source, layer: str | None) -> list[tuple[nn.Module, str]]:
    """Each model whose features ``attack`` uses (an ensemble's members, else the model) with the
    module name of its layer (module docstring); a one-line DecorrError when one has none."""
    if source.members:
        archs = list(source.member_archs) + [None] * (len(source.members) - len(source.member_archs))
        models = [(m, archs[k], f"member {k} of {source.name}", source.feature_layer)
                  for k, m in enumerate(source.members)]
    elif source.module is not None:
        models = [(source.module, source.arch, source.name, source.feature_layer)]
    else:
        raise DecorrError(f"{attack} attacks a model's hidden layer, but the source is a bare loss function")
    found = []
    for model, arch, what, feature_layer in models:
        if layer is not None:
            name = _module_name(model, layer)
            if name is None:
                sample = ", ".join(n for n, _ in list(model.named_modules())[1:9])
                raise DecorrError(f"{attack}: {what} has no layer {layer!r} (--attack-layer); some of its "
                                  f"modules: {sample}, ...")
        else:
            candidates = [c for c in (_default_layer(attack, arch), feature_layer) if c]
            names = [n for n in (_module_name(model, c) for c in candidates) if n is not None]
            if not names:
                raise DecorrError(f"{attack}: no default layer for {what} (architecture {arch or 'unknown'}); "
                                  "name one with --attack-layer, e.g. a middle block")
            name = names[0]
        found.append((model, name))
    return found


# ------------------------------------------------------------------------------------------------
# The papers' quantities, as functions (the tests check them by hand)


def ila_projection(features: Tensor, clean: Tensor, baseline: Tensor) -> Tensor:
    """Per sample, the length of the projection of ``features - clean`` onto ``baseline - clean``
    (ILA's projection loss); shape (N,). A sample whose baseline did not move its features gives 0."""
    direction = (baseline - clean).flatten(1)
    length = direction.norm(dim=1).clamp_min(torch.finfo(direction.dtype).tiny)
    return ((features - clean).flatten(1) * direction).sum(dim=1) / length


def _unit_per_sample(t: Tensor) -> Tensor:
    """``t`` over its per-sample L2 norm (a zero sample stays zero)."""
    return t / per_sample_norm(t).clamp_min(torch.finfo(t.dtype).tiny)


def _feature_gradient(model: nn.Module, layer: str, x: Tensor, output: Callable[[Tensor], Tensor]) -> Tensor:
    """The gradient of ``output(logits).sum()`` with respect to ``layer``'s output at ``x``."""
    with torch.enable_grad(), record_features(model, layer) as recorded:
        logits = model(x.detach())
        if layer not in recorded:
            raise DecorrError(f"module {layer!r} was not called in the forward pass; choose another --attack-layer")
        (grad,) = torch.autograd.grad(output(logits).sum(), recorded[layer])
    return grad.detach()


def fia_aggregate_gradient(model: nn.Module, layer: str, x: Tensor, y: Tensor, masks: Iterable[Tensor]) -> Tensor:
    """FIA's feature importance: the sum over ``masks`` of the gradient of the true-class logit with
    respect to ``layer``'s output at ``x * mask``, L2-normalised per sample (the paper's eq. 5-6)."""
    total: Tensor | None = None
    for mask in masks:
        grad = _feature_gradient(model, layer, x * mask, lambda logits: logits.gather(1, y[:, None]))
        total = grad if total is None else total + grad
    if total is None:
        raise DecorrError("fia needs at least one masked copy; set --fia-copies >= 1")
    return _unit_per_sample(total)


def naa_integrated_gradient(model: nn.Module, layer: str, x: Tensor, y: Tensor, steps: int,
                            noise: Callable[[], Tensor] | None = None) -> Tensor:
    """NAA's integrated gradient: the mean over ``k = 1..steps`` of the gradient of the true-class
    softmax probability with respect to ``layer``'s output at ``(k / steps) * (x + noise())`` (the
    path from the black image to ``x``), L2-normalised per sample as the authors' code does."""
    total: Tensor | int = 0
    for k in range(1, steps + 1):
        point = x if noise is None else x + noise()
        total = total + _feature_gradient(model, layer, point * (k / steps),
                                          lambda logits: F.softmax(logits, dim=1).gather(1, y[:, None]))
    return _unit_per_sample(total / steps)  # type: ignore[operator]


def naa_weighted_attribution(features: Tensor, baseline: Tensor, weights: Tensor, gamma: float) -> Tensor:
    """NAA's weighted attribution per sample, shape (N,): with ``IA = (features - baseline) * weights``,
    the sum of the positive attributions plus ``gamma`` times the sum of the negative ones (the
    paper's linear transformation)."""
    attribution = ((features - baseline) * weights).flatten(1)
    return attribution.clamp(min=0).sum(dim=1) + gamma * attribution.clamp(max=0).sum(dim=1)


# ------------------------------------------------------------------------------------------------
# The components


@dataclass(frozen=True)
class _FeatureObjective(Objective):
    """A feature-level objective: the layer per model, the per-member preparation, the member mean."""

    targeted_ok: ClassVar[bool] = False

    layer: str | None = opt(None, _LAYER_HELP, flag="--attack-layer")

    def check(self) -> None:
        if self.layer is not None and not (isinstance(self.layer, str) and self.layer.strip()):
            self.fail("layer", f"must be a module name such as layer2, got {self.layer!r}")

    def check_source(self, source: Source) -> None:
        self.targets(source)

    def targets(self, source: Source) -> list[tuple[nn.Module, str]]:
        """Each model whose features are attacked with its layer's module name (:func:`attack_layers`)."""
        return attack_layers(self.name, source, self.layer)

    def prepare(self, ctx: Context) -> Callable[[Tensor, int | None], Tensor]:
        targets = self.targets(ctx.source)
        shared = self.prepare_batch(ctx)
        with torch.enable_grad():
            losses = [self.prepare_member(ctx, model, layer, shared) for model, layer in targets]

        def loss(x_in: Tensor, member: int | None = None) -> Tensor:
            if member is not None:
                return losses[member](x_in)
            return sum(member_loss(x_in) for member_loss in losses) / len(losses)  # type: ignore[return-value]

        return loss

    def prepare_batch(self, ctx: Context) -> Any:
        """What every member shares (ILA's baseline examples)."""
        return None

    def prepare_member(self, ctx: Context, model: nn.Module, layer: str, shared: Any) -> MemberLoss:
        raise NotImplementedError


def _check_count(component: _FeatureObjective, field_name: str, paper: int) -> None:
    value = getattr(component, field_name)
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        component.fail(field_name, f"must be an integer >= 1 (the paper uses {paper}), got {value!r}")


def _features(model: nn.Module, layer: str, x: Tensor) -> Tensor:
    """``layer``'s output at ``x`` with its graph; the layers above it are not run."""
    return layer_output(model, x, layer)


@register_attack("ila")
@dataclass(frozen=True)
class ILA(_FeatureObjective):
    """ILA (Huang et al., ICCV 2019) with TransferAttack's protocol: the baseline ``x'`` is MI-FGSM on the
    cross-entropy (decay 1, ``baseline_steps`` = 10 steps of eps / 10, the same eps); the second stage,
    from the clean image, is I-FGSM (``base``; TransferAttack's ILA steps along the sign of the plain
    gradient, 10 steps of eps / 10) on the projection.

    The paper's and TransferAttack's loss is one projection of the whole batch divided by ``||d||^2``;
    here each sample's projection ``(F(x_adv) - F(x)) . d_i / ||d_i||`` (the paper's definition of the
    projection), averaged. Each sample's gradient differs from theirs by a positive factor only, so
    sign steps, L1-normalised (MI) and L2-normalised steps are the same, and a sample's result does
    not depend on the rest of its batch.
    """

    base = "ifgsm"
    baseline: str = opt("mifgsm", "the optimizer giving ILA's baseline examples, on the cross-entropy "
                        "(TransferAttack: mifgsm; the paper: ifgsm and others)", flag="--ila-baseline")
    baseline_steps: int = opt(10, "iterations of the baseline attack (TransferAttack: 10)", flag="--ila-baseline-steps")

    def check(self) -> None:
        super().check()
        _check_count(self, "baseline_steps", 10)
        try:
            kind = attack_class(str(self.baseline)).kind
        except DecorrError:
            kind = None
        if kind != "optimizer":
            self.fail("baseline", f"must name an optimizer (e.g. ifgsm, mifgsm, pgd), got {self.baseline!r}")

    def baseline_attack(self, ctx: Context) -> Attack:
        cls = attack_class(self.baseline)
        settings = {"steps": self.baseline_steps} if "steps" in {f.name for f in dataclasses.fields(cls)} else {}
        return Attack(optimizer=cls(**settings), ensemble=ctx.attack.ensemble)  # type: ignore[arg-type]

    def prepare_batch(self, ctx: Context) -> Tensor:
        """The baseline examples ``x'``: the baseline attack on the same source, ball and generator
        (crafted inside this attack's model modifiers, which stay installed)."""
        return self.baseline_attack(ctx).craft(ctx.source, ctx.x, ctx.y, eps=ctx.eps / ctx.scale, norm=ctx.norm,
                                               scale=ctx.scale, generator=ctx.generator)

    def prepare_member(self, ctx: Context, model: nn.Module, layer: str, shared: Tensor) -> MemberLoss:
        clean = _features(model, layer, ctx.x).detach()
        baseline = _features(model, layer, shared).detach()
        return lambda x_in: ila_projection(_features(model, layer, x_in), clean, baseline).mean()


@register_attack("fia")
@dataclass(frozen=True)
class FIA(_FeatureObjective):
    """FIA (Wang et al., ICCV 2021) on MI-FGSM (the paper's and TransferAttack's base): ``copies`` = 30
    masked copies (the paper's N; TransferAttack's num_ens), each pixel value (every channel of every
    pixel, independently) dropped to 0 with probability ``drop`` = 0.3 (the paper's and TransferAttack's
    for normally trained models; the paper uses 0.1 against defended ones, the authors' code's default).

    The importance is the gradient of the true-class logit (the paper, the authors' code); TransferAttack
    differentiates the softmax probability instead. Mask k is ``uniform(x.shape) >= drop``, drawn in
    order from the attack's generator.
    """

    copies: int = opt(30, "masked copies whose feature gradients are aggregated (FIA: 30)", flag="--fia-copies")
    drop: float = opt(0.3, "probability of dropping each pixel value of a copy (FIA: 0.3; 0.1 against "
                      "defended models)", flag="--fia-drop")

    def check(self) -> None:
        super().check()
        _check_count(self, "copies", 30)
        if not (isinstance(self.drop, (int, float)) and not isinstance(self.drop, bool) and 0 <= self.drop < 1):
            self.fail("drop", f"is a probability in [0, 1) (FIA uses 0.3), got {self.drop!r}")

    def masks(self, ctx: Context) -> Iterable[Tensor]:
        for _ in range(self.copies):  # one at a time: never all copies of the batch in memory
            yield (ctx.uniform(ctx.x.shape, 0.0, 1.0) >= self.drop).to(ctx.x.dtype)

    def prepare_member(self, ctx: Context, model: nn.Module, layer: str, shared: Any) -> MemberLoss:
        weights = fia_aggregate_gradient(model, layer, ctx.x, ctx.y, self.masks(ctx))
        return lambda x_in: -(weights * _features(model, layer, x_in)).flatten(1).sum(dim=1).mean()


@register_attack("naa")
@dataclass(frozen=True)
class NAA(_FeatureObjective):
    """NAA (Zhang et al., CVPR 2022) on MI-FGSM (the paper's and TransferAttack's base): the integrated
    gradient of the true-class softmax probability (the authors' code, TransferAttack) over
    ``path_steps`` = 30 points ``k / 30 * x``, k = 1..30, from the black image (the paper's baseline;
    TransferAttack takes k = 0..29, the authors k = 1..30); attributions relative to the black image's
    features; the linear transformation with ``gamma`` = 1.0 (the paper's best, the authors' fixed value).

    ``gamma`` weights the negative attributions as in the paper's WAA; the authors' code, which negates
    the weights before splitting, weights the positive ones instead (the same at gamma = 1).
    ``noise`` > 0 adds Gaussian noise of that standard deviation (pixel units) to ``x`` at each path
    point, as the authors' code does (0.2 in the network's input scale, 0.1 pixels for Inception);
    the default 0 is TransferAttack's and the paper's path.
    """

    path_steps: int = opt(30, "points on the integrated-gradient path (NAA: 30)", flag="--naa-path-steps")
    gamma: float = opt(1.0, "weight of the negative attributions (NAA: 1.0)", flag="--naa-gamma")
    noise: float = opt(0.0, "std of Gaussian noise added at each path point, pixel units (authors' code: "
                       "0.1 for Inception; TransferAttack: 0)", flag="--naa-noise")

    def check(self) -> None:
        super().check()
        _check_count(self, "path_steps", 30)
        for name in ("gamma", "noise"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")):
                self.fail(name, f"must be a finite number >= 0, got {value!r}")

    def prepare_member(self, ctx: Context, model: nn.Module, layer: str, shared: Any) -> MemberLoss:
        std = float(self.noise)
        noise = (lambda: ctx.normal(ctx.x.shape, std)) if std > 0 else None
        weights = naa_integrated_gradient(model, layer, ctx.x, ctx.y, self.path_steps, noise)
        black = _features(model, layer, torch.zeros_like(ctx.x)).detach()
        gamma = float(self.gamma)
        return lambda x_in: -naa_weighted_attribution(_features(model, layer, x_in), black, weights, gamma).mean()
