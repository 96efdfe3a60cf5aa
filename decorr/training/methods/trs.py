"""``trs``: TRS (Yang et al., NeurIPS 2021, Transferability Reduced Smooth ensembles): the objective, the
radius schedule, the perturbed batch of ``--trs-plus-adv``, and the task.

Follows ``train/Empirical/trainer.py`` of AI-secure/Transferability-Reduced-Smooth-Ensemble. Its CE terms
and per-sample cosines are batch means of each process's shard (as in the authors' single-process code);
under data parallelism the per-sample terms average exactly, the smoothness term (the norm of
batch-mean-CE gradients, ~1/batch^2) is that of the shard's batch size."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from decorr.errors import DecorrError
from decorr.training.methods.base import EnsembleTask, register_method
from decorr.training.methods.shared import (with_loss, ce_or_zero, coefficient, input_gradients, member_input_gradients,
                                            member_tensors, pairwise_cosine, stream_generator)

#: stream_generator stream of TRS's random starts (per epoch).
STREAM_TRS = 3

__all__ = ['TrsTask', 'trs_loss', 'trs_schedule', 'trs_smooth_inputs']

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
    scale = coefficient("scale", scale)
    coeff = coefficient("coeff", coeff)
    lamda = coefficient("lamda", lamda)
    grads = member_tensors(input_grads, "input_grads")
    cos = pairwise_cosine(grads).abs().mean(dim=0).mean()
    smooth_source = grads if smooth_grads is None else member_tensors(smooth_grads, "smooth_grads")
    if len(smooth_source) != len(grads) or smooth_source[0].shape != grads[0].shape:
        raise DecorrError(f"smooth_grads must hold one gradient per member ({len(grads)}) shaped like input_grads "
                          f"{tuple(grads[0].shape)}, got {len(smooth_source)} of {tuple(smooth_source[0].shape)}")
    smooth = torch.stack([_magnitude(g) for g in smooth_source]).mean()
    ce = ce_or_zero(logits, y, len(grads), grads[0].shape[0], cos)
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
    init_eps = coefficient("init_eps", init_eps)
    adv_eps = coefficient("adv_eps", adv_eps)
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
    eps = coefficient("eps", eps)
    step_size = eps / 3.0 if step_size is None else coefficient("step_size", step_size)
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
        grads, _ = input_gradients(models, adv, y[half:], create_graph=True)
        ascent = torch.stack([_magnitude(g) for g in grads]).mean()
        (direction,) = torch.autograd.grad(ascent, adv)
        with torch.no_grad():
            adv = adv + step_size * direction.sign()
            adv = torch.minimum(torch.maximum(adv, start - eps), start + eps).clamp(low, high)
    return torch.cat([clean, adv.detach()])


@register_method("trs")
class TrsTask(EnsembleTask):
    """TRS: :func:`trs_loss`, the radius from :func:`trs_schedule` every epoch."""

    min_batch = 2  # trs_smooth_inputs perturbs the second half of the batch

    def begin_epoch(self, epoch: int) -> None:
        config = self.config
        self.eps = trs_schedule(epoch, config.epochs, init_eps=config.trs_init_eps, adv_eps=config.trs_adv_eps)
        self.generator = stream_generator(config.seed, epoch, STREAM_TRS)

    def loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        x, y = batch
        config = self.config
        x = self.channels_last(x)
        grads, logits = member_input_gradients(self.wrapped, x, y, create_graph=True)
        smooth = None
        if config.trs_plus_adv:  # TRS's PGD batch (in train mode, as their trainer runs it)
            perturbed = trs_smooth_inputs(self.wrapped, x, y, self.eps, steps=config.trs_steps,
                                          generator=self.generator)
            smooth, _ = member_input_gradients(self.wrapped, perturbed, y, create_graph=True)
        loss, terms = trs_loss(grads, logits=logits, y=y, smooth_grads=smooth, scale=config.trs_scale,
                               coeff=config.trs_coeff, lamda=config.trs_lambda)
        return with_loss(loss, {**terms, "eps": loss.new_tensor(self.eps).detach()})
