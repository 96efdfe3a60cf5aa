"""The one trainer entry: the options every training run shares (:class:`RunOptions`, the flags of
:func:`add_run_arguments`) and :func:`run_training`, which opens the run and fits its task.

Every ``train_*`` function takes its method's config and a :class:`RunOptions`::

    def train_classifier(config: ClassifierConfig, options: RunOptions = RunOptions()) -> dict:
        dataset = ...                                    # checks that need no run directory come first
        return run_training(lambda run: ClassifierTask(config, run.place(dataset), ..., run),
                            run_config, options, seed=config.seed, default_name=config.arch)
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from decorr.config import add_config_arguments, opt, set_threads
from decorr.errors import DecorrError
from decorr.training.loop import Task, fit
from decorr.training.run import EXTENDABLE, TrainingRun, releases_run_lock

__all__ = ["RunOptions", "add_run_arguments", "run_training"]


@dataclass(frozen=True)
class RunOptions:
    """Where and how a run trains, whatever it trains; every training script's shared flags."""

    run_dir: str | None = opt(None, "where checkpoints and TensorBoard logs go (default: a new "
                                    "runs/<name>/<timestamp>)")
    resume: bool = opt(False, "continue the run in --run-dir from its last checkpoint")
    data_root: str | None = opt(None, "folder holding the dataset files (else $DECORR_DATA_ROOT, ./data)")
    mixed_precision: str | None = opt(None, "autocast the models (default: accelerate launch's --mixed_precision, "
                                            "else no)", choices=("no", "bf16", "fp16"))
    cpu: bool = opt(False, "train on the CPU even when a GPU is present")
    no_tensorboard: bool = opt(False, "write no TensorBoard logs")
    deterministic: bool = opt(False, "torch.use_deterministic_algorithms and no cuDNN autotuning (slower; see "
                                     "docs/design.md)")
    threads: int | None = opt(None, "torch CPU threads (e.g. 1 on a shared machine)")
    #: A dataset already loaded (tests, benchmarks, the DNA's two stages): used instead of loading the
    #: config's, which the checkpoint still records. Not a flag.
    dataset: Any = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> "RunOptions":
        names = [f.name for f in dataclasses.fields(cls) if f.name != "dataset"]
        return cls(**{**{n: getattr(args, n) for n in names if hasattr(args, n)}, **overrides})

    def replace(self, **changes: Any) -> "RunOptions":
        return dataclasses.replace(self, **changes)


def add_run_arguments(parser: argparse.ArgumentParser, *, helps: Mapping[str, str] | None = None) -> None:
    """The flags of :class:`RunOptions` (``helps`` replaces help texts, e.g. a script's run directory)."""
    add_config_arguments(parser, RunOptions, exclude=("dataset",), helps=helps)


@releases_run_lock
def run_training(task: Callable[[TrainingRun], Task], run_config: dict[str, Any], options: RunOptions, *,
                 seed: int, default_name: str, gradient_accumulation_steps: int | None = None,
                 extendable: tuple[str, ...] = EXTENDABLE) -> Any:
    """Open the run (the run-directory lock, accelerate, TensorBoard, the resume checks) and fit the task
    that ``task(run)`` makes; return what the task's ``result`` gives. Call it after every check that
    needs no run directory, so that a refusal writes nothing.

    ``gradient_accumulation_steps``: the micro-batches per step the task cuts (accelerate must agree:
    ``accelerate launch --gradient_accumulation_steps`` would otherwise silently regroup them); None
    leaves it to accelerate.
    """
    set_threads(options.threads)
    run = TrainingRun(None if options.run_dir is None else Path(options.run_dir), run_config, seed=seed,
                      resume=options.resume, mixed_precision=options.mixed_precision, cpu=options.cpu,
                      log=not options.no_tensorboard, default_name=default_name, extendable=extendable,
                      gradient_accumulation_steps=gradient_accumulation_steps or 1,
                      deterministic=True if options.deterministic else None)
    steps = run.accelerator.gradient_accumulation_steps
    if gradient_accumulation_steps is not None and steps != gradient_accumulation_steps:
        run.release()
        raise DecorrError(f"accelerate is set to {steps} gradient accumulation steps but the run to "
                          f"{gradient_accumulation_steps}; pass --gradient-accumulation-steps to the script, not "
                          "to accelerate launch")
    return fit(run, task(run))
