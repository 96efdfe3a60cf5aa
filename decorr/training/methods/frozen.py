"""``dec-frozen``: one deployable model decorrelated from a fixed, independently trained surrogate.

The attacker's likely surrogate (``--surrogate SPEC``, any model spec: a checkpoint, ``CKPT:MODEL`` or
``ARCH=WEIGHTS``) is loaded once, frozen and kept in eval mode; one model is trained with::

    L = CE(model) + lambda * L_corr(f_surrogate, f_model)

``L_corr(z1, z2)`` regresses z2 on z1 (:func:`decorr.loss.correlation_loss`), so the *model's*
features are regressed on the *surrogate's*. Why this direction: the question a transfer attack asks
is whether what the surrogate computes explains what the model computes; the one-way pair loss puts
the same reference model in the regressor's place (model1 regressed on model0), so this is the pair
objective with model0 frozen. The batch must exceed the surrogate's feature width plus one (checked
before any work). The surrogate gets no gradient and no batch-norm update.

The checkpoint holds the trained model only (``model0``); its ``hyperparameters`` record the
surrogate's spec and the SHA-256 of its weights, so ``--resume`` with another surrogate is refused.
The evaluation after every epoch includes the surrogate (``acc_surrogate``, ``r2_surrogate_model0``:
the model's test features explained by the surrogate's).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from decorr.features import record_features
from decorr.loss import correlation_loss
from decorr.training.methods.base import EnsembleTask, register_method

SURROGATE = "surrogate"


@register_method("dec-frozen")
class DecFrozenTask(EnsembleTask):
    """One model, ``CE + lambda * L_corr(surrogate features, model features)``."""

    min_models = 1
    max_models = 1
    uses_correlation = True

    @classmethod
    def regressors(cls, config: Any, names: list[str]) -> list[str]:
        return [SURROGATE]

    def start(self, models: dict[str, nn.Module], optimizer: torch.optim.Optimizer, start_epoch: int) -> None:
        super().start(models, optimizer, start_epoch)
        surrogate = self.members.surrogate
        assert surrogate is not None
        self.surrogate = surrogate.module.to(self.run.device).eval().requires_grad_(False)
        self.surrogate_layer = surrogate.layer

    def begin_epoch(self, epoch: int) -> None:
        self.lambda_corr = self.config.lambda_at(epoch)
        self.surrogate.eval()

    def loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch
        logits, features = self.forward(x)
        (ce,) = self.member_ce(logits, y)
        loss, terms = ce, {"ce0": ce.detach()}
        if self.lambda_corr > 0:
            with torch.no_grad(), record_features(self.surrogate, self.surrogate_layer) as recorded:
                self.surrogate(self.channels_last(x))
            corr = correlation_loss(recorded[self.surrogate_layer], features[0], eps_mode=self.config.corr_eps)
            terms["corr"] = corr.detach()
            loss = loss + self.lambda_corr * corr
        terms["loss"] = loss.detach()
        return loss, terms

    def evaluated_models(self) -> tuple[dict[str, nn.Module], dict[str, str]]:
        return ({SURROGATE: self.surrogate, **{n: self.models[n] for n in self.names}},
                {SURROGATE: self.surrogate_layer, **self.layers})
