"""LinBP (Guo, Li & Chen, NeurIPS 2020, "Backpropagating linearly improves transferability of adversarial
examples"): from a position of the network on, the backward pass treats ReLUs as the identity; the
forward pass is unchanged.

Which ReLUs, as in the authors' code (qizhangli/linbp-attack, ``linbp_forw_resnet50`` /
``linbp_backw_resnet50``; TransferAttack's ``linbp.py`` is a copy):

- Residual networks (units the SGM registry knows whose output is skip plus one branch: torchvision
  ``BasicBlock``/``Bottleneck``, decorr's ``ResidualUnit``): every unit that starts at or after the
  position has the ReLUs of its residual branch linearised; the ReLU after the addition (torchvision's
  post-activation blocks) stays a ReLU, so does every ReLU outside those units. Their backward also
  *renormalises* each such unit: the gradient that reaches the unit's input through the branch is the
  linearised one, ``J_lin^T g``, rescaled per sample to the L2 norm of the true one, ``J^T g`` (``g``:
  the gradient at the branch's output), i.e. ``||J^T g|| / ||J_lin^T g|| * J_lin^T g``; the skip path's
  gradient is added unchanged. ``renormalize=False`` drops the rescaling (the plain linear backward).
- Plain networks (no residual units; the authors' VGG-19 on CIFAR-10): every ``nn.ReLU`` module
  called after the position module starts is linearised; nothing is rescaled.

The position is a module name (``layer3.1``, as in ``model.named_modules()``; for a wrapped model such
as ``decorr.models.foreign.Preprocessed`` also relative to its ``net``). The default
(:func:`default_position`) is the authors' ResNet-50 setting ``3_1`` (their ``layer3[1]``) carried over
to any depth: the second unit of the next-to-last stage (``layer3.1`` for torchvision's ResNets and
``resnet18_small``, ``layer2.1`` for the three-stage ``resnet20``/``resnet56``). Plain networks have no
default (the authors' VGG-19 index 23 does not carry over): name the position.

How it is done, with hooks only (in-place ReLUs included): the linearised ReLU modules run with
``inplace=False`` while the context is active (so their forward hooks see the input) and return a
ReLU whose backward is the identity, or, while a unit's true branch gradient is being computed, the
ReLU's mask. Each linearised unit runs on a detached copy of its input and of its branch's output, and
a custom autograd node puts the unit back into the graph; its backward computes the skip path's
gradient, the branch's linear and true gradients, and their combination. Gradients with respect to
the model's parameters are therefore cut at those units (attacks need the input's gradient only).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn
from torch import Tensor

from decorr.attacks.skip_gradient import additive_units, residual_units
from decorr.errors import DecorrError

__all__ = ["default_position", "linear_backprop", "linbp_position"]


# ------------------------------------------------------------------------------------------------
# Where


def default_position(model: nn.Module) -> str | None:
    """The second residual unit of the next-to-last stage (units grouped by parent module), the
    authors' ResNet-50 ``3_1`` for any depth; the only stage's second unit for a one-stage model;
    None for a model without residual units."""
    stages: dict[str, list[str]] = {}
    for name, _, _ in additive_units(model):
        stages.setdefault(name.rpartition(".")[0], []).append(name)
    if not stages:
        return None
    groups = list(stages.values())
    stage = groups[-2] if len(groups) >= 2 else groups[-1]
    return stage[1] if len(stage) > 1 else stage[0]


def linbp_position(model: nn.Module, position: str | None) -> str:
    """``position`` as a name of ``model.named_modules()`` (default: :func:`default_position`), or a
    one-line DecorrError saying why LinBP cannot run on ``model``."""
    kind = type(model).__name__
    residual = additive_units(model)
    if not residual and residual_units(model):
        raise DecorrError(f"linbp: {kind} has dense layers (concatenated, not added, skip paths), which LinBP's "
                          "rules do not cover; use a ResNet or a plain (VGG-like) surrogate")
    if not residual and not any(isinstance(m, nn.ReLU) for m in model.modules()):
        raise DecorrError(f"linbp: {kind} has no nn.ReLU modules to linearise; use a ReLU network")
    if position is None:
        found = default_position(model)
        if found is None:
            raise DecorrError(f"linbp: {kind} has no residual units, so no default position; name the module "
                              "from which ReLUs are linearised, e.g. --linbp-position features.relu4")
        return found
    modules = dict(model.named_modules())
    for candidate in (position, f"net.{position}"):
        if candidate in modules:
            return candidate
    sample = ", ".join(name for name, _, _ in residual[:4]) or ", ".join(n for n in list(modules)[1:5])
    raise DecorrError(f"linbp: {kind} has no module {position!r}; name one as in model.named_modules(), "
                      f"e.g. {sample}")


# ------------------------------------------------------------------------------------------------
# The linearised ReLU and the renormalised unit


@dataclass
class _UnitPass:
    """One forward pass through a linearised unit: its input (in the caller's graph) and the detached
    copies the unit ran on, so that its backward can be computed piece by piece."""

    x: Tensor
    x_leaf: Tensor
    branch_out: Tensor | None = None
    #: the output of the branch's last linearised ReLU, where the linear and true backward passes part
    #: (set only for units whose branch is one chain of layers, where every path runs through it)
    split: Tensor | None = None
    chain: bool = False
    branch_leaf: Tensor | None = None
    out: Tensor | None = None


@dataclass
class _State:
    started: bool = False  # the position module has started in this forward pass
    masked: bool = False  # backward through linearised ReLUs applies their masks (the true gradient)
    units: list[_UnitPass | None] = field(default_factory=list)  # the units running now (None: not linearised)


class _LinearReLU(torch.autograd.Function):
    """ReLU forward; backward the identity, or the ReLU's own mask while ``state.masked``."""

    @staticmethod
    def forward(ctx, x: Tensor, state: _State) -> Tensor:  # type: ignore[override]
        ctx.state = state
        ctx.save_for_backward(x > 0)
        return torch.relu(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return (grad * mask if ctx.state.masked else grad), None


class _Renormalised(torch.autograd.Function):
    """The unit's output, connected to its input ``x``; the backward combines the skip path's gradient
    with the branch's linear gradient rescaled to the norm of its true one (module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, unit: _UnitPass, state: _State, renormalize: bool) -> Tensor:  # type: ignore[override]
        ctx.unit, ctx.state, ctx.renormalize = unit, state, renormalize
        assert unit.out is not None
        return unit.out.detach()

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        unit, state = ctx.unit, ctx.state
        # Graphs are kept (retain_graph) so that a caller's retain_graph=True backward can run twice.
        skip, at_branch = torch.autograd.grad(unit.out, (unit.x_leaf, unit.branch_leaf), grad_out,
                                              retain_graph=True, allow_unused=True)
        if at_branch is None:
            at_branch = torch.zeros_like(unit.branch_leaf)
        start = unit.branch_out
        if unit.split is not None:  # above the last linearised ReLU both passes agree: backpropagate once
            at_branch = torch.autograd.grad(unit.branch_out, unit.split, at_branch, retain_graph=True)[0]
            start = unit.split
        linear = torch.autograd.grad(start, unit.x_leaf, at_branch, retain_graph=True)[0]
        if ctx.renormalize:
            state.masked = True
            try:
                true = torch.autograd.grad(start, unit.x_leaf, at_branch, retain_graph=True)[0]
            finally:
                state.masked = False
            linear = linear * _norm_ratio(true, linear)
        return (linear if skip is None else skip + linear), None, None, None


def _norm_ratio(true: Tensor, linear: Tensor) -> Tensor:
    """Per sample ||true||_2 / ||linear||_2, shaped to broadcast (0 where the linear gradient is 0)."""
    shape = (-1,) + (1,) * (true.dim() - 1)
    true_norm = true.flatten(1).norm(dim=1).view(shape)
    linear_norm = linear.flatten(1).norm(dim=1).view(shape)
    return torch.where(linear_norm > 0, true_norm / torch.where(linear_norm > 0, linear_norm, 1.0), 0.0)


# ------------------------------------------------------------------------------------------------
# The hooks


@contextmanager
def linear_backprop(model: nn.Module, position: str | None = None, *, renormalize: bool = True) -> Iterator[str]:
    """Within this context ``model``'s backward is LinBP's from ``position`` on (module docstring);
    yields the resolved position. Hooks are removed and ReLUs' ``inplace`` flags restored on exit."""
    position = linbp_position(model, position)
    units = additive_units(model)
    state = _State()
    handles: list[torch.utils.hooks.RemovableHandle] = []
    relaxed: list[nn.ReLU] = []

    def start_forward(_module: nn.Module, _args: tuple) -> None:
        state.started = False
        state.units.clear()

    def reach_position(_module: nn.Module, _args: tuple) -> None:
        state.started = True

    try:
        handles.append(model.register_forward_pre_hook(start_forward))
        handles.append(dict(model.named_modules())[position].register_forward_pre_hook(reach_position))
        if units:
            relus = _install_unit_hooks(units, state, renormalize, handles)
        else:
            relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
        relu_hook = _relu_hook(state, residual=bool(units))
        for relu in dict.fromkeys(relus):  # a ReLU module used twice is hooked once
            if relu.inplace:
                relu.inplace = False
                relaxed.append(relu)
            handles.append(relu.register_forward_hook(relu_hook))
        yield position
    finally:
        for handle in handles:
            handle.remove()
        for relu in relaxed:
            relu.inplace = True


def _relu_hook(state: _State, *, residual: bool):
    def hook(_module: nn.Module, args: tuple, _output: Tensor) -> Tensor | None:
        if not torch.is_grad_enabled():
            return None
        if residual:
            # Inside a linearised unit, before its branch has ended: a ReLU of the branch.
            current = state.units[-1] if state.units else None
            linearise = current is not None and current.branch_out is None
        else:
            linearise = state.started
        if not linearise:
            return None
        out = _LinearReLU.apply(args[0], state)
        if residual and current.chain:
            current.split = out
        return out

    return hook


@functools.lru_cache(maxsize=1)
def _chain_units() -> tuple[type, ...]:
    """Unit types whose branch is one chain of layers (every path from the input to the branch's output runs
    through its last ReLU), so the linear and true backward passes can share what lies above that ReLU."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from decorr.models.blocks import ResidualUnit

    return (BasicBlock, Bottleneck, ResidualUnit)


def _install_unit_hooks(units: list[tuple[str, nn.Module, nn.Module]], state: _State, renormalize: bool,
                        handles: list) -> list[nn.ReLU]:
    """Hooks on every residual unit (active for units that start after the position); returns the ReLU
    modules inside the units."""

    def enter(_unit: nn.Module, args: tuple) -> tuple | None:
        if not (state.started and torch.is_grad_enabled()):
            state.units.append(None)
            return None
        x = args[0]
        x_leaf = x.detach().requires_grad_(True)
        state.units.append(_UnitPass(x=x, x_leaf=x_leaf, chain=isinstance(_unit, _chain_units())))
        # A copy, so that the unit may work in place on what it is given.
        return (x_leaf.clone(), *args[1:])

    def branch_end(_branch: nn.Module, _args: tuple, output: Tensor) -> Tensor | None:
        current = state.units[-1] if state.units else None
        if current is None or current.branch_out is not None:
            return None
        current.branch_out = output
        current.branch_leaf = output.detach().requires_grad_(True)
        return current.branch_leaf.clone()  # torchvision adds the skip onto it in place

    def leave(unit: nn.Module, _args: tuple, output: Tensor) -> Tensor | None:
        current = state.units.pop() if state.units else None
        if current is None:
            return None
        if current.branch_out is None:
            raise DecorrError(f"linbp: the residual branch of {type(unit).__name__} did not run inside it; "
                              "register the unit's branch module with register_residual_branch")
        current.out = output
        return _Renormalised.apply(current.x, current, state, renormalize)

    relus: list[nn.ReLU] = []
    for _, unit, branch in units:
        handles.append(unit.register_forward_pre_hook(enter))
        handles.append(branch.register_forward_hook(branch_end))
        handles.append(unit.register_forward_hook(leave))
        relus += [m for m in unit.modules() if isinstance(m, nn.ReLU)]
    return relus
