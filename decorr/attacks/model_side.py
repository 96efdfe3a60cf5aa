"""Model-side attacks of the suite: SGM (sgm), LinBP (linbp), Ghost networks (ghost).

They change how the source model is differentiated (SGM, LinBP) or evaluated (Ghost) while the attack
crafts, through hooks installed on entry and removed on exit; the model itself is never modified. On an
ensemble source they act on every member (each member is a network of its own, with its own stages).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch.nn as nn

from decorr.attacks.base import Context, ModelModifier, Source
from decorr.attacks.linear_backprop import linbp_position, linear_backprop
from decorr.attacks.registry import register_attack
from decorr.attacks.skip_erosion import eroded_units, skip_erosion
from decorr.attacks.skip_gradient import DEFAULT_EXCLUDE, EXCLUDE_RULES, residual_branches, skip_gradient
from decorr.config import opt
from decorr.errors import DecorrError

__all__ = ["SGM", "Ghost", "LinBP", "networks"]


def networks(source: Source) -> list[nn.Module]:
    """The networks a model-side component changes: an ensemble's members, else the model."""
    if source.members:
        return list(source.members)
    return [source.module] if source.module is not None else []


def _label(source: Source, index: int) -> str:
    return f"{source.name} member {index}" if source.members else source.name


@register_attack("sgm")
@dataclass(frozen=True)
class SGM(ModelModifier):
    """SGM (Wu et al. 2020): the gradient through every residual branch times ``gamma`` (the skip path's
    kept), the first unit of each stage left alone as in the authors' code (:mod:`decorr.attacks.skip_gradient`;
    equal to their hooks' gradient). The paper: gamma 0.2 for ResNets, 0.5 for DenseNets."""

    gamma: float = opt(0.2, "decay of the gradient through residual branches (ResNet 0.2, DenseNet 0.5)",
                       flag="--gamma")
    exclude: str = opt(DEFAULT_EXCLUDE, "residual units left undecayed: first-of-stage (the authors') or none",
                       flag="--sgm-exclude")

    def check(self) -> None:
        if not (isinstance(self.gamma, (int, float)) and 0 < self.gamma <= 1):
            self.fail("gamma", f"must be in (0, 1] (the paper uses 0.2 for ResNets), got {self.gamma!r}")
        if self.exclude not in EXCLUDE_RULES:
            self.fail("exclude", f"must be one of {', '.join(EXCLUDE_RULES)}, got {self.exclude!r}")

    def check_source(self, source: Source) -> None:
        for index, model in enumerate(networks(source)):
            if not residual_branches(model, self.exclude):
                raise DecorrError(f"sgm: source {_label(source, index)} ({type(model).__name__}) has no residual "
                                  f"units to decay (--sgm-exclude {self.exclude}); attack it without sgm, or use a "
                                  "residual surrogate")

    @contextlib.contextmanager
    def applied(self, ctx: Context) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for model in networks(ctx.source):
                stack.enter_context(skip_gradient(model, float(self.gamma), exclude=self.exclude))
            yield


@register_attack("linbp")
@dataclass(frozen=True)
class LinBP(ModelModifier):
    """LinBP (Guo et al., NeurIPS 2020): from ``position`` on, the backward pass treats ReLUs as linear
    and (residual networks) rescales each unit's branch gradient to the norm of its true one, as the
    authors' code and TransferAttack's ``linbp.py`` (:mod:`decorr.attacks.linear_backprop`). Position:
    default the second unit of the next-to-last stage, the authors' ResNet-50 ``3_1`` (``layer3.1``);
    ``resnet20``/``resnet56``: ``layer2.1``. TransferAttack runs it on MI-FGSM (decay 1, eps/10 steps; its
    class defaults to the paper's 300 iterations, its documented setting is 10, the suite's protocol)."""

    position: str | None = opt(None, "module from which ReLUs backpropagate linearly (default: the second unit "
                                     "of the next-to-last stage, ResNet-50's layer3.1)", flag="--linbp-position")
    renormalize: bool = opt(True, "rescale each residual unit's linear branch gradient to its true gradient's "
                                  "norm (the authors')", flag="--linbp-renormalize")

    def check(self) -> None:
        if self.position is not None and not (isinstance(self.position, str) and self.position.strip()):
            self.fail("position", f"must be a module name such as layer3.1, got {self.position!r}")
        if not isinstance(self.renormalize, bool):
            self.fail("renormalize", f"must be true or false, got {self.renormalize!r}")

    def check_source(self, source: Source) -> None:
        for index, model in enumerate(networks(source)):
            try:
                linbp_position(model, self.position)
            except DecorrError as err:
                raise DecorrError(f"{err} (source {_label(source, index)})") from None

    @contextlib.contextmanager
    def applied(self, ctx: Context) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for model in networks(ctx.source):
                stack.enter_context(linear_backprop(model, self.position, renormalize=self.renormalize))
            yield


@register_attack("ghost")
@dataclass(frozen=True)
class Ghost(ModelModifier):
    """Ghost networks (Li et al., AAAI 2020), skip connection erosion: every forward pass multiplies each
    residual unit's skip path by factors uniform in ``[1 - r, 1 + r]``, drawn per unit, per channel and per
    pass from the attack's generator (:mod:`decorr.attacks.skip_erosion`). ``random_range`` 0.22: the
    paper's and TransferAttack's ResNet-50 value (TransferAttack: 0.16 for ResNet-101, 0.12 for
    ResNet-152). TransferAttack's ``ghost`` is MI-FGSM based. The paper's dropout erosion for
    non-residual networks is not implemented (such a source is refused)."""

    random_range: float = opt(0.22, "skip paths are multiplied by U[1 - r, 1 + r] factors (ResNet-50: 0.22)",
                              flag="--ghost-random-range")

    def check(self) -> None:
        r = self.random_range
        if not (isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r < 1):
            self.fail("random_range", f"must be in [0, 1) (the paper uses 0.22 for ResNet-50), got {r!r}")

    def check_source(self, source: Source) -> None:
        for index, model in enumerate(networks(source)):
            if not eroded_units(model):
                raise DecorrError(f"ghost: source {_label(source, index)} ({type(model).__name__}) has no residual "
                                  "units to erode, and the paper's dropout erosion for non-residual networks is not "
                                  "implemented; use a residual surrogate")

    @contextlib.contextmanager
    def applied(self, ctx: Context) -> Iterator[None]:
        r = float(self.random_range)
        if r == 0:  # every factor would be 1: the plain network, bit for bit
            yield
            return
        with contextlib.ExitStack() as stack:
            for model in networks(ctx.source):
                stack.enter_context(skip_erosion(model, lambda shape: ctx.uniform(shape, 1 - r, 1 + r)))
            yield
