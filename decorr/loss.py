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

For an ensemble, :func:`pairwise_correlation_loss` sums the loss over pairs of members, factorising
each member once and reusing its orthonormal basis for every pair in which it is the regressor
(``benchmarks/ensemble_loss.py``); with two members and one direction it is ``correlation_loss``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn

from decorr.distributed import all_gather_with_grad, is_distributed
from decorr.errors import DecorrError

__all__ = [
    "BatchTooSmallError",
    "correlation_loss",
    "pairwise_correlation_loss",
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


def _centre(z: torch.Tensor) -> torch.Tensor:
    """Columns minus their means: regressing on [z, 1] is regressing on the centred z (and SStot is its norm)."""
    return z - z.mean(dim=0, keepdim=True)


class _Kept(NamedTuple):
    """The QR of the kept regressor columns (see :func:`_kept_qr`); ``k`` and ``all_kept`` live on the host."""

    a: torch.Tensor
    tau: torch.Tensor
    keep: torch.Tensor
    columns: torch.Tensor
    k: int
    all_kept: bool


def _kept_qr_host(x_centred: torch.Tensor, z1: torch.Tensor, eta: float,
                  finite: torch.Tensor | None = None) -> _Kept:
    """Householder QR of the centred regressors with dependent columns dropped.

    LAPACK's compact form ``(a, tau)`` of the QR of ``x_centred[:, columns]``. A column is kept when its
    |R_jj| exceeds ``eta`` times the largest one. Centring first is the same as factorising [1, Z1] with
    the intercept first, so constant columns are dropped as dependent on the intercept. Exactly constant
    columns (dead ReLU units are common) are dropped before factorising: they would get R_jj = 0 anyway,
    and this usually saves a second factorisation. The column choice needs two reads from the device
    (which columns vary, then which pivots are kept); ``finite`` (a flag tensor from the caller) rides
    along with the first, so the whole loss synchronises twice on a GPU and its backward not at all.
    """
    mask = z1.amax(dim=0) > z1.amin(dim=0)
    flags = (torch.cat([mask, finite.reshape(1)]) if finite is not None else mask).tolist()  # read 1
    if finite is not None:
        if not flags.pop():
            _raise_non_finite()
    device, width = x_centred.device, x_centred.shape[1]
    varying_list = [j for j, varies in enumerate(flags) if varies]
    varying = torch.tensor(varying_list, dtype=torch.long, device=device)
    a, tau = torch.geqrf(x_centred[:, varying])
    diag = a.diagonal().abs()
    largest = diag.max() if diag.numel() else diag.new_zeros(())
    kept_list = (diag > eta * largest).tolist()  # read 2
    columns_list = [j for j, kept in zip(varying_list, kept_list) if kept]
    columns = torch.tensor(columns_list, dtype=torch.long, device=device)
    if not all(kept_list):
        a, tau = torch.geqrf(x_centred[:, columns])
    keep = torch.zeros(width, dtype=torch.bool, device=device)
    keep[columns] = True
    k = len(columns_list)
    return _Kept(a, tau, keep, columns, k, k == width)


def _kept_qr(x_centred: torch.Tensor, z1: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, tau, keep) of :func:`_kept_qr_host`, ``keep`` the boolean mask of the kept columns."""
    kept = _kept_qr_host(x_centred, z1, eta)
    return kept.a, kept.tau, kept.keep


class _CorrelationLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z1: torch.Tensor, z2: torch.Tensor, eta: float, eps: float, relative: bool = False,  # type: ignore[override]
                finite: torch.Tensor | None = None) -> torch.Tensor:
        n, m2 = z2.shape
        x = _centre(z1)
        y = _centre(z2)
        ss_tot = y.square().sum()
        kept = _kept_qr_host(x, z1, eta, finite)
        a, tau, k = kept.a, kept.tau, kept.k
        if k == 0:
            residual = y
            coefficients = y.new_zeros((0, m2))
        else:
            # Q^T y: the first k rows are the fitted coordinates, the rest the residual's.
            qty = torch.ormqr(a, tau, y, left=True, transpose=True)
            r_factor = a[:k].triu()
            coefficients = torch.linalg.solve_triangular(r_factor, qty[:k], upper=True)
            regressors = x if kept.all_kept else x.index_select(1, kept.columns)
            residual = torch.addmm(y, regressors, coefficients, alpha=-1)
        ss_res = residual.square().sum()
        ctx.save_for_backward(y, residual, coefficients, kept.columns, ss_tot, ss_res)
        ctx.eps, ctx.relative, ctx.all_kept, ctx.width = eps, relative, kept.all_kept, x.shape[1]
        if relative:
            offset = _relative_offset(ss_tot, eps)
            return torch.log(ss_tot + offset) - torch.log(ss_res + offset)
        return torch.log(ss_tot + eps) - torch.log(ss_res + eps)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        y, residual, coefficients, columns, ss_tot, ss_res = ctx.saved_tensors
        eps = ctx.eps
        grad_z1 = grad_z2 = None
        if ctx.relative:
            scale_tot, scale_res = _relative_scales(ss_tot, ss_res, eps)
        else:
            scale_tot, scale_res = 2.0 / (ss_tot + eps), 2.0 / (ss_res + eps)
        if ctx.needs_input_grad[1]:
            grad_z2 = (y * scale_tot - residual * scale_res) * grad_out
        if ctx.needs_input_grad[0]:
            # The residual has zero column means, so centring z1 does not change this gradient.
            if ctx.all_kept:
                grad_z1 = (residual @ coefficients.T) * (scale_res * grad_out)
            else:
                grad_z1 = residual.new_zeros((residual.shape[0], ctx.width))
                if coefficients.shape[0]:
                    grad_z1.index_copy_(1, columns, (residual @ coefficients.T) * (scale_res * grad_out))
        return grad_z1, grad_z2, None, None, None, None


def _relative_offset(ss_tot: torch.Tensor, eps: float) -> torch.Tensor:
    """eps * SStot, or 1 where SStot is 0 (a constant response: then SSres = 0 and the loss is 0)."""
    return torch.where(ss_tot > 0, ss_tot * eps, torch.ones_like(ss_tot))


def _relative_scales(ss_tot: torch.Tensor, ss_res: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dSStot and dL/dSSres, times 2, of L = log(SStot (1 + eps)) - log(SSres + eps SStot).

    dL/dSStot = 1/SStot - eps/(SSres + eps SStot) = SSres / (SStot (SSres + eps SStot)), written without
    the cancellation; zero for a constant response (SStot = 0, where y and the residual vanish too).
    """
    offset = _relative_offset(ss_tot, eps)
    denominator = ss_res + offset
    safe_tot = torch.where(ss_tot > 0, ss_tot, torch.ones_like(ss_tot))
    scale_tot = torch.where(ss_tot > 0, 2.0 * ss_res / (safe_tot * denominator), torch.zeros_like(ss_tot))
    return scale_tot, 2.0 / denominator


def _prepare_features(zs: list[torch.Tensor], names: list[str], gather: bool | None,
                      check_finite: bool = True) -> list[torch.Tensor]:
    """Gather (under torch.distributed), flatten and upcast feature sets; refuse empty ones and, with
    ``check_finite`` (one host read), non-finite ones; the correlation loss merges that read with its own."""
    for name, z in zip(names[1:], zs[1:]):
        if z.shape[0] != zs[0].shape[0]:
            raise DecorrError(f"{names[0]} and {name} must have the same batch size, got {zs[0].shape[0]} and {z.shape[0]}")
    if gather is None:
        gather = is_distributed()
    zs = [_flatten_float(z) for z in zs]
    if any(z.dtype != zs[0].dtype for z in zs):
        zs = [z.double() for z in zs]
    if gather:
        # One gather for all feature sets (each gather reads the shard lengths back to the host once).
        widths = [z.shape[1] for z in zs]
        zs = list(torch.split(all_gather_with_grad(torch.cat(zs, dim=1)), widths, dim=1))
    for name, z in zip(names, zs):
        if z.shape[1] == 0:
            raise DecorrError(f"{name} has no features (shape {tuple(z.shape)}); pick a feature layer that outputs values")
    if check_finite and not bool(_all_finite(zs)):
        _raise_non_finite()
    return zs


def _all_finite(zs: Sequence[torch.Tensor]) -> torch.Tensor:
    """A device flag: every value finite (NaN columns would otherwise be dropped as if constant, silently)."""
    finite = torch.isfinite(zs[0]).all()
    for z in zs[1:]:
        finite = finite & torch.isfinite(z).all()
    return finite


def _raise_non_finite() -> None:
    raise DecorrError("the features hold NaN or inf (a diverged model or bad inputs); the correlation loss "
                      "and R^2 are undefined: check the inputs and the model's weights")


def _prepare(z1: torch.Tensor, z2: torch.Tensor, gather: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    z1, z2 = _prepare_features([z1, z2], ["z1", "z2"], gather)
    return z1, z2


EPS_MODES = ("absolute", "relative")


def _check_constants(eta: float, eps: float | None, eps_mode: str = "absolute") -> None:
    if not (isinstance(eta, (int, float)) and 0 <= eta < 1):
        raise DecorrError(f"eta (the QR pivot tolerance) must be in [0, 1), got {eta!r}")
    if eps is not None and not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise DecorrError(f"eps (added to SStot and SSres) must be a finite number > 0, got {eps!r}")
    if eps_mode not in EPS_MODES:
        raise DecorrError(f"unknown eps_mode {eps_mode!r}; use one of {', '.join(EPS_MODES)}")


def correlation_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    eta: float = 5e-4,
    eps: float = 1e-3,
    eps_mode: str = "absolute",
    gather: bool | None = None,
) -> torch.Tensor:
    """``log(SStot + eps) - log(SSres + eps)`` of the least-squares regression of z2 on [z1, 1].

    ``z1`` (N, ...) and ``z2`` (N, ...) are flattened after the batch dimension. Columns of ``z1``
    whose QR pivot is below ``eta`` times the largest are dropped as linearly dependent. Computed in
    float32 (float64 if given) even under autocast. Under ``torch.distributed`` (``gather=None``) the
    features of all processes are gathered with gradient, so the loss is that of the global batch.
    Zero when z2 is uncorrelated with z1; large when z2 is an affine image of z1.

    ``eps_mode="absolute"`` (the paper's, the default) adds ``eps`` itself, so the loss depends on the
    features' scale: with eps = 1e-3 a perfect affine relation of 512 x 512 unit-variance features
    scores 19.4, and 1.3 once the features are scaled by 1e-4. ``"relative"`` adds ``eps * SStot``,
    so the loss is ``log(1 + eps) - log(1 - R^2 + eps)``, a function of R^2 alone (scale invariant; at
    most log(1 + 1/eps) = 6.9 for eps = 1e-3); a constant z2 scores 0. The gradient is exact in both.
    """
    _check_constants(eta, eps, eps_mode)
    z1, z2 = _prepare_features([z1, z2], ["z1", "z2"], gather, check_finite=False)
    _check_batch(z1.shape[0], z1.shape[1])
    with torch.autocast(device_type=z1.device.type, enabled=False):
        return _CorrelationLoss.apply(z1, z2, eta, eps, eps_mode == "relative", _all_finite([z1, z2]))


# ------------------------------------------------------------------------------------------------
# All pairs of an ensemble


class _Regressor:
    """One member's centred features factorised once, reused for every pair in which it regresses.

    ``q`` holds an orthonormal basis: with ``full`` the whole n x n Q of the QR (kept columns first, then
    the orthogonal complement), so that ``q^T y`` gives the fitted coordinates ``c`` (first k rows) and
    the residual's coordinates ``d`` in one product and the residual is ``q_perp d`` (no cancellation);
    otherwise the thin n x k Q and the residual ``y - q c`` is formed explicitly. The full basis is
    cheaper per pair when the batch is not much larger than the width (1000 x 784), the thin one when
    it is (n >= ~2k).
    """

    def __init__(self, x: torch.Tensor, z: torch.Tensor, eta: float) -> None:
        n = x.shape[0]
        a, tau, keep = _kept_qr(x, z, eta)
        self.keep = keep
        self.k = k = int(keep.sum())
        self.all_kept = k == keep.shape[0]
        self.full = 0 < k and n * n + 2 * (n - k) * k < 3 * n * k
        if k == 0:
            self.q = x.new_zeros((n, 0))
        elif self.full:
            self.q = torch.linalg.householder_product(torch.cat([a, a.new_zeros((n, n - k))], dim=1), tau)
        else:
            self.q = torch.linalg.householder_product(a, tau)
        self.r_factor = a[:k].triu()

    def regress(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c, residual or its complement coordinates d, SSres) of y regressed on this member."""
        if self.full:
            cd = self.q.T @ y
            c, rest = cd[: self.k], cd[self.k :]
        else:
            c = self.q.T @ y
            rest = torch.addmm(y, self.q, c, alpha=-1)
        return c, rest, rest.square().sum()


class _PairwiseCorrelationLoss(torch.autograd.Function):
    """The vector of correlation losses of ``pairs`` (regressor i, response j), with exact gradients.

    Same closed-form gradient as :class:`_CorrelationLoss`, accumulated over pairs: for pair p with
    weight g_p, alpha_p = 2 g_p / (SStot_j + eps), beta_p = 2 g_p / (SSres_p + eps) (with a relative
    eps, alpha_p and beta_p of :func:`_relative_scales`)::

        dL/dZ_j += alpha_p y_j - beta_p r_p          dL/dZ_i[:, kept] += beta_p r_p c_p^T R_i^-T

    The products r_p c_p^T are summed over a regressor's pairs before its one triangular solve.
    """

    @staticmethod
    def forward(ctx, pairs: tuple[tuple[int, int], ...], eta: float, eps: float, relative: bool, *zs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ys = [_centre(z) for z in zs]
        regressors = {i: _Regressor(ys[i], zs[i], eta) for i in sorted({i for i, _ in pairs})}
        responses = sorted({j for _, j in pairs})
        ss_tot = {j: ys[j].square().sum() for j in responses}
        fits = [regressors[i].regress(ys[j]) for i, j in pairs]
        ss_tot_p = torch.stack([ss_tot[j] for _, j in pairs])
        ss_res_p = torch.stack([fit[2] for fit in fits])
        ctx.pairs, ctx.eps, ctx.relative = pairs, eps, relative
        ctx.ys, ctx.regressors, ctx.fits = ys, regressors, fits
        ctx.save_for_backward(ss_tot_p, ss_res_p)
        if relative:
            offset = _relative_offset(ss_tot_p, eps)
            return torch.log(ss_tot_p + offset) - torch.log(ss_res_p + offset)
        return torch.log(ss_tot_p + eps) - torch.log(ss_res_p + eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        ss_tot_p, ss_res_p = ctx.saved_tensors
        pairs, ys, regressors, fits = ctx.pairs, ctx.ys, ctx.regressors, ctx.fits
        needs = ctx.needs_input_grad[4:]
        if ctx.relative:
            scale_tot, scale_res = _relative_scales(ss_tot_p, ss_res_p, ctx.eps)
            alpha, beta = scale_tot * grad_out, scale_res * grad_out
        else:
            alpha = 2.0 * grad_out / (ss_tot_p + ctx.eps)
            beta = 2.0 * grad_out / (ss_res_p + ctx.eps)
        grads: list[torch.Tensor | None] = [None] * len(ys)
        # Responses: alpha y_j (summed over the pairs of j) minus beta r for each pair.
        for j in sorted({j for _, j in pairs}):
            if needs[j]:
                grads[j] = ys[j] * sum(alpha[p] for p, (_, jj) in enumerate(pairs) if jj == j)
        sums: dict[int, torch.Tensor] = {}
        for p, (i, j) in enumerate(pairs):
            reg = regressors[i]
            c, rest, _ = fits[p]
            want_i = needs[i] and reg.k > 0
            if reg.full:
                scaled = rest * beta[p]  # beta d: small ((n - k) x m)
                if needs[j]:
                    grads[j].addmm_(reg.q[:, reg.k :], scaled, alpha=-1)
                if want_i:
                    sums[i] = scaled @ c.T if i not in sums else sums[i].addmm_(scaled, c.T)
            else:
                if needs[j]:
                    grads[j].addcmul_(rest, beta[p], value=-1)
                if want_i:
                    scaled_c = c * beta[p]
                    sums[i] = rest @ scaled_c.T if i not in sums else sums[i].addmm_(rest, scaled_c.T)
        for i, total in sums.items():
            reg = regressors[i]
            if reg.full:
                total = reg.q[:, reg.k :] @ total
            # total R^-T: solve X R^T = total.
            grad_kept = torch.linalg.solve_triangular(reg.r_factor.T, total, upper=False, left=False)
            if reg.all_kept:
                grads[i] = grad_kept if grads[i] is None else grads[i].add_(grad_kept)
            else:  # dropped (dependent or constant) columns get no gradient, as in _CorrelationLoss
                if grads[i] is None:
                    grads[i] = ys[i].new_zeros(ys[i].shape)
                grads[i][:, reg.keep] += grad_kept
        for m, y in enumerate(ys):
            if needs[m] and grads[m] is None:
                grads[m] = torch.zeros_like(y)
        return (None, None, None, None, *grads)


DIRECTIONS = ("one-way", "both")
REDUCTIONS = ("mean", "sum")


def pairwise_correlation_loss(
    features: Sequence[torch.Tensor],
    direction: str = "one-way",
    reduction: str = "mean",
    *,
    eta: float = 5e-4,
    eps: float = 1e-3,
    eps_mode: str = "absolute",
    gather: bool | None = None,
) -> torch.Tensor:
    """The correlation loss summed or averaged over the pairs of an ensemble's members.

    ``features`` holds N >= 2 tensors (batch, ...), one per member, flattened after the batch
    dimension. ``direction="one-way"`` regresses member j on member i for every i < j (N (N - 1) / 2
    pairs; for N = 2 exactly ``correlation_loss(features[0], features[1])``, the paper's term);
    ``"both"`` takes every ordered pair i != j (N (N - 1) pairs). ``reduction="mean"`` divides the sum by
    the number of pairs. Each term is ``correlation_loss(features[i], features[j], eta=eta, eps=eps,
    eps_mode=eps_mode)`` (``"relative"``: eps times each response's SStot, scale invariant).

    Each member's centred features are QR-factorised once per call and reused for every pair in which
    it is the regressor, and the gradient is exact (the closed form of :func:`correlation_loss`). Same
    conventions and refusals as :func:`correlation_loss`: float32 (float64 if given) even under
    autocast; under ``torch.distributed`` (``gather=None``) each member's features are gathered once,
    with gradient, so the loss is that of the global batch; the batch must exceed every regressor's
    width plus one; NaN/inf or empty features are an error. A constant member (a dead layer) explains
    nothing and contributes zero terms, with finite gradients.
    """
    _check_constants(eta, eps, eps_mode)
    relative = eps_mode == "relative"
    if direction not in DIRECTIONS:
        raise DecorrError(f"unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)}")
    if reduction not in REDUCTIONS:
        raise DecorrError(f"unknown reduction {reduction!r}; use one of {', '.join(REDUCTIONS)}")
    if isinstance(features, torch.Tensor) or not all(isinstance(z, torch.Tensor) for z in features):
        raise DecorrError("features must be a sequence (list or tuple) of tensors, one (batch, ...) tensor per member")
    zs = list(features)
    if len(zs) < 2:
        raise DecorrError(f"the pairwise correlation loss needs at least 2 members, got {len(zs)}")
    zs = _prepare_features(zs, [f"features[{m}]" for m in range(len(zs))], gather)
    count = len(zs)
    if direction == "one-way":
        pairs = tuple((i, j) for i in range(count) for j in range(i + 1, count))
    else:
        pairs = tuple((i, j) for i in range(count) for j in range(count) if i != j)
    for i in sorted({i for i, _ in pairs}):
        _check_batch(zs[i].shape[0], zs[i].shape[1])
    with torch.autocast(device_type=zs[0].device.type, enabled=False):
        if len(pairs) == 1:  # nothing to share: the paper's term itself, bit for bit
            if relative:
                return _CorrelationLoss.apply(zs[0], zs[1], eta, eps, True)
            return _CorrelationLoss.apply(zs[0], zs[1], eta, eps)
        losses = _PairwiseCorrelationLoss.apply(pairs, eta, eps, relative, *zs)
        return losses.sum() if reduction == "sum" else losses.mean()


def regression_sums(
    z1: torch.Tensor, z2: torch.Tensor, *, eta: float = 5e-4, gather: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(SSres, SStot) of the least-squares regression of z2 on [z1, 1], without gradient."""
    _check_constants(eta, None)
    z1, z2 = _prepare(z1, z2, gather)
    _check_batch(z1.shape[0], z1.shape[1])
    with torch.no_grad(), torch.autocast(device_type=z1.device.type, enabled=False):
        x = _centre(z1)
        y = _centre(z2)
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
