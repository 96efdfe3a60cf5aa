"""A DVERGE run (SPEC section 5): the starting models, the per-epoch transfer evaluation, the task on the one loop.

The step itself (feature distillation, the objective) is :mod:`decorr.training.dverge`; this module loads the
starting models from model specs, evaluates the members' transfer after every epoch, and runs
:class:`DvergeTask` through :func:`decorr.training.loop.fit` (``train/dverge.py``).
"""

from __future__ import annotations

import math
import time
from itertools import islice
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from decorr.data import ImageSplit, iterate_batches, load_dataset, num_batches, require_training_images, to_float
from decorr.errors import DecorrError
from decorr.features import find_module
from decorr.training.loop import Built, Task, fit, prefixed
from decorr.features import eval_mode
from decorr.specs import NamedModel, SpecOptions, check_input_shape, load_specs
from decorr.training.dverge import STREAM_DISTILL, TARGET_SEED_OFFSET, DvergeConfig, choose_layer, dverge_loss, stream_generator
from decorr.training.run import TrainingRun, default_run_dir, releases_run_lock, unwrap
from decorr.io import write_json

__all__ = ["DvergeTask", "evaluate_epoch", "format_history", "load_init_models", "train_dverge"]


# ------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_epoch(
    models: Mapping[str, nn.Module],
    split: ImageSplit,
    config: DvergeConfig,
    *,
    feature_layers: Mapping[str, str],
    archs: Mapping[str, str],
    accuracy_split: ImageSplit | None = None,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, float], dict[str, Any]]:
    """PGD transfer rates of every pair (``decorr.evaluation.transfer.evaluate_transfer`` on ``split``) and the
    natural accuracy of every model on ``accuracy_split`` (None: on ``split``, from the same pass).

    Returns flat scalars for logging (``transfer/eps0.1/model0-model1``, ``transfer/eps0.1/mean``,
    ``acc/model0``, ...) and the full transfer result. Models are left in eval mode.
    """
    from decorr.evaluation.metrics import accuracy, predict
    from decorr.evaluation.transfer import evaluate_transfer

    plain = {name: unwrap(m) for name, m in models.items()}
    result = evaluate_transfer(
        plain, split, feature_layers=feature_layers, archs=archs, attack="pgd", eps_list=config.eval_eps,
        steps=config.eval_steps, step_size=config.eval_step_size, random_start=True, seed=config.eval_seed,
        batch_size=config.eval_batch_size, features=config.eval_features, device=device,
    )
    scalars: dict[str, float] = {}
    for row in result["by_eps"]:
        tag = f"eps{row['eps']:g}"
        means = []
        for pair in row["pairs"]:
            value = pair["mean"]
            scalars[f"transfer/{tag}/{pair['a']}-{pair['b']}"] = math.nan if value is None else value
            if value is not None:
                means.append(value)
        scalars[f"transfer/{tag}/mean"] = float(np.mean(means)) if means else math.nan
        for name, acc in row["white_box_accuracy"].items():
            scalars[f"white_box_acc/{tag}/{name}"] = math.nan if acc is None else acc
    for pair in result["pairs"]:
        stats = pair.get("natural_features") or {}
        if stats.get("r2") is not None:
            scalars[f"feature_r2/{pair['a']}-{pair['b']}"] = stats["r2"]
    if accuracy_split is None:
        for name in plain:
            scalars[f"acc/{name}"] = result["models"][name]["natural_accuracy"]
    else:
        x, y = to_float(accuracy_split.images).to(device), accuracy_split.labels.to(device)
        with torch.no_grad(), eval_mode(*plain.values()):
            for name, m in plain.items():
                scalars[f"acc/{name}"] = accuracy(predict(m, x, batch_size=config.eval_batch_size), y)
    return scalars, result


