"""Ghost networks' skip connection erosion (Li et al., AAAI 2020, "Learning transferable adversarial
examples via ghost networks"): every forward pass of a residual network is a new "ghost" whose skip
connections are multiplied by random factors.

In every additive residual unit (torchvision ``BasicBlock``/``Bottleneck``, decorr's ``ResidualUnit``)
the skip path's output ``s`` becomes ``lambda * s`` before it is added to the branch, with ``lambda``
drawn afresh for every unit in every forward pass, uniformly from ``[1 - r, 1 + r]``, one factor per
channel shared by the batch, as in TransferAttack's ghost ResNets (``ghost_networks/resnet.py``,
``uniform_random(shape=(1, c, 1, 1), ...)``) and the authors' TensorFlow code (``tf.random_uniform((depth,))``);
the paper writes lambda as one scalar. Forward and backward both see the eroded network (the paper's
ghosts are models, not gradient tricks).

How: a unit whose skip is a module (a projection or zero-padding shortcut, ``ResidualUnit.skip``) gets a
forward hook on it returning ``lambda * s``; a unit with an identity skip (torchvision's
``downsample=None``) gets ``(lambda - 1) * x`` (``x``: the unit's input) added to its branch's output, so
that the unit's own ``+ x`` makes it ``branch + lambda * x``. Draws are made in forward order through
``draw(shape)``, so they come from whatever generator the caller's ``draw`` uses.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch.nn as nn
from torch import Tensor

from decorr.attacks.skip_gradient import additive_units
from decorr.errors import DecorrError

__all__ = ["eroded_units", "skip_erosion", "skip_module"]

#: ``draw(shape) -> Tensor``: the factors for one skip path, shape ``(1, C, 1, ..., 1)``.
Draw = Callable[[tuple[int, ...]], Tensor]

_IDENTITY = object()


def skip_module(unit: nn.Module) -> nn.Module | object | None:
    """The module computing ``unit``'s skip path, ``_IDENTITY`` for an identity skip that is no module,
    None for a unit type whose skip path is unknown."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from decorr.models.blocks import ResidualUnit

    if isinstance(unit, (BasicBlock, Bottleneck)):
        return unit.downsample if unit.downsample is not None else _IDENTITY
    if isinstance(unit, ResidualUnit):
        return unit.skip
    return None


def eroded_units(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, unit, branch) of the residual units whose skip paths :func:`skip_erosion` scales."""
    return [(name, unit, branch) for name, unit, branch in additive_units(model) if skip_module(unit) is not None]


def _factors(draw: Draw, like: Tensor) -> Tensor:
    shape = (1, like.shape[1]) + (1,) * (like.dim() - 2)
    return draw(shape).to(dtype=like.dtype, device=like.device)


@contextmanager
def skip_erosion(model: nn.Module, draw: Draw) -> Iterator[list[str]]:
    """Within this context every forward pass of ``model`` multiplies each unit's skip path by factors
    from ``draw`` (module docstring); yields the eroded units' names. Hooks are removed on exit."""
    units = eroded_units(model)
    if not units:
        raise DecorrError(f"ghost: {type(model).__name__} has no residual units with a known skip path "
                          "(torchvision ResNet blocks, decorr ResidualUnit) to erode; use a residual surrogate")
    handles = []
    try:
        for _, unit, branch in units:
            skip = skip_module(unit)
            if skip is _IDENTITY:
                handles += _identity_hooks(unit, branch, draw)
            else:
                assert isinstance(skip, nn.Module)
                handles.append(skip.register_forward_hook(
                    lambda _m, _args, out: out * _factors(draw, out)))
        yield [name for name, _, _ in units]
    finally:
        for handle in handles:
            handle.remove()


def _identity_hooks(unit: nn.Module, branch: nn.Module, draw: Draw) -> list:
    inputs: list[Tensor] = []

    def enter(_unit: nn.Module, args: tuple) -> None:
        inputs.append(args[0])

    def branch_end(_branch: nn.Module, _args: tuple, out: Tensor) -> Tensor | None:
        if not inputs:
            return None
        x = inputs[-1]
        return out + (_factors(draw, x) - 1) * x

    def leave(_unit: nn.Module, _args: tuple, _out: Tensor) -> None:
        if inputs:
            inputs.pop()

    return [unit.register_forward_pre_hook(enter), branch.register_forward_hook(branch_end),
            unit.register_forward_hook(leave)]
