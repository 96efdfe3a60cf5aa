"""The training harness every training script shares: accelerate, TensorBoard, checkpoints, resume.

One CPU, one GPU or many (``accelerate launch`` / ``torchrun``) run the same code. Batches are not
drawn by a DataLoader: every process draws the same global batch from a generator seeded by
``(seed, epoch)`` and keeps its own shard (see :func:`decorr.data.iterate_batches`). That makes a
resumed run bit-identical to an uninterrupted one on CPU, and N processes equivalent to one process with
the whole batch, which the global-batch losses rely on.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

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
from decorr.distributed import unwrap
from decorr.io import json_default
from decorr.training.runlock import RunLock

__all__ = [
    "NonFiniteError",
    "TrainingRun",
    "check_finite_features",
    "check_finite_weights",
    "default_run_dir",
    "flat_hparams",
    "mean_terms",
    "releases_run_lock",
]

#: The settings a resumed run may change: the number of epochs, to extend a finished run.
EXTENDABLE = ("epochs",)

F = TypeVar("F", bound=Callable[..., Any])


class NonFiniteError(DecorrError):
    """Training produced NaN or inf (a diverged run); the last good checkpoint is kept."""


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

    run_dir: Path | None
    config: dict[str, Any]
    seed: int = 0
    resume: bool = False
    #: "no", "bf16", "fp16", or None for accelerate's own default (``accelerate launch --mixed_precision``).
    mixed_precision: str | None = None
    gradient_accumulation_steps: int = 1
    cpu: bool = False
    log: bool = True
    #: Name of the default run directory ``runs/<default_name>/<timestamp>`` when ``run_dir`` is None.
    default_name: str = "run"
    #: Hyperparameters that ``resume`` may change (every other difference is refused).
    extendable: tuple[str, ...] = EXTENDABLE
    #: ``torch.use_deterministic_algorithms`` and cuDNN without autotuning (None: ``$DECORR_DETERMINISTIC``,
    #: which ``--deterministic`` sets); otherwise ``cudnn.benchmark`` is on. See docs/design.md for what
    #: each guarantees on CPU and GPU.
    deterministic: bool | None = None
    #: Datasets up to this size (MiB) are kept whole on the GPU by :meth:`place`; larger ones are pinned.
    gpu_data_budget_mb: float = float(os.environ.get("DECORR_GPU_DATA_MB", 4096))
    accelerator: Accelerator = field(init=False)
    history: list[dict[str, Any]] = field(init=False, default_factory=list)
    resumes: list[dict[str, Any]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
            raise DecorrError(f"--seed must be an integer in [0, 2**32), got {self.seed}")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise DecorrError(f"unknown mixed precision {self.mixed_precision!r}; use no, bf16 or fp16")
        cpu = self.cpu or not _has_accelerator()
        if self.mixed_precision == "fp16" and cpu:
            raise DecorrError("--mixed-precision fp16 needs a GPU (on the CPU it would silently train in float32); "
                              "use --mixed-precision bf16 or no")
        self.run_dir = default_run_dir(self.default_name, cpu=cpu) if self.run_dir is None else Path(self.run_dir)
        # What this run creates, so that a run failing before its first checkpoint leaves nothing behind.
        self._created_dirs = _missing_dirs(self.run_dir)
        self._had_tensorboard = (self.run_dir / "tensorboard").exists()
        project = ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir))
        self.accelerator = Accelerator(
            mixed_precision=self.mixed_precision,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            # accelerate recognises torchrun's processes on a machine without GPU only when told to run
            # on the CPU; otherwise every process would silently train alone on the whole data.
            cpu=cpu,
            log_with="tensorboard" if self.log else None,
            project_config=project,
        )
        from decorr.distributed import world_size

        if world_size() != self.accelerator.num_processes:
            raise DecorrError(
                f"torch.distributed has {world_size()} processes but accelerate sees "
                f"{self.accelerator.num_processes}; launch with accelerate launch or torchrun, not both"
            )
        if self.accelerator.mixed_precision == "fp16" and self.device.type == "cpu":
            raise DecorrError("fp16 mixed precision (from accelerate's config) needs a GPU; on the CPU it would "
                              "silently train in float32: use bf16 or no")
        # The precision actually used is part of the run's settings: a resume must not change it.
        self.config = {**self.config, "precision": self.accelerator.mixed_precision}
        if self.deterministic is None:
            self.deterministic = os.environ.get("DECORR_DETERMINISTIC", "") not in ("", "0")
        configure_backends(self.deterministic)
        self.config["deterministic"] = self.deterministic
        # The lock comes first: two runs racing into one directory must not both pass the checks below.
        self._lock = RunLock(self.run_dir)
        self._on_main(self._lock.acquire)
        try:
            self._on_main(self._check_run_dir)
        except DecorrError:
            self._lock.release()
            self._remove_created_dirs()
            raise
        _OPEN_RUNS.append(self)
        set_seed(self.seed)
        if self.log:
            self.accelerator.init_trackers("tensorboard", config=flat_hparams(self.config.get("hyperparameters", {})))

    def _on_main(self, check: Callable[[], None]) -> None:
        """Run ``check`` on the main process; every process raises its DecorrError, if any."""
        message = None
        if self.is_main:
            try:
                check()
            except DecorrError as err:
                message = str(err)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            message = broadcast_object_list([message])[0]
        if message is not None:
            raise DecorrError(message)

    def _check_run_dir(self) -> None:
        """A new run needs a directory without a checkpoint; a resumed one, a checkpoint of the same settings."""
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
        if self.resume:
            saved = load_checkpoint(self.run_dir, load_weights=False).config
            differing = changed_settings(saved, self.config, self.extendable)
            if differing:
                shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differing[:6])
                raise DecorrError(
                    f"cannot resume {self.run_dir} with other settings ({shown}); only "
                    f"{', '.join('--' + k.replace('_', '-') for k in self.extendable)} may change; "
                    "resume with the original settings or start a new --run-dir"
                )

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
        """Load the run's checkpoint into ``models`` if resuming; return the next epoch.

        Call before :meth:`prepare`, on the plain modules. The optimiser's state is better restored after
        ``prepare`` with :meth:`restore_optimizer` (what :func:`decorr.training.loop.fit` does): accelerate's
        ``prepare`` moves any state it finds to the device, Adam's ``step`` counters included, and Adam
        then reads each of them back to the host at every step. ``optimizer`` here is for callers
        without ``prepare``.
        """
        if not self.resume:
            return 0
        checkpoint = load_checkpoint(self.run_dir)
        saved = checkpoint.config
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
        epochs = self.config.get("hyperparameters", {}).get("epochs")
        self.resumes = list(saved.get("resumes", [])) + [{
            "after_epoch": epoch, "epochs": epochs, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(), "num_processes": self.accelerator.num_processes}]
        self.print(f"resumed {self.run_dir} after epoch {epoch}")
        return epoch

    def restore_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """After ``prepare``: the optimiser's state (PyTorch puts each tensor where it belongs: moments on
        the parameters' device, ``step`` counters on the host unless the optimiser is capturable or fused)
        and, with fp16, the gradient scaler's scale and growth tracker."""
        if not self.resume:
            return
        inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        load_optimizer_state(inner, self.run_dir)
        scaler = getattr(self.accelerator, "scaler", None)
        saved = load_checkpoint(self.run_dir, load_weights=False).config.get("grad_scaler")
        if scaler is not None and saved:
            scaler.load_state_dict(saved)

    def place(self, dataset: Any) -> Any:
        """``dataset`` (an ImageDataset) for training on this run's device: on a GPU, whole splits that fit
        ``gpu_data_budget_mb`` are copied there once (batches are then cut on the GPU), larger ones are
        put in pinned host memory; on the CPU it is returned as it is."""
        if self.device.type != "cuda":
            return dataset
        import dataclasses

        from decorr.data import ImageSplit

        def placed(split: Any) -> Any:
            if not isinstance(split, ImageSplit):
                return split
            size_mb = (split.images.numel() * split.images.element_size() + split.labels.numel() * 8) / 2**20
            if size_mb <= self.gpu_data_budget_mb:
                return split.to(self.device)
            return ImageSplit(split.images.pin_memory(), split.labels.pin_memory())

        return dataclasses.replace(dataset, train=placed(dataset.train), test=placed(dataset.test))

    def prepare(self, *objects: Any) -> Any:
        return self.accelerator.prepare(*objects)

    def save(self, epoch: int, models: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer | None,
             metrics: Mapping[str, Any]) -> None:
        """Write the checkpoint for the end of ``epoch`` (atomic; main process only)."""
        plain = {name: unwrap(module) for name, module in models.items()}
        check_finite_weights(plain, f"after epoch {epoch}", self.history[-1]["epoch"] if self.history else None)
        self.history.append({"epoch": epoch, **{k: json_default(v) for k, v in metrics.items()}})
        self.accelerator.wait_for_everyone()
        if self.is_main:
            config = {**self.config, "seed": self.seed, "epoch": epoch,
                      "metrics": {k: json_default(v) for k, v in metrics.items()}, "history": self.history}
            if self.resumes:
                config["resumes"] = self.resumes
            optim = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:  # fp16: the loss scale a resumed run continues from
                config["grad_scaler"] = {k: json_default(v) for k, v in scaler.state_dict().items()}
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
        self.release()

    def release(self) -> None:
        """Give up the run directory's lock (``finish`` does; also called when training fails)."""
        self._lock.release()
        if self in _OPEN_RUNS:
            _OPEN_RUNS.remove(self)

    def abandon(self) -> None:
        """The run failed: give the directory back, and when it holds no checkpoint (the run failed before
        its first one), remove what the run wrote there (its TensorBoard logs) and the folders it created,
        so that a refused or diverged run leaves no debris. A directory with a checkpoint is left as it is."""
        unused = False
        try:
            unused = self.is_main and not self._has_checkpoint()
            if unused:
                if self.log:
                    for tracker in self.accelerator.trackers:
                        try:
                            tracker.finish()  # close the event files before removing them
                        except Exception:  # noqa: BLE001 - the run is failing already; its error is the one to show
                            pass
                if not self._had_tensorboard:  # while the lock is held: these logs are this run's
                    shutil.rmtree(self.run_dir / "tensorboard", ignore_errors=True)
        finally:
            self.release()
        if unused:
            self._remove_created_dirs()  # only empty folders, so another run that came in since loses nothing

    def _has_checkpoint(self) -> bool:
        return any((self.run_dir / f"{CHECKPOINT_DIR}{suffix}").exists() for suffix in ("", ".old", ".tmp"))

    def _remove_created_dirs(self) -> None:
        for directory in reversed(self._created_dirs):  # deepest first; only empty ones
            try:
                directory.rmdir()
            except OSError:
                break


