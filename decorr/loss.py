"""The correlation loss of Wiedeman & Wang (2022, Algorithm 1) and related measures.

The loss regresses the features ``z2`` of one model on the features ``z1`` of another (ordinary least
squares with an intercept) and penalises how much of ``z2`` is explained::

    L_corr = log(SStot + e) - log(SSres + e)       (about -log(1 - R^2))

The paper computes it with a pseudo-inverse and an N x N projection matrix; autograd then
differentiates an SVD. We compute the same number with one Householder QR of the centred ``z1`` and
write the gradient in closed form (the least-squares fit is optimal, so by the envelope theorem only the
explicit dependence on the data remains):

    dSSres/dZ2 = 2 r,   dSSres/dZ1 = -2 r beta^T,   dSStot/dZ2 = 2 (Z2 - mean)

with ``r`` the residual and ``beta`` the fitted coefficients. That is several times cheaper than the
paper's route (see ``benchmarks/correlation_loss.py``) and is exact, not an approximation.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from decorr.distributed import all_gather_with_grad, is_distributed
from decorr.errors import DecorrError

__all__ = [
    "BatchTooSmallError",
    "correlation_loss",
    "r_squared",
    "regression_sums",
    "pearson",
    "pca_pearson",
    "parameter_distance",
]


class BatchTooSmallError(DecorrError, ValueError):
    """The batch has too few samples for the regression to mean anything."""


def _flatten_float(z: torch.Tensor) -> torch.Tensor:
    z = z.reshape(z.shape[0], -1)
    # Reduced precision (bf16/fp16 under autocast) would wreck the factorisation: upcast.
    return z if z.dtype == torch.float64 else z.float()


def _check_batch(n: int, m1: int) -> None:
    if n <= m1 + 1:
        raise BatchTooSmallError(
            f"correlation loss needs more samples than features: batch of {n} for {m1} features "
            f"(plus the intercept); use a (global) batch of at least {m1 + 2} samples, or a narrower "
            f"feature layer"
        )


def _kept_qr(x_centred: torch.Tensor, z1: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Householder QR of the centred regressors with dependent columns dropped.

    Returns (a, tau, keep): LAPACK's compact form of the QR of ``x_centred[:, keep]``. A column is kept
    when its |R_jj| exceeds ``eta`` times the largest one. Centring first is the same as factorising
    [1, Z1] with the intercept first, so constant columns are dropped as dependent on the intercept.
    Exactly constant columns (dead ReLU units are common) are dropped before factorising: they would
    get R_jj = 0 anyway, and this usually saves a second factorisation.
    """
    varying = (z1.amax(dim=0) > z1.amin(dim=0)).nonzero().squeeze(1)
    a, tau = torch.geqrf(x_centred[:, varying])
    diag = a.diagonal().abs()
    largest = diag.max() if diag.numel() else diag.new_zeros(())
    kept_varying = diag > eta * largest
    columns = varying[kept_varying]
    if not bool(kept_varying.all()):
        a, tau = torch.geqrf(x_centred[:, columns])
    keep = torch.zeros(x_centred.shape[1], dtype=torch.bool, device=x_centred.device)
    keep[columns] = True
    return a, tau, keep


class _CorrelationLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z1: torch.Tensor, z2: torch.Tensor, eta: float, eps: float) -> torch.Tensor:  # type: ignore[override]
        n, m2 = z2.shape
        x = z1 - z1.mean(dim=0, keepdim=True)
        y = z2 - z2.mean(dim=0, keepdim=True)
        ss_tot = y.square().sum()
        a, tau, keep = _kept_qr(x, z1, eta)
        k = int(keep.sum())
        if k == 0:
            residual = y
            coefficients = y.new_zeros((0, m2))
        else:
            # Q^T y: the first k rows are the fitted coordinates, the rest the residual's.
            qty = torch.ormqr(a, tau, y, left=True, transpose=True)
            r_factor = a[:k].triu()
            coefficients = torch.linalg.solve_triangular(r_factor, qty[:k], upper=True)
            kept = x if k == x.shape[1] else x[:, keep]
            residual = torch.addmm(y, kept, coefficients, alpha=-1)
        ss_res = residual.square().sum()
        ctx.save_for_backward(y, residual, coefficients, keep, ss_tot, ss_res)
        ctx.eps = eps
        return torch.log(ss_tot + eps) - torch.log(ss_res + eps)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        y, residual, coefficients, keep, ss_tot, ss_res = ctx.saved_tensors
        eps = ctx.eps
        grad_z1 = grad_z2 = None
        scale_res = 2.0 / (ss_res + eps)
        if ctx.needs_input_grad[1]:
            grad_z2 = (y * (2.0 / (ss_tot + eps)) - residual * scale_res) * grad_out
        if ctx.needs_input_grad[0]:
            # The residual has zero column means, so centring z1 does not change this gradient.
            if bool(keep.all()):
                grad_z1 = (residual @ coefficients.T) * (scale_res * grad_out)
            else:
                grad_z1 = residual.new_zeros((residual.shape[0], keep.shape[0]))
                if coefficients.shape[0]:
                    grad_z1[:, keep] = (residual @ coefficients.T) * (scale_res * grad_out)
        return grad_z1, grad_z2, None, None


