"""Training one registry classifier on one dataset: surrogates and targets for transfer experiments.

Plain supervised training (cross-entropy, SGD with momentum or Adam, optional cosine learning rate),
with the same harness and checkpoint format as the pairs (:mod:`decorr.training.pairs`): a
:class:`~decorr.training.run.TrainingRun` (accelerate, TensorBoard, an atomic checkpoint after every epoch,
``resume``), batches drawn from ``(seed, epoch)`` with the dataset's default augmentation, and the
checkpoint kind ``"classifier"`` holding one model named ``model``.

The cross-entropy is the mean over the global batch (per-sample losses gathered with gradient across
processes), so N processes take the step one process takes with the whole batch; with ``sync_bn`` the
batch norm statistics are those of the global batch too (:mod:`decorr.training.batchnorm`), otherwise each
process normalises its own shard, as plain DDP does.

The model is built for the dataset: when the architecture's builder takes ``in_channels``,
``in_features`` or ``num_classes`` and the dataset needs another value than the builder's default
(e.g. ``resnet20`` on 1-channel Fashion-MNIST), that keyword is set and recorded in the checkpoint, so
``decorr.checkpoint.load_models`` rebuilds the same model.

Defaults (SGD 0.05, momentum 0.9, weight decay 5e-4, cosine to 0 over the run, batch 128, crop + flip
for colour images) are the usual CIFAR recipe shortened to a few epochs. On the CIFAR-10 subset
(8068 training images) they gave ResNet-20 62% test accuracy in 12 epochs, VGG-small 74% in 15 and
DenseNet-small 55% in 8, 1 to 4 minutes per epoch on one CPU thread (``docs/results_sgm.md``).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from decorr.checkpoint import model_entry
from decorr.config import check_at_least, check_finite, check_positive, check_seed, check_subset, opt
from decorr.data import ImageDataset, dataset_augment, iterate_batches, load_dataset, num_batches, require_training_images
from decorr.distributed import global_mean
from decorr.errors import DecorrError
from decorr.features import eval_mode
from decorr.models import create_model, model_spec
from decorr.training.batchnorm import convert_sync_batchnorm
from decorr.training.entry import RunOptions, run_training
from decorr.training.epoch_metrics import evaluate_models
from decorr.training.loop import Built, Task, prefixed
from decorr.training.run import TrainingRun

__all__ = [
    "ClassifierConfig",
    "ClassifierTask",
    "MODEL_NAME",
    "OPTIMIZERS",
    "SCHEDULES",
    "build_optimizer",
    "check_model_fits",
    "classifier_objective",
    "dataset_model_kwargs",
    "learning_rate",
    "train_classifier",
]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("none", "cosine")
#: The one model of a classifier checkpoint.
MODEL_NAME = "model"


@dataclass
class ClassifierConfig:
    """Hyperparameters of one classifier run; the defaults suit the CIFAR-size models of
    :mod:`decorr.models.cifar` on a few thousand images."""

    arch: str = opt("resnet20", "registry model name (resnet20, vgg_small, densenet_small, resnet18_small, "
                                "mnist_cnn, ...)")
    dataset: str = opt("cifar10", "dataset name or path to an .npz")
    epochs: int = opt(15, "number of epochs")
    batch_size: int = opt(128, "global batch size")
    lr: float = opt(0.05, "(peak) learning rate")
    optimizer: str = opt("sgd", "sgd (with momentum) or adam", choices=OPTIMIZERS)
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(5e-4, "L2 weight decay")
    schedule: str = opt("cosine", "cosine: decay the learning rate to 0 over the run, per step", choices=SCHEDULES)
    augment: bool = opt(True, "no training augmentation (default: the dataset's; colour images: random crop + flip)")
    sync_bn: bool = opt(True, "batch norm over each process's shard only (default: over the global batch of all "
                              "processes; one process: plain batch norm)")
    feature_layer: str | None = opt(None, "module name recorded as the feature layer (default: the model's)")
    seed: int = opt(0, "seed of the initialisation and the batches")
    train_subset: int | None = opt(None, "use only the first N training images")
    test_subset: int | None = opt(None, "use only the first N test images")
    eval_batch_size: int = opt(1000, "batch size of the evaluation after every epoch")
    model_kwargs: dict[str, Any] = opt({}, "keyword arguments for the registry model, e.g. "
                                           "'{\"mean\": [0], \"std\": [1]}' (raw pixels)")

    def __post_init__(self) -> None:
        spec = model_spec(self.arch)  # an unknown architecture is a DecorrError listing the known ones
        if self.optimizer not in OPTIMIZERS:
            raise DecorrError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise DecorrError(f"unknown learning-rate schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            check_at_least(name, getattr(self, name), 1)
        check_positive("lr", self.lr)
        check_finite("weight_decay", self.weight_decay, minimum=0)
        if not 0 <= self.momentum < 1:
            raise DecorrError(f"--momentum must be in [0, 1), got {self.momentum}")
        check_seed(self.seed)
        check_subset("train_subset", self.train_subset)
        check_subset("test_subset", self.test_subset)
        if self.feature_layer is None:
            self.feature_layer = spec.feature_layer
        if self.feature_layer is None:
            raise DecorrError(f"model {self.arch!r} has no default feature layer; pass --feature-layer MODULE_NAME")


# ------------------------------------------------------------------------------------------------
# The model for a dataset


def dataset_model_kwargs(arch: str, dataset: ImageDataset, kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``kwargs`` plus the input and class counts ``dataset`` needs, where the builder takes them.

    A keyword is added only when the user did not give it and the dataset's value differs from the
    builder's default, so that a model on the data it was designed for is recorded without kwargs.
    """
    kwargs = dict(kwargs or {})
    c, h, w = dataset.input_shape
    wanted = {"in_channels": c, "in_features": c * h * w, "num_classes": dataset.num_classes}
    parameters = inspect.signature(model_spec(arch).builder).parameters
    for name, value in wanted.items():
        parameter = parameters.get(name)
        if name in kwargs or parameter is None:
            continue
        if parameter.default is inspect.Parameter.empty or parameter.default != value:
            kwargs[name] = value
    return kwargs


