"""Weights files from outside the toolkit: read them without running code, fit them to an architecture.

``read_state_dict(path)`` reads a safetensors file (safetensors) or a torch.save state dict, zip or legacy
pickle (``torch.load(..., map_location="cpu", weights_only=True)``, which refuses anything that would run
code when unpickled); the format is told by the file's first bytes (:func:`file_format`), not its suffix,
so a paper's ``model_final`` or a ``.ckpt`` loads too. The usual containers are unwrapped: a dict under
``state_dict``, ``model`` or ``net`` and the ``module.`` prefix of DataParallel / DistributedDataParallel. ``fit_state_dict(model, state)``
loads it strictly, by name, or with ``by_order=True`` by position (same count, same shapes).
"""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn as nn
from torch import Tensor

from decorr.errors import DecorrError, short_reason

__all__ = ["PICKLE_SUFFIXES", "WEIGHTS_SUFFIXES", "constant_buffers", "file_format", "fit_state_dict", "order_keys",
           "read_state_dict", "sha256_of"]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
WEIGHTS_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
#: Keys under which training scripts commonly nest the state dict.
CONTAINER_KEYS = ("state_dict", "model", "net")
#: BatchNorm's step counter: not a weight; older files lack it and paper code often drops it.
_COUNTER = "num_batches_tracked"
#: Buffers learned in training (running statistics); a model's other buffers are constants of its architecture
#: (Normalize's mean and std), which paper files do not hold.
_RUNNING = ("running_mean", "running_var")


def constant_buffers(model: nn.Module) -> set[str]:
    """State-dict keys of ``model``'s constant buffers: every buffer but running statistics and counters."""
    keys = set(model.state_dict())
    return {name for name, _ in model.named_buffers()
            if name in keys and name.rsplit(".", 1)[-1] not in (*_RUNNING, _COUNTER)}


def order_keys(expected: Mapping[str, Tensor], constants: set[str], theirs: list[Tensor]) -> list[str]:
    """The model's keys that a file's tensors ``theirs`` (counters aside) fill by order: all of them when the file
    has as many, the learned parameters and running statistics only (constants stay the model's) when it has
    as many as those; otherwise the list whose shapes agree with the file's as far as both go (for the error)."""
    every = [k for k in expected if not k.endswith(_COUNTER)]
    learned = [k for k in every if k not in constants]
    for keys in (every, learned):
        if len(keys) == len(theirs):
            return keys
    for keys in (every, learned):
        if all(list(expected[k].shape) == list(t.shape) for k, t in zip(keys, theirs)):
            return keys
    return learned


def file_format(path: str | Path) -> str | None:
    """What a weights file is, read from its first bytes whatever its suffix: ``"safetensors"`` (an 8-byte
    header length, then a JSON header), ``"zip"`` (torch.save since torch 1.6), ``"pickle"`` (torch.save's
    legacy format; still read with weights_only=True) or None."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= Path(path).stat().st_size:
        return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    return None


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file, by name, read without unpickling code; NaN or inf is refused."""
    state = _read_state_dict(Path(path))
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DecorrError(f"{path}: tensor {key!r} holds NaN or inf; these weights are unusable")
    return state


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.is_dir():
        raise DecorrError(f"weights file {path} is a folder, not a file; give the path of a .safetensors, .pt, .pth or "
                          ".bin file (a decorr checkpoint folder is a spec of its own, without ARCH=)")
    if not path.is_file():
        raise DecorrError(f"weights file {path} does not exist; give the path of a .safetensors, .pt, .pth or .bin file")
    if path.stat().st_size == 0:
        raise DecorrError(f"weights file {path} is empty (0 bytes); it was not written completely: save the weights again")
    kind = file_format(path)
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise DecorrError(f"cannot read {path} as safetensors ({err}); the file is damaged or not safetensors") from None
    if kind is None:
        raise DecorrError(f"weights file {path} is neither safetensors nor a torch.save file (zip or pickle), whatever "
                          "its suffix; give a .safetensors file or a state dict saved with torch.save")
    try:
        # a file object, not the path: torch.load would go by a .safetensors suffix; map_location: a file saved
        # on a GPU loads on any machine
        with open(path, "rb") as handle:
            loaded = torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own text is many lines of advice to load it unsafely; say what was found, in our words.
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f"it needs {found.group(1)}" if found else short_reason(err, 100)
        raise DecorrError(
            f"{path} is refused: unpickling it would run code or build objects ({what}); only plain state dicts "
            "load, so save model.state_dict() (or .safetensors) where the model is defined"
        ) from None
    except Exception as err:  # noqa: BLE001 - any failure to parse a user's file is that file's problem
        raise DecorrError(f"cannot read {path} with torch.load ({type(err).__name__}: {short_reason(err, 100)}); "
                          "the file is damaged or not a torch file") from None
    return _unwrap(loaded, path)