def _prepare(z1: torch.Tensor, z2: torch.Tensor, gather: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    if z1.shape[0] != z2.shape[0]:
        raise DecorrError(f"z1 and z2 must have the same batch size, got {z1.shape[0]} and {z2.shape[0]}")
    if gather is None:
        gather = is_distributed()
    if gather:
        z1, z2 = all_gather_with_grad(z1), all_gather_with_grad(z2)
    z1, z2 = _flatten_float(z1), _flatten_float(z2)
    if z1.dtype != z2.dtype:
        z1, z2 = z1.double(), z2.double()
    for name, z in (("z1", z1), ("z2", z2)):
        if z.shape[1] == 0:
            raise DecorrError(f"{name} has no features (shape {tuple(z.shape)}); pick a feature layer that outputs values")
    # One host read for both: NaN columns would otherwise be dropped as if constant, silently.
    if not bool(torch.isfinite(z1).all() & torch.isfinite(z2).all()):
        raise DecorrError("the features hold NaN or inf (a diverged model or bad inputs); the correlation loss "
                          "and R^2 are undefined: check the inputs and the model's weights")
    return z1, z2


def _check_constants(eta: float, eps: float | None) -> None:
    if not (isinstance(eta, (int, float)) and 0 <= eta < 1):
        raise DecorrError(f"eta (the QR pivot tolerance) must be in [0, 1), got {eta!r}")
    if eps is not None and not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise DecorrError(f"eps (added to SStot and SSres) must be a finite number > 0, got {eps!r}")


def correlation_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    eta: float = 5e-4,
    eps: float = 1e-3,
    gather: bool | None = None,
) -> torch.Tensor:
    """``log(SStot + eps) - log(SSres + eps)`` of the least-squares regression of z2 on [z1, 1].

    ``z1`` (N, ...) and ``z2`` (N, ...) are flattened after the batch dimension. Columns of ``z1``
    whose QR pivot is below ``eta`` times the largest are dropped as linearly dependent. Computed in
    float32 (float64 if given) even under autocast. Under ``torch.distributed`` (``gather=None``) the
    features of all processes are gathered with gradient, so the loss is that of the global batch.
    Zero when z2 is uncorrelated with z1; large when z2 is an affine image of z1.
    """
    _check_constants(eta, eps)
    z1, z2 = _prepare(z1, z2, gather)
    _check_batch(z1.shape[0], z1.shape[1])
    with torch.autocast(device_type=z1.device.type, enabled=False):
        return _CorrelationLoss.apply(z1, z2, eta, eps)


def regression_sums(
    z1: torch.Tensor, z2: torch.Tensor, *, eta: float = 5e-4, gather: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(SSres, SStot) of the least-squares regression of z2 on [z1, 1], without gradient."""
    _check_constants(eta, None)
    z1, z2 = _prepare(z1, z2, gather)
    _check_batch(z1.shape[0], z1.shape[1])
    with torch.no_grad(), torch.autocast(device_type=z1.device.type, enabled=False):
        x = z1 - z1.mean(dim=0, keepdim=True)
        y = z2 - z2.mean(dim=0, keepdim=True)
        a, tau, keep = _kept_qr(x, z1, eta)
        k = int(keep.sum())
        qty = torch.ormqr(a, tau, y, left=True, transpose=True) if k else y
        return qty[k:].square().sum(), y.square().sum()


def r_squared(z1: torch.Tensor, z2: torch.Tensor, *, eta: float = 5e-4, gather: bool | None = None) -> float:
    """Coefficient of determination of z2 regressed on z1 (pooled over all of z2's columns).

    1.0 when z2 is an affine image of z1, 0.0 when nothing of it is linearly explained. NaN when z2 is
    constant (nothing to explain).
    """
    ss_res, ss_tot = regression_sums(z1, z2, eta=eta, gather=gather)
    if float(ss_tot) == 0.0:
        return math.nan
    return float(1.0 - ss_res / ss_tot)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two vectors (flattened)."""
    a = a.reshape(-1).double()
    b = b.reshape(-1).double()
    a = a - a.mean()
    b = b - b.mean()
    denominator = a.norm() * b.norm()
    if float(denominator) == 0.0:
        return math.nan
    return float((a @ b) / denominator)


def pca_pearson(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """Pearson correlation between the first principal-component scores of two feature sets.

    The paper's 1-D PCA scatter (Fig. 2): each model's features projected on their own first principal
    axis, then correlated. The sign of a principal axis is arbitrary, so the absolute value is returned.
    """
    scores = []
    for z in (z1, z2):
        z = z.reshape(z.shape[0], -1).double()
        z = z - z.mean(dim=0, keepdim=True)
        # The leading right singular vector is the first principal axis.
        _, _, v = torch.linalg.svd(z, full_matrices=False)
        scores.append(z @ v[0])
    return abs(pearson(scores[0], scores[1]))


def parameter_distance(model_a: nn.Module, model_b: nn.Module) -> torch.Tensor:
    """Squared Euclidean distance sum ||theta_a - theta_b||^2 over all parameters (the paper's D).

    Differentiable, for the parametric-distance pairs of Fig. 1.
    """
    params_a = list(model_a.parameters())
    params_b = list(model_b.parameters())
    if len(params_a) != len(params_b) or any(p.shape != q.shape for p, q in zip(params_a, params_b)):
        raise ValueError("parameter_distance needs two models of the same architecture")
    return torch.stack([(p - q).square().sum() for p, q in zip(params_a, params_b)]).sum()