def check_model_fits(model: nn.Module, arch: str, dataset: ImageDataset) -> None:
    """Raise a DecorrError unless ``model`` maps the dataset's images to one logit per class."""
    try:
        with eval_mode(model), torch.no_grad():
            out = model(torch.zeros(2, *dataset.input_shape))
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DecorrError(
            f"model {arch!r} cannot take the {dataset.input_shape} images of {dataset.name!r} ({first}); "
            f"choose a model for this input size"
        ) from None
    if not torch.is_tensor(out) or tuple(out.shape) != (2, dataset.num_classes):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise DecorrError(
            f"model {arch!r} outputs {shape} for a batch of 2 but {dataset.name!r} has {dataset.num_classes} "
            "classes; choose a classifier (or pass num_classes in model_kwargs)"
        )


# ------------------------------------------------------------------------------------------------
# Optimisation


def build_optimizer(parameters: Any, config: ClassifierConfig) -> torch.optim.Optimizer:
    """SGD with (heavy-ball) momentum, or Adam; weight decay as an L2 term in both."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)


def learning_rate(config: ClassifierConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total_steps``.

    ``cosine`` decays from ``lr`` at step 0 towards 0 at ``total_steps``, per step. It is a function
    of the step alone (no scheduler state), so a resumed run follows the same schedule; resuming with
    more ``epochs`` stretches the rest of it.
    """
    if config.schedule == "none":
        return config.lr
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


