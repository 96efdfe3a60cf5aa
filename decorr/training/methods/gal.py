"""``gal``: GAL (Kariyappa & Qureshi, 2019, Gradient Alignment Loss): the objective and its task.

GAL differentiates input gradients (``create_graph=True``: double backpropagation); the loop's
``accelerator.backward`` of such a loss is an ordinary backward through a larger graph."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from decorr.errors import DecorrError
from decorr.training.methods.base import EnsembleTask, register_method
from decorr.training.methods.shared import with_loss, LOG_OFFSET, ce_or_zero, coefficient, member_input_gradients, pairwise_cosine

__all__ = ['GalTask', 'gal_loss']

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
    lamda = coefficient("lamda", lamda)
    log_offset = coefficient("log_offset", log_offset)
    if ce_reduction not in ("sum", "mean"):
        raise DecorrError(f"unknown ce_reduction {ce_reduction!r}; use sum or mean")
    cosines = pairwise_cosine(input_grads)
    coherence = torch.log(cosines.exp().sum(dim=-1) + log_offset).mean()
    ce = ce_or_zero(logits, y, len(input_grads), input_grads[0].shape[0], coherence)
    if ce_reduction == "mean":
        ce = ce / len(input_grads)
    loss = ce + lamda * coherence
    return loss, {"ce": ce.detach(), "coherence": coherence.detach()}


@register_method("gal")
class GalTask(EnsembleTask):
    """GAL: :func:`gal_loss` of the members' input gradients (double backprop)."""

    def loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        x, y = batch
        grads, logits = member_input_gradients(self.wrapped, self.channels_last(x), y, create_graph=True)
        return with_loss(*gal_loss(grads, logits=logits, y=y, lamda=self.config.gal_lambda))
