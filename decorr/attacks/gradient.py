"""Gradient attacks, the optimizers of the suite: FGSM, I-FGSM, PGD, MI-FGSM, NI-FGSM, VMI-FGSM, VNI-FGSM.

All step along the sign of the gradient (Linf) or its per-sample unit L2 direction, then project onto
the eps-ball around the clean image and clip to [0, 1] (torchattacks' order, so float results agree).
Momentum methods accumulate ``g_t = decay * g_{t-1} + grad / mean|grad|`` per sample (MI-FGSM; the mean
absolute value is the L1 norm over the sample size, a factor common to every sample and step, as in
torchattacks and TransferAttack). ``step_size`` None means ``eps / steps`` (the I-FGSM and MI-FGSM papers'
alpha = eps / T, TransferAttack's 1.6/255 for 16/255 in 10 steps).

- ``fgsm``: one step of size eps from the clean image (Goodfellow et al. 2015).
- ``ifgsm``: ``steps`` signed steps from the clean image (Kurakin et al. 2017).
- ``pgd``: from a random point of the ball (Madry et al. 2018); decorr's default protocol (P1): 40 steps
  of 3/255; ``momentum`` > 0 makes it DVERGE's momentum PGD.
- ``mifgsm``: momentum (Dong et al. 2018), decay 1.0.
- ``nifgsm``: Nesterov's look-ahead: the gradient at ``x + alpha * decay * g`` (Lin et al. 2020).
- ``vmifgsm`` / ``vnifgsm``: variance tuning (Wang & He 2021): the gradient plus ``v``, the mean gradient
  at ``neighbors`` points drawn uniformly in a ``beta * eps`` cube around the iterate, minus the
  gradient there, from the previous step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from decorr.attacks._common import normalise_l1
from decorr.attacks.base import Context, Optimizer
from decorr.attacks.registry import register_attack
from decorr.config import opt

__all__ = ["FGSM", "IFGSM", "MIFGSM", "NIFGSM", "PGD", "VMIFGSM", "VNIFGSM"]

_STEPS = "iterations"
_STEP = "step in pixel units (default eps / steps)"
_START = "start at a random point of the eps-ball"


@register_attack("fgsm")
@dataclass(frozen=True)
class FGSM(Optimizer):
    """One signed (Linf) or normalised (L2) gradient step of size eps from the clean image."""

    steps: ClassVar[int] = 1
    step_size: ClassVar[None] = None
    random_start: ClassVar[bool] = False

    def run(self, ctx: Context) -> Tensor:
        x_adv = ctx.start()
        return ctx.update(x_adv, ctx.gradient(x_adv))


@dataclass(frozen=True)
class _Iterative(Optimizer):
    def run(self, ctx: Context) -> Tensor:
        x_adv = ctx.start()
        for _ in range(ctx.steps):
            x_adv = ctx.update(x_adv, ctx.gradient(x_adv))
        return x_adv


@register_attack("ifgsm")
@dataclass(frozen=True)
class IFGSM(_Iterative):
    """I-FGSM / BIM: signed steps from the clean image."""

    steps: int = opt(10, _STEPS, flag="--steps")
    step_size: float | None = opt(None, _STEP, flag="--step-size")
    random_start: bool = opt(False, _START, flag="--random-start")


@register_attack("pgd")
@dataclass(frozen=True)
class PGD(Optimizer):
    """PGD from a random start; with ``momentum`` > 0 the MI update (DVERGE's momentum PGD)."""

    steps: int = opt(40, _STEPS, flag="--steps")
    step_size: float | None = opt(3 / 255, "step in pixel units (None: eps / steps)", flag="--step-size")
    random_start: bool = opt(True, _START, flag="--random-start")
    momentum: float = opt(0.0, "momentum decay of PGD (0: plain PGD; MI uses 1.0)", flag="--momentum")

    def check(self) -> None:
        super().check()
        if not (isinstance(self.momentum, (int, float)) and self.momentum >= 0):
            self.fail("momentum", f"must be >= 0 (MI uses 1.0), got {self.momentum!r}")

    def run(self, ctx: Context) -> Tensor:
        x_adv = ctx.start()
        accumulated = torch.zeros_like(x_adv)
        for _ in range(ctx.steps):
            grad = ctx.gradient(x_adv)
            if self.momentum > 0:
                grad = normalise_l1(grad) + self.momentum * accumulated
                accumulated = grad
            x_adv = ctx.update(x_adv, grad)
        return x_adv


@dataclass(frozen=True)
class _Momentum(Optimizer):
    """MI's update; subclasses choose where the gradient is taken (``nesterov``) and add variance tuning."""

    nesterov: ClassVar[bool] = False
    variance: ClassVar[bool] = False
    steps: int = opt(10, _STEPS, flag="--steps")
    step_size: float | None = opt(None, _STEP, flag="--step-size")
    random_start: bool = opt(False, _START, flag="--random-start")
    decay: float = opt(1.0, "momentum decay (MI-FGSM: 1.0)", flag="--decay")

    def check(self) -> None:
        super().check()
        decay = self.decay
        if not (isinstance(decay, (int, float)) and not isinstance(decay, bool) and decay >= 0):
            self.fail("decay", f"must be >= 0 (MI-FGSM uses 1.0), got {decay!r}")
        if self.variance:
            beta, neighbors = getattr(self, "beta"), getattr(self, "neighbors")
            if not (isinstance(beta, (int, float)) and beta >= 0):
                self.fail("beta", f"must be >= 0 (VMI uses 1.5), got {beta!r}")
            if not (isinstance(neighbors, int) and neighbors >= 1):
                self.fail("neighbors", f"must be an integer >= 1 (VMI uses 20), got {neighbors!r}")

    def run(self, ctx: Context) -> Tensor:
        decay = getattr(self, "decay")
        x_adv = ctx.start()
        momentum = torch.zeros_like(x_adv)
        variance = torch.zeros_like(x_adv)
        for _ in range(ctx.steps):
            point = x_adv + ctx.step_size * decay * momentum if self.nesterov else x_adv
            grad = ctx.gradient(point)
            tuned = grad + variance if self.variance else grad
            momentum = normalise_l1(tuned) + decay * momentum
            if self.variance:
                variance = self._neighbour_gradient(ctx, x_adv) - grad
            x_adv = ctx.update(x_adv, momentum)
        return x_adv

    def _neighbour_gradient(self, ctx: Context, x_adv: Tensor) -> Tensor:
        """Mean gradient at ``neighbors`` points uniform in the ``beta * eps`` cube around ``x_adv``."""
        radius = getattr(self, "beta") * ctx.eps
        total: Tensor | int = 0
        for _ in range(getattr(self, "neighbors")):
            if ctx.generator is None:  # torchattacks' draws: randn_like, then uniform_ in place
                noise = torch.randn_like(x_adv).uniform_(-radius, radius)
            else:
                noise = ctx.uniform(x_adv.shape, -radius, radius)
            total = total + ctx.gradient(x_adv.detach() + noise)
        return total / getattr(self, "neighbors")  # type: ignore[operator]


@dataclass(frozen=True)
class _VarianceTuned(_Momentum):
    """The variance-tuning settings (Wang & He 2021) shared by VMI and VNI."""

    variance = True
    beta: float = opt(1.5, "variance tuning: neighbours within beta * eps (VMI: 1.5)", flag="--variance-beta")
    neighbors: int = opt(20, "variance tuning: neighbours per step (VMI: 20)", flag="--variance-neighbors")


@register_attack("mifgsm")
@dataclass(frozen=True)
class MIFGSM(_Momentum):
    """MI-FGSM (Dong et al. 2018)."""


@register_attack("nifgsm")
@dataclass(frozen=True)
class NIFGSM(_Momentum):
    """NI-FGSM (Lin et al. 2020): the gradient at the Nesterov look-ahead point."""

    nesterov = True


@register_attack("vmifgsm")
@dataclass(frozen=True)
class VMIFGSM(_VarianceTuned):
    """VMI-FGSM (Wang & He 2021): MI-FGSM with variance tuning."""


@register_attack("vnifgsm")
@dataclass(frozen=True)
class VNIFGSM(_VarianceTuned):
    """VNI-FGSM (Wang & He 2021): NI-FGSM with variance tuning."""

    nesterov = True