def classifier_objective(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean cross-entropy over the global batch, and (for logging) the loss and accuracy."""
    loss = global_mean(F.cross_entropy(logits, y, reduction="none"))
    with torch.no_grad():
        acc = global_mean((logits.argmax(1) == y).float())
    return loss, {"loss": loss.detach(), "acc": acc}


# ------------------------------------------------------------------------------------------------
# Training


def _load_data(config: ClassifierConfig, data_root: str | None) -> ImageDataset:
    dataset = load_dataset(config.dataset, data_root)
    require_training_images(dataset)
    if config.train_subset or config.test_subset:
        dataset = dataset.subset(train=config.train_subset, test=config.test_subset)
    return dataset


def train_classifier(config: ClassifierConfig, options: RunOptions = RunOptions()) -> dict[str, Any]:
    """Train ``config.arch`` on ``config.dataset``, checkpointing after every epoch; return the last metrics.

    ``options.dataset`` overrides loading ``config.dataset`` (subsets still apply); ``config.dataset`` is
    what the checkpoint records, so it should name the same data.
    """
    dataset = options.dataset
    dataset = _load_data(config, options.data_root) if dataset is None else dataset.subset(config.train_subset,
                                                                                         config.test_subset)
    steps = num_batches(len(dataset.train), config.batch_size, drop_last=True)
    if steps == 0:
        raise DecorrError(
            f"--batch-size {config.batch_size} exceeds the {len(dataset.train)} training images; use a smaller batch"
        )
    layer = config.feature_layer
    assert layer is not None
    kwargs = dataset_model_kwargs(config.arch, dataset, config.model_kwargs)
    run_config = {
        "kind": "classifier",
        "models": {MODEL_NAME: model_entry(config.arch, kwargs, layer)},
        "dataset": config.dataset,
        "hyperparameters": asdict(config),
    }
    return run_training(lambda run: ClassifierTask(config, run.place(dataset), kwargs, steps, run), run_config,
                        options, seed=config.seed, default_name=config.arch)


class ClassifierTask(Task):
    """One model, cross-entropy, SGD or Adam with a per-step learning rate."""

    def __init__(self, config: ClassifierConfig, dataset: ImageDataset, kwargs: dict[str, Any], steps: int,
                 run: TrainingRun) -> None:
        self.config, self.dataset, self.kwargs, self.steps, self.run = config, dataset, kwargs, steps, run
        self.epochs = config.epochs
        self.augment = dataset_augment(dataset) if config.augment else None
        self.lr = config.lr

    def build(self, run: TrainingRun) -> Built:
        model = create_model(self.config.arch, **self.kwargs)
        check_model_fits(model, self.config.arch, self.dataset)
        if self.config.sync_bn:
            model = convert_sync_batchnorm(model)
        return Built({MODEL_NAME: model}, build_optimizer(model.parameters(), self.config))

    def steps_per_epoch(self) -> int:
        return self.steps

    def batches(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        # Batch norm cannot normalise a last batch of one sample, and a small one is a noisy step: drop it.
        self.lr = self.config.lr
        return iterate_batches(self.dataset.train, self.config.batch_size, shuffle=True, seed=self.config.seed,
                               epoch=epoch, drop_last=True, augment=self.augment, shard=self.run.shard,
                               device=self.run.device)

    def before_step(self, epoch: int, index: int) -> None:
        self.lr = learning_rate(self.config, epoch * self.steps + index, self.config.epochs * self.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        return classifier_objective(self.models[MODEL_NAME](x), y)

    def end_epoch(self, epoch: int, terms: dict[str, float], seconds: float) -> dict[str, Any]:
        config, run = self.config, self.run
        evaluation = evaluate_models(self.models, self.dataset.test, {MODEL_NAME: config.feature_layer},
                                     batch_size=config.eval_batch_size, device=run.device, shard=run.shard)
        metrics = {**prefixed("train", terms), "train/lr": self.lr, "test/acc": evaluation[f"acc_{MODEL_NAME}"],
                   "time/train_epoch_s": seconds}
        run.print(
            f"epoch {epoch + 1:3d}/{config.epochs}  loss {metrics['train/loss']:.4f}  "
            f"train acc {metrics['train/acc']:.4f}  test acc {metrics['test/acc']:.4f}  "
            f"lr {self.lr:.4g}  {seconds:.0f} s"
        )
        return metrics