def format_history(record: Mapping[str, Any]) -> str:
    """A markdown table of a run's record: per evaluated epoch, the mean pair transfer rate at every
    epsilon and every model's natural accuracy (epoch 0 is the starting point)."""
    epochs = record.get("epochs", [])
    if not epochs:
        return "(no evaluations yet)"
    eps_list = record["config"]["eval_eps"]
    names = sorted({k.split("/", 1)[1] for k in epochs[0]["metrics"] if k.startswith("acc/")})
    header = ["epoch"] + [f"T eps {e:g}" for e in eps_list] + [f"acc {n}" for n in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in epochs:
        m = entry["metrics"]
        cells = [str(entry["epoch"])]
        cells += [_cell(m.get(f"transfer/eps{e:g}/mean")) for e in eps_list]
        cells += [_cell(m.get(f"acc/{n}")) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


# ------------------------------------------------------------------------------------------------
# Loading the starting models


def load_init_models(paths: Sequence[str], options: SpecOptions | None = None
                     ) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]], list[dict[str, Any]], str | None]:
    """The starting models: every model of each spec in order (``decorr.specs``: checkpoints,
    ``PATH:MODEL``, or ``ARCH=WEIGHTS`` files), renamed ``model0 .. model{N-1}``.

    Returns the models, their checkpoint entries (arch, kwargs, feature_layer, and for preprocessed
    foreign models ``preprocess``: what the run's checkpoints rebuild them from), where each came from
    (``{"name", "checkpoint", "model", "epoch"}``, or ``{"name", "spec", "weights", "sha256"}``) and the
    checkpoints' common dataset.
    """
    loaded = load_specs(paths, options)
    models: dict[str, nn.Module] = {}
    entries: dict[str, dict[str, Any]] = {}
    origins: list[dict[str, Any]] = []
    datasets: set[str] = set()
    for full_name, model in loaded.items():
        name = f"model{len(models)}"
        models[name] = model.module
        entries[name] = {k: v for k, v in model.entry.items() if k in ("arch", "kwargs", "feature_layer", "preprocess")}
        info = model.info
        if "checkpoint" in info:
            origins.append({"name": name, "checkpoint": info["checkpoint"], "model": full_name.rsplit("/", 1)[1],
                            "epoch": info["epoch"]})
            if info.get("dataset"):
                datasets.add(info["dataset"])
        else:
            origins.append({"name": name, "spec": info["spec"], "weights": info["weights"], "sha256": info["sha256"]})
    if len(models) < 2:
        raise DecorrError(f"DVERGE trains at least 2 models but {', '.join(map(str, paths))} hold "
                          f"{len(models)}; pass a pair run (--init-from) or several checkpoints (--init A B)")
    if len(datasets) > 1:
        raise DecorrError(f"the starting checkpoints were trained on different datasets ({', '.join(sorted(datasets))}); "
                          "start from models of one dataset")
    return models, entries, origins, (datasets.pop() if datasets else None)


# ------------------------------------------------------------------------------------------------
# A whole run


@releases_run_lock
def train_dverge(
    config: DvergeConfig,
    init: Sequence[str],
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    data_root: str | None = None,
    mixed_precision: str | None = None,
    cpu: bool = False,
    log: bool = True,
    json_path: str | Path | None = None,
    spec_options: SpecOptions | None = None,
) -> dict[str, Any]:
    """Fine-tune the models of ``init`` with DVERGE, measuring the transfer rates before the first
    epoch and after every epoch; checkpoint after each (epoch 0 holds the starting point).

    Writes ``RUN_DIR/checkpoint`` (kind ``dverge``), TensorBoard scalars, and the JSON record
    ``json_path`` (default ``RUN_DIR/dverge.json``) after every evaluation. Returns that record.
    ``init`` holds model specs (``decorr.specs``); ``spec_options`` are the global options of
    its ``ARCH=WEIGHTS`` specs.
    """
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir("dverge", cpu=cpu)
    json_path = Path(json_path) if json_path is not None else run_dir / "dverge.json"
    models, entries, origins, init_dataset = load_init_models(init, spec_options)
    dataset_name = config.dataset or init_dataset
    if dataset_name is None:
        raise DecorrError("the starting models do not say their dataset; pass --dataset")
    config.dataset = dataset_name
    names = list(models)
    default_layers = [entries[n]["feature_layer"] for n in names]
    if not config.layers and any(layer is None for layer in default_layers):
        raise DecorrError("a starting model has no feature layer in its checkpoint or spec; pass --layer MODULE_NAME "
                          "(or feature_layer= in its spec)")
    for layer in config.layers:
        for n in names:
            find_module(models[n], layer)  # a DecorrError naming the layer if a model lacks it

    dataset = load_dataset(dataset_name, data_root)
    require_training_images(dataset)
    check_input_shape({n: NamedModel(n, models[n], {}, entries[n]) for n in names}, dataset.test.images.shape[1:])
    for model in models.values():
        model.train()
    train_split = dataset.train if config.train_subset is None else dataset.train.subset(config.train_subset)
    eval_split = dataset.test if config.eval_subset is None else dataset.test.subset(config.eval_subset)
    accuracy_split = dataset.test if config.accuracy_subset is None else dataset.test.subset(config.accuracy_subset)
    if len(accuracy_split) == len(eval_split):  # both are the first N test images
        accuracy_split = None
    run_config = {"kind": "dverge", "models": entries, "dataset": dataset_name,
                  "hyperparameters": {**asdict(config), "init": [o["spec"] if "spec" in o else o["checkpoint"] + ":" + o["model"]
                                                                 for o in origins]}}
    run = TrainingRun(run_dir, run_config, seed=config.seed, resume=resume, mixed_precision=mixed_precision,
                      cpu=cpu, log=log)
    record: dict[str, Any] = {"format": "decorr-dverge/1", "run_dir": str(run_dir), "init": origins,
                              "dataset": dataset_name, "config": asdict(config),
                              "eval_samples": len(eval_split), "train_samples": len(train_split),
                              "accuracy_samples": len(eval_split if accuracy_split is None else accuracy_split),
                              "epochs": []}
    task = DvergeTask(config, models, entries, run, record, json_path, train_split, eval_split, accuracy_split)
    return fit(run, task)


