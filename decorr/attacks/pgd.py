"""PGD (Madry et al. 2018) in Linf and L2, with the MI, DI and TI transferability tricks."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from decorr.attacks._common import (
    Norm,
    check_attack_inputs,
    input_gradient,
    normalise_l1,
    project,
    random_start as draw_random_start,
    step_direction,
)
from decorr.attacks.losses import LossFn
from decorr.attacks.transforms import gaussian_kernel, input_diversity as apply_input_diversity
from decorr.attacks.transforms import smooth_gradient
from decorr.errors import DecorrError


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
    input_diversity: float = 0.0,
    diversity_resize_rate: float = 0.9,
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
      resized and padded ``x_adv`` at each step (``transforms.input_diversity``, with
      ``diversity_resize_rate``); the paper uses 0.5.
    - ``translation_kernel`` (TI, Dong et al. 2019): convolve the gradient, channel by channel, with a
      kernel: an int ``k`` gives TI's Gaussian (``gaussian_kernel(k)``, sigma = (k - 1) / 6 pixels;
      the paper uses 15 on ImageNet), or pass a (k, k) or (C, 1, k, k) tensor.

    Randomness (start, DI) comes from ``generator`` when given, else from the global RNG (then the
    draws are torchattacks' draws). Models stay in whatever train/eval mode the caller set; gradients
    are taken even under ``torch.no_grad()``. Returns a detached tensor in [0, 1] within the ball.
    For SGM, run this inside ``with skip_gradient(model, gamma):``.
    """
    check_attack_inputs(x, y, eps=eps, norm=norm)
    if steps < 0:
        raise DecorrError(f"PGD steps must be >= 0, got {steps}")
    if not step_size >= 0:
        raise DecorrError(f"PGD step size must be >= 0 (pixel units), got {step_size}")
    if not momentum >= 0:
        raise DecorrError(f"momentum must be >= 0 (MI-FGSM uses 1.0), got {momentum}")
    if not 0.0 <= input_diversity <= 1.0:
        raise DecorrError(
            f"input_diversity is a probability in [0, 1] (DI uses 0.5), got {input_diversity}"
        )
    kernel = _translation_kernel(translation_kernel)

    x = x.detach()
    y = y.detach()
    x_adv = draw_random_start(x, eps=eps, norm=norm, generator=generator) if random_start else x.clone()
    accumulated = torch.zeros_like(x)
    for _ in range(steps):
        # enable_grad: callers often evaluate under torch.no_grad().
        with torch.enable_grad():
            x_adv.requires_grad_(True)
            x_in = x_adv
            if input_diversity > 0:
                x_in = apply_input_diversity(
                    x_adv, prob=input_diversity, resize_rate=diversity_resize_rate, generator=generator
                )
            grad = input_gradient(loss_fn, x_in, x_adv, y)
        if kernel is not None:
            grad = smooth_gradient(grad, kernel)
        if momentum > 0:
            grad = normalise_l1(grad) + momentum * accumulated
            accumulated = grad
        x_adv = x_adv.detach() + step_size * step_direction(grad, norm)
        delta = project(x_adv - x, eps=eps, norm=norm)
        x_adv = torch.clamp(x + delta, min=0, max=1).detach()
    return x_adv


def _translation_kernel(translation_kernel: int | Tensor | None) -> Tensor | None:
    if translation_kernel is None or isinstance(translation_kernel, Tensor):
        return translation_kernel
    if isinstance(translation_kernel, bool) or not isinstance(translation_kernel, int):
        raise DecorrError(
            f"translation_kernel must be an int kernel size or a tensor, got {translation_kernel!r}"
        )
    return gaussian_kernel(translation_kernel)


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

    Craft once per source model and epsilon, then evaluate every target on the same ``x_adv``.
    ``attack_kwargs`` (steps, step_size, norm, generator, ...) are shared by all epsilons; a
    ``generator``'s draws continue from one epsilon to the next.
    """
    return {float(eps): attack(loss_fn, x, y, eps=eps, **attack_kwargs) for eps in eps_list}
