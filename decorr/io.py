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

__all__ = ["RESULTS_FILE", "default_output_dir", "jsonable", "prepare_output_dir", "staged_output_dir", "write_csv",
           "json_default", "write_json", "write_results_json"]

RESULTS_FILE = "results.json"

def default_output_dir(root: str | os.PathLike = "runs/eval") -> Path:
    """``root/<YYYYmmdd-HHMMSS>``: a fresh folder name per run."""
    return Path(root) / time.strftime("%Y%m%d-%H%M%S")

def prepare_output_dir(out: str | os.PathLike, *, overwrite: bool = False, marker: str = RESULTS_FILE) -> Path:
    """Check that results may be written to ``out``, without creating anything; return it as a Path.

    Refused (DecorrError): a file; a folder holding ``marker`` (earlier results) unless ``overwrite``;
    a non-empty folder without ``marker`` (not ours to replace); a parent that cannot be written.
    Call it before any long computation, so that a refusal costs nothing and damages nothing, then
    write into :func:`staged_output_dir`.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DecorrError(f"--out {out} is a file, not a folder; choose another --out")
    if (out / marker).exists() and not overwrite:
        raise DecorrError(f"{out / marker} already exists; choose another --out or pass --overwrite")
    if out.is_dir() and not (out / marker).exists() and any(out.iterdir()):
        raise DecorrError(f"--out {out} holds other files and no {marker}; choose a new or empty folder")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
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


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temp file + rename) so a kill never leaves half a result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=json_default) + "\n")
    os.replace(tmp, path)
