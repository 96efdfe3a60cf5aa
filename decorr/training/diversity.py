"""Objectives of the established ensemble-diversity defences: ADP, GAL and TRS.

Pure functions of the members' outputs (logits, input gradients), so that a trainer can wrap each in a
small task. Each follows its authors' training code (read in ``zjysteven/DVERGE`` and
``AI-secure/Transferability-Reduced-Smooth-Ensemble``, TRS below; Pang et al.'s own ADP code for the
ADP names); where that code and the paper differ, the code wins and ``docs/diversity.md`` says how.

* :func:`adp_loss`: Pang et al., ICML 2019 (Adaptive Diversity Promoting).
* :func:`gal_loss`: Kariyappa & Qureshi, 2019 (Gradient Alignment Loss).
* :func:`trs_loss`, :func:`trs_schedule`, :func:`trs_smooth_inputs`: Yang et al., NeurIPS 2021.
* :func:`member_input_gradients`: every member's input gradient of its loss, kept differentiable
  (double backpropagation) for GAL and TRS.

All CE terms are the batch mean of each member (``nn.CrossEntropyLoss()``), summed over members as in
the authors' code unless said otherwise.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from decorr.errors import DecorrError

__all__ = [
    "adp_loss",
    "gal_loss",
    "trs_loss",
    "trs_schedule",
    "trs_smooth_inputs",
    "member_input_gradients",
    "pairwise_cosine",
]

# The authors' offsets: DVERGE train/train_adp.py and TRS train/Empirical/trainer.py (ADP_Trainer:
# ``1e-20`` in the entropy's log, ``1e-6 * I`` in the log-det; GAL_Trainer: ``1e-20`` in the log).
LOG_OFFSET = 1e-20
DET_OFFSET = 1e-6


# ------------------------------------------------------------------------------------------------
# Checks


def _members(values: Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    if isinstance(values, torch.Tensor) or not all(isinstance(v, torch.Tensor) for v in values):
        raise DecorrError(f"{name} must be a sequence (list or tuple) of tensors, one per member")
    values = list(values)
    if len(values) < 2:
        raise DecorrError(f"{name}: an ensemble objective needs at least 2 members, got {len(values)}")
    for m, v in enumerate(values[1:], start=1):
        if v.shape != values[0].shape:
            raise DecorrError(f"{name}: every member must have the same shape, got {tuple(values[0].shape)} "
                              f"for member 0 and {tuple(v.shape)} for member {m}")
    if values[0].dim() < 2 or values[0].shape[0] == 0:
        raise DecorrError(f"{name}: expected (batch, ...) tensors with a non-empty batch, "
                          f"got shape {tuple(values[0].shape)}")
    return values


def _coefficient(name: str, value: float, *, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise DecorrError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _labels(y: torch.Tensor, logits: list[torch.Tensor], name: str = "logits") -> None:
    if logits[0].dim() != 2 or logits[0].shape[1] < 2:
        raise DecorrError(f"{name} must be (batch, classes) with at least 2 classes, "
                          f"got shape {tuple(logits[0].shape)}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != logits[0].shape[0] or y.is_floating_point():
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise DecorrError(f"y must be a 1-D tensor of {logits[0].shape[0]} integer class labels, got {shape}")


def _sum_ce(logits: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Sum over members of each member's batch-mean cross-entropy."""
    return torch.stack([F.cross_entropy(z, y) for z in logits]).sum()


# ------------------------------------------------------------------------------------------------
# ADP


