"""Training pairs of classifiers: independent ("cor"), decorrelated ("dec") or parameter-distance ("param").

SPEC section 2 (P1, Fig. 1-3): two models trained at once on the same batches with one Adam optimiser::

    cor / dec:  L = sqrt(CE1^2 + CE2^2) + lambda * L_corr(f1, f2)      (lambda = 0 for "cor")
    param:      L = CE1 + CE2 + w * (||theta1 - theta2||^2 - D)^2

All batch statistics (the CE means and the correlation loss) are those of the global batch, gathered
with gradient across processes, so N processes train exactly like one.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from decorr.checkpoint import model_entry
from decorr.config import opt
from decorr.data import ImageSplit, iterate_batches, last_batch_too_small, load_dataset, num_batches, require_training_images
from decorr.distributed import all_gather_with_grad, all_reduce_sum, global_mean
from decorr.errors import DecorrError
from decorr.features import DEAD_FEATURES_BELOW, dead_features_warning, feature_diagnostics, record_features
from decorr.training.loop import Built, Task, fit, prefixed
from decorr.loss import correlation_loss, pca_pearson, parameter_distance, r_squared
from decorr.models import create_model, model_spec
from decorr.features import eval_mode, r2_text
from decorr.config import check_at_least, check_finite, check_positive, check_seed, check_subset
from decorr.training.run import TrainingRun, check_finite_features, releases_run_lock, unwrap

MODES = ("cor", "dec", "param")
MODEL_NAMES = ("model0", "model1")

__all__ = ["PairConfig", "PairTask", "train_pair", "pair_objective", "evaluate_models", "feature_width", "MODES"]


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


def feature_width(model: nn.Module, layer: str, input_shape: tuple[int, ...]) -> int:
    """Number of features (after flattening) that ``layer`` produces for one input."""
    with eval_mode(model), torch.no_grad(), record_features(model, layer) as feats:
        model(torch.zeros(1, *input_shape))
    return int(feats[layer][0].numel())



def pair_objective(
    logits: tuple[torch.Tensor, torch.Tensor],
    features: tuple[torch.Tensor, torch.Tensor],
    y: torch.Tensor,
    config: PairConfig,
    models: tuple[nn.Module, nn.Module],
    lambda_corr: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The pair loss of SPEC section 2 on the global batch, and its terms for logging.

    ``lambda_corr`` overrides ``config.lambda_effective`` (the warm-up passes 0).
    """
    weight = config.lambda_effective if lambda_corr is None else lambda_corr
    ce = [global_mean(F.cross_entropy(out, y, reduction="none")) for out in logits]
    terms: dict[str, torch.Tensor] = {"ce0": ce[0].detach(), "ce1": ce[1].detach()}
    if config.mode == "param":
        distance = parameter_distance(unwrap(models[0]), unwrap(models[1]))
        terms["distance"] = distance.detach()
        loss = ce[0] + ce[1] + config.distance_weight * (distance - config.target_distance) ** 2
    else:
        loss = torch.sqrt(ce[0] ** 2 + ce[1] ** 2)
        if weight > 0:
            corr = correlation_loss(features[0], features[1])
            if config.corr_direction == "both":
                corr = 0.5 * (corr + correlation_loss(features[1], features[0]))
            terms["corr"] = corr.detach()
            loss = loss + weight * corr
    terms["loss"] = loss.detach()
    return loss, terms


@torch.no_grad()
def evaluate_models(
    models: dict[str, nn.Module],
    split: ImageSplit,
    layers: dict[str, str],
    *,
    batch_size: int = 1000,
    device: torch.device | str = "cpu",
    shard: tuple[int, int] = (0, 1),
    ensemble: bool = False,
) -> dict[str, Any]:
    """Test accuracy of every model and, for each pair of models, the feature R^2 and 1-D PCA Pearson.

    With ``ensemble=True`` also ``acc_ensemble``: the accuracy of the models' mean softmax, from the
    same forward passes.

    Per model also ``active_features_<name>`` (the fraction of feature columns that vary over the split)
    and ``effective_rank_<name>`` (of the centred features, see :func:`decorr.features.feature_diagnostics`).

    Each process evaluates its shard; features and counts are gathered so every process gets the
    numbers of the whole split.
    """
    names = list(models)
    plain = {name: unwrap(models[name]) for name in names}
    with eval_mode(*plain.values()):
        return _evaluate(plain, split, layers, batch_size, device, shard, ensemble)


