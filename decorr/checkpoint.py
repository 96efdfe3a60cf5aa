"""One checkpoint format: a directory of safetensors files plus ``config.json``.

Loading never runs pickled code. ``config.json`` records the SHA-256 of every file beside it
(``checksums``), checked on every load, so a damaged file is a one-line error rather than wrong numbers;
weights holding NaN or inf are refused too. Writing is atomic: everything goes to ``<dir>.tmp`` first, is synced
to disk, and replaces the old directory by renames, so a kill at any moment leaves the previous complete
checkpoint in place (as ``<dir>`` or, between the two renames, ``<dir>.old``, which loading accepts).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from decorr.errors import DecorrError
from decorr.models import create_model
from decorr.models.weights import sha256_of as file_sha256

FORMAT = "decorr-checkpoint/2"
#: Older checkpoints (no checksums) still load, with a warning that they cannot be verified.
READABLE_FORMATS = ("decorr-checkpoint/1", FORMAT)
CHECKPOINT_DIR = "checkpoint"
OPTIMIZER_FILE = "optimizer.safetensors"

__all__ = [
    "Checkpoint",
    "FORMAT",
    "resolve_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "load_models",
    "build_model",
    "model_entry",
    "optimizer_tensors",
    "load_optimizer_state",
]


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any]
    state_dicts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def model_names(self) -> list[str]:
        return list(self.config["models"])


def model_entry(arch: str, kwargs: Mapping[str, Any] | None = None, feature_layer: str | None = None) -> dict[str, Any]:
    """The config record describing how to rebuild one model from the registry."""
    from decorr.models import model_spec

    return {
        "arch": arch,
        "kwargs": dict(kwargs or {}),
        "feature_layer": feature_layer if feature_layer is not None else model_spec(arch).feature_layer,
    }


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=float)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; checkpoints hold plain copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state into tensors (for safetensors) and JSON-able metadata."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Restore an optimizer saved by :func:`save_checkpoint`."""
    checkpoint = load_checkpoint(path, load_weights=False)
    meta = checkpoint.config.get("optimizer")
    file = checkpoint.path / OPTIMIZER_FILE
    if meta is None or not file.exists():
        raise DecorrError(f"checkpoint {checkpoint.path} has no optimizer state to resume from; start a new run")
    tensors = _read_tensors(checkpoint, OPTIMIZER_FILE)
    try:
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        for index, values in meta.get("scalars", {}).items():
            state.setdefault(int(index), {}).update(values)
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DecorrError(f"optimizer state in {checkpoint.path} does not fit this run ({err}); start a new run") from None


