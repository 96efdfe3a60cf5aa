"""Writing results without losing any: atomic files, output folders replaced only on success, strict JSON.

Every evaluation writes into :func:`staged_output_dir`, which replaces ``--out`` only when everything
succeeded; single files (:func:`write_json`, :func:`write_csv`) are written to a temporary file and renamed,
so a kill never leaves half a result.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from decorr.errors import DecorrError

__all__ = ["RESULTS_FILE", "blocking_file", "check_output_file", "check_paths_apart", "default_output_dir", "jsonable",
           "prepare_output_dir", "results_file", "staged_output_dir", "strict_json", "write_csv", "json_default", "write_json",
           "write_results_json", "write_text"]

RESULTS_FILE = "results.json"

def default_output_dir(root: str | os.PathLike = "runs/eval") -> Path:
    """``root/<YYYYmmdd-HHMMSS>``: a fresh folder name per run."""
    return Path(root) / time.strftime("%Y%m%d-%H%M%S")

def results_file(path: str | os.PathLike) -> Path:
    """The ``results.json`` that ``path`` names: the file itself, or the one in the folder ``path``."""
    path = Path(path)
    return path / RESULTS_FILE if path.is_dir() else path


def _absolute(path: str | os.PathLike) -> Path:
    # Symbolic links resolved, so that two spellings of one file compare equal.
    return Path(os.path.expanduser(os.fspath(path))).resolve()


def blocking_file(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is not a folder (nothing can be written below it)."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _writable_parent(path: Path) -> Path:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def check_paths_apart(outputs: Mapping[str, str | os.PathLike | None],
                      inputs: Mapping[str, str | os.PathLike | None] | None = None) -> None:
    """Refuse outputs of one command that would overwrite one of its inputs or one another (DecorrError).

    ``outputs`` maps each output's flag (``--out``) to its path, ``inputs`` a name for each input (what the
    user typed) to the path actually read. Refused: an output that is an input; an output folder that
    holds an input (replacing the folder would delete it); two outputs at one path or one inside the
    other (writing one would replace the other's files). An output inside an input folder is allowed: it
    replaces nothing there. Paths are compared resolved (symbolic links and ``..`` followed).
    """
    outs = [(flag, _absolute(path)) for flag, path in outputs.items() if path is not None]
    ins = [(name, _absolute(path)) for name, path in (inputs or {}).items() if path is not None]
    for i, (flag, out) in enumerate(outs):
        for other, path in outs[i + 1:]:
            if out == path:
                raise DecorrError(f"{flag} and {other} are both {path}; give each output its own path")
            inner, outer = ((other, flag) if out in path.parents else (flag, other) if path in out.parents
                            else (None, None))
            if inner is not None:
                raise DecorrError(f"{inner} {outputs[inner]} lies inside {outer} {outputs[outer]}, which this command "
                                  f"replaces whole; choose {inner} outside {outer}")
        for name, path in ins:
            if out == path:
                raise DecorrError(f"{flag} {outputs[flag]} is the input {name} of this command; writing it would "
                                  f"destroy the input; choose another {flag}")
            if out in path.parents:
                raise DecorrError(f"{flag} {outputs[flag]} holds the input {name}, which writing {flag} would replace; "
                                  f"choose {flag} outside it")


def check_output_file(path: str | os.PathLike, *, flag: str = "--out", overwrite: bool = False) -> Path:
    """Check that the file ``path`` may be written, without creating anything; return it as a Path.

    Refused (DecorrError): a path below a file; a folder; an existing file unless ``overwrite`` (as
    ``eval/transfer.py`` refuses an existing ``--out``); a location that cannot be written.
    """
    path = Path(path)
    blocker = blocking_file(path)
    if blocker is not None:
        raise DecorrError(f"{flag} {path} lies below {blocker}, which is a file, not a folder; choose another {flag}")
    if path.is_dir():
        raise DecorrError(f"{flag} {path} is a folder; give the path of a file to write")
    if path.exists() and not overwrite:
        raise DecorrError(f"{path} already exists; choose another {flag} or pass --overwrite to replace it")
    parent = _writable_parent(path)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DecorrError(f"cannot write to {parent}; choose a writable {flag}")
    return path


def prepare_output_dir(out: str | os.PathLike, *, overwrite: bool = False, marker: str = RESULTS_FILE) -> Path:
    """Check that results may be written to ``out``, without creating anything; return it as a Path.

    Refused (DecorrError): a file; a folder holding ``marker`` (earlier results) unless ``overwrite``;
    a non-empty folder without ``marker`` (not ours to replace); a parent that cannot be written.
    Call it before any long computation, so that a refusal costs nothing and damages nothing, then
    write into :func:`staged_output_dir`.
    """
    out = Path(out)
    blocker = blocking_file(out)
    if blocker is not None:
        raise DecorrError(f"--out {out} lies below {blocker}, which is a file, not a folder; choose another --out")
    if out.exists() and not out.is_dir():
        raise DecorrError(f"--out {out} is a file, not a folder; choose another --out")
    if (out / marker).exists() and not overwrite:
        raise DecorrError(f"{out / marker} already exists; choose another --out or pass --overwrite")
    if out.is_dir() and not (out / marker).exists() and any(out.iterdir()):
        raise DecorrError(f"--out {out} holds other files and no {marker}; choose a new or empty folder")
    parent = _writable_parent(out)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DecorrError(f"cannot write to {parent}; choose a writable --out")
    return out

@contextlib.contextmanager
def staged_output_dir(out: str | os.PathLike, *, overwrite: bool = False,
                      marker: str = RESULTS_FILE) -> Iterator[Path]:
    """Write an evaluation's outputs into a fresh staging folder that replaces ``out`` only on success.

    A failure leaves ``out`` as it was (no empty folder, no half of the files); a success replaces
    an earlier ``out`` whole, so no plot of an earlier run is left beside the new results.
    """
    out = prepare_output_dir(out, overwrite=overwrite, marker=marker)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = out.with_name(f".{out.name}.previous-{os.getpid()}")
    if out.exists():
        os.replace(out, previous)
    os.replace(staging, out)
    shutil.rmtree(previous, ignore_errors=True)

def jsonable(value: Any) -> Any:
    """``value`` with NaN/inf floats as None and tuples as lists, recursively (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value

def strict_json(value: Any, indent: int | None = 2) -> str:
    """``value`` as strict JSON text (NaN/inf as null, tensors as numbers), e.g. a script's final printout."""
    return json.dumps(jsonable(value), indent=indent, default=json_default, allow_nan=False)


def write_results_json(path: str | os.PathLike, data: Any) -> Path:
    """Write strict JSON (no NaN) atomically."""
    path = Path(path)
    write_json(path, jsonable(data))
    return path

def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV atomically; None and NaN become empty cells, floats keep full precision."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in row])
    os.replace(tmp, path)
    return path


def json_default(value: Any) -> Any:
    """A tensor as a number or list; NaN/inf as None (``json.dumps``'s ``default`` hook)."""
    if torch.is_tensor(value):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temp file + rename) so a kill never leaves half a result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=json_default) + "\n")
    os.replace(tmp, path)
