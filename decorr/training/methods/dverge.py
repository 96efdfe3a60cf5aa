"""``dverge``: DVERGE (Yang et al., NeurIPS 2020) for N members on the one loop.

The objective, the feature distillation and the per-epoch layer draw are those of :mod:`decorr.training.dverge`
(:func:`~decorr.training.dverge.dverge_loss`: each member's batch distilled toward an unrelated target batch,
every other member trained to classify it correctly; ``--dverge-plus-adv`` adds each member's own PGD
examples). Defaults are P1's MNIST setting of :class:`decorr.training.dverge.DvergeConfig` (SPEC section 5):
eps 0.15, 20 steps of 3/255 at each member's feature layer; DVERGE's own CIFAR-10 setting is
``--dverge-eps 0.07 --dverge-steps 10 --dverge-step-size 0.007 --dverge-layers L1 L2 ...``.

From scratch (``--method dverge``) the members start freshly initialised; ``--init SPEC ...`` starts
from trained models, as ``train/dverge.py`` does. DVERGE on decorrelated members (the paper's
``dec+dverge`` for pairs) is two runs: ``--method dec`` into RUN_DIR, then ``--method dverge --init
RUN_DIR``. Unlike ``train/dverge.py`` this trainer measures no transfer rates per epoch (accuracy and
feature statistics only); evaluate the checkpoint with ``eval/transfer.py RUN_DIR``.
"""

from __future__ import annotations

from typing import Any, Iterable

from torch import Tensor

from decorr.training.dverge import (STREAM_DISTILL, TARGET_SEED_OFFSET, DvergeConfig, choose_layer, dverge_loss,
                           stream_generator)
from decorr.training.methods.base import EnsembleTask, register_method


def dverge_config(config: Any) -> DvergeConfig:
    """The :class:`DvergeConfig` of an ensemble config's ``dverge_*`` fields (its validation applies)."""
    return DvergeConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                        layers=tuple(config.dverge_layers), eps=config.dverge_eps, steps=config.dverge_steps,
                        step_size=config.dverge_step_size, random_start=config.dverge_random_start,
                        plus_adv=config.dverge_plus_adv, seed=config.seed)


@register_method("dverge")
class DvergeMethodTask(EnsembleTask):
    """N members, every source batch distilled by each member and learnt by the others."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dverge = dverge_config(self.config)

    def begin_epoch(self, epoch: int) -> None:
        self.layer = choose_layer(self.dverge.layers, self.config.seed, epoch)
        self.distill_layers = [self.layer or self.layers[n] for n in self.names]
        self.generator = stream_generator(self.config.seed, epoch, STREAM_DISTILL)

    def batches(self, epoch: int) -> Iterable[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]:
        # Target batches: a second, independent shuffle of the training set (as DvergeTask draws them).
        return zip(self.draw(epoch, self.config.seed), self.draw(epoch, self.config.seed + TARGET_SEED_OFFSET))

    def loss(self, batch: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, dict[str, Tensor]]:
        (xs, ys), (xt, _yt) = batch
        xs, xt = self.channels_last(xs), self.channels_last(xt)
        return dverge_loss(self.wrapped, xs, ys, xt, self.dverge, self.distill_layers, generator=self.generator)

    def end_epoch(self, epoch: int, terms: dict[str, float], seconds: float) -> dict[str, Any]:
        metrics = super().end_epoch(epoch, terms, seconds)
        metrics["layer"] = self.layer if self.layer is not None else ",".join(sorted(set(self.distill_layers)))
        return metrics