def save_checkpoint(
    path: str | os.PathLike,
    models: Mapping[str, nn.Module],
    config: Mapping[str, Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write ``models`` and ``config`` to the checkpoint directory ``path`` atomically.

    ``config["models"]`` must describe every model (see :func:`model_entry`).
    """
    path = Path(path)
    entries = config.get("models", {})
    missing = [name for name in models if name not in entries]
    if missing:
        raise ValueError(f"config['models'] lacks entries for {missing}")
    full_config = {"format": FORMAT, **config}
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, module in models.items():
        save_file(_state_tensors(module), str(tmp / f"{name}.safetensors"))
    if optimizer is not None:
        tensors, meta = optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        full_config["optimizer"] = meta
    full_config["checksums"] = {file.name: file_sha256(file) for file in sorted(tmp.iterdir())}
    _write_json(tmp / "config.json", full_config)
    for file in tmp.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(tmp)
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory for ``path``: a checkpoint directory itself or a run directory."""
    path = Path(path)
    for candidate in (path, path / CHECKPOINT_DIR):
        if (candidate / "config.json").is_file():
            return candidate
        old = candidate.with_name(candidate.name + ".old")
        if not candidate.exists() and (old / "config.json").is_file():
            return old
    if not path.exists():
        raise DecorrError(f"checkpoint {path} does not exist; pass a run directory or its checkpoint/ folder")
    raise DecorrError(f"{path} is not a decorr checkpoint (no config.json in it or in {path / CHECKPOINT_DIR})")


def _check_config(directory: Path, config: Any) -> None:
    """A one-line DecorrError for a config.json that is not a decorr checkpoint's."""
    where = directory / "config.json"
    if not isinstance(config, dict):
        raise DecorrError(f"{where} holds a JSON {type(config).__name__}, not a checkpoint record; the checkpoint is damaged")
    if config.get("format") not in READABLE_FORMATS or "models" not in config:
        raise DecorrError(f"{directory} is not a {FORMAT} checkpoint (format {config.get('format')!r})")
    models = config["models"]
    if not isinstance(models, dict) or not models:
        raise DecorrError(f"{where}: 'models' must map model names to their records; the checkpoint is damaged")
    for name, entry in models.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("arch"), str):
            raise DecorrError(f"{where}: model {name!r} has no 'arch' (architecture name); the checkpoint is damaged")
        if not isinstance(entry.get("kwargs", {}), dict):
            raise DecorrError(f"{where}: model {name!r} has kwargs that are not a JSON object; the checkpoint is damaged")
    if "checksums" in config and not isinstance(config["checksums"], dict):
        raise DecorrError(f"{where}: 'checksums' is not a JSON object; the checkpoint is damaged")
    epoch, seed, dataset = config.get("epoch"), config.get("seed"), config.get("dataset")
    if epoch is not None and not (_is_int(epoch) and epoch >= 0):
        raise DecorrError(f"{where}: 'epoch' is {epoch!r}, not an integer >= 0; the checkpoint is damaged")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 2**32):
        raise DecorrError(f"{where}: 'seed' is {seed!r}, not an integer in [0, 2**32); the checkpoint is damaged")
    if dataset is not None and not (isinstance(dataset, str) and dataset):
        raise DecorrError(f"{where}: 'dataset' is {dataset!r}, not a dataset name; the checkpoint is damaged")
    for name, entry in models.items():
        check_model_kwargs(entry["arch"], entry.get("kwargs", {}), f"{where}: model {name!r}")


#: The largest size a model's integer argument may have (channels, classes, widths): larger values are damage,
#: not a model (``in_channels`` 1e9 would allocate hundreds of GB before any weight is read).
MAX_MODEL_SIZE = 1 << 16


#: The most parameters a checkpoint's model may have (8 GiB of float32), checked before it is built.
MAX_PARAMETERS = 1 << 31


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_model_kwargs(arch: str, kwargs: Mapping[str, Any], where: str) -> None:
    """Refuse kwargs of a registry model that cannot describe a model, before it is built.

    Checked against the builder's signature: an argument whose default is an integer (channels, classes,
    widths) must be an integer in 1..MAX_MODEL_SIZE, one whose default is a tuple of integers a list of
    such, and every number finite. Unknown names are left to the builder (its TypeError is a one-line error).
    """
    import inspect
    import math

    from decorr.models.registry import model_spec

    if arch.startswith(("torchvision.", "timm.")):
        return
    try:
        builder = model_spec(arch).builder
    except DecorrError:
        return  # an unknown architecture is reported when it is built
    parameters = inspect.signature(builder).parameters
    def size(v: Any) -> bool:
        return _is_int(v) and 1 <= v <= MAX_MODEL_SIZE

    for key, value in kwargs.items():
        default = parameters[key].default if key in parameters else None
        if _is_int(default):
            fits, wanted = size(value), "an integer"
        elif isinstance(default, (tuple, list)) and default and all(map(_is_int, default)):
            fits, wanted = isinstance(value, (tuple, list)) and bool(value) and all(map(size, value)), "a list of integers"
        else:
            values = value if isinstance(value, (tuple, list)) else [value]
            fits, wanted = not any(isinstance(v, float) and not math.isfinite(v) for v in values), "finite numbers"
        if not fits:
            span = f" in 1..{MAX_MODEL_SIZE}" if wanted != "finite numbers" else ""
            raise DecorrError(f"{where} has {key} {value!r}, but it must be {wanted}{span}; the checkpoint is damaged")


_warned_unverified: set[str] = set()


