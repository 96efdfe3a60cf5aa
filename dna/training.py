"""Training the (dual-neck) autoencoder and its classifier: SPEC section 6, in two stages.

Stage 1 trains the autoencoder alone::

    DNA:  L = sqrt(MSE(x, r1)^2 + MSE(x, r2)^2) + lambda * L_corr(b1, b2)      (lambda = 0.05)
    AE:   L = MSE(x, r)

Stage 2 freezes it (eval mode, no gradient) and trains the classifier with cross-entropy on every
path's reconstruction of each batch (the reconstructions concatenated, the labels repeated).

A run directory holds one autoencoder and its classifier, one :class:`~decorr.training.run.TrainingRun`
per stage::

    RUN_DIR/stage1/checkpoint/   autoencoder              (config kind "dna", "stage": 1)
    RUN_DIR/stage2/checkpoint/   autoencoder + classifier (config kind "dna", "stage": 2)
    RUN_DIR/stage{1,2}/tensorboard/

As in :mod:`decorr.training.pairs`, every batch statistic is that of the global batch, gathered with gradient
across processes (the per-sample errors, the latents for the correlation loss, the classifier's
per-sample cross-entropy, and with ``sync_bn`` the batch norm statistics), so N processes train like
one process with the whole batch. With gradient accumulation each optimiser step sums ``k``
micro-batches of ``batch_size / k`` samples; the global batch that the correlation loss (and batch norm)
sees is then one micro-batch across all processes, and it must still exceed the latent width.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from itertools import chain
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from decorr.training.batchnorm import convert_sync_batchnorm
from decorr.checkpoint import build_model, load_checkpoint, model_entry, resolve_checkpoint
from decorr.data import ImageDataset, ImageSplit, dataset_augment, iterate_batches, load_dataset, require_training_images
from decorr.distributed import all_gather_with_grad
from decorr.errors import DecorrError
from decorr.training.loop import Built, Task, prefixed
from decorr.loss import r_squared
from decorr.models import create_model
from decorr.features import eval_mode
from decorr.training.entry import RunOptions, run_training
from decorr.training.run import TrainingRun, default_run_dir
from decorr.distributed import unwrap
from dna.config import STAGE_DIRS, DnaConfig
from dna.models import forward_with_latents
from dna.objectives import dna_accuracy, reconstruction_errors
from dna.steps import _steps_per_epoch, autoencoder_objective, classifier_objective, latent_width, optimizer_steps

__all__ = [
    "AutoencoderTask",
    "ReconstructionClassifierTask",
    "evaluate_autoencoder",
    "reconstruction_grid",
    "resolve_dna_checkpoint",
    "train_autoencoder",
    "train_classifier",
    "train_dna",
]

@torch.no_grad()
def evaluate_autoencoder(
    autoencoder: nn.Module,
    split: ImageSplit,
    *,
    classifier: nn.Module | None = None,
    batch_size: int = 1000,
    device: torch.device | str = "cpu",
    shard: tuple[int, int] = (0, 1),
) -> dict[str, float]:
    """Test metrics in eval mode: each path's MSE, the bottleneck R^2 (latent 1 regressed on latent 0)
    and, with a classifier, the accuracy of each path / either path / their mean and on natural images.

    Each process evaluates its shard; the per-sample values are gathered, so every process returns
    the numbers of the whole split.
    """
    models = [unwrap(autoencoder)] + ([unwrap(classifier)] if classifier is not None else [])
    with eval_mode(*models):
        return _evaluate_autoencoder(models, split, batch_size, device, shard)


def _evaluate_autoencoder(models: list[nn.Module], split: ImageSplit, batch_size: int, device: torch.device | str,
                          shard: tuple[int, int]) -> dict[str, float]:
    ae = models[0]
    classifier = models[1] if len(models) > 1 else None
    errors, labels, preds, natural = [], [], [], []
    latents: list[list[torch.Tensor]] = []
    for x, y in iterate_batches(split, batch_size, shuffle=False, shard=shard, device=device):
        recons, lat = forward_with_latents(ae, x)
        errors.append(reconstruction_errors([r.float() for r in recons], x))
        latents.append([z.flatten(1).float() for z in lat])
        labels.append(y)
        if classifier is not None:
            clf = models[1]
            preds.append(torch.stack([clf(r).argmax(dim=1) for r in recons]))
            natural.append(clf(x).argmax(dim=1))
    paths = len(latents[0]) if latents else 0
    result: dict[str, float] = {}
    all_errors = all_gather_with_grad(torch.cat(errors, dim=1).T.contiguous()).T
    for n, value in enumerate(all_errors.mean(dim=1)):
        result[f"mse{n}"] = float(value)
    result["mse"] = float(all_errors.mean())
    if paths >= 2:
        z0, z1 = (all_gather_with_grad(torch.cat([b[n] for b in latents])) for n in (0, 1))
        result["bottleneck_r2"] = r_squared(z0, z1, gather=False) if z0.shape[0] > z0.shape[1] + 1 else math.nan
    if classifier is not None:
        y_all = all_gather_with_grad(torch.cat(labels))
        p_all = all_gather_with_grad(torch.cat(preds, dim=1).T.contiguous()).T
        result.update({f"acc_{k}": v for k, v in dna_accuracy(p_all, y_all).items()})
        result["acc_natural"] = float((all_gather_with_grad(torch.cat(natural)) == y_all).float().mean())
    return result


@torch.no_grad()
def reconstruction_grid(autoencoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Images for TensorBoard: the inputs, then each path's reconstructions (one row each)."""
    model = unwrap(autoencoder)
    with eval_mode(model):
        recons = model(x)
    return torch.cat([x, *recons]).float()


