"""Transfer rates measured while a model trains: :class:`TransferMonitor`, the DVERGE recipe's per-epoch
evaluation (``train/dverge.py``), given to the trainer as an epoch monitor.

Before the first epoch and after every epoch: the PGD transfer rate of every pair of members
(:func:`decorr.evaluation.transfer.evaluate_transfer` on the first ``eval_subset`` test images) and every
member's natural accuracy; logged, checkpointed with the epoch, and written to the run's JSON record
(``RUN_DIR/dverge.json``, format ``decorr-dverge/1``), which a resumed run continues.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from decorr.data import ImageSplit, to_float
from decorr.evaluation.metrics import accuracy, predict
from decorr.evaluation.options import TransferOptions
from decorr.evaluation.transfer import evaluate_transfer
from decorr.features import eval_mode
from decorr.io import write_json
from decorr.distributed import unwrap

__all__ = ["RECORD_FORMAT", "TransferMonitor", "evaluate_epoch", "format_history"]

RECORD_FORMAT = "decorr-dverge/1"


def evaluate_epoch(
    models: Mapping[str, nn.Module],
    split: ImageSplit,
    config: Any,
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
    plain = {name: unwrap(m) for name, m in models.items()}
    options = TransferOptions(attacks=("pgd",), eps=tuple(config.eval_eps), seed=config.eval_seed,
                              batch_size=config.eval_batch_size, features=config.eval_features,
                              attack_settings={"--steps": config.eval_steps, "--step-size": config.eval_step_size,
                                               "--random-start": True})
    result = evaluate_transfer(plain, split, options, feature_layers=feature_layers, archs=archs, device=device)
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


class TransferMonitor:
    """The epoch monitor of the DVERGE recipe (``config``: a :class:`decorr.training.recipes.DvergeConfig`,
    whose ``eval_*`` and ``accuracy_subset`` fields it reads); ``json_path`` defaults to RUN_DIR/dverge.json."""

    def __init__(self, config: Any, json_path: str | Path | None = None) -> None:
        self.config = config
        self.json_path = None if json_path is None else Path(json_path)

    def start(self, task: Any, start_epoch: int) -> None:
        config, test = self.config, task.dataset.test
        self.task, self.run = task, task.run
        if self.json_path is None:
            self.json_path = Path(self.run.run_dir) / "dverge.json"
        self.eval_split = test if config.eval_subset is None else test.subset(config.eval_subset)
        accuracy_split = test if config.accuracy_subset is None else test.subset(config.accuracy_subset)
        self.accuracy_split = None if len(accuracy_split) == len(self.eval_split) else accuracy_split
        self.archs = dict(task.members.archs)
        self.layers = dict(task.layers)
        self.record: dict[str, Any] = {
            "format": RECORD_FORMAT, "run_dir": str(self.run.run_dir), "init": task.members.origins or [],
            "dataset": task.config.dataset, "config": {**asdict(config), "dataset": task.config.dataset},
            "eval_samples": len(self.eval_split), "train_samples": len(task.dataset.train),
            "accuracy_samples": len(accuracy_split), "epochs": []}
        if self.run.resume and self.json_path.exists():
            previous = json.loads(self.json_path.read_text())
            self.record["epochs"] = [e for e in previous.get("epochs", []) if e["epoch"] <= start_epoch]

    def before(self, models: dict[str, nn.Module]) -> dict[str, Any]:
        metrics = self._evaluate(0, models, {})
        self._write()
        return metrics

    def after(self, epoch: int, models: dict[str, nn.Module], metrics: dict[str, Any]) -> dict[str, Any]:
        found = self._evaluate(epoch + 1, models, {})
        if "layer" in metrics:
            self.record["epochs"][-1]["layer"] = metrics["layer"]
        self.record["epochs"][-1]["metrics"].update({k: v for k, v in metrics.items() if k.startswith("train/")})
        self._write()
        return found

    def result(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return self.record

    def _evaluate(self, epoch: int, models: dict[str, nn.Module], extra: dict[str, Any]) -> dict[str, Any]:
        tick = time.perf_counter()
        scalars, result = evaluate_epoch(models, self.eval_split, self.config, feature_layers=self.layers,
                                         archs=self.archs, accuracy_split=self.accuracy_split, device=self.run.device)
        scalars["time/eval_s"] = time.perf_counter() - tick
        metrics = {**extra, **scalars}
        self.record["epochs"].append({"epoch": epoch, "metrics": metrics,
                                      "transfer": {"by_eps": result["by_eps"], "pairs": result["pairs"],
                                                   "models": result["models"], "settings": result["settings"]}})
        rates = "  ".join(f"eps {e:g}: {metrics[f'transfer/eps{e:g}/mean']:.3f}" for e in self.config.eval_eps)
        accs = " / ".join(f"{metrics[f'acc/{n}']:.4f}" for n in models)
        self.run.print(f"epoch {epoch:3d}/{self.config.epochs}  transfer {rates}  acc {accs}")
        return metrics

    def _write(self) -> None:
        if self.run.is_main:
            write_json(self.json_path, self.record)


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
