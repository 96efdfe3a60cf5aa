"""Attack objectives, evaluation and training losses for the (dual-neck) autoencoder defence.

The defended model is classifier(autoencoder(x)) with one reconstruction per path; a sample counts
as correct when *either* path's reconstruction is classified correctly (SPEC section 6). Attack
objectives are closures ``loss_fn(x_adv, y) -> scalar`` that ``decorr.attacks`` maximise.

Objectives call the classifier once per path (not on the concatenated reconstructions), so that the
value is the definition's in any mode, batch norm in training mode included. Run attacks and
:func:`path_predictions` with both models in ``eval()`` mode.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from decorr.errors import DecorrError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CorrFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def path_logits(autoencoder: nn.Module, classifier: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Classifier logits of each path's reconstruction of ``x``: a list of P tensors [N, K]."""
    return [classifier(recon) for recon in autoencoder(x)]


def paper_objective(autoencoder: nn.Module, classifier: nn.Module) -> LossFn:
    """P1's objective: ``sum_n CE(C(r_n), y)^2`` for the DNA, ``CE(C(r), y)`` for one path.

    CE is the batch-mean cross-entropy of one path.
    """

    def loss_fn(x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses = [F.cross_entropy(logits, y) for logits in path_logits(autoencoder, classifier, x_adv)]
        if len(losses) == 1:
            return losses[0]
        return torch.stack(losses).pow(2).sum()

    return loss_fn


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample CW margin ``max_{k != y} z_k - z_y``: positive exactly when the sample is misclassified."""
    true_logit = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.amax(dim=1) - true_logit


def adaptive_objective(
    autoencoder: nn.Module, classifier: nn.Module, kind: str = "min", kappa: float = 0.0
) -> LossFn:
    """An objective that is only large when *every* path is fooled (the "either path" criterion).

    The paper's ``sum_n CE_n^2`` can grow without bound by pushing one path far past the decision
    boundary while the other still classifies correctly, and such a sample still counts as correct.
    These objectives put the attack's effort on the path that is still correct:

    - ``kind="min"``: the batch mean of the per-sample minimum over paths of the per-sample CE.
      Its gradient for each sample flows only into the least-fooled path, and it rises only when that
      path's loss rises: pushing an already-fooled path further does not pay.
    - ``kind="margin"``: the batch mean of the per-sample sum over paths of
      ``min(max_{k != y} z_k - z_y, kappa)`` (a CW margin per path, capped at ``kappa``). A path
      that is fooled by a margin of ``kappa`` contributes a constant and no gradient, so the step
      goes to the other paths; the maximum, ``P * kappa``, is reached only when all paths are fooled.
      ``kappa > 0`` keeps a safety margin so a fooled path is less likely to flip back.

    For one path both reduce to ordinary untargeted objectives (CE, capped CW margin).
    """
    if kind not in ("min", "margin"):
        raise DecorrError(f"unknown adaptive objective kind {kind!r}; use 'min' or 'margin'")

    def loss_fn(x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = path_logits(autoencoder, classifier, x_adv)
        if kind == "min":
            per_path = torch.stack([F.cross_entropy(z, y, reduction="none") for z in logits])
            return per_path.amin(dim=0).mean()
        per_path = torch.stack([margins(z, y).clamp(max=kappa) for z in logits])
        return per_path.sum(dim=0).mean()

    return loss_fn


@torch.no_grad()
def path_predictions(autoencoder: nn.Module, classifier: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Predicted label of each path's reconstruction: Tensor[P, N] (int64)."""
    return torch.stack([logits.argmax(dim=1) for logits in path_logits(autoencoder, classifier, x)])


def dna_accuracy(preds: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracies (fractions in [0, 1]) from per-path predictions ``preds`` [P, N] and labels ``y`` [N].

    ``"either"``: correct when any path is correct (the defence's accuracy; for one path it equals
    ``"path0"``); ``"path<n>"``: path n alone; ``"mean"``: the mean of the per-path accuracies.
    """
    if preds.dim() != 2 or preds.shape[1] != y.shape[0]:
        raise ValueError(f"preds must be [paths, N] with N = {y.shape[0]}, got {tuple(preds.shape)}")
    correct = preds == y.to(preds.device)[None, :]
    per_path = correct.float().mean(dim=1)
    result = {"either": correct.any(dim=0).float().mean().item()}
    result.update({f"path{n}": acc.item() for n, acc in enumerate(per_path)})
    result["mean"] = per_path.mean().item()
    return result


def reconstruction_errors(recons: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Per-path, per-sample mean squared error: Tensor[P, N].

    ``errors.mean(dim=1)`` is each path's batch MSE; a data-parallel trainer gathers these per-sample
    values over processes (along dim 1) to form the global batch's MSE exactly.
    """
    return torch.stack([(recon - x).pow(2).flatten(1).mean(dim=1) for recon in recons])


def autoencoder_loss_from_errors(
    errors: torch.Tensor,
    latents: Sequence[torch.Tensor] | None = None,
    lambda_corr: float = 0.05,
    corr_fn: CorrFn | None = None,
) -> torch.Tensor:
    """``sqrt(sum_n MSE_n^2) + lambda * sum_{i<j} L_corr(b_i, b_j)`` from per-sample ``errors`` [P, N].

    One path: the plain MSE (no correlation term). For two paths the sum over pairs is the SPEC's
    single ``L_corr(b1, b2)``. ``corr_fn`` defaults to :func:`decorr.loss.correlation_loss`; the
    latents are flattened after the batch dimension and must hold the whole (global) batch.
    """
    mse = errors.mean(dim=1)
    if mse.numel() == 1:
        return mse[0]
    loss = mse.pow(2).sum().sqrt()
    if lambda_corr == 0:
        return loss
    if latents is None or len(latents) != mse.numel():
        raise ValueError(f"need one latent per path ({mse.numel()}) for the correlation term")
    if corr_fn is None:
        from decorr.loss import correlation_loss as corr_fn  # lazy: decorr.loss imports more
    flat = [z.flatten(1) for z in latents]
    corr = sum(corr_fn(flat[i], flat[j]) for i in range(len(flat)) for j in range(i + 1, len(flat)))
    return loss + lambda_corr * corr


def autoencoder_loss(
    recons: Sequence[torch.Tensor],
    x: torch.Tensor,
    latents: Sequence[torch.Tensor] | None = None,
    lambda_corr: float = 0.05,
    corr_fn: CorrFn | None = None,
) -> torch.Tensor:
    """Training loss of the DNA (SPEC section 6): ``sqrt(MSE(x, r1)^2 + MSE(x, r2)^2) + lambda * L_corr(b1, b2)``.

    For the plain autoencoder (one reconstruction) it is ``MSE(x, r)``.
    """
    return autoencoder_loss_from_errors(reconstruction_errors(recons, x), latents, lambda_corr, corr_fn)


__all__ = [
    "adaptive_objective",
    "autoencoder_loss",
    "autoencoder_loss_from_errors",
    "dna_accuracy",
    "margins",
    "paper_objective",
    "path_logits",
    "path_predictions",
    "reconstruction_errors",
]