def _load_data(config: DnaConfig, data_root: str | None) -> ImageDataset:
    dataset = load_dataset(config.dataset, data_root)
    require_training_images(dataset)
    if config.train_subset or config.test_subset:
        dataset = dataset.subset(train=config.train_subset, test=config.test_subset)
    if dataset.input_shape != config.input_shape:
        raise DecorrError(
            f"dataset {config.dataset!r} has images {dataset.input_shape} but the {config.family} models take "
            f"{config.input_shape}; use train/dna_{'cifar' if dataset.input_shape[0] == 3 else 'mnist'}.py"
        )
    return dataset


def _check_batch(config: DnaConfig, width: int, stage: int) -> None:
    micro = config.micro_batch_size(stage)
    if stage == 1 and config.model == "dna" and config.lambda_corr > 0 and micro <= width + 1:
        k = config.gradient_accumulation_steps
        raise DecorrError(
            f"the correlation loss on the {width}-wide latent needs a global (micro-)batch of at least {width + 2} "
            f"samples, but --batch-size {config.batch_size} with --gradient-accumulation-steps {k} gives {micro}; "
            f"use --batch-size {(width + 2) * k} or more, or fewer accumulation steps"
        )


def _check_stage_batches(config: DnaConfig, dataset: ImageDataset, stages: Sequence[int]) -> None:
    """The batch-size refusals of ``stages``, before any run directory is written (the tasks check again)."""
    if 1 in stages:
        with torch.random.fork_rng():  # a probe that leaves the autoencoder's initialisation untouched
            probe = create_model(config.autoencoder_arch, **config.autoencoder_kwargs)
        _check_batch(config, latent_width(probe, config.input_shape), stage=1)
        if _steps_per_epoch(len(dataset.train), config, 1) == 0:
            raise DecorrError(f"--batch-size {config.batch_size} exceeds the {len(dataset.train)} training images")
    if 2 in stages and _steps_per_epoch(len(dataset.train), config, 2) == 0:
        raise DecorrError(f"--classifier-batch-size {config.classifier_batch_size} exceeds the "
                          f"{len(dataset.train)} training images")


def _maybe_sync_bn(model: nn.Module, config: DnaConfig) -> nn.Module:
    return convert_sync_batchnorm(model) if config.sync_bn else model