def _read_tensors(checkpoint: Checkpoint, filename: str) -> dict[str, torch.Tensor]:
    """The tensors of one file of ``checkpoint``, after checking its SHA-256 and that they are finite."""
    file = checkpoint.path / filename
    expected = checkpoint.config.get("checksums", {}).get(filename)
    try:
        if expected is not None:
            actual = file_sha256(file)
            if actual != expected:
                raise DecorrError(f"{file} is damaged: its SHA-256 is {actual[:12]}..., config.json records "
                                  f"{str(expected)[:12]}...; restore the file or retrain")
        elif str(checkpoint.path) not in _warned_unverified:
            _warned_unverified.add(str(checkpoint.path))
            print(f"warning: {checkpoint.path} records no checksums (an older decorr checkpoint); its files "
                  "cannot be verified", file=sys.stderr)
        tensors = load_file(str(file))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise DecorrError(f"cannot read {file} ({' '.join(str(err).split())}); the checkpoint is incomplete or "
                          "damaged") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DecorrError(f"{file}: tensor {key!r} holds NaN or inf; these weights are unusable (retrain, or "
                              "use an earlier checkpoint)")
    return tensors


def load_checkpoint(path: str | os.PathLike, *, load_weights: bool = True) -> Checkpoint:
    """Read a checkpoint's config and (optionally) its weights; never unpickles anything.

    Every file read is checked against the SHA-256 in ``config.json`` and for NaN/inf values.
    """
    directory = resolve_checkpoint(path)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "not text"
        raise DecorrError(f"{directory / 'config.json'} is not valid JSON ({reason}); the checkpoint is damaged") from None
    _check_config(directory, config)
    checkpoint = Checkpoint(directory, config)
    if load_weights:
        for name in config["models"]:
            checkpoint.state_dicts[name] = _read_tensors(checkpoint, f"{name}.safetensors")
    return checkpoint


def build_model(entry: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None,
                *, source: str = "checkpoint") -> nn.Module:
    """Create a model from a config entry and load weights that must fit it exactly.

    ``arch`` is a registry name, or ``torchvision.NAME`` / ``timm.NAME`` (converted checkpoints); an
    entry's optional ``preprocess`` (``{mean, std, input_size}``) wraps it (``decorr.models.foreign``).
    """
    def build() -> nn.Module:
        if entry.get("preprocess") or str(entry["arch"]).startswith(("torchvision.", "timm.", "robustbench.")):
            from decorr.models.foreign import build_architecture

            return build_architecture(entry["arch"], entry.get("kwargs", {}), entry.get("preprocess"))
        return create_model(entry["arch"], **entry.get("kwargs", {}))

    try:
        # First without memory (the meta device): sizes that cannot be built, or would not fit, are refused
        # before anything is allocated.
        try:
            with torch.device("meta"):
                size = sum(p.numel() for p in build().parameters())
        except (RuntimeError, ValueError, OverflowError) as err:
            raise DecorrError(f"{source}: cannot build {entry['arch']!r} with kwargs {entry.get('kwargs', {})} "
                              f"({' '.join(str(err).split())[:160]}); the checkpoint is damaged") from None
        if size > MAX_PARAMETERS:
            raise DecorrError(f"{source}: {entry['arch']!r} with kwargs {entry.get('kwargs', {})} would have {size:.3g} "
                              f"parameters (more than {MAX_PARAMETERS:.3g}); the checkpoint is damaged")
        model = build()
    except TypeError as err:
        raise DecorrError(f"{source}: cannot build {entry['arch']!r} with kwargs {entry.get('kwargs', {})} "
                          f"({err}); the checkpoint does not fit this version of the model") from None
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()
            detail = first[1].strip() if len(first) > 1 else first[0]
            raise DecorrError(
                f"weights in {source} do not match architecture {entry['arch']!r} ({detail}); "
                f"check that the checkpoint was made for this model"
            ) from None
    return model


def load_models(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, nn.Module]:
    """All models of a checkpoint, rebuilt from the registry, in eval mode on ``device``."""
    checkpoint = load_checkpoint(path)
    models = {}
    for name, entry in checkpoint.config["models"].items():
        model = build_model(entry, checkpoint.state_dicts[name], source=str(checkpoint.path / f"{name}.safetensors"))
        models[name] = model.to(device).eval()
    return models
