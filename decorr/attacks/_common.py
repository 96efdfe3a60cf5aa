"""What every gradient attack shares: checks, random starts, steps and projections per norm.

Conventions follow torchattacks (PGD, PGDL2) so that results agree with it to float rounding:
step, then project the perturbation onto the eps-ball, then clip to [0, 1].
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from decorr.errors import DecorrError

#: ``loss_fn(x_adv, y) -> scalar``: what an attack maximises (``x_adv`` in pixel units [0, 1]).
LossFn = Callable[[Tensor, Tensor], Tensor]
Norm = Literal["linf", "l2"]
NORMS = ("linf", "l2")

#: Added to per-sample gradient norms before dividing (torchattacks PGDL2's ``eps_for_division``).
EPS_FOR_DIVISION = 1e-10


def check_attack_inputs(x: Tensor, y: Tensor, *, eps: float, norm: str) -> None:
    if norm not in NORMS:
        raise DecorrError(f"unknown attack norm {norm!r}; use 'linf' or 'l2'")
    if not eps >= 0:
        raise DecorrError(f"attack epsilon must be >= 0 (pixel units), got {eps}")
    if x.dim() < 2:
        raise DecorrError(f"attack inputs must be a batch (N, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DecorrError(f"attack inputs must be floating point pixels in [0, 1], got {x.dtype}")
    if y.shape[:1] != x.shape[:1]:
        raise DecorrError(f"attack got {x.shape[0]} inputs but {y.shape[0] if y.dim() else 0} labels")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise DecorrError(
            "attack inputs must be pixels in [0, 1]; put any normalisation inside the model "
            "(decorr.models.Normalize)"
        )


def per_sample_norm(t: Tensor) -> Tensor:
    """L2 norm of each sample, shaped (N, 1, ..., 1) to broadcast against ``t``."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def random_start(x: Tensor, *, eps: float, norm: Norm, generator: torch.Generator | None) -> Tensor:
    """A random point of the eps-ball around ``x``, clipped to [0, 1].

    Linf: uniform in the cube. L2: uniform direction and a radius uniform in [0, eps] (torchattacks
    PGDL2); this is not uniform over the ball's volume, which in high dimension would put almost every
    start on the sphere. Draws come from ``generator`` (on its own device, so a CPU generator gives
    the same start on any device) or, without one, from the global RNG exactly as torchattacks draws.
    """
    device = generator.device if generator is not None else x.device
    if norm == "linf":
        delta = torch.empty(x.shape, dtype=x.dtype, device=device).uniform_(-eps, eps, generator=generator)
    else:
        delta = torch.empty(x.shape, dtype=x.dtype, device=device).normal_(generator=generator)
        length = per_sample_norm(delta)
        radius = torch.zeros_like(length).uniform_(0, 1, generator=generator)
        delta *= radius / length * eps
    return torch.clamp(x + delta.to(x.device), min=0, max=1)


def normalise_l1(grad: Tensor) -> Tensor:
    """``grad`` divided by its per-sample mean absolute value, for momentum (MI-FGSM).

    MI divides by the L1 norm; the mean is that norm over the sample size d, a factor common to every
    sample and step that changes neither sign steps nor L2-normalised ones (torchattacks divides by the
    mean too). Zero gradients stay zero instead of becoming NaN.
    """
    scale = grad.abs().mean(dim=tuple(range(1, grad.dim())), keepdim=True)
    return grad / torch.where(scale > 0, scale, torch.ones_like(scale))


def step_direction(grad: Tensor, norm: Norm) -> Tensor:
    """Steepest ascent direction of unit size in ``norm``: sign (Linf) or g / ||g||_2 per sample (L2)."""
    if norm == "linf":
        return grad.sign()
    return grad / (per_sample_norm(grad) + EPS_FOR_DIVISION)


def project(delta: Tensor, *, eps: float, norm: Norm) -> Tensor:
    """Project each sample's perturbation onto its own eps-ball."""
    if norm == "linf":
        return torch.clamp(delta, min=-eps, max=eps)
    length = per_sample_norm(delta)
    # min(1, eps / ||delta||) as torchattacks; the floor only matters for a zero delta with eps = 0.
    factor = torch.clamp(eps / torch.clamp(length, min=1e-12), max=1.0)
    return delta * factor


def input_gradient(loss_fn: LossFn, x_in: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
    """d loss / d x_adv, w.r.t. the input only, so nothing accumulates in the models' ``.grad``."""
    loss = loss_fn(x_in, y)
    if loss.dim() != 0:
        raise DecorrError(
            f"the attack's loss function must return a scalar, got shape {tuple(loss.shape)}; "
            "reduce it with .mean() or .sum()"
        )
    (grad,) = torch.autograd.grad(loss, x_adv)
    return grad
