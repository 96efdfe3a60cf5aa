"""``adp``: ADP (Pang et al., ICML 2019, Adaptive Diversity Promoting): the objective and its task.

Follows the authors' training code (DVERGE ``train/train_adp.py``, TRS ``train/Empirical/trainer.py``,
Pang et al.'s own code for the names); where code and paper differ the code wins (``docs/diversity.md``)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from decorr.training.methods.base import EnsembleTask, register_method
from decorr.training.methods.shared import with_loss, DET_OFFSET, LOG_OFFSET, check_labels, coefficient, member_tensors, sum_ce

__all__ = ['AdpTask', 'adp_loss']

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
    logits = member_tensors(logits, "logits")
    check_labels(y, logits)
    alpha = coefficient("alpha", alpha)
    beta = coefficient("beta", beta)
    det_offset = coefficient("det_offset", det_offset, positive=True)
    log_offset = coefficient("log_offset", log_offset)
    batch, classes = logits[0].shape
    ce = sum_ce(logits, y)
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


@register_method("adp")
class AdpTask(EnsembleTask):
    """ADP: :func:`adp_loss` of the members' logits (float32 for the log-det)."""

    def loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        x, y = batch
        logits, _ = self.forward(x, features=False)
        return with_loss(*adp_loss([z.float() for z in logits], y, alpha=self.config.adp_alpha,
                                    beta=self.config.adp_beta))
