"""The attacks as functions of a loss closure: :func:`pgd` (with MI/DI/TI), :func:`fgsm`, :func:`eps_sweep`.

They build the suite's :class:`~decorr.attacks.base.Attack` (``pgd`` with ``dim``/``kernel`` components) and
craft on ``Source(loss_fn=...)``: one implementation of every step, whichever way it is called. DVERGE's
feature distillation, TRS's smoothing batch and the DNA's evaluation call them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from decorr.attacks._common import Norm
from decorr.attacks.base import Attack, LossFn, Source
from decorr.attacks.gradient import FGSM, PGD
from decorr.attacks.inputs import DIM, KernelSmoothing, TIM
from decorr.errors import DecorrError

__all__ = ["eps_sweep", "fgsm", "pgd"]


def pgd(
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    norm: Norm = "linf",
    random_start: bool = True,
    momentum: float = 0.0,
    input_diversity: float | DIM = 0.0,
    translation_kernel: int | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient ascent on ``loss_fn`` within the ``norm`` ball of radius ``eps`` around ``x``.

    Each step: gradient of ``loss_fn(x_adv, y)`` w.r.t. ``x_adv`` only; TI smoothing; MI momentum;
    a step of ``step_size`` along the sign (Linf) or the per-sample unit L2 direction; projection of
    each sample onto its own ball; clipping to [0, 1]. The options combine freely:

    - ``random_start``: start at a random point of the ball (see ``_common.random_start``: uniform
      in the Linf cube; for L2 a uniform direction with a radius uniform in [0, eps], as torchattacks).
    - ``momentum`` (MI-FGSM, Dong et al. 2018): ``g_t = momentum * g_{t-1} + grad / ||grad||_1`` per
      sample, and the step follows ``g_t``. 1.0 is the MI paper's value; 0 is plain PGD.
    - ``input_diversity`` (DI, Xie et al. 2019): the probability of feeding the model a randomly
      resized and padded ``x_adv`` at each step (``transforms.input_diversity``); the paper uses 0.5.
      A :class:`~decorr.attacks.inputs.DIM` instead sets its resize rate too (``DIM(prob=1, resize_rate=1.25)``).
    - ``translation_kernel`` (TI, Dong et al. 2019): convolve the gradient, channel by channel, with a
      kernel: an int ``k`` gives TI's Gaussian (``gaussian_kernel(k)``, sigma = (k - 1) / 6 pixels;
      the paper uses 15 on ImageNet), or pass a (k, k) or (C, 1, k, k) tensor.

    Randomness (start, DI) comes from ``generator`` when given, else from the global RNG (then the
    draws are torchattacks' draws). Models stay in whatever train/eval mode the caller set; gradients
    are taken even under ``torch.no_grad()``. Returns a detached tensor in [0, 1] within the ball.
    For SGM, run this inside ``with skip_gradient(model, gamma):``.
    """
    if steps < 0:
        raise DecorrError(f"PGD steps must be >= 0, got {steps}")
    if not step_size >= 0:
        raise DecorrError(f"PGD step size must be >= 0 (pixel units), got {step_size}")
    if not momentum >= 0:
        raise DecorrError(f"momentum must be >= 0 (MI-FGSM uses 1.0), got {momentum}")
    diversity = input_diversity if isinstance(input_diversity, DIM) else None
    if diversity is None and not 0.0 <= input_diversity <= 1.0:
        raise DecorrError(f"input_diversity is a probability in [0, 1] (DI uses 0.5), got {input_diversity}")
    if steps == 0:
        return x.detach().clone() if not random_start else _start_only(x, eps, norm, generator)
    if diversity is None and input_diversity > 0:
        diversity = DIM(prob=input_diversity)
    inputs = (diversity,) if diversity is not None and diversity.prob > 0 else ()
    smoothing = (_smoothing(translation_kernel),) if translation_kernel is not None else ()
    optimizer = PGD(steps=steps, step_size=step_size if step_size > 0 else None, random_start=random_start,
                    momentum=momentum)
    if step_size == 0:  # a zero step: the iterate never moves (kept for API compatibility)
        return x.detach().clone() if not random_start else _start_only(x, eps, norm, generator)
    attack = Attack(optimizer=optimizer, inputs=inputs, gradient_transforms=smoothing)
    return attack.craft(Source(loss_fn=loss_fn), x, y, eps=eps, norm=norm, generator=generator)


def _start_only(x: Tensor, eps: float, norm: Norm, generator: torch.Generator | None) -> Tensor:
    from decorr.attacks._common import random_start as draw

    return draw(x.detach(), eps=eps, norm=norm, generator=generator)


def _smoothing(kernel: int | Tensor) -> TIM | KernelSmoothing:
    if isinstance(kernel, Tensor):
        return KernelSmoothing(kernel_tensor=kernel)
    if isinstance(kernel, bool) or not isinstance(kernel, int):
        raise DecorrError(f"translation_kernel must be an int kernel size or a tensor, got {kernel!r}")
    if kernel < 1:
        raise DecorrError(f"translation kernel size must be a positive integer, got {kernel}")
    return TIM(kernel=kernel) if kernel % 2 == 1 else KernelSmoothing(kernel_tensor=_even_kernel(kernel))


def _even_kernel(size: int) -> Tensor:
    from decorr.attacks.transforms import gaussian_kernel

    return gaussian_kernel(size)


def fgsm(loss_fn: LossFn, x: Tensor, y: Tensor, *, eps: float, norm: Norm = "linf") -> Tensor:
    """One step of size ``eps``: ``clip(x + eps * sign(g))`` (Linf) or ``clip(x + eps * g / ||g||_2)``
    per sample (L2), g the gradient of ``loss_fn(x, y)`` w.r.t. ``x``. Returns a detached tensor."""
    return Attack(optimizer=FGSM()).craft(Source(loss_fn=loss_fn), x, y, eps=eps, norm=norm)


def eps_sweep(
    attack: Callable[..., Tensor],
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    eps_list: Sequence[float],
    **attack_kwargs: Any,
) -> dict[float, Tensor]:
    """Run ``attack`` (``fgsm`` or ``pgd``) once per epsilon: ``{eps: x_adv}`` (foolbox-style sweep).

    ``attack_kwargs`` (steps, step_size, norm, generator, ...) are shared by all epsilons; a
    ``generator``'s draws continue from one epsilon to the next.
    """
    return {float(eps): attack(loss_fn, x, y, eps=eps, **attack_kwargs) for eps in eps_list}
