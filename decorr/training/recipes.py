"""The papers' recipes as presets of the ensemble trainer: P1's classifier pairs and P1's DVERGE fine-tuning.

``train/pair_classifiers.py`` and ``train/dverge.py`` keep their flags and defaults (the paper's setting,
SPEC sections 2 and 5); each config here is translated into an :class:`~decorr.training.ensemble.EnsembleConfig`
with two (or N) members and trained by the one trainer with the registered method:

- :class:`PairConfig` ``--mode cor | dec | param`` -> ``--method ce | dec | param`` with 2 members;
- :class:`DvergeConfig` -> ``--method dverge --init ...``, plus the per-epoch transfer evaluation, which
  the script passes as a monitor (:class:`decorr.evaluation.monitor.TransferMonitor`) since training
  imports no evaluation code.

The checkpoint records the recipe's own settings (kind ``pair`` / ``dverge``, the recipe config as
``hyperparameters``), so runs of earlier versions keep resuming.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from decorr.config import check_at_least, check_finite, check_positive, check_seed, check_subset, opt
from decorr.errors import DecorrError, pixel_value
from decorr.models import model_spec
from decorr.specs import SpecOptions
from decorr.training.entry import RunOptions
from decorr.training.ensemble import EnsembleConfig, train_ensemble
from decorr.training.methods.base import EpochMonitor

__all__ = ["DEFAULT_EVAL_EPS", "DvergeConfig", "MODES", "PairConfig", "pair_ensemble_config", "train_dverge",
           "train_pair", "dverge_ensemble_config"]

MODES = ("cor", "dec", "param")
#: ``--mode`` -> the registered method it is.
PAIR_METHODS = {"cor": "ce", "dec": "dec", "param": "param"}
#: The transfer evaluation's epsilons of the DVERGE recipe (SPEC sections 4 and 5).
DEFAULT_EVAL_EPS = (0.05, 0.10, 0.15)


# ------------------------------------------------------------------------------------------------
# Pairs (SPEC section 2)


@dataclass
class PairConfig:
    """Hyperparameters of a pair run; the defaults are the paper's MNIST setting."""

    arch: str = opt("mnist_cnn", "registry model name (mnist_cnn, mnist_fc, ...)")
    mode: str = opt("dec", "cor: independent, dec: decorrelated, param: parameter distance", choices=MODES)
    dataset: str = opt("mnist", "dataset name or path to an .npz")
    epochs: int = opt(20, "number of epochs")
    batch_size: int = opt(1000, "global batch size")
    lr: float = opt(5e-3, "Adam learning rate")
    lambda_corr: float = opt(0.05, "weight of the correlation loss (mode dec)")
    target_distance: float = opt(1000.0, "D of the parametric-distance pairs (mode param)")
    distance_weight: float = opt(1e-5, "weight of the distance term (mode param)")
    feature_layer: str | None = opt(None, "module name of the decorrelated layer (default: the model's)")
    #: The paper regresses model1's features on model0's only; "both" averages the loss over the two
    #: directions, since the one-way loss leaves model0's features explained by model1's.
    corr_direction: str = opt("forward", "regress model1 on model0 (the paper) or average both directions",
                              choices=("forward", "both"))
    #: Epochs of cross-entropy alone before the correlation term is switched on (the paper: 0). The
    #: loss has a trivial minimum, a model whose feature layer is constant (L_corr = 0 exactly), which a
    #: freshly initialised model can fall into within the first steps and never leave; a short warm-up
    #: lets both models build features first.
    corr_warmup_epochs: int = opt(0, "epochs of cross-entropy alone before the correlation loss starts (paper: 0); "
                                     "guards against a model collapsing to constant features")
    seed: int = opt(0, "seed of the initialisation and the batches")
    train_subset: int | None = opt(None, "use only the first N training images")
    test_subset: int | None = opt(None, "use only the first N test images")
    eval_batch_size: int = opt(1000, "batch size of the evaluation after every epoch")
    model_kwargs: dict[str, Any] = opt({}, "keyword arguments for the registry model, e.g. "
                                           "'{\"mean\": [0], \"std\": [1]}' (raw pixels)")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise DecorrError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.corr_direction not in ("forward", "both"):
            raise DecorrError(f"unknown correlation direction {self.corr_direction!r}; use forward or both")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            check_at_least(name, getattr(self, name), 1)
        check_at_least("corr_warmup_epochs", self.corr_warmup_epochs, 0)
        check_positive("lr", self.lr)
        check_finite("lambda_corr", self.lambda_corr, minimum=0)
        check_finite("target_distance", self.target_distance)
        check_finite("distance_weight", self.distance_weight, minimum=0)
        check_seed(self.seed)
        check_subset("train_subset", self.train_subset)
        check_subset("test_subset", self.test_subset)
        if self.mode == "dec" and self.lambda_corr == 0:
            raise DecorrError("--mode dec with --lambda-corr 0 is an independent pair; use --mode cor, or a "
                              "positive --lambda-corr (the paper: 0.05)")
        if self.mode == "dec" and self.corr_warmup_epochs >= self.epochs:
            raise DecorrError(f"a warm-up of {self.corr_warmup_epochs} epochs leaves none of the {self.epochs} for the "
                              "correlation loss; lower --corr-warmup-epochs or raise --epochs")
        if self.feature_layer is None:
            self.feature_layer = model_spec(self.arch).feature_layer
        if self.feature_layer is None:
            raise DecorrError(f"model {self.arch!r} has no default feature layer; pass --feature-layer MODULE_NAME")

    @property
    def lambda_effective(self) -> float:
        return self.lambda_corr if self.mode == "dec" else 0.0

    def lambda_at(self, epoch: int) -> float:
        """The correlation weight in epoch ``epoch`` (0-based): 0 during the warm-up."""
        return 0.0 if epoch < self.corr_warmup_epochs else self.lambda_effective


