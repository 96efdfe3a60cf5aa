"""Accuracy and transfer rates (SPEC section 3) from predicted labels.

Metrics take label tensors, not models, so that adversarial examples are crafted once per source and
every target's predictions are computed once and reused by every metric.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from decorr.errors import DecorrError


@torch.no_grad()
def predict(
    model: nn.Module, x: Tensor, *, batch_size: int = 1000, device: torch.device | str | None = None
) -> Tensor:
    """Predicted labels (argmax of the logits) of ``model`` on ``x``, computed in batches.

    Batches run on ``device`` (default: where the model's parameters are); the labels come back on
    ``x``'s device. The model's train/eval mode is left as the caller set it.
    """
    if batch_size < 1:
        raise DecorrError(f"batch size must be >= 1, got {batch_size}")
    if device is None:
        tensor = next(iter(model.parameters()), None)
        if tensor is None:
            tensor = next(iter(model.buffers()), None)
        device = tensor.device if tensor is not None else x.device
    labels = [
        model(x[start : start + batch_size].to(device)).argmax(dim=1).to(x.device)
        for start in range(0, x.shape[0], batch_size)
    ]
    if not labels:
        return torch.empty(0, dtype=torch.long, device=x.device)
    return torch.cat(labels)


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise DecorrError(f"prediction and label tensors must have the same shape; got {listed}")


def accuracy(pred: Tensor, y: Tensor) -> float:
    """Fraction of ``pred == y``; NaN for no samples."""
    _check_same_shape(pred=pred, y=y)
    if pred.numel() == 0:
        return math.nan
    return (pred == y).double().mean().item()


def error_rate(pred: Tensor, y: Tensor) -> float:
    """Fraction of ``pred != y`` (an attack's success rate on adversarial inputs); NaN for no samples."""
    return 1.0 - accuracy(pred, y)


class TransferRate(NamedTuple):
    #: P(target wrong | source wrong); NaN when the source is never fooled.
    rate: float
    #: Samples on which the source model is fooled (the denominator).
    source_fooled: int
    #: Of those, samples on which the target is fooled too (the numerator).
    transferred: int


def transfer_rate(src_pred: Tensor, tgt_pred: Tensor, y: Tensor) -> TransferRate:
    """``T(src -> tgt) = P(f_tgt(x') != y | f_src(x') != y)`` over all samples (SPEC section 3).

    ``src_pred`` and ``tgt_pred`` are the two models' labels on the same adversarial examples
    crafted on the source, from correctly and incorrectly classified inputs alike.
    """
    _check_same_shape(src_pred=src_pred, tgt_pred=tgt_pred, y=y)
    source_fooled = src_pred != y
    count = int(source_fooled.sum())
    transferred = int((source_fooled & (tgt_pred != y)).sum())
    return TransferRate(transferred / count if count else math.nan, count, transferred)


def transfer_matrix(preds: Tensor, y: Tensor, *, source_preds: Tensor | None = None) -> Tensor:
    """Transfer rates between models: entry (i, j) = ``T(i -> j)``, float64, shape (K_src, K_tgt).

    ``preds[i, j]`` (shape (K_src, K_tgt, N)) holds model j's labels on the adversarial examples
    crafted on source i. Without ``source_preds`` the sources are the targets (K_src = K_tgt) and
    ``preds[i, i]`` says where source i is fooled; the diagonal then holds source i's own
    (white-box) error rate ``P(f_i(x'_i) != y)``, since ``T(i -> i)`` would trivially be 1.
    With ``source_preds`` (K_src, N), the sources' own labels on their examples, every entry is a
    transfer rate (sources and targets may differ). NaN where a source is never fooled.
    """
    if preds.dim() != 3:
        raise DecorrError(
            f"transfer_matrix needs predictions shaped (K_src, K_tgt, N), got {tuple(preds.shape)}"
        )
    n_src, n_tgt, n = preds.shape
    if y.shape != (n,):
        raise DecorrError(
            f"transfer_matrix got {n} predictions per model but labels of shape {tuple(y.shape)}"
        )
    diagonal_is_source = source_preds is None
    if source_preds is None:
        if n_src != n_tgt:
            raise DecorrError(
                f"transfer_matrix got {n_src} sources and {n_tgt} targets; pass source_preds "
                "(each source's labels on its own adversarial examples) when they differ"
            )
        source_preds = preds.diagonal(dim1=0, dim2=1).T
    if source_preds.shape != (n_src, n):
        raise DecorrError(
            f"source_preds must have shape ({n_src}, {n}), got {tuple(source_preds.shape)}"
        )
    source_fooled = (source_preds != y).double()  # (K_src, N)
    target_fooled = (preds != y).double()  # (K_src, K_tgt, N)
    count = source_fooled.sum(dim=1, keepdim=True)
    both = (target_fooled * source_fooled[:, None, :]).sum(dim=2)
    matrix = torch.where(count > 0, both / count.clamp(min=1), torch.full_like(both, math.nan))
    if diagonal_is_source:
        own = source_fooled.mean(dim=1) if n else torch.full((n_src,), math.nan, dtype=torch.float64)
        matrix.diagonal().copy_(own.to(matrix.device))
    return matrix


def pair_average(matrix: Tensor) -> dict[tuple[int, int], float]:
    """``{(i, j): (T(i -> j) + T(j -> i)) / 2}`` for every pair i < j: a pair's transfer rate.

    NaN in either direction gives NaN (a pair's figure needs both directions).
    """
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise DecorrError(f"pair_average needs a square transfer matrix, got shape {tuple(matrix.shape)}")
    k = matrix.shape[0]
    return {
        (i, j): 0.5 * (float(matrix[i, j]) + float(matrix[j, i])) for i in range(k) for j in range(i + 1, k)
    }


class GradientAlignment(NamedTuple):
    #: Per-sample cosine similarity of the two gradients (0 where either gradient is zero).
    cosine: Tensor
    #: Per-sample fraction of input coordinates where the two gradients' signs agree (what a
    #: sign-gradient Linf step shares with the other model's steepest-ascent step).
    sign_agreement: Tensor


def gradient_alignment(grad_a: Tensor, grad_b: Tensor) -> GradientAlignment:
    """How well two models' input gradients on the same samples agree, per sample (first dimension).

    Aligned loss gradients are the usual first-order account of why adversarial examples transfer
    (a step up one model's loss is a step up the other's), so this is the quantity SGM's decay is meant
    to raise. Inputs of shape (N, ...) are flattened per sample; results are float64, shape (N,).
    """
    if grad_a.shape != grad_b.shape:
        raise DecorrError(f"the two gradients must have the same shape; got {tuple(grad_a.shape)} and "
                          f"{tuple(grad_b.shape)}")
    if grad_a.dim() < 1:
        raise DecorrError("gradient_alignment needs gradients with a sample dimension, shape (N, ...)")
    a = grad_a.detach().reshape(len(grad_a), -1).double()
    b = grad_b.detach().reshape(len(grad_b), -1).double()
    norms = a.norm(dim=1) * b.norm(dim=1)
    cosine = torch.where(norms > 0, (a * b).sum(dim=1) / norms.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    sign_agreement = (a.sign() == b.sign()).double().mean(dim=1)
    return GradientAlignment(cosine, sign_agreement)