def _run_config(config: DnaConfig, stage: int, models: Mapping[str, dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"kind": "dna", "stage": stage, "models": dict(models), "dataset": config.dataset,
            "hyperparameters": asdict(config), **extra}


# ------------------------------------------------------------------------------------------------
# Stage 1


def _train(task: Any, config: DnaConfig, run_config: dict[str, Any], options: RunOptions) -> dict[str, Any]:
    return run_training(task, run_config, options, seed=config.seed, default_name=config.autoencoder_arch,
                        gradient_accumulation_steps=config.gradient_accumulation_steps,
                        extendable=("epochs", "classifier_epochs"))


def train_autoencoder(config: DnaConfig, options: RunOptions) -> dict[str, Any]:
    """Stage 1 in ``options.run_dir`` (a stage directory, e.g. ``RUN_DIR/stage1``); returns the last metrics."""
    dataset = options.dataset if options.dataset is not None else _load_data(config, options.data_root)
    _check_stage_batches(config, dataset, [1])
    entry = model_entry(config.autoencoder_arch, config.autoencoder_kwargs)
    return _train(lambda run: AutoencoderTask(config, run.place(dataset), run), config,
                  _run_config(config, 1, {"autoencoder": entry}), options)


class AutoencoderTask(Task):
    """Stage 1: the autoencoder alone (reconstruction errors + correlation of the latents)."""

    label = "autoencoder"

    def __init__(self, config: DnaConfig, dataset: ImageDataset, run: TrainingRun) -> None:
        self.config, self.dataset, self.run = config, dataset, run
        self.epochs = config.epochs
        self.augment = dataset_augment(dataset) if config.augment else None
        self.steps = _steps_per_epoch(len(dataset.train), config, 1)

    def build(self, run: TrainingRun) -> Built:
        config = self.config
        autoencoder = create_model(config.autoencoder_arch, **config.autoencoder_kwargs)
        _check_batch(config, latent_width(autoencoder, config.input_shape), stage=1)
        autoencoder = _maybe_sync_bn(autoencoder, config)
        if self.steps == 0:
            raise DecorrError(f"--batch-size {config.batch_size} exceeds the {len(self.dataset.train)} training images")
        return Built({"autoencoder": autoencoder}, torch.optim.Adam(autoencoder.parameters(), lr=config.lr))

    def start(self, models: dict[str, nn.Module], optimizer: torch.optim.Optimizer, start_epoch: int) -> None:
        super().start(models, optimizer, start_epoch)
        self.grid_images = _grid_images(self.dataset, self.config, self.run)

    def steps_per_epoch(self) -> int:
        return self.steps

    def batches(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return chain.from_iterable(optimizer_steps(self.dataset.train, self.config, 1, epoch, self.augment, self.run))

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return autoencoder_objective(self.models["autoencoder"], batch[0], self.config.lambda_corr)

    def end_epoch(self, epoch: int, terms: dict[str, float], seconds: float) -> dict[str, Any]:
        config, run, model = self.config, self.run, self.models["autoencoder"]
        evaluation = evaluate_autoencoder(model, self.dataset.test, batch_size=config.eval_batch_size,
                                          device=run.device, shard=run.shard)
        metrics = {**prefixed("train", terms), **prefixed("test", evaluation)}
        if self.grid_images is not None:
            run.log_images("reconstructions/input_then_paths", reconstruction_grid(model, self.grid_images), epoch + 1)
        r2 = f"  bottleneck R^2 {evaluation['bottleneck_r2']:.3f}" if "bottleneck_r2" in evaluation else ""
        corr = f"  corr {metrics['train/corr']:.3f}" if "train/corr" in metrics else ""
        run.print(f"autoencoder epoch {epoch + 1:3d}/{config.epochs}  loss {metrics['train/loss']:.5f}{corr}  "
                  f"test MSE {evaluation['mse']:.5f}{r2}")
        return metrics


def _grid_images(dataset: ImageDataset, config: DnaConfig, run: TrainingRun) -> torch.Tensor | None:
    if not run.is_main or config.image_samples < 1:
        return None
    x, _ = next(iterate_batches(dataset.test.subset(min(config.image_samples, len(dataset.test))),
                                config.image_samples, shuffle=False, device=run.device))
    return x


# ------------------------------------------------------------------------------------------------
# Stage 2


def _load_autoencoder(source: str | Path, config: DnaConfig) -> tuple[nn.Module, dict[str, Any]]:
    checkpoint = load_checkpoint(source)
    saved = checkpoint.config
    if saved.get("kind") != "dna" or "autoencoder" not in checkpoint.state_dicts:
        raise DecorrError(f"{checkpoint.path} is not a DNA/AE checkpoint with an autoencoder; pass a stage-1 run "
                          "(RUN_DIR/stage1) to --from")
    entry = saved["models"]["autoencoder"]
    expected = model_entry(config.autoencoder_arch, config.autoencoder_kwargs)
    if (entry["arch"], entry.get("kwargs", {})) != (expected["arch"], expected["kwargs"]):
        raise DecorrError(
            f"{checkpoint.path} holds {entry['arch']} {entry.get('kwargs', {})} but this run asks for "
            f"{expected['arch']} {expected['kwargs']}; pass the matching --model/--unshared"
        )
    if saved.get("dataset") != config.dataset:
        raise DecorrError(f"{checkpoint.path} was trained on {saved.get('dataset')!r}, not {config.dataset!r}; "
                          f"pass --dataset {saved.get('dataset')}")
    autoencoder = build_model(entry, checkpoint.state_dicts["autoencoder"], source=str(checkpoint.path))
    return autoencoder, {"path": str(checkpoint.path.resolve()), "epoch": saved.get("epoch")}


def train_classifier(config: DnaConfig, autoencoder_checkpoint: str | Path, options: RunOptions) -> dict[str, Any]:
    """Stage 2 in ``options.run_dir`` (e.g. ``RUN_DIR/stage2``) on the frozen autoencoder of a stage-1
    checkpoint."""
    dataset = options.dataset if options.dataset is not None else _load_data(config, options.data_root)
    _check_stage_batches(config, dataset, [2])
    autoencoder, source = _load_autoencoder(autoencoder_checkpoint, config)
    entries = {"autoencoder": model_entry(config.autoencoder_arch, config.autoencoder_kwargs),
               "classifier": model_entry(config.classifier_arch)}
    return _train(lambda run: ReconstructionClassifierTask(config, run.place(dataset), run, autoencoder, source,
                                                           run.run_dir),
                  config, _run_config(config, 2, entries, autoencoder_from=source), options)


class ReconstructionClassifierTask(Task):
    """Stage 2: the classifier on every path's reconstruction, the autoencoder frozen."""

    label = "classifier"

    def __init__(self, config: DnaConfig, dataset: ImageDataset, run: TrainingRun, autoencoder: nn.Module,
                 source: dict[str, Any], run_dir: str | Path) -> None:
        self.config, self.dataset, self.run, self.autoencoder = config, dataset, run, autoencoder
        self.source, self.run_dir = source, run_dir
        self.epochs = config.classifier_epochs
        self.augment = dataset_augment(dataset) if config.augment else None
        self.steps = _steps_per_epoch(len(dataset.train), config, 2)

    def build(self, run: TrainingRun) -> Built:
        classifier = _maybe_sync_bn(create_model(self.config.classifier_arch), self.config)
        optimizer = torch.optim.Adam(classifier.parameters(), lr=self.config.classifier_lr)
        self.frozen = {k: v.clone() for k, v in self.autoencoder.state_dict().items()}
        return Built({"autoencoder": self.autoencoder, "classifier": classifier}, optimizer, trained=("classifier",))

    def start(self, models: dict[str, nn.Module], optimizer: torch.optim.Optimizer, start_epoch: int) -> None:
        super().start(models, optimizer, start_epoch)
        if any(not torch.equal(v, self.frozen[k]) for k, v in self.autoencoder.state_dict().items()):
            raise DecorrError(
                f"the classifier in {self.run_dir} was trained on another autoencoder than the one now in "
                f"{self.source['path']} (stage 1 was changed since); delete {self.run_dir} to train the classifier again"
            )
        self.autoencoder.to(self.run.device).eval().requires_grad_(False)
        if self.steps == 0:
            raise DecorrError(f"--classifier-batch-size {self.config.classifier_batch_size} exceeds the "
                              f"{len(self.dataset.train)} training images")

    def steps_per_epoch(self) -> int:
        return self.steps

    def batches(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return chain.from_iterable(optimizer_steps(self.dataset.train, self.config, 2, epoch, self.augment, self.run))

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return classifier_objective(self.autoencoder, self.models["classifier"], *batch)

    def end_epoch(self, epoch: int, terms: dict[str, float], seconds: float) -> dict[str, Any]:
        config, run = self.config, self.run
        evaluation = evaluate_autoencoder(self.autoencoder, self.dataset.test, classifier=self.models["classifier"],
                                          batch_size=config.eval_batch_size, device=run.device, shard=run.shard)
        metrics = {**prefixed("train", terms), **prefixed("test", evaluation)}
        paths = "  ".join(f"{k[4:]} {v:.4f}" for k, v in evaluation.items() if k.startswith("acc_path"))
        run.print(f"classifier epoch {epoch + 1:3d}/{config.classifier_epochs}  ce {metrics['train/ce']:.4f}  "
                  f"acc either {evaluation['acc_either']:.4f}  {paths}  natural {evaluation['acc_natural']:.4f}")
        return metrics


# ------------------------------------------------------------------------------------------------
# Both stages


def _has_checkpoint(stage_dir: Path) -> bool:
    try:
        resolve_checkpoint(stage_dir)
    except DecorrError:
        return False
    return True


def train_dna(config: DnaConfig, options: RunOptions = RunOptions(), *, stage: str = "both",
              init_from: str | Path | None = None) -> dict[str, Any]:
    """Run stage "1", "2" or "both" in ``options.run_dir``; return ``{"stage1": metrics, "stage2": metrics}``.

    Stage 2 starts from the autoencoder in ``init_from`` (a stage-1 checkpoint or run directory),
    by default ``run_dir/stage1``. With ``resume`` each requested stage continues from its own
    checkpoint when it has one (a finished stage is left as it is) and starts fresh otherwise; at
    least one of them must have a checkpoint.
    """
    if stage not in ("1", "2", "both"):
        raise DecorrError(f"unknown stage {stage!r}; use --stage 1, 2 or both")
    if init_from is not None and stage != "2":
        raise DecorrError("--from gives stage 2 its autoencoder; use it with --stage 2")
    resume = options.resume
    run_dir = Path(options.run_dir) if options.run_dir is not None else default_run_dir(config.autoencoder_arch,
                                                                                         cpu=options.cpu)
    stage_dirs = {n: run_dir / d for n, d in STAGE_DIRS.items()}
    wanted = [1, 2] if stage == "both" else [int(stage)]
    if resume and not any(_has_checkpoint(stage_dirs[n]) for n in wanted):
        raise DecorrError(f"--resume given but {run_dir} has no checkpoint of stage {' or '.join(map(str, wanted))}; "
                          "drop --resume to start a new run")
    dataset = options.dataset if options.dataset is not None else _load_data(config, options.data_root)
    _check_stage_batches(config, dataset, wanted)  # stage 2's refusal too, before stage 1 trains
    results: dict[str, Any] = {}
    if 1 in wanted:
        results["stage1"] = train_autoencoder(config, options.replace(
            run_dir=stage_dirs[1], resume=resume and _has_checkpoint(stage_dirs[1]), dataset=dataset))
    if 2 in wanted:
        source = Path(init_from) if init_from is not None else stage_dirs[1]
        if init_from is None and not _has_checkpoint(source):
            raise DecorrError(f"stage 2 needs a trained autoencoder but {source} has none; run --stage 1 first "
                              "or pass --from STAGE1_CHECKPOINT")
        results["stage2"] = train_classifier(config, source, options.replace(
            run_dir=stage_dirs[2], resume=resume and _has_checkpoint(stage_dirs[2]), dataset=dataset))
    return results


def resolve_dna_checkpoint(path: str | Path) -> Path:
    """The stage-2 checkpoint (autoencoder + classifier) of a run directory, of its ``stage2`` folder,
    or a checkpoint directory itself."""
    path = Path(path)
    if not _has_checkpoint(path):
        if _has_checkpoint(path / STAGE_DIRS[2]):
            path = path / STAGE_DIRS[2]
        elif _has_checkpoint(path / STAGE_DIRS[1]):
            raise DecorrError(f"{path} holds only the stage-1 autoencoder; train its classifier with --stage 2 first")
    directory = resolve_checkpoint(path)  # the usual "not a checkpoint" error when there is none
    config = load_checkpoint(directory, load_weights=False).config
    if config.get("kind") != "dna":
        raise DecorrError(f"{directory} is a {config.get('kind')!r} checkpoint, not a DNA/AE one")
    if "classifier" not in config["models"]:
        raise DecorrError(f"{directory} holds only the stage-1 autoencoder; train its classifier with --stage 2 "
                          "and pass that run directory")
    return directory