def pair_ensemble_config(config: PairConfig) -> EnsembleConfig:
    """The ensemble trainer's config that trains this pair (2 members, the mode's method)."""
    return EnsembleConfig(
        method=PAIR_METHODS[config.mode], num_models=2, arch=(config.arch,), dataset=config.dataset,
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
        feature_layer=(config.feature_layer,) if config.feature_layer else (),
        lambda_corr=config.lambda_corr if config.mode == "dec" else EnsembleConfig.lambda_corr,
        corr_direction="one-way" if config.corr_direction == "forward" else "both",
        corr_warmup_epochs=config.corr_warmup_epochs if config.mode == "dec" else 0,
        param_distance=config.target_distance, param_weight=config.distance_weight, seed=config.seed,
        train_subset=config.train_subset, test_subset=config.test_subset, eval_batch_size=config.eval_batch_size,
        model_kwargs=dict(config.model_kwargs))


def train_pair(config: PairConfig, options: RunOptions = RunOptions()) -> dict[str, Any]:
    """Train a pair as configured (the ensemble trainer with 2 members), checkpointing after every epoch;
    return the last epoch's metrics."""
    return train_ensemble(pair_ensemble_config(config), options, kind="pair", recorded=asdict(config),
                          default_name=f"{config.arch}_{config.mode}")


# ------------------------------------------------------------------------------------------------
# DVERGE fine-tuning (SPEC section 5)