def _evaluate(plain: dict[str, nn.Module], split: ImageSplit, layers: dict[str, str], batch_size: int,
              device: torch.device | str, shard: tuple[int, int], ensemble: bool = False) -> dict[str, Any]:
    names = list(plain)
    correct = {name: torch.zeros((), device=device) for name in names}
    correct_ensemble = torch.zeros((), device=device)
    features: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    count = torch.zeros((), device=device)
    for x, y in iterate_batches(split, batch_size, shuffle=False, shard=shard, device=device):
        probs = 0
        for name in names:
            with record_features(plain[name], layers[name]) as feats:
                logits = plain[name](x)
            correct[name] += (logits.argmax(1) == y).sum()
            features[name].append(feats[layers[name]].flatten(1).float().cpu())
            if ensemble:
                probs = probs + F.softmax(logits.float(), dim=1)
        if ensemble:
            correct_ensemble += (probs.argmax(1) == y).sum()
        count += len(y)
    total = all_reduce_sum(count)
    result: dict[str, Any] = {f"acc_{n}": float(all_reduce_sum(correct[n]) / total) for n in names}
    if ensemble:
        result["acc_ensemble"] = float(all_reduce_sum(correct_ensemble) / total)
    gathered = {n: all_gather_with_grad(torch.cat(features[n]).to(device)).cpu() for n in names}
    check_finite_features(gathered, "on the test images")  # before the SVDs below
    for n in names:
        # Fraction of feature columns that vary over the split (0: a dead, constant layer), and the
        # effective rank of the centred features (decorr.features.feature_diagnostics).
        z = gathered[n]
        diagnostics = feature_diagnostics(z) if len(z) else {"active_fraction": math.nan, "effective_rank": math.nan}
        result[f"active_features_{n}"] = float(diagnostics["active_fraction"])
        result[f"effective_rank_{n}"] = float(diagnostics["effective_rank"])
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            za, zb = gathered[a], gathered[b]
            if za.shape[0] > za.shape[1] + 1:
                result[f"r2_{a}_{b}"] = r_squared(za, zb, gather=False)
            else:
                result[f"r2_{a}_{b}"] = math.nan
            result[f"pca_pearson_{a}_{b}"] = pca_pearson(za, zb)
    return result



def _check_batches(config: PairConfig, dataset: Any, kwargs: dict[str, Any]) -> bool:
    """Refuse batches too small for the correlation loss; return whether to drop the last partial batch.

    The last batch of an epoch is dropped when it is smaller than the correlation loss needs (more
    samples than features plus one) or, for models with batch norm, smaller than 2 samples per process;
    full batches are never dropped, so a split that the batch size divides is unaffected.
    """
    with torch.random.fork_rng():  # a probe model that leaves the models' initialisation untouched
        probe = create_model(config.arch, **kwargs)
    layer = config.feature_layer
    assert layer is not None
    width = feature_width(probe, layer, dataset.input_shape)
    minimum = width + 2 if config.lambda_effective > 0 else 1
    if config.lambda_effective > 0 and config.batch_size < minimum:
        raise DecorrError(
            f"batch size {config.batch_size} is too small for the correlation loss on {width} features "
            f"({config.arch} layer {layer!r}); use --batch-size {minimum} or more"
        )
    return drop_small_last_batch([probe], len(dataset.train), config.batch_size, minimum)


