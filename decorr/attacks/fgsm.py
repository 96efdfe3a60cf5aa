"""FGSM (Goodfellow et al. 2015) and its L2 counterpart (fast gradient method)."""

from __future__ import annotations

from torch import Tensor

from decorr.attacks._common import Norm
from decorr.attacks.losses import LossFn
from decorr.attacks.pgd import pgd


def fgsm(loss_fn: LossFn, x: Tensor, y: Tensor, *, eps: float, norm: Norm = "linf") -> Tensor:
    """One step of size ``eps``: ``clip(x + eps * sign(g))`` (Linf) or ``clip(x + eps * g / ||g||_2)``
    per sample (L2), g the gradient of ``loss_fn(x, y)`` w.r.t. ``x``. Returns a detached tensor.

    This is single-step PGD from ``x`` with step ``eps``; the projection it adds changes nothing but
    float rounding (agrees with torchattacks' FGSM to ~1e-7).
    """
    return pgd(loss_fn, x, y, eps=eps, steps=1, step_size=eps, norm=norm, random_start=False)