@dataclass
class DvergeConfig:
    """Hyperparameters of a DVERGE run; the defaults are P1's MNIST setting (SPEC section 5).

    ``layers``: empty for each model's own feature layer (from its checkpoint), one name for a fixed
    layer, several to draw one at random at the start of every epoch (DVERGE's random layer).
    ``adv_*`` (plus adversarial) default to the distillation's eps and step size with 10 steps.
    ``batches_per_epoch`` stops each epoch after that many batches of its shuffle (each epoch then
    sees a different part of the training set); ``train_subset`` uses the first N images only.
    ``eval_subset`` evaluates the transfer rates on the first N test images (None: all of them),
    ``accuracy_subset`` the natural accuracy (None: all); ``eval_features`` adds the pairs' feature R^2.
    """

    epochs: int = opt(10, "number of epochs")
    batch_size: int = opt(1000, "global batch size")
    lr: float = opt(5e-3, "Adam learning rate")
    layers: tuple[str, ...] = opt((), "distillation layer; several: one drawn at random every epoch (default: each "
                                      "model's feature layer)", flag="--layer", metavar="MODULE")
    eps: float = opt(0.15, "distillation Linf radius (pixel units)", type=pixel_value)
    steps: int = opt(20, "distillation steps")
    step_size: float = opt(3 / 255, "distillation step (pixel units)", type=pixel_value)
    random_start: bool = opt(False, "start the distillation at a random point of the ball")
    momentum: float = opt(0.0, "MI momentum of the distillation")
    plus_adv: bool = opt(False, "also train each model on its own PGD examples")
    adv_weight: float = opt(1.0, "weight of the plus-adv cross-entropy")
    adv_eps: float | None = opt(None, "plus-adv PGD radius (default: --eps)", type=pixel_value)
    adv_steps: int = opt(10, "plus-adv PGD steps")
    adv_step_size: float | None = opt(None, "plus-adv PGD step (default: --step-size)", type=pixel_value)
    seed: int = opt(0, "seed of the batches, the layer draws and the random starts")
    dataset: str | None = opt(None, "dataset name or .npz (default: the checkpoints' dataset)")
    train_subset: int | None = opt(None, "train on the first N training images")
    batches_per_epoch: int | None = opt(None, "stop every epoch after N batches of its shuffle (a shorter epoch; "
                                              "default: all)")
    eval_subset: int | None = opt(None, "transfer rates on the first N test images (default all)")
    eval_eps: tuple[float, ...] = opt(DEFAULT_EVAL_EPS, "epsilons of the PGD transfer evaluation", type=pixel_value)
    eval_steps: int = opt(40, "PGD steps of the transfer evaluation")
    eval_step_size: float = opt(3 / 255, "PGD step of the transfer evaluation", type=pixel_value)
    eval_batch_size: int = opt(1000, "batch size of the evaluation")
    eval_seed: int = opt(0, "seed of the evaluation's PGD random starts")
    eval_features: bool = opt(True, "skip the pairs' feature R^2 in the evaluation", flag="--no-features")
    accuracy_subset: int | None = opt(None, "natural accuracy on the first N test images (default all)")

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        self.eval_eps = tuple(float(e) for e in self.eval_eps)
        check_at_least("epochs", self.epochs, 0)
        for name in ("batch_size", "eval_steps", "eval_batch_size", "adv_steps"):
            check_at_least(name, getattr(self, name), 1)
        check_at_least("steps", self.steps, 0)
        check_positive("lr", self.lr)
        check_positive("eval_step_size", self.eval_step_size)
        for name in ("eps", "step_size", "momentum", "adv_weight"):
            check_finite(name, getattr(self, name), minimum=0)
        for name in ("adv_eps", "adv_step_size"):
            if getattr(self, name) is not None:
                check_finite(name, getattr(self, name), minimum=0)
        for eps in self.eval_eps:
            check_finite("eval_eps", eps, minimum=0)
        check_seed(self.seed)
        check_seed(self.eval_seed, "eval_seed")
        for name in ("train_subset", "batches_per_epoch", "eval_subset", "accuracy_subset"):
            check_subset(name, getattr(self, name))
        if len(set(self.layers)) != len(self.layers):
            raise DecorrError("a layer is listed twice in --layer; list each once")
        if not self.eval_eps:
            raise DecorrError("no evaluation epsilon; pass e.g. --eval-eps 0.05 0.1 0.15")
        if self.adv_eps is None:
            self.adv_eps = self.eps
        if self.adv_step_size is None:
            self.adv_step_size = self.step_size


def dverge_ensemble_config(config: DvergeConfig, init: Sequence[str]) -> EnsembleConfig:
    """The ensemble trainer's config that runs this recipe (``--method dverge --init ...``)."""
    return EnsembleConfig(
        method="dverge", init=tuple(str(s) for s in init), dataset=config.dataset, epochs=config.epochs,
        batch_size=config.batch_size, lr=config.lr, batches_per_epoch=config.batches_per_epoch,
        dverge_eps=config.eps, dverge_steps=config.steps, dverge_step_size=config.step_size,
        dverge_layers=tuple(config.layers), dverge_random_start=config.random_start, dverge_momentum=config.momentum,
        dverge_plus_adv=config.plus_adv, dverge_adv_weight=config.adv_weight, dverge_adv_eps=config.adv_eps,
        dverge_adv_steps=config.adv_steps, dverge_adv_step_size=config.adv_step_size, seed=config.seed,
        train_subset=config.train_subset, eval_batch_size=config.eval_batch_size)


def train_dverge(config: DvergeConfig, init: Sequence[str], options: RunOptions = RunOptions(), *,
                 spec_options: SpecOptions | None = None, monitors: Sequence[EpochMonitor] = ()) -> Any:
    """Fine-tune the models of ``init`` (model specs) with DVERGE, checkpointing after every epoch (epoch 0
    holds the starting point when a monitor evaluates it); return the last metrics, or the monitor's
    record (the script's :class:`decorr.evaluation.monitor.TransferMonitor`: transfer rates before the
    first epoch and after every epoch, written to ``RUN_DIR/dverge.json``)."""
    if not init:
        raise DecorrError("DVERGE fine-tunes trained models; pass --init SPEC ... or --init-from PAIR_DIR")
    ensemble = dverge_ensemble_config(config, init)
    recorded = {**asdict(config), "init": [str(s) for s in init]}
    return train_ensemble(ensemble, options, spec_options=spec_options, kind="dverge", recorded=recorded,
                          monitors=monitors, default_name="dverge")