def drop_small_last_batch(models: Sequence[nn.Module], num_train: int, batch_size: int, minimum: int) -> bool:
    """Whether to drop an epoch's last partial batch: when it has fewer samples than the loss needs
    (``minimum``) or, with batch norm, fewer than 2 per process. Refuses a training set smaller than both
    a batch and that minimum."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for model in models for m in model.modules()):
        # The process group may not exist yet; the launcher's WORLD_SIZE says how many shards there will be.
        minimum = max(minimum, 2 * int(os.environ.get("WORLD_SIZE", "1")))
    if num_train < batch_size and num_train < minimum:
        raise DecorrError(f"the {num_train} training images are fewer than one batch needs ({minimum}); "
                          "use more training images or a model with a narrower feature layer")
    return last_batch_too_small(num_train, batch_size, minimum)


@releases_run_lock
def train_pair(
    config: PairConfig,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    data_root: str | None = None,
    mixed_precision: str | None = None,
    cpu: bool = False,
    log: bool = True,
) -> dict[str, Any]:
    """Train a pair as configured, checkpointing after every epoch; return the last epoch's metrics."""
    dataset = load_dataset(config.dataset, data_root)
    require_training_images(dataset)
    if config.train_subset or config.test_subset:
        dataset = dataset.subset(train=config.train_subset, test=config.test_subset)
    layer = config.feature_layer
    assert layer is not None
    kwargs = dict(config.model_kwargs)
    run_config = {
        "kind": "pair",
        "models": {n: model_entry(config.arch, kwargs, layer) for n in MODEL_NAMES},
        "dataset": config.dataset,
        "hyperparameters": asdict(config),
    }
    drop_last = _check_batches(config, dataset, kwargs)  # before any work (the run writes its directory)
    run = TrainingRun(None if run_dir is None else Path(run_dir), run_config, seed=config.seed, resume=resume,
                      mixed_precision=mixed_precision, cpu=cpu, log=log, default_name=f"{config.arch}_{config.mode}")
    return fit(run, PairTask(config, run.place(dataset), kwargs, drop_last, run))


class PairTask(Task):
    """Two models, one Adam, the pair objective on the same batches (SPEC section 2)."""

    def __init__(self, config: PairConfig, dataset: Any, kwargs: dict[str, Any], drop_last: bool,
                 run: TrainingRun) -> None:
        self.config, self.dataset, self.kwargs, self.drop_last, self.run = config, dataset, kwargs, drop_last, run
        self.epochs = config.epochs
        self.layer: str = config.feature_layer  # type: ignore[assignment]

    def build(self, run: TrainingRun) -> Built:
        models = {n: create_model(self.config.arch, **self.kwargs).to(memory_format=torch.channels_last)
                  for n in MODEL_NAMES}
        return Built(models, torch.optim.Adam([p for m in models.values() for p in m.parameters()], lr=self.config.lr))

    def steps_per_epoch(self) -> int:
        return num_batches(len(self.dataset.train), self.config.batch_size, self.drop_last)

    def begin_epoch(self, epoch: int) -> None:
        self.lambda_corr = self.config.lambda_at(epoch)

    def batches(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return iterate_batches(self.dataset.train, self.config.batch_size, shuffle=True, seed=self.config.seed,
                               epoch=epoch, shard=self.run.shard, device=self.run.device, drop_last=self.drop_last)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        if x.dim() == 4:
            # Channels-last convolutions are ~1.6x faster with oneDNN on CPU for these small CNNs.
            x = x.contiguous(memory_format=torch.channels_last)
        model0, model1 = self.models["model0"], self.models["model1"]
        layer = self.layer
        with record_features(unwrap(model0), layer) as f0, record_features(unwrap(model1), layer) as f1:
            logits = (model0(x), model1(x))
        return pair_objective(logits, (f0[layer], f1[layer]), y, self.config, (model0, model1), self.lambda_corr)

    def end_epoch(self, epoch: int, terms: dict[str, float], seconds: float) -> dict[str, Any]:
        config, run = self.config, self.run
        evaluation = evaluate_models(self.models, self.dataset.test, {n: self.layer for n in MODEL_NAMES},
                                     batch_size=config.eval_batch_size, device=run.device, shard=run.shard)
        metrics = {**prefixed("train", terms), **prefixed("test", evaluation)}
        if config.mode == "param" or epoch + 1 == config.epochs:
            with torch.no_grad():
                metrics["parameter_distance"] = float(parameter_distance(*(unwrap(self.models[n]) for n in MODEL_NAMES)))
        run.print(
            f"epoch {epoch + 1:3d}/{config.epochs}  loss {metrics['train/loss']:.4f}  "
            f"acc {evaluation['acc_model0']:.4f} / {evaluation['acc_model1']:.4f}  "
            f"feature R^2 {r2_text(evaluation['r2_model0_model1'], unwrap(self.models['model0']), self.layer, self.dataset.input_shape)}"
        )
        for name in MODEL_NAMES:
            if evaluation[f"active_features_{name}"] < DEAD_FEATURES_BELOW:
                run.print(dead_features_warning(name, self.layer, evaluation[f"active_features_{name}"],
                                                correlation=config.lambda_effective > 0,
                                                warmup_epochs=config.corr_warmup_epochs))
        return metrics
