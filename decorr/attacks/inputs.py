"""Input transformations of the suite: DI (dim), TI (tim); SI, Admix, SSM and BSR (sim, admix, ssm, bsr).

An input transformation turns the point the gradient is taken at into copies (random or deterministic
transformations of it); the optimizer receives the mean of their gradients (:meth:`Context.raw_gradient`).
Transformations combine in the order written (``dim+sim``: every copy of SI is taken of DI's output).
TI acts on the gradient instead: it smooths it with a Gaussian kernel, channel by channel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from torch import Tensor

from decorr.attacks.base import Context, GradientTransform, InputTransform
from decorr.attacks.registry import register_attack
from decorr.attacks.transforms import gaussian_kernel, input_diversity, smooth_gradient
from decorr.config import opt

__all__ = ["DIM", "KernelSmoothing", "TIM"]


@register_attack("dim")
@dataclass(frozen=True)
class DIM(InputTransform):
    """DI (Xie et al. 2019): with probability ``prob`` the model sees a randomly resized and zero-padded
    copy (``resize_rate`` < 1 shrinks and pads back to the input size, as torchattacks; > 1 enlarges and
    pads to ``rate * size``, as the DI paper on 299-pixel images); one draw per batch."""

    prob: float = opt(0.5, "probability of transforming the input (DI: 0.5)", flag="--dim-prob")
    resize_rate: float = opt(0.9, "resize range: [rate * size, size) for rate < 1 (torchattacks' 0.9)",
                             flag="--dim-resize-rate")

    def check(self) -> None:
        if not (isinstance(self.prob, (int, float)) and 0 <= self.prob <= 1):
            self.fail("prob", f"is a probability in [0, 1] (DI uses 0.5), got {self.prob!r}")
        if not (isinstance(self.resize_rate, (int, float)) and self.resize_rate > 0 and self.resize_rate != 1):
            self.fail("resize_rate", f"must be positive and not 1 (e.g. 0.9 or 1.1), got {self.resize_rate!r}")

    def expand(self, copies: list[Tensor], ctx: Context) -> list[Tensor]:
        return [input_diversity(c, prob=self.prob, resize_rate=self.resize_rate, generator=ctx.generator)
                for c in copies]


@functools.lru_cache(maxsize=16)
def _kernel(size: int, nsig: float) -> Tensor:
    return gaussian_kernel(size, nsig)


@register_attack("tim")
@dataclass(frozen=True)
class TIM(GradientTransform):
    """TI (Dong et al. 2019): the gradient convolved with a ``kernel`` x ``kernel`` Gaussian spanning
    ``nsig`` standard deviations each way (TI's best setting on ImageNet: 15, 3)."""

    kernel: int = opt(15, "Gaussian kernel size, odd (TI: 15 on 299-pixel images)", flag="--ti-kernel")
    nsig: float = opt(3.0, "the kernel spans +-nsig standard deviations (TI: 3)", flag="--ti-nsig")

    def check(self) -> None:
        if not (isinstance(self.kernel, int) and not isinstance(self.kernel, bool) and self.kernel >= 1
                and self.kernel % 2 == 1):
            self.fail("kernel", f"size must be an odd positive integer, got {self.kernel!r}")
        if not (isinstance(self.nsig, (int, float)) and self.nsig > 0):
            self.fail("nsig", f"must be positive, got {self.nsig!r}")

    def apply(self, grad: Tensor, ctx: Context) -> Tensor:
        return smooth_gradient(grad, _kernel(self.kernel, float(self.nsig)))


@dataclass(frozen=True)
class KernelSmoothing(GradientTransform):
    """The gradient convolved with a given (k, k) or (C, 1, k, k) kernel (not registered: the functional
    :func:`decorr.attacks.pgd` takes a kernel tensor)."""

    name = "kernel"
    kernel_tensor: Tensor = None  # type: ignore[assignment]

    def apply(self, grad: Tensor, ctx: Context) -> Tensor:
        return smooth_gradient(grad, self.kernel_tensor)