def adp_loss(
    logits: Sequence[torch.Tensor],
    y: torch.Tensor,
    *,
    alpha: float = 2.0,
    beta: float = 0.5,
    det_offset: float = DET_OFFSET,
    log_offset: float = LOG_OFFSET,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ADP (Pang et al., ICML 2019): ``sum_m CE_m - alpha * H(mean_m p_m) - beta * log det(G + det_offset I)``.

    ``logits``: N >= 2 tensors (batch, classes); ``y``: (batch,) labels. ``p_m`` is member m's softmax;
    ``H`` the entropy ``-sum_k p_k log(p_k + log_offset)`` of the ensemble's mean prediction, averaged
    over the batch. For each sample, member m's non-maximal prediction is ``p_m`` with the true class's
    entry *removed* (a (classes - 1)-vector, not zeroed), divided by its L2 norm; ``G`` is the N x N Gram
    matrix of these vectors (``M^T M`` with M's columns the members' vectors), and the log-det is
    averaged over the batch. Returns ``(loss, {"ce", "entropy", "log_det"})``.

    Defaults: alpha = 2.0, beta = 0.5 (the paper's CIFAR-10 setting; DVERGE ``arguments.py``
    ``adp_train_args``, TRS ``train_adp.py`` / ``utils/Empirical/script_train.py``; Pang et al.'s
    code calls them ``lamda`` and ``log_det_lamda``: there ``log_det_lamda`` is beta, not the offset).
    det_offset = 1e-6 and log_offset = 1e-20 are hard-coded in DVERGE ``train/train_adp.py``
    (``self.det_offset``, ``self.log_offset``) and TRS ``trainer.py`` ``ADP_Trainer``. One change: the
    L2 norm is clamped at the dtype's smallest normal number, so a vector that underflowed to 0 gives 0
    rather than NaN (no effect otherwise).
    """
    logits = _members(logits, "logits")
    _labels(y, logits)
    alpha = _coefficient("alpha", alpha)
    beta = _coefficient("beta", beta)
    det_offset = _coefficient("det_offset", det_offset, positive=True)
    log_offset = _coefficient("log_offset", log_offset)
    batch, classes = logits[0].shape
    ce = _sum_ce(logits, y)
    probs = [F.softmax(z, dim=-1) for z in logits]
    mean = torch.stack(probs).mean(dim=0)
    entropy = -(mean * torch.log(mean + log_offset)).sum(dim=-1).mean()
    others = ~F.one_hot(y, classes).bool()
    non_max = torch.stack([p[others].reshape(batch, classes - 1) for p in probs], dim=1)  # (B, N, C-1)
    norms = non_max.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(non_max.dtype).tiny)
    non_max = non_max / norms
    gram = non_max @ non_max.transpose(1, 2)  # (B, N, N)
    eye = torch.eye(len(logits), dtype=gram.dtype, device=gram.device)
    log_det = torch.logdet(gram + det_offset * eye).mean()
    loss = ce - alpha * entropy - beta * log_det
    return loss, {"ce": ce.detach(), "entropy": entropy.detach(), "log_det": log_det.detach()}


# ------------------------------------------------------------------------------------------------
# Input gradients (GAL, TRS)


def member_input_gradients(
    models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, *, create_graph: bool = True
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(input gradients, logits) of every member: ``d CE_m(model_m(x), y) / dx``, CE the batch mean.

    As in the authors' code (DVERGE ``train_gal.py``, TRS ``trainer.py``) the loss differentiated is
    ``nn.CrossEntropyLoss()`` of the whole batch, so a sample's gradient is 1/batch times that of its own
    loss: cosines do not care, TRS's smoothness term does (it is on this scale in their code). With
    ``create_graph=True`` the gradients are differentiable w.r.t. the parameters (double backprop); the
    logits keep their graph either way, for the CE terms. ``x`` is detached first: no gradient flows
    back into whatever produced it.
    """
    return _input_gradients(models, x.detach().requires_grad_(True), y, create_graph=create_graph)


def _input_gradients(models, x: torch.Tensor, y: torch.Tensor, *, create_graph: bool):
    if isinstance(models, nn.Module) or len(models) < 2:
        raise DecorrError("models must be a sequence of at least 2 modules, one per member")
    grads, logits = [], []
    for model in models:
        z = model(x)
        if z.dim() != 2 or z.shape[0] != x.shape[0]:
            raise DecorrError(f"a member returned shape {tuple(z.shape)}; expected (batch, classes) logits")
        _labels(y, [z])
        (g,) = torch.autograd.grad(F.cross_entropy(z, y), x, create_graph=create_graph, retain_graph=True)
        grads.append(g)
        logits.append(z)
    return grads, logits


def pairwise_cosine(input_grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """(batch, pairs) cosine similarities of the members' flattened per-sample gradients, pairs i < j.

    ``F.cosine_similarity`` on ``grad.flatten(1)``, as DVERGE ``train_gal.py`` and TRS ``trainer.py``
    (its ``eps`` 1e-8 keeps a zero gradient at cosine 0).
    """
    grads = [g.flatten(start_dim=1) for g in _members(input_grads, "input_grads")]
    count = len(grads)
    return torch.stack([F.cosine_similarity(grads[i], grads[j], dim=-1)
                        for i in range(count) for j in range(i + 1, count)], dim=-1)


# ------------------------------------------------------------------------------------------------
# GAL


def gal_loss(
    input_grads: Sequence[torch.Tensor],
    *,
    logits: Sequence[torch.Tensor] | None = None,
    y: torch.Tensor | None = None,
    lamda: float = 0.5,
    ce_reduction: str = "sum",
    log_offset: float = LOG_OFFSET,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GAL (Kariyappa & Qureshi, 2019): ``CE + lamda * mean_b log(sum_{i<j} exp(cos_b(g_i, g_j)) + 1e-20)``.

    ``input_grads``: N >= 2 tensors (batch, ...), each member's input gradient of its loss (from
    :func:`member_input_gradients`, create_graph=True). The coherence term is computed **per sample**
    (each sample's flattened gradient, the log-sum-exp over its pairs) and averaged over the batch, as
    both DVERGE ``train/train_gal.py`` and TRS ``trainer.py`` ``GAL_Trainer`` do. With ``logits`` and
    ``y`` the CE of the members is added: ``ce_reduction="sum"`` (TRS ``GAL_Trainer``: ``loss_std``) or
    ``"mean"`` (DVERGE: ``ce_loss / len(models)``); without them the CE term is 0. Returns
    ``(loss, {"ce", "coherence"})``.

    Default lamda = 0.5: DVERGE ``arguments.py`` ``gal_train_args`` (``--lambda``), TRS
    ``train_gal.py`` (``--coeff``) and ``script_train.py`` (``gal_coeff``). DVERGE also trains GAL
    members with leaky ReLU and Gaussian-noise augmentation (``train_gal.py``); that is the trainer's.
    """
    lamda = _coefficient("lamda", lamda)
    log_offset = _coefficient("log_offset", log_offset)
    if ce_reduction not in ("sum", "mean"):
        raise DecorrError(f"unknown ce_reduction {ce_reduction!r}; use sum or mean")
    cosines = pairwise_cosine(input_grads)
    coherence = torch.log(cosines.exp().sum(dim=-1) + log_offset).mean()
    ce = _ce_or_zero(logits, y, len(input_grads), input_grads[0].shape[0], coherence)
    if ce_reduction == "mean":
        ce = ce / len(input_grads)
    loss = ce + lamda * coherence
    return loss, {"ce": ce.detach(), "coherence": coherence.detach()}


def _ce_or_zero(logits, y, count: int, batch: int, like: torch.Tensor) -> torch.Tensor:
    if logits is None and y is None:
        return like.new_zeros(())
    if logits is None or y is None:
        raise DecorrError("give both logits and y (for the CE terms), or neither")
    logits = _members(logits, "logits")
    if len(logits) != count or logits[0].shape[0] != batch:
        raise DecorrError(f"logits must hold one (batch {batch}, classes) tensor per member ({count}), "
                          f"got {len(logits)} of shape {tuple(logits[0].shape)}")
    _labels(y, logits)
    return _sum_ce(logits, y)


# ------------------------------------------------------------------------------------------------
# TRS


def trs_loss(
    input_grads: Sequence[torch.Tensor],
    *,
    logits: Sequence[torch.Tensor] | None = None,
    y: torch.Tensor | None = None,
    smooth_grads: Sequence[torch.Tensor] | None = None,
    scale: float = 5.0,
    coeff: float = 2.0,
    lamda: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRS (Yang et al., NeurIPS 2021): ``sum_m CE_m + scale * (coeff * L_cos + lamda * L_smooth)``.

    ``L_cos`` is the mean over pairs i < j of ``mean_b |cos(g_i[b], g_j[b])|`` of the members' clean
    input gradients ``input_grads``; ``L_smooth`` the mean over members of ``2 * mean_b ||s_m[b]||^2``
    with ``s_m`` = ``smooth_grads`` (gradients at :func:`trs_smooth_inputs`'s perturbed batch: TRS's
    ``--plus-adv``) or, if None, ``input_grads`` (without ``--plus-adv`` their code takes the norm at the
    clean inputs). The gradients are those of the batch-mean CE (:func:`member_input_gradients`), so
    ``L_smooth`` shrinks as 1/batch^2, exactly as in the authors' code. CE as in :func:`gal_loss`
    (sum, TRS ``loss_std``), 0 without ``logits``/``y``. Returns ``(loss, {"ce", "cos", "smooth"})``.

    This is TRS ``train/Empirical/trainer.py`` ``TRS_Trainer`` with ``utils_ensemble.py``'s
    ``Cosine`` (``|F.cosine_similarity|.mean()``) and ``Magnitude`` (``2 * sum(g^2, 1).mean()``);
    their code has 3 members hard-coded (``/ 3.``); here it is the number of pairs and of members.
    Defaults scale = 5.0, coeff = 2.0, lamda = 2.0: ``train_trs.py`` argparse and
    ``utils/Empirical/script_train.py`` (``trs_scale``, ``trs_coeff``, ``trs_lamda``).
    """
    scale = _coefficient("scale", scale)
    coeff = _coefficient("coeff", coeff)
    lamda = _coefficient("lamda", lamda)
    grads = _members(input_grads, "input_grads")
    cos = pairwise_cosine(grads).abs().mean(dim=0).mean()
    smooth_source = grads if smooth_grads is None else _members(smooth_grads, "smooth_grads")
    if len(smooth_source) != len(grads) or smooth_source[0].shape != grads[0].shape:
        raise DecorrError(f"smooth_grads must hold one gradient per member ({len(grads)}) shaped like input_grads "
                          f"{tuple(grads[0].shape)}, got {len(smooth_source)} of {tuple(smooth_source[0].shape)}")
    smooth = torch.stack([_magnitude(g) for g in smooth_source]).mean()
    ce = _ce_or_zero(logits, y, len(grads), grads[0].shape[0], cos)
    loss = ce + scale * (coeff * cos + lamda * smooth)
    return loss, {"ce": ce.detach(), "cos": cos.detach(), "smooth": smooth.detach()}


def _magnitude(g: torch.Tensor) -> torch.Tensor:
    """TRS ``Magnitude``: 2 * batch mean of the squared L2 norm of each sample's flattened gradient."""
    return 2.0 * g.flatten(start_dim=1).square().sum(dim=1).mean()


def trs_schedule(epoch: int, epochs: int, *, init_eps: float = 0.1, adv_eps: float = 0.2) -> float:
    """TRS's smoothness radius at 0-based ``epoch`` of ``epochs``: linear from init_eps towards adv_eps.

    ``cureps = (adv_eps - init_eps) * epoch / epochs + init_eps`` (TRS ``trainer.py``, with
    ``for epoch in range(args.epochs)`` in ``train_trs.py``), so the last epoch uses
    ``init_eps + (adv_eps - init_eps) * (epochs - 1) / epochs``, never adv_eps itself. Defaults
    init_eps = 0.1, adv_eps = 0.2: ``train_trs.py`` argparse and ``script_train.py`` (``trs_initeps``,
    ``trs_adveps``; that script is set up for MNIST, pixels in [0, 1]).
    """
    if not (isinstance(epochs, int) and epochs > 0 and isinstance(epoch, int) and 0 <= epoch < epochs):
        raise DecorrError(f"epoch must be an integer in [0, epochs) and epochs > 0, got epoch {epoch!r} of {epochs!r}")
    init_eps = _coefficient("init_eps", init_eps)
    adv_eps = _coefficient("adv_eps", adv_eps)
    return (adv_eps - init_eps) * epoch / epochs + init_eps


def trs_smooth_inputs(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    steps: int = 6,
    step_size: float | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TRS's perturbed batch for the smoothness term (``--plus-adv``): first half clean, second half PGD.

    The second half (``x[batch // 2:]``) starts uniformly in the L-inf ball of radius ``eps`` (clipped to
    ``bounds``) and takes ``steps`` signed ascent steps of ``step_size`` (default eps / 3) on the mean
    over members of their ``Magnitude`` (gradient norm) at that point, projected back to the ball and
    to ``bounds`` after each: TRS ``trainer.py`` ``PGD`` (``steps = 6``, ``alpha = eps / 3.``). Take eps
    from :func:`trs_schedule`. Returns a detached tensor shaped like ``x``; the members' modes (train
    or eval) are left as the caller set them (TRS runs this in train mode).
    """
    eps = _coefficient("eps", eps)
    step_size = eps / 3.0 if step_size is None else _coefficient("step_size", step_size)
    if not (isinstance(steps, int) and steps >= 0):
        raise DecorrError(f"steps must be an integer >= 0, got {steps!r}")
    low, high = bounds
    half = x.shape[0] // 2
    clean, start = x[:half].detach(), x[half:].detach()
    noise = torch.rand(start.shape, generator=generator, dtype=start.dtype,
                       device=start.device if generator is None else generator.device).to(start.device)
    adv = (start + (2.0 * noise - 1.0) * eps).clamp(low, high)
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        grads, _ = _input_gradients(models, adv, y[half:], create_graph=True)
        ascent = torch.stack([_magnitude(g) for g in grads]).mean()
        (direction,) = torch.autograd.grad(ascent, adv)
        with torch.no_grad():
            adv = adv + step_size * direction.sign()
            adv = torch.minimum(torch.maximum(adv, start - eps), start + eps).clamp(low, high)
    return torch.cat([clean, adv.detach()])
