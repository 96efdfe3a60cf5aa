"""Ensemble strategies of the suite: how an ensemble source's members are combined into one attack.

Without a strategy an ensemble surrogate given as members (``combine="loss"``) is attacked on the mean
of its members' losses (:class:`decorr.attacks.losses._Classification`). The strategies here replace that:

- ``ens`` (Liu et al., ICLR 2017; TransferAttack's ``ens.py``): the classification objective is taken on
  the members' mean logits. TransferAttack's ``EnsembleModel`` averages logits ("mean" mode); Liu et al.
  averaged the members' softmax outputs.
- ``svre`` (Xiong et al., CVPR 2022, "Stochastic variance reduced ensemble adversarial attack"): the
  gradient an optimizer receives is the result of an inner loop of variance-reduced steps, each using
  one randomly chosen member (below), with the ensemble's loss on mean logits as in the paper and
  TransferAttack's ``svre.py``.

SVRE at the outer iterate ``x_t`` (Algorithm 1 of the paper): ``g_ens`` = the ensemble's gradient at
``x_t``; ``x~_0 = x_t``, ``G~_0 = 0``; for ``m < M``: pick member ``k`` uniformly,
``g_m = grad J_k(x~_m) - (grad J_k(x_t) - g_ens)``, ``G~_{m+1} = mu * G~_m + g_m / ||g_m||_1``,
``x~_{m+1}`` = a step of ``beta`` along ``G~_{m+1}`` (projected onto the eps-ball, clipped to [0, 1]).
The optimizer receives ``G~_M``; with the default MI-FGSM it does ``G_{t+1} = mu * G_t + G~_M / ||G~_M||_1``,
the paper's outer update. Defaults as TransferAttack: ``M = 4 K`` (K members), ``beta`` = the outer step,
``mu`` = 1. ``grad J_k(x_t)`` is computed once per member and outer step (TransferAttack recomputes it
at every inner step; the same value unless an input transformation is random).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from decorr.attacks._common import normalise_l1
from decorr.attacks.base import Context, EnsembleStrategy
from decorr.attacks.registry import register_attack
from decorr.config import opt

__all__ = ["ENS", "SVRE", "mean_logits"]


def mean_logits(ctx: Context, x: Tensor) -> Tensor:
    """The mean of the members' logits on ``x`` (one member at a time, to hold one output at once)."""
    members = ctx.source.members
    total: Tensor | int = 0
    for member in members:
        total = total + member(x)
    return total / len(members)  # type: ignore[return-value]


@register_attack("ens")
@dataclass(frozen=True)
class ENS(EnsembleStrategy):
    """Ensemble attack on the members' mean logits (Liu et al. 2017, TransferAttack's ``ens``: MI-FGSM,
    decay 1, eps/10 steps)."""

    def logits(self, ctx: Context, x: Tensor) -> Tensor:
        return mean_logits(ctx, x)


@register_attack("svre")
@dataclass(frozen=True)
class SVRE(EnsembleStrategy):
    """SVRE (Xiong et al. 2022): variance-reduced inner updates over randomly chosen members (module
    docstring); on MI-FGSM, as the paper's SVRE-MI-FGSM and TransferAttack's ``svre``."""

    inner_steps: int | None = opt(None, "inner updates per step (default 4 x the number of members)",
                                  flag="--svre-inner-steps")
    inner_step_size: float | None = opt(None, "inner step in pixel units (default the attack's step)",
                                        flag="--svre-inner-step-size")
    inner_decay: float = opt(1.0, "momentum decay of the inner updates (SVRE: 1.0)", flag="--svre-inner-decay")

    def check(self) -> None:
        steps = self.inner_steps
        if steps is not None and not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
            self.fail("inner_steps", f"must be an integer >= 1 (SVRE: 4 x members), got {steps!r}")
        size = self.inner_step_size
        if size is not None and not (isinstance(size, (int, float)) and not isinstance(size, bool) and size > 0
                                     and size < float("inf")):
            self.fail("inner_step_size", f"must be a positive number (pixel units), got {size!r}")
        decay = self.inner_decay
        if not (isinstance(decay, (int, float)) and not isinstance(decay, bool) and decay >= 0):
            self.fail("inner_decay", f"must be >= 0 (SVRE uses 1.0), got {decay!r}")

    def logits(self, ctx: Context, x: Tensor) -> Tensor:
        return mean_logits(ctx, x)

    def gradient(self, ctx: Context, point: Tensor) -> Tensor:
        count = ctx.member_count()
        steps = self.inner_steps if self.inner_steps is not None else 4 * count
        step = self.inner_step_size * ctx.scale if self.inner_step_size is not None else ctx.step_size
        point = point.detach()
        ensemble = ctx.raw_gradient(point)
        at_point: dict[int, Tensor] = {}
        inner = point
        accumulated = torch.zeros_like(point)
        for _ in range(steps):
            k = int(ctx.randint(0, count).item())
            member_grad = ctx.raw_gradient(inner, member=k)
            if k not in at_point:
                at_point[k] = ctx.raw_gradient(point, member=k)
            reduced = member_grad - (at_point[k] - ensemble)
            accumulated = normalise_l1(reduced) + self.inner_decay * accumulated
            inner = ctx.update(inner, accumulated, step=step)
        return accumulated