def _unwrap(value: object, path: Path) -> dict[str, Tensor]:
    for _ in range(4):  # {"state_dict": {...}}, {"model": {"state_dict": ...}}, ...
        if isinstance(value, Mapping) and not _all_tensors(value):
            inner = next((value[k] for k in CONTAINER_KEYS if isinstance(value.get(k), Mapping)), None)
            if inner is None:
                break
            value = inner
    if not isinstance(value, Mapping) or not value or not _all_tensors(value):
        keys = ", ".join(map(str, list(value)[:6])) if isinstance(value, Mapping) else type(value).__name__
        raise DecorrError(f"{path} holds no state dict of tensors (found: {keys}); save model.state_dict(), or "
                          f"nest it under one of the keys {', '.join(CONTAINER_KEYS)}")
    state = {str(k): v for k, v in value.items()}
    if all(k.startswith("module.") for k in state):  # DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _all_tensors(mapping: Mapping) -> bool:
    return all(torch.is_tensor(v) for v in mapping.values())


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def fit_state_dict(model: nn.Module, state: Mapping[str, Tensor], *, by_order: bool = False, source: str = "weights",
                   arch: str = "the architecture", log: Callable[[str], None] | None = None) -> None:
    """Load ``state`` into ``model``: all names and shapes must fit (``num_batches_tracked`` may be absent).

    ``by_order=True`` ignores the names: the i-th tensor of the file goes to the model's i-th tensor
    (``num_batches_tracked`` left out on both sides; the model's constant buffers, e.g. Normalize's mean and
    std, too unless the file has as many tensors as the model), counts and every shape must agree, and the
    mapping used (with the constants kept from the architecture) goes to ``log``. A misfit is a one-line DecorrError naming the first tensor that does
    not fit.
    """
    expected = model.state_dict()
    if by_order:
        mapped = _map_by_order(expected, state, constant_buffers(model), source, arch, log)
    else:
        missing = [k for k in expected if k not in state and not k.endswith(_COUNTER)]
        unexpected = [k for k in state if k not in expected]
        hint = "; if they are the same tensors under other names, pass --match-by-order (or match_by_order=1)"
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            extra = f", and it has unexpected key {unexpected[0]!r}" if unexpected else ""
            raise DecorrError(f"weights {source} do not fit {arch}: missing key {missing[0]!r}{more}{extra}{hint}")
        if unexpected:
            raise DecorrError(f"weights {source} do not fit {arch}: unexpected key {unexpected[0]!r} "
                              f"({len(unexpected)} in all){hint}")
        for key, tensor in expected.items():
            if key in state and _shape(state[key]) != _shape(tensor):
                raise DecorrError(f"weights {source} do not fit {arch}: {key!r} has shape {_shape(state[key])} in the "
                                  f"file but {_shape(tensor)} in the model; check the architecture and --num-classes")
        mapped = dict(state)
    for key, tensor in expected.items():
        if key.endswith(_COUNTER) and key not in mapped:
            mapped[key] = tensor
    model.load_state_dict(mapped, strict=True)


def _map_by_order(expected: Mapping[str, Tensor], state: Mapping[str, Tensor], constants: set[str], source: str,
                  arch: str, log: Callable[[str], None] | None) -> dict[str, Tensor]:
    theirs = [(k, v) for k, v in state.items() if not k.endswith(_COUNTER)]
    ours = [(k, expected[k]) for k in order_keys(expected, constants, [t for _, t in theirs])]
    kept = [k for k in expected if not k.endswith(_COUNTER) and k not in dict(ours)]
    for index, ((key, tensor), (file_key, file_tensor)) in enumerate(zip(ours, theirs)):
        if _shape(tensor) != _shape(file_tensor):
            raise DecorrError(
                f"weights {source} do not fit {arch} by order: tensor {index} {file_key!r} has shape "
                f"{_shape(file_tensor)} but {arch}'s {key!r} has {_shape(tensor)}; check the architecture and --num-classes"
            )
    if len(ours) != len(theirs):
        index = min(len(ours), len(theirs))
        which = (f"the file's tensor {index} {theirs[index][0]!r} has no counterpart" if len(theirs) > len(ours)
                 else f"{arch}'s tensor {index} {ours[index][0]!r} has no counterpart in the file")
        aside = " and constant buffers" if kept else ""
        raise DecorrError(f"weights {source} hold {len(theirs)} tensors but {arch} has {len(ours)} "
                          f"(num_batches_tracked{aside} aside): {which}; check the architecture")
    mapping = [(file_key, key) for (key, _), (file_key, _) in zip(ours, theirs)]
    if log is not None:
        log(f"{source}: loading {len(mapping)} tensors by order onto {arch}; the first of them:")
        for file_key, key in mapping[:5]:
            log(f"  {file_key} -> {key}")
        if len(mapping) > 5:
            log(f"  ... ({len(mapping) - 5} more; all shapes agree)")
        for key in kept:
            log(f"  (kept from the architecture) -> {key} = {_brief(expected[key])}")
    return {**{key: expected[key] for key in kept}, **{key: state[file_key] for file_key, key in mapping}}


def _brief(tensor: Tensor) -> str:
    values = tensor.flatten()[:4].tolist()
    return "[" + ", ".join(f"{v:.4g}" for v in values) + (", ...]" if tensor.numel() > 4 else "]")
