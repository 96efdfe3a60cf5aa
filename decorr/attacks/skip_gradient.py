"""SGM, the Skip Gradient Method (Wu et al. 2020): decay the gradient through residual branches.

In a residual unit ``z + f(z)`` the backward pass keeps the skip path's gradient and multiplies the
gradient through the branch ``f`` by ``gamma``; the forward pass is unchanged. The decay is applied
to the branch's output tensor (a forward hook swaps it for a copy whose gradient is scaled), not to
named ReLUs as in the authors' code, so it works with in-place ReLUs, pre-activation units and
DenseNet layers alike. Which module's output is "the branch" is looked up per unit type in a small
registry that users extend with :func:`register_residual_branch`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from decorr.errors import DecorrError

#: Given a residual unit, the module(s) whose output is the residual branch's output, i.e. the
#: tensor added to (or, for DenseNet, concatenated with) the skip path. None: this instance has no
#: residual branch (e.g. a block that only sometimes has a skip connection).
BranchGetter = Callable[[nn.Module], Union[nn.Module, Sequence[nn.Module], None]]

_BRANCH_GETTERS: dict[type, BranchGetter] = {}
_defaults_registered = False


def register_residual_branch(module_type: type[nn.Module], branch_getter: BranchGetter) -> None:
    """Teach SGM a residual unit type: ``branch_getter(unit)`` returns the module(s) to decay.

    The returned module's output must be the branch's contribution before it meets the skip path,
    e.g. ``lambda unit: unit.bn2`` for torchvision's BasicBlock. Subclasses inherit the entry of
    their nearest registered base class; registering a type again replaces its entry.
    """
    _register_defaults()
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise DecorrError(f"register_residual_branch needs an nn.Module subclass, got {module_type!r}")
    _BRANCH_GETTERS[module_type] = branch_getter


def _register_defaults() -> None:
    global _defaults_registered
    if _defaults_registered:
        return
    _defaults_registered = True
    from torchvision.models.densenet import _DenseLayer
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from decorr.models.blocks import ResidualUnit

    # torchvision adds the identity in place onto the last batch norm's output, then applies ReLU.
    _BRANCH_GETTERS[BasicBlock] = lambda unit: unit.bn2
    _BRANCH_GETTERS[Bottleneck] = lambda unit: unit.bn3
    # A dense layer's output is the new feature map concatenated after the block's earlier ones.
    _BRANCH_GETTERS[_DenseLayer] = lambda unit: unit
    _BRANCH_GETTERS[ResidualUnit] = lambda unit: unit.branch


def _getter_for(module: nn.Module) -> BranchGetter | None:
    for cls in type(module).__mro__:
        if cls in _BRANCH_GETTERS:
            return _BRANCH_GETTERS[cls]
    return None


def residual_branches(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs ``skip_gradient`` decays: one (or more) per residual unit in ``model``."""
    _register_defaults()
    branches: dict[int, nn.Module] = {}
    for module in model.modules():
        getter = _getter_for(module)
        if getter is None:
            continue
        found = getter(module)
        if found is None:
            continue
        for branch in [found] if isinstance(found, nn.Module) else found:
            branches.setdefault(id(branch), branch)
    return list(branches.values())


class _ScaleGradient(torch.autograd.Function):
    """Identity forward (a fresh copy, so in-place ops after it stay legal); gradient times gamma."""

    @staticmethod
    def forward(ctx, x: Tensor, gamma: float) -> Tensor:
        ctx.gamma = gamma
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.gamma, None


def _decay_hook(gamma: float) -> Callable[[nn.Module, object, object], Tensor]:
    def hook(module: nn.Module, inputs: object, output: object) -> Tensor:
        if not isinstance(output, Tensor):
            raise DecorrError(
                f"skip_gradient expects the residual branch {type(module).__name__} to return a tensor, "
                f"got {type(output).__name__}; register a branch getter that returns a tensor-valued module"
            )
        return _ScaleGradient.apply(output, gamma)

    return hook


@contextmanager
def skip_gradient(model: nn.Module, gamma: float) -> Iterator[list[nn.Module]]:
    """Within this context, gradients through every residual branch of ``model`` are scaled by ``gamma``.

    Use it around an attack on ``model``: ``with skip_gradient(model, 0.2): pgd(ce_loss(model), ...)``.
    The paper uses gamma 0.2 (ResNet) and 0.5 (DenseNet). gamma = 1 installs nothing, so it is plain
    PGD bit for bit. Yields the decayed branch modules; hooks are removed on exit, also on errors.
    Raises DecorrError when ``model`` has no known residual units.
    """
    if not 0.0 < gamma <= 1.0:
        raise DecorrError(f"SGM gamma must be in (0, 1] (the paper uses 0.2 for ResNets), got {gamma}")
    branches = residual_branches(model)
    if not branches:
        raise DecorrError(
            f"skip_gradient found no residual units in {type(model).__name__}; SGM needs a residual model "
            "(torchvision ResNet/DenseNet, decorr ResidualUnit) or register_residual_branch() for your unit"
        )
    if gamma == 1.0:
        yield branches
        return
    hook = _decay_hook(float(gamma))
    handles = []
    try:
        for branch in branches:
            handles.append(branch.register_forward_hook(hook))
        yield branches
    finally:
        for handle in handles:
            handle.remove()