class DvergeTask(Task):
    """N models, one Adam, every batch distilled by each model and learnt by the others."""

    def __init__(self, config: DvergeConfig, models: dict[str, nn.Module], entries: Mapping[str, Mapping[str, Any]],
                 run: TrainingRun, record: dict[str, Any], json_path: Path, train_split: ImageSplit,
                 eval_split: ImageSplit, accuracy_split: ImageSplit | None) -> None:
        self.config, self.plain, self.run, self.record, self.json_path = config, models, run, record, json_path
        self.train_split, self.eval_split, self.accuracy_split = train_split, eval_split, accuracy_split
        self.epochs = config.epochs
        self.names = list(models)
        self.archs = {n: entries[n]["arch"] for n in self.names}
        self.feature_layers = {n: entries[n]["feature_layer"] for n in self.names}
        self.default_layers = [self.feature_layers[n] for n in self.names]

    def build(self, run: TrainingRun) -> Built:
        parameters = [p for n in self.names for p in self.plain[n].parameters()]
        return Built(dict(self.plain), torch.optim.Adam(parameters, lr=self.config.lr))

    def start(self, models: dict[str, nn.Module], optimizer: torch.optim.Optimizer, start_epoch: int) -> None:
        super().start(models, optimizer, start_epoch)
        self.wrapped = [models[n] for n in self.names]
        if self.run.resume and self.json_path.exists():
            import json

            previous = json.loads(self.json_path.read_text())
            self.record["epochs"] = [e for e in previous.get("epochs", []) if e["epoch"] <= start_epoch]

    def steps_per_epoch(self) -> int:
        steps = num_batches(len(self.train_split), self.config.batch_size)
        return steps if self.config.batches_per_epoch is None else min(steps, self.config.batches_per_epoch)

    def begin_epoch(self, epoch: int) -> None:
        self.layer = choose_layer(self.config.layers, self.config.seed, epoch)
        self.layers = [self.layer or self.default_layers[i] for i in range(len(self.names))]
        self.generator = stream_generator(self.config.seed, epoch, STREAM_DISTILL)

    def batches(self, epoch: int) -> Iterable[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]:
        config, run = self.config, self.run
        sources = iterate_batches(self.train_split, config.batch_size, shuffle=True, seed=config.seed, epoch=epoch,
                                  shard=run.shard, device=run.device)
        targets = iterate_batches(self.train_split, config.batch_size, shuffle=True,
                                  seed=config.seed + TARGET_SEED_OFFSET, epoch=epoch, shard=run.shard,
                                  device=run.device)
        return islice(zip(sources, targets), self.steps_per_epoch())

    def loss(self, batch: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, dict[str, Tensor]]:
        (xs, ys), (xt, _yt) = batch
        return dverge_loss(self.wrapped, xs, ys, xt, self.config, self.layers, generator=self.generator)

    def evaluate(self, epoch: int, extra: dict[str, Any]) -> dict[str, Any]:
        tick = time.perf_counter()
        scalars, result = evaluate_epoch(self.models, self.eval_split, self.config, feature_layers=self.feature_layers,
                                         archs=self.archs, accuracy_split=self.accuracy_split, device=self.run.device)
        scalars["time/eval_s"] = time.perf_counter() - tick
        metrics = {**extra, **scalars}
        self.record["epochs"].append({"epoch": epoch, "metrics": metrics,
                                      "transfer": {"by_eps": result["by_eps"], "pairs": result["pairs"],
                                                   "models": result["models"], "settings": result["settings"]}})
        rates = "  ".join(f"eps {e:g}: {metrics[f'transfer/eps{e:g}/mean']:.3f}" for e in self.config.eval_eps)
        accs = " / ".join(f"{metrics[f'acc/{n}']:.4f}" for n in self.names)
        self.run.print(f"epoch {epoch:3d}/{self.config.epochs}  transfer {rates}  acc {accs}")
        return metrics

    def evaluate_before(self) -> dict[str, Any]:
        metrics = self.evaluate(0, {})
        self._write_record()
        return metrics

    def end_epoch(self, epoch: int, terms: dict[str, float], seconds: float) -> dict[str, Any]:
        metrics = self.evaluate(epoch + 1, {**prefixed("train", terms), "time/train_s": seconds})
        metrics["layer"] = self.layer if self.layer is not None else ",".join(sorted(set(self.default_layers)))
        self.record["epochs"][-1]["layer"] = metrics["layer"]
        self._write_record()
        return metrics

    def _write_record(self) -> None:
        if self.run.is_main:
            write_json(self.json_path, self.record)

    def result(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return self.record
