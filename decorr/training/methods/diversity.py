"""``adp``, ``gal`` and ``trs``: the established ensemble-diversity objectives of :mod:`decorr.training.diversity`.

Each task is a thin wrapper; the objectives, their defaults and where they come from (the authors'
code: ``zjysteven/DVERGE`` and ``AI-secure/Transferability-Reduced-Smooth-Ensemble``) are documented
in :mod:`decorr.training.diversity` and ``docs/diversity.md``:

* ADP (Pang et al., ICML 2019): ``sum CE - alpha H(mean p) - beta log det``, alpha 2, beta 0.5.
* GAL (Kariyappa & Qureshi, 2019): ``sum CE + lamda * mean_b log sum_{i<j} exp(cos(g_i, g_j))``, lamda 0.5.
* TRS (Yang et al., NeurIPS 2021): ``sum CE + scale (coeff L_cos + lamda L_smooth)``, 5 / 2 / 2, the
  smoothness radius scheduled from 0.1 to 0.2 over the run (``--trs-plus-adv``: the smoothness term at
  TRS's PGD batch, 6 steps of eps/3; default off, as in ``train_trs.py`` and its released scripts).

GAL and TRS differentiate input gradients (``create_graph=True``: double backpropagation); the loop's
``accelerator.backward`` of such a loss is an ordinary backward through a larger graph, under autocast
too. Their CE terms and per-sample cosines are batch means of each process's shard (as in the authors'
single-process code); under data parallelism the per-sample terms average exactly, TRS's smoothness
term (the norm of batch-mean-CE gradients, ~1/batch^2) is then that of the shard's batch size.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from decorr.training.diversity import adp_loss, gal_loss, member_input_gradients, trs_loss, trs_schedule, trs_smooth_inputs
from decorr.training.dverge import stream_generator
from decorr.training.methods.base import EnsembleTask, register_method

#: stream_generator stream of TRS's random starts (per epoch).
STREAM_TRS = 3


def _with_loss(loss: Tensor, terms: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    return loss, {**terms, "loss": loss.detach()}


@register_method("adp")
class AdpTask(EnsembleTask):
    """ADP: :func:`decorr.training.diversity.adp_loss` of the members' logits (float32 for the log-det)."""

    def loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        x, y = batch
        logits, _ = self.forward(x, features=False)
        return _with_loss(*adp_loss([z.float() for z in logits], y, alpha=self.config.adp_alpha,
                                    beta=self.config.adp_beta))


@register_method("gal")
class GalTask(EnsembleTask):
    """GAL: :func:`decorr.training.diversity.gal_loss` of the members' input gradients (double backprop)."""

    def loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        x, y = batch
        grads, logits = member_input_gradients(self.wrapped, self.channels_last(x), y, create_graph=True)
        return _with_loss(*gal_loss(grads, logits=logits, y=y, lamda=self.config.gal_lambda))


@register_method("trs")
class TrsTask(EnsembleTask):
    """TRS: :func:`decorr.training.diversity.trs_loss`, the radius from :func:`trs_schedule` every epoch."""

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
        return _with_loss(loss, {**terms, "eps": loss.new_tensor(self.eps).detach()})