#: Runs of this process that hold their directory's lock, so that a training function failing half-way
#: gives its run directory back.
_OPEN_RUNS: list[TrainingRun] = []


def _missing_dirs(path: Path) -> list[Path]:
    """The folders that creating ``path`` would create, outermost first."""
    missing = []
    for directory in [path, *path.absolute().parents]:
        if directory.exists():
            break
        missing.append(directory)
    return missing[::-1]


def releases_run_lock(train: F) -> F:
    """Decorate a training function: if it raises, the runs it opened give their directories back (and
    remove their debris when they wrote no checkpoint; see :meth:`TrainingRun.abandon`)."""

    @functools.wraps(train)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = len(_OPEN_RUNS)
        try:
            return train(*args, **kwargs)
        except BaseException:
            for run in list(_OPEN_RUNS[before:]):
                run.abandon()
            del _OPEN_RUNS[before:]
            raise

    return wrapper  # type: ignore[return-value]


def configure_backends(deterministic: bool) -> None:
    """cuDNN autotuning for speed, or deterministic algorithms (``--deterministic``) for repeatability."""
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic matrix products (CUDA >= 10.2).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


def default_run_dir(name: str, *, cpu: bool = False, root: str | os.PathLike = "runs") -> Path:
    """A fresh ``runs/<name>/<YYYYmmdd-HHMMSS>`` that every process agrees on (chosen by the main one)."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=cpu or not _has_accelerator())
    chosen = None
    if state.is_main_process:
        base = Path(root) / name / time.strftime("%Y%m%d-%H%M%S")
        chosen, n = base, 1
        while chosen.exists():
            n += 1
            chosen = base.with_name(f"{base.name}-{n}")
        chosen = str(chosen)
    if state.num_processes > 1:
        chosen = broadcast_object_list([chosen])[0]
    if state.is_main_process:
        print(f"run directory: {chosen} (pass --run-dir to choose)", file=sys.stderr)
    return Path(chosen)


def _normalised(value: Any) -> Any:
    return json.loads(json.dumps(value, default=json_default, sort_keys=True))


def changed_settings(saved: Mapping[str, Any], wanted: Mapping[str, Any],
                     extendable: tuple[str, ...] = EXTENDABLE) -> list[tuple[str, Any, Any]]:
    """The settings in which a run's new config differs from its checkpoint's: ``(name, saved, new)``.

    Compared: the run's kind, models, dataset and precision, and every hyperparameter except
    ``extendable`` ones. Checkpoints written before precision was recorded compare as matching there.
    """
    differing: list[tuple[str, Any, Any]] = []
    for key in ("kind", "stage", "models", "dataset", "precision"):
        if key in wanted and key in saved and _normalised(saved[key]) != _normalised(wanted[key]):
            differing.append((key, saved[key], wanted[key]))
    old = _normalised(saved.get("hyperparameters", {}))
    new = _normalised(wanted.get("hyperparameters", {}))
    for key in sorted(set(old) | set(new)):
        if key not in extendable and old.get(key) != new.get(key):
            differing.append((key, old.get(key), new.get(key)))
    return differing


def mean_terms(values: list[dict[str, torch.Tensor]], where: str = "") -> dict[str, float]:
    """Average each logged loss term over an epoch's steps; a NaN or inf term is a :class:`NonFiniteError`.

    The check costs no extra host read per step: the terms stay on the device until the epoch's end.
    ``where`` (e.g. ``"epoch 3"``) goes into the message, which names the first bad step.
    """
    keys = list(values[0].keys()) if values else []
    stacked = {k: torch.stack([v[k].float() for v in values]) for k in keys}
    means = {k: float(t.mean()) for k, t in stacked.items()}
    bad = [k for k, m in means.items() if not math.isfinite(m)]
    if bad:
        key = "loss" if "loss" in bad else bad[0]
        step = int((~torch.isfinite(stacked[key])).nonzero()[0, 0]) + 1
        raise NonFiniteError(
            f"training diverged: the {key} term is {float(stacked[key][step - 1])} at step {step}"
            f"{' of ' + where if where else ''}; the last good checkpoint is kept (nothing was saved for "
            "this epoch); lower --lr or check the data, then --resume or start again"
        )
    return means


def check_finite_features(features: Mapping[str, torch.Tensor], where: str = "") -> None:
    """Refuse NaN or inf features (a diverged model) before any statistic of them (an SVD would fail)."""
    for name, z in features.items():
        if not bool(torch.isfinite(z).all()):
            raise NonFiniteError(f"training diverged: {name}'s features hold NaN or inf{' ' + where if where else ''}; "
                                 "the last good checkpoint is kept (nothing was saved for this epoch); lower --lr or "
                                 "check the data")


def check_finite_weights(models: Mapping[str, nn.Module], where: str, last_good: int | None = None) -> None:
    """Refuse to save NaN or inf weights: a diverged model is never written as a checkpoint."""
    for name, model in models.items():
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                kept = "no checkpoint was written" if last_good is None else f"the checkpoint of epoch {last_good} is kept"
                raise NonFiniteError(f"training diverged: {name}.{key} holds NaN or inf {where}; {kept}; "
                                     "lower --lr or check the data")


def _has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return bool(probe.is_available())
    return torch.cuda.is_available()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1)





