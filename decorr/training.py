"""The training harness every training script shares: accelerate, TensorBoard, checkpoints, resume.

One CPU, one GPU or many (``accelerate launch`` / ``torchrun``) run the same code. Batches are not
drawn by a DataLoader: every process draws the same global batch from a generator seeded by
``(seed, epoch)`` and keeps its own shard (see :func:`decorr.data.iterate_batches`). That makes a
resumed run bit-identical to an uninterrupted one on CPU, and N processes equivalent to one process with
the whole batch, which the global-batch losses rely on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from decorr.checkpoint import (
    CHECKPOINT_DIR,
    load_checkpoint,
    load_optimizer_state,
    save_checkpoint,
)
from decorr.errors import DecorrError

__all__ = ["TrainingRun", "add_run_arguments", "flat_hparams", "mean_terms", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a data-parallel wrapper (DDP keeps it as ``.module``)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config into TensorBoard-friendly scalars and strings."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_hparams(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)) or value is None:
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


@dataclass
class TrainingRun:
    """State of one training run in ``run_dir``.

    ``config`` is what the checkpoint records (kind, models, dataset, seed, hyperparameters). On
    ``resume=True`` the existing checkpoint must have been written with the same ``config`` (except for
    the number of epochs), so that a resumed run cannot silently continue a different experiment.
    """

    run_dir: Path
    config: dict[str, Any]
    seed: int = 0
    resume: bool = False
    #: "no", "bf16", "fp16", or None for accelerate's own default (``accelerate launch --mixed_precision``).
    mixed_precision: str | None = None
    gradient_accumulation_steps: int = 1
    cpu: bool = False
    log: bool = True
    accelerator: Accelerator = field(init=False)
    history: list[dict[str, Any]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        checkpoint_dir = self.run_dir / CHECKPOINT_DIR
        exists = (checkpoint_dir / "config.json").exists() or (
            not checkpoint_dir.exists() and (checkpoint_dir.with_name(CHECKPOINT_DIR + ".old") / "config.json").exists()
        )
        if self.resume and not exists:
            raise DecorrError(f"--resume given but {self.run_dir} has no checkpoint; drop --resume to start a new run")
        if not self.resume and exists:
            raise DecorrError(
                f"{self.run_dir} already holds a checkpoint; pass --resume to continue it or choose another --run-dir"
            )
        project = ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir))
        self.accelerator = Accelerator(
            mixed_precision=self.mixed_precision,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            # accelerate recognises torchrun's processes on a machine without GPU only when told to run
            # on the CPU; otherwise every process would silently train alone on the whole data.
            cpu=self.cpu or not _has_accelerator(),
            log_with="tensorboard" if self.log else None,
            project_config=project,
        )
        from decorr.distributed import world_size

        if world_size() != self.accelerator.num_processes:
            raise DecorrError(
                f"torch.distributed has {world_size()} processes but accelerate sees "
                f"{self.accelerator.num_processes}; launch with accelerate launch or torchrun, not both"
            )
        set_seed(self.seed)
        if self.log:
            self.accelerator.init_trackers("tensorboard", config=flat_hparams(self.config.get("hyperparameters", {})))

    # -- process topology -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def shard(self) -> tuple[int, int]:
        return self.accelerator.process_index, self.accelerator.num_processes

    def print(self, *args: Any) -> None:
        self.accelerator.print(*args)

    # -- checkpoints ------------------------------------------------------------------------------
    def restore(self, models: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer | None = None) -> int:
        """Load the run's checkpoint into ``models`` (and ``optimizer``) if resuming; return the next epoch.

        Call before :meth:`prepare`, on the plain modules.
        """
        if not self.resume:
            return 0
        checkpoint = load_checkpoint(self.run_dir)
        saved = checkpoint.config
        for key in ("kind", "models", "dataset"):
            if key in self.config and saved.get(key) != self.config.get(key):
                raise DecorrError(
                    f"cannot resume {self.run_dir}: its {key} is {saved.get(key)!r} but this run asks for "
                    f"{self.config.get(key)!r}; use the original settings or another --run-dir"
                )
        for name, module in models.items():
            if name not in checkpoint.state_dicts:
                raise DecorrError(f"cannot resume {self.run_dir}: checkpoint has no model {name!r}")
            try:
                module.load_state_dict(checkpoint.state_dicts[name], strict=True)
            except RuntimeError as err:
                raise DecorrError(
                    f"cannot resume {self.run_dir}: weights of {name!r} do not fit the model "
                    f"({str(err).splitlines()[0]})"
                ) from None
        if optimizer is not None:
            load_optimizer_state(optimizer, self.run_dir)
        self.history = list(saved.get("history", []))
        epoch = int(saved.get("epoch", 0))
        self.print(f"resumed {self.run_dir} after epoch {epoch}")
        return epoch

    def prepare(self, *objects: Any) -> Any:
        return self.accelerator.prepare(*objects)

    def save(self, epoch: int, models: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer | None,
             metrics: Mapping[str, Any]) -> None:
        """Write the checkpoint for the end of ``epoch`` (atomic; main process only)."""
        self.history.append({"epoch": epoch, **{k: _jsonable(v) for k, v in metrics.items()}})
        self.accelerator.wait_for_everyone()
        if self.is_main:
            plain = {name: unwrap(module) for name, module in models.items()}
            config = {**self.config, "seed": self.seed, "epoch": epoch,
                      "metrics": {k: _jsonable(v) for k, v in metrics.items()}, "history": self.history}
            optim = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
            save_checkpoint(self.run_dir / CHECKPOINT_DIR, plain, config, optimizer=optim)
        self.accelerator.wait_for_everyone()

    # -- logging ----------------------------------------------------------------------------------
    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.log:
            self.accelerator.log({k: float(v) for k, v in values.items() if _is_number(v)}, step=step)

    def log_images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """Log a (N, C, H, W) batch in [0, 1] as one image grid."""
        if not (self.log and self.is_main):
            return
        from torchvision.utils import make_grid

        writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
        grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=min(len(images), 16))
        writer.add_image(tag, grid, global_step=step)

    def progress(self, iterable: Any, total: int | None = None, desc: str = "") -> Iterator[Any]:
        from tqdm.auto import tqdm

        disable = not self.is_main or not sys.stderr.isatty() and os.environ.get("DECORR_PROGRESS") != "1"
        return iter(tqdm(iterable, total=total, desc=desc, leave=False, disable=disable))

    def finish(self) -> None:
        """Flush and close the trackers. The process group stays up (accelerate's ``end_training``
        would destroy it), so one process can run several stages, e.g. the DNA's two."""
        self.accelerator.wait_for_everyone()
        if self.log:
            for tracker in self.accelerator.trackers:
                tracker.finish()


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every training script shares: precision, device, resume, logging."""
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
                        help="default: accelerate launch's --mixed_precision, else no")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    parser.add_argument("--no-tensorboard", action="store_true")


def mean_terms(values: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Average each logged loss term over an epoch's steps."""
    keys = values[0].keys() if values else []
    return {k: float(torch.stack([v[k] for v in values]).mean()) for k in keys}


def _has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return bool(probe.is_available())
    return torch.cuda.is_available()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1)


def _jsonable(value: Any) -> Any:
    if torch.is_tensor(value):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temp file + rename) so a kill never leaves half a result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


__all__.append("write_json")
