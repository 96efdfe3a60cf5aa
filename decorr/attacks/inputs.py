"""Input transformations of the suite: DI (dim), TI (tim); SI, Admix, SSM and BSR (sim, admix, ssm, bsr).

An input transformation turns the point the gradient is taken at into copies (random or deterministic
transformations of it); the optimizer receives the mean of their gradients (:meth:`Context.raw_gradient`).
Transformations combine in the order written (``dim+sim``: every copy of SI is taken of DI's output).
TI acts on the gradient instead: it smooths it with a Gaussian kernel, channel by channel.

Every one of them names no optimizer of its own and so runs on MI-FGSM (decay 1.0, 10 steps of eps/10,
no random start), as TransferAttack builds each of DIM, TIM, SIM, Admix, SSM and BSR on its MIFGSM;
the labels of every copy are the batch's own.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from decorr.attacks.base import Context, GradientTransform, InputTransform
from decorr.attacks.registry import register_attack
from decorr.attacks.transforms import dct_2d, gaussian_kernel, idct_2d, input_diversity, rotate, smooth_gradient
from decorr.config import opt
from decorr.errors import DecorrError

__all__ = ["Admix", "BSR", "DIM", "KernelSmoothing", "SIM", "SSM", "TIM"]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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


@register_attack("sim")
@dataclass(frozen=True)
class SIM(InputTransform):
    """SI (Lin et al. 2020): ``scales`` copies ``x / 2^i``, i = 0 .. scales - 1 (the paper's and
    TransferAttack's m = 5). ``nifgsm+sim`` is the paper's SI-NI-FGSM; plain ``sim`` runs on MI-FGSM, as
    TransferAttack's SIM."""

    scales: int = opt(5, "number of scaled copies x / 2^i (SI: 5)", flag="--sim-scales")

    def check(self) -> None:
        if not _is_count(self.scales):
            self.fail("scales", f"must be an integer >= 1 (SI uses 5), got {self.scales!r}")

    def expand(self, copies: list[Tensor], ctx: Context) -> list[Tensor]:
        return [copy / 2**i for copy in copies for i in range(self.scales)]


@register_attack("admix")
@dataclass(frozen=True)
class Admix(InputTransform):
    """Admix (Wang et al. 2021): ``mixes`` images mixed in with weight ``strength``, each at ``scales`` SI
    scales: copies ``(x + strength * x[perm_j]) / 2^i`` (paper and TransferAttack: m1 = 5, m2 = 3,
    eta = 0.2; 15 copies). As TransferAttack and the authors' code, the admixed images are the batch's own
    (current iterates) in a random order, one permutation per mix (an image may meet itself or its own
    class; the paper speaks of images of other categories), held constant in the gradient (the paper's
    gradient is with respect to x alone), and every copy keeps its image's label."""

    scales: int = opt(5, "SI scales per admixed copy (Admix: m1 = 5)", flag="--admix-scales")
    mixes: int = opt(3, "images admixed per input (Admix: m2 = 3)", flag="--admix-mixes")
    strength: float = opt(0.2, "weight of the admixed image (Admix: eta = 0.2)", flag="--admix-strength")

    def check(self) -> None:
        if not _is_count(self.scales):
            self.fail("scales", f"must be an integer >= 1 (Admix uses 5), got {self.scales!r}")
        if not _is_count(self.mixes):
            self.fail("mixes", f"must be an integer >= 1 (Admix uses 3), got {self.mixes!r}")
        if not (_is_real(self.strength) and self.strength >= 0):
            self.fail("strength", f"must be a finite number >= 0 (Admix uses 0.2), got {self.strength!r}")

    def expand(self, copies: list[Tensor], ctx: Context) -> list[Tensor]:
        expanded = []
        for copy in copies:
            for _ in range(self.mixes):
                partner = copy[ctx.randperm(copy.shape[0]).to(copy.device)].detach()
                mixed = copy + self.strength * partner
                expanded.extend(mixed / 2**i for i in range(self.scales))
        return expanded


@register_attack("ssm")
@dataclass(frozen=True)
class SSM(InputTransform):
    """SSM, the spectrum simulation attack (Long et al. 2022): ``copies`` copies
    ``IDCT(DCT(x + xi) * M)`` with Gaussian noise ``xi`` of std ``sigma`` and a mask ``M`` uniform in
    ``[1 - rho, 1 + rho]`` per coefficient (both per pixel, channel and image), the DCT the orthonormal 2-D
    DCT-II over H and W of each channel (TransferAttack's unnormalised DCT gives the same copies: its
    scaling is per coefficient, as the mask, and its inverse undoes it). Paper and TransferAttack: N = 20,
    rho = 0.5, sigma = eps (16/255).

    As the authors' code and TransferAttack, each copy's gradient is taken with respect to the transformed
    image and used as the gradient at x (the transform's Jacobian taken as the identity);
    ``through_spectrum`` backpropagates through the mask instead (the exact derivative in x)."""

    copies: int = opt(20, "number of spectrum-transformed copies (SSM: 20)", flag="--ssm-copies")
    rho: float = opt(0.5, "the spectrum mask is uniform in [1 - rho, 1 + rho] (SSM: 0.5)", flag="--ssm-rho")
    sigma: float | None = opt(None, "std of the Gaussian noise, pixel units (None: eps, as SSM's 16/255)",
                              flag="--ssm-sigma")
    through_spectrum: bool = opt(False, "backpropagate through the spectrum transform (SSM's code: no)",
                                 flag="--ssm-through-spectrum")

    def check(self) -> None:
        if not _is_count(self.copies):
            self.fail("copies", f"must be an integer >= 1 (SSM uses 20), got {self.copies!r}")
        if not (_is_real(self.rho) and 0 <= self.rho <= 1):
            self.fail("rho", f"must be in [0, 1] (SSM uses 0.5), got {self.rho!r}")
        if self.sigma is not None and not (_is_real(self.sigma) and self.sigma >= 0):
            self.fail("sigma", f"must be a finite number >= 0 or None (eps), got {self.sigma!r}")

    def expand(self, copies: list[Tensor], ctx: Context) -> list[Tensor]:
        # eps as the caller gave it (for L2 before --l2-scale): the noise is per pixel.
        sigma = ctx.eps / ctx.scale if self.sigma is None else self.sigma
        expanded = []
        for copy in copies:
            if copy.dim() != 4:
                raise DecorrError(f"ssm needs image batches (N, C, H, W), got shape {tuple(copy.shape)}")
            for _ in range(self.copies):
                noise = ctx.normal(copy.shape, sigma)
                mask = ctx.uniform(copy.shape, 1 - self.rho, 1 + self.rho)
                if self.through_spectrum:
                    expanded.append(idct_2d(dct_2d(copy + noise) * mask))
                    continue
                with torch.no_grad():
                    spectral = idct_2d(dct_2d(copy + noise) * mask)
                # The transformed values, with the gradient passed straight to ``copy``.
                expanded.append(copy + (spectral - copy).detach())
        return expanded


@register_attack("bsr")
@dataclass(frozen=True)
class BSR(InputTransform):
    """BSR, block shuffle and rotation (Wang et al. 2024): ``copies`` copies, each the image cut into
    ``blocks`` x ``blocks`` blocks at random split points, shuffled, and rotated by random angles in
    ``[-max_angle, max_angle]`` degrees (TransferAttack, by the paper's authors: 20 copies, 3 blocks, 24
    degrees).

    The procedure is TransferAttack's: pick at random which axis (H or W) to cut first; cut it into
    ``blocks`` strips of random lengths (weights uniform in [1, 2], rounded, the largest absorbing the
    remainder) and shuffle them; rotate each strip by its own angle about its centre (bilinear; the corners
    rotated in from outside are 0), then cut it along the other axis at its own random points, shuffle
    those blocks and put everything back together. Each draw is shared by the whole batch, as there.
    """

    copies: int = opt(20, "number of shuffled and rotated copies (BSR: 20)", flag="--bsr-copies")
    blocks: int = opt(3, "blocks per side: the image is cut into blocks x blocks (BSR: 3)", flag="--bsr-blocks")
    max_angle: float = opt(24.0, "rotation angles are uniform in [-max_angle, max_angle] degrees (BSR: 24)",
                           flag="--bsr-max-angle")

    def check(self) -> None:
        if not _is_count(self.copies):
            self.fail("copies", f"must be an integer >= 1 (BSR uses 20), got {self.copies!r}")
        if not _is_count(self.blocks):
            self.fail("blocks", f"must be an integer >= 1 (BSR uses 3), got {self.blocks!r}")
        if not (_is_real(self.max_angle) and 0 <= self.max_angle <= 180):
            self.fail("max_angle", f"must be in [0, 180] degrees (BSR uses 24), got {self.max_angle!r}")

    def expand(self, copies: list[Tensor], ctx: Context) -> list[Tensor]:
        expanded = []
        for copy in copies:
            if copy.dim() != 4:
                raise DecorrError(f"bsr needs image batches (N, C, H, W), got shape {tuple(copy.shape)}")
            if min(copy.shape[-2:]) < self.blocks:
                raise DecorrError(f"bsr cannot cut {copy.shape[-2]}x{copy.shape[-1]} images into {self.blocks} "
                                  f"blocks per side; use --bsr-blocks {min(copy.shape[-2:])} or fewer")
            expanded.extend(self.shuffle_and_rotate(copy, ctx) for _ in range(self.copies))
        return expanded

    def shuffle_and_rotate(self, image: Tensor, ctx: Context) -> Tensor:
        """One BSR copy of ``image`` (N, C, H, W)."""
        first, second = (2, 3) if int(ctx.randint(0, 2)) == 0 else (3, 2)
        strips = []
        for strip in self._cut_and_shuffle(image, first, ctx):
            angle = float(ctx.uniform((1,), -self.max_angle, self.max_angle))
            strips.append(torch.cat(self._cut_and_shuffle(rotate(strip, angle), second, ctx), dim=second))
        return torch.cat(strips, dim=first)

    def _cut_and_shuffle(self, x: Tensor, dim: int, ctx: Context) -> list[Tensor]:
        length = x.shape[dim]
        weights = ctx.uniform((self.blocks,), 1.0, 2.0).cpu().double()
        sizes = torch.round(weights / weights.sum() * length).long()
        sizes[sizes.argmax()] += length - sizes.sum()
        pieces = x.split(sizes.tolist(), dim=dim)
        return [pieces[i] for i in ctx.randperm(self.blocks).tolist()]
