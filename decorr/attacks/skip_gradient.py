"""SGM, the Skip Gradient Method (Wu et al. 2020): decay the gradient through residual branches.

In a residual unit ``z + f(z)`` the backward pass keeps the skip path's gradient and multiplies the
gradient through the branch ``f`` by ``gamma``; the forward pass is unchanged. ``gamma`` is therefore
the branch's gradient relative to the skip's, per unit. The decay is applied to the branch's output
tensor (a forward hook swaps it for a copy whose gradient is scaled), not to named ReLUs as in the
authors' code, so it works with in-place ReLUs, pre-activation units and DenseNet layers alike. Which
module's output is "the branch" is looked up per unit type in a small registry that users extend
with :func:`register_residual_branch`.

How this maps onto the authors' code (``utils_sgm.py`` of csdongxian/skip-connections-matter): they
multiply the gradient by a factor at every use of a ReLU module whose name contains ``relu``. A
torchvision ``BasicBlock`` uses its one ``relu`` twice (inside the branch after ``bn1``, and after the
addition), so their factor ``gamma`` per use decays the branch by ``gamma`` relative to the skip and
scales the whole block's gradient by ``gamma``. A ``Bottleneck`` uses ``relu`` three times (two in the
branch, one after the addition) and a DenseNet layer has ``relu1`` and ``relu2`` in its branch, so they
use ``gamma ** 0.5`` per use: the branch is again decayed by ``gamma`` relative to the skip. The
uniform factors (the post-addition ReLUs, the stem ReLU, their ``backward_hook_norm`` dividing by the
gradient's standard deviation) only rescale the whole input gradient, which leaves PGD's sign and
normalised steps unchanged. Their ResNet rule skips names containing ``0.relu``, i.e. the first block
of every stage (``layer1.0`` ... ``layer4.0``); that is ``exclude="first-of-stage"`` here, the
default. With it, ``skip_gradient`` gives their input gradient up to one scalar (tests:
``tests/test_sgm_authors.py``). Two details of theirs are not copied: the substring ``0.relu`` also
matches ``layer3.10`` / ``layer3.20`` / ``layer3.30`` of ResNet-101/152, which are not first of
their stage; and an earlier version of their file skipped only ``layer1.0``.
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

#: What ``exclude`` accepts: a rule name, unit names (as in ``model.named_modules()``), or a
#: predicate ``(name, unit) -> bool`` that is True for the units to leave undecayed.
Exclude = Union[str, Sequence[str], Callable[[str, nn.Module], bool]]

#: The rules a unit type can follow under ``exclude="first-of-stage"``:
#: ``"index-0"``: the unit is the first child of its parent ``nn.Sequential`` (torchvision's ``layerN.0``);
#: ``"first-unit"``: the unit is the first residual unit among its parent's children, whatever the parent;
#: ``"never"``: no unit of this type is left undecayed (DenseNet layers).
STAGE_RULES = ("index-0", "first-unit", "never")
EXCLUDE_RULES = ("first-of-stage", "none")
DEFAULT_EXCLUDE = "first-of-stage"

_BRANCH_GETTERS: dict[type, BranchGetter] = {}
_STAGE_RULE: dict[type, str] = {}
_defaults_registered = False


def register_residual_branch(
    module_type: type[nn.Module], branch_getter: BranchGetter, *, first_of_stage: str | None = None
) -> None:
    """Teach SGM a residual unit type: ``branch_getter(unit)`` returns the module(s) to decay.

    The returned module's output must be the branch's contribution before it meets the skip path,
    e.g. ``lambda unit: unit.bn2`` for torchvision's BasicBlock. Subclasses inherit the entry of
    their nearest registered base class; registering a type again replaces its entry.
    ``first_of_stage`` (one of :data:`STAGE_RULES`) says which units ``exclude="first-of-stage"``
    leaves undecayed; None keeps the rule the type already has (its own, or its nearest registered
    base's), else ``"first-unit"``.
    """
    _register_defaults()
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise DecorrError(f"register_residual_branch needs an nn.Module subclass, got {module_type!r}")
    if first_of_stage is None:
        first_of_stage = _lookup(_STAGE_RULE, module_type) or "first-unit"
    if first_of_stage not in STAGE_RULES:
        raise DecorrError(f"unknown first_of_stage rule {first_of_stage!r}; use one of {', '.join(STAGE_RULES)}")
    _BRANCH_GETTERS[module_type] = branch_getter
    _STAGE_RULE[module_type] = first_of_stage


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
    # The authors leave torchvision's layerN.0 alone and decay every dense layer.
    _STAGE_RULE.update({BasicBlock: "index-0", Bottleneck: "index-0", _DenseLayer: "never",
                        ResidualUnit: "first-unit"})


def _lookup(table: dict[type, object], module_type: type) -> object | None:
    for cls in module_type.__mro__:
        if cls in table:
            return table[cls]
    return None


def _getter_for(module: nn.Module) -> BranchGetter | None:
    return _lookup(_BRANCH_GETTERS, type(module))  # type: ignore[return-value]


def _as_modules(found: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    return [found] if isinstance(found, nn.Module) else list(found)


def _units(model: nn.Module) -> list[tuple[str, nn.Module, list[nn.Module]]]:
    """(name, unit, branch modules) of every residual unit in ``model``, in ``named_modules`` order."""
    units = []
    for name, module in model.named_modules():
        getter = _getter_for(module)
        found = getter(module) if getter is not None else None
        if found is not None:
            units.append((name, module, _as_modules(found)))
    return units


def _first_of_stage(model: nn.Module, units: list[tuple[str, nn.Module, list[nn.Module]]]) -> set[int]:
    """ids of the units that ``exclude="first-of-stage"`` leaves undecayed."""
    unit_ids = {id(unit) for _, unit, _ in units}
    parents: dict[int, nn.Module] = {}
    for module in model.modules():
        for child in module.children():
            parents.setdefault(id(child), module)
    excluded = set()
    for _, unit, _ in units:
        rule = _lookup(_STAGE_RULE, type(unit)) or "first-unit"
        parent = parents.get(id(unit))
        if rule == "never" or parent is None:  # a unit that is the whole model has no stage
            continue
        children = list(parent.children())
        if rule == "index-0":
            first = isinstance(parent, nn.Sequential) and children[0] is unit
        else:
            first = next(c for c in children if id(c) in unit_ids) is unit
        if first:
            excluded.add(id(unit))
    return excluded


def _excluded(model: nn.Module, units: list[tuple[str, nn.Module, list[nn.Module]]], exclude: Exclude) -> set[int]:
    if isinstance(exclude, str):
        if exclude == "none":
            return set()
        if exclude == "first-of-stage":
            return _first_of_stage(model, units)
        raise DecorrError(
            f"unknown SGM exclude {exclude!r}; use 'first-of-stage' (the authors' rule), 'none', "
            "a list of unit names or a callable (name, module) -> bool"
        )
    if callable(exclude):
        return {id(unit) for name, unit, _ in units if exclude(name, unit)}
    if isinstance(exclude, (list, tuple)):
        by_name = {name: unit for name, unit, _ in units}
        modules = dict(model.named_modules())
        for name in exclude:
            if name not in by_name:
                what = "is not a residual unit" if name in modules else "is not a module name"
                raise DecorrError(
                    f"SGM exclude: {name!r} {what} of {type(model).__name__}; name residual units as in "
                    f"model.named_modules(), e.g. {', '.join(repr(n) for n in list(by_name)[:3]) or 'none here'}"
                )
        return {id(by_name[name]) for name in exclude}
    raise DecorrError(
        f"SGM exclude must be 'first-of-stage', 'none', a list of unit names or a callable, got {type(exclude).__name__}"
    )


def residual_units(model: nn.Module) -> list[tuple[str, nn.Module, list[nn.Module]]]:
    """(name, unit, branch modules) of every residual unit of ``model`` the registry knows, in
    ``named_modules`` order (what LinBP and Ghost networks find their units with)."""
    _register_defaults()
    return _units(model)


def additive_units(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, unit, branch module) of the units whose output is their skip path plus one branch module's
    output (ResNet blocks, ``ResidualUnit``), not DenseNet layers, whose "branch" is the whole unit."""
    units = []
    for name, unit, branches in residual_units(model):
        if len(branches) == 1 and branches[0] is not unit:
            units.append((name, unit, branches[0]))
    return units


def residual_branches(model: nn.Module, exclude: Exclude = DEFAULT_EXCLUDE) -> list[nn.Module]:
    """The modules whose outputs ``skip_gradient(model, gamma, exclude=exclude)`` decays.

    One (or more) per residual unit of ``model`` that ``exclude`` does not leave alone (see
    :func:`skip_gradient`); ``exclude="none"``: every unit.
    """
    _register_defaults()
    units = _units(model)
    excluded = _excluded(model, units, exclude)
    branches: dict[int, nn.Module] = {}
    for _, unit, found in units:
        if id(unit) not in excluded:
            for branch in found:
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
def skip_gradient(model: nn.Module, gamma: float, *, exclude: Exclude = DEFAULT_EXCLUDE) -> Iterator[list[nn.Module]]:
    """Within this context, gradients through the residual branches of ``model`` are scaled by ``gamma``.

    Use it around an attack on ``model``: ``with skip_gradient(model, 0.2): pgd(ce_loss(model), ...)``.
    ``gamma`` is the branch's gradient relative to the skip path's in every decayed unit; the paper
    uses 0.2 (ResNet) and 0.5 (DenseNet). The authors' code gets the same by multiplying the gradient
    at every ReLU use: ``gamma`` per use for BasicBlock ResNets (18/34), ``gamma ** 0.5`` for
    Bottleneck ResNets (50/101/152) and DenseNet layers (see the module docstring).
    gamma = 1 installs nothing, so it is plain PGD bit for bit. Yields the decayed branch modules;
    hooks are removed on exit, also on errors.

    ``exclude`` picks the residual units left undecayed:

    - ``"first-of-stage"`` (default): the authors' rule, generalised beyond torchvision's names:
      the first residual unit of each stage. Per unit type: torchvision ``BasicBlock`` and
      ``Bottleneck`` (so also decorr's ``resnet20``/``resnet56``/``resnet18_small``): the block at
      index 0 of its parent ``nn.Sequential`` stage, exactly torchvision's ``layerN.0``; decorr's
      ``ResidualUnit``: the first ResidualUnit among its parent module's children (e.g.
      ``features.res2`` of ``dna_classifier_cifar``, whose three units share one parent); torchvision
      ``_DenseLayer``: none (the authors decay every dense layer; transitions are not units). A unit
      that is ``model`` itself is never excluded. Types added with :func:`register_residual_branch`
      follow its ``first_of_stage`` rule.
    - ``"none"``: every unit is decayed (what decorr did before ``exclude`` existed, bit for bit).
    - a list or tuple of unit names (as in ``model.named_modules()``), or a callable
      ``(name, unit) -> bool`` that is True for the units to leave alone.

    Raises DecorrError when ``model`` has no known residual units, when ``exclude`` leaves none to
    decay, or for an unknown ``exclude``.
    """
    if not 0.0 < gamma <= 1.0:
        raise DecorrError(f"SGM gamma must be in (0, 1] (the paper uses 0.2 for ResNets), got {gamma}")
    branches = residual_branches(model, exclude)
    if not branches:
        if residual_branches(model, "none"):
            raise DecorrError(
                f"skip_gradient: exclude={exclude!r} leaves no residual unit of {type(model).__name__} to decay; "
                "pass exclude='none' to decay every unit"
            )
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
