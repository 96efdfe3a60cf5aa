"""Transferability tricks that act on the input or the gradient: DI (input diversity), TI (smoothing),
and the image operations of SSM and BSR (orthonormal 2-D DCT, rotation).

DI and TI follow the authors' code and torchattacks (DIFGSM, TIFGSM), so that with the global RNG
(``generator=None``) the random draws are the same as torchattacks' for square images.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from decorr.errors import DecorrError


def input_diversity(
    x: Tensor, *, prob: float, resize_rate: float = 0.9, generator: torch.Generator | None = None
) -> Tensor:
    """DI (Xie et al. 2019): with probability ``prob``, resize to a random size and zero-pad at random.

    ``resize_rate < 1`` (torchattacks' default 0.9): shrink to a side in ``[int(H * rate), H)`` and pad
    back to ``H``, so the model sees its usual input size (needed by fixed-size models such as
    flatten-then-linear ones). ``resize_rate > 1`` (the DI paper, 1.1 for 299-pixel ImageNet):
    enlarge to a side in ``[H, int(H * rate))`` and pad to ``int(H * rate)``; the model must accept
    the larger input. One draw for the whole batch, as in the paper's and torchattacks' code.
    """
    if x.dim() != 4:
        raise DecorrError(f"input diversity needs image batches (N, C, H, W), got shape {tuple(x.shape)}")
    if not 0.0 <= prob <= 1.0:
        raise DecorrError(f"input diversity probability must be in [0, 1], got {prob}")
    height, width = x.shape[-2:]
    low, high = int(height * resize_rate), height
    if resize_rate > 1:
        low, high = height, int(height * resize_rate)
    if low < 1 or low >= high:
        raise DecorrError(
            f"input diversity resize rate {resize_rate} gives no size range for {height}-pixel images; "
            "use a rate further from 1 (e.g. 0.9)"
        )
    device = generator.device if generator is not None else torch.device("cpu")
    side = int(torch.randint(low, high, (1,), dtype=torch.int32, generator=generator, device=device))
    # Non-square images keep their aspect ratio; for square ones this is torchattacks' draw exactly.
    out_width = width if resize_rate < 1 else int(width * resize_rate)
    side_w = side if height == width else min(max(round(side * width / height), 1), out_width - 1)
    rem_h, rem_w = high - side, out_width - side_w
    pad_top = int(torch.randint(0, rem_h, (1,), dtype=torch.int32, generator=generator, device=device))
    pad_left = int(torch.randint(0, rem_w, (1,), dtype=torch.int32, generator=generator, device=device))
    apply = bool(torch.rand(1, generator=generator, device=device) < prob)
    if not apply:
        return x
    resized = F.interpolate(x, size=[side, side_w], mode="bilinear", align_corners=False)
    return F.pad(resized, [pad_left, rem_w - pad_left, pad_top, rem_h - pad_top], value=0.0)


def gaussian_kernel(size: int, nsig: float = 3.0) -> Tensor:
    """TI's Gaussian kernel (Dong et al. 2019 code, torchattacks' ``gkern``), shape (size, size), sum 1.

    The ``size`` points span ``[-nsig, nsig]`` standard deviations, so sigma = (size - 1) / (2 nsig)
    pixels; the TI paper's best setting is size 15, nsig 3.
    """
    if size < 1:
        raise DecorrError(f"translation kernel size must be a positive integer, got {size}")
    from scipy import stats

    points = np.linspace(-nsig, nsig, size)
    kernel_1d = stats.norm.pdf(points)
    kernel = np.outer(kernel_1d, kernel_1d)
    # float32 first, as torchattacks does, so that float32 attacks match it bit for bit.
    return torch.from_numpy((kernel / kernel.sum()).astype(np.float32))


def smooth_gradient(grad: Tensor, kernel: Tensor) -> Tensor:
    """TI: convolve each channel of ``grad`` (N, C, H, W) with ``kernel`` (k, k) or (C, 1, k, k)."""
    if grad.dim() != 4:
        raise DecorrError(
            f"translation invariance needs image batches (N, C, H, W), got {tuple(grad.shape)}"
        )
    channels = grad.shape[1]
    if kernel.dim() == 2:
        kernel = kernel.expand(channels, 1, *kernel.shape)
    if kernel.dim() != 4 or kernel.shape[:2] != (channels, 1):
        raise DecorrError(
            f"translation kernel must have shape (k, k) or ({channels}, 1, k, k), got {tuple(kernel.shape)}"
        )
    return F.conv2d(grad, kernel.to(grad), padding="same", groups=channels)


@functools.lru_cache(maxsize=16)
def _dct_matrix_cpu(size: int) -> Tensor:
    k = torch.arange(size, dtype=torch.float64)[:, None]
    n = torch.arange(size, dtype=torch.float64)[None, :]
    matrix = torch.cos(math.pi * (2 * n + 1) * k / (2 * size)) * math.sqrt(2.0 / size)
    matrix[0] /= math.sqrt(2.0)
    return matrix


def dct_matrix(size: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """The orthonormal DCT-II matrix D (size x size): ``D @ v`` is ``scipy.fft.dct(v, norm="ortho")`` and
    ``D.T`` is its inverse (built in float64, then cast)."""
    return _dct_matrix_cpu(size).to(dtype=dtype, device=device)


def dct_2d(x: Tensor) -> Tensor:
    """Orthonormal 2-D DCT-II over the last two dimensions (H, W) of ``x``, each channel on its own:
    ``D_H x D_W^T`` (``scipy.fft.dctn(x, axes=(-2, -1), norm="ortho")``)."""
    rows = dct_matrix(x.shape[-2], dtype=x.dtype, device=x.device)
    cols = dct_matrix(x.shape[-1], dtype=x.dtype, device=x.device)
    return rows @ x @ cols.T


def idct_2d(coefficients: Tensor) -> Tensor:
    """The inverse of :func:`dct_2d`: ``D_H^T X D_W`` (orthonormal, so the transpose)."""
    rows = dct_matrix(coefficients.shape[-2], dtype=coefficients.dtype, device=coefficients.device)
    cols = dct_matrix(coefficients.shape[-1], dtype=coefficients.dtype, device=coefficients.device)
    return rows.T @ coefficients @ cols


def rotate(x: Tensor, degrees: float) -> Tensor:
    """``x`` (N, C, H, W) rotated counter-clockwise by ``degrees`` about its centre, same size, bilinear
    (torchvision's ``rotate`` with ``fill=None``): output pixels whose source lies outside the image are
    0, and those within half a pixel of the edge blend with that 0. Differentiable in ``x``."""
    if degrees == 0 or x.numel() == 0:
        return x
    height, width = x.shape[-2:]
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    # Each output pixel samples the input at the output position rotated back (clockwise on screen, y
    # pointing down), in affine_grid's coordinates normalised per axis, hence the aspect-ratio factors.
    theta = torch.tensor([[cos, -sin * height / width, 0.0], [sin * width / height, cos, 0.0]],
                         dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
