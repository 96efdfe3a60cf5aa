"""Checks of settings, shared by the config dataclasses: each failure is a one-line DecorrError.

Messages name the command-line flag (``lambda_corr`` -> ``--lambda-corr``), since that is what the
user typed; the Python API raises the same errors.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from decorr.errors import DecorrError

__all__ = [
    "check_at_least",
    "check_finite",
    "check_positive",
    "check_seed",
    "check_subset",
    "flag",
    "resolve_device",
    "set_threads",
]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_finite(name: str, value: Any, *, minimum: float | None = None) -> None:
    """``value`` is a finite number (and at least ``minimum``)."""
    if not (_is_number(value) and math.isfinite(value)):
        raise DecorrError(f"{flag(name)} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise DecorrError(f"{flag(name)} must be >= {minimum:g}, got {value!r}")


def check_positive(name: str, value: Any) -> None:
    """``value`` is a finite number > 0 (learning rates, step sizes)."""
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        raise DecorrError(f"{flag(name)} must be positive and finite, got {value!r}")


def check_at_least(name: str, value: Any, minimum: int = 1) -> None:
    """``value`` is an integer >= ``minimum`` (epochs, batch sizes, steps)."""
    if not (isinstance(value, int) and not isinstance(value, bool)):
        raise DecorrError(f"{flag(name)} must be an integer, got {value!r}")
    if value < minimum:
        raise DecorrError(f"{flag(name)} must be at least {minimum}, got {value!r}")


def check_subset(name: str, value: Any) -> None:
    """An optional subset size: None (everything) or an integer >= 1 (0 would silently mean 'all')."""
    if value is not None:
        check_at_least(name, value, 1)


def check_seed(value: Any, name: str = "seed") -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32):
        raise DecorrError(f"{flag(name)} must be an integer in [0, 2**32), got {value!r}")


def resolve_device(name: str | None) -> torch.device:
    """``--device``: cpu, cuda, cuda:N, mps, or None for cuda when available; one that is absent is an error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DecorrError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DecorrError(f"--device {name} asked for but no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DecorrError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s); "
                              f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DecorrError(f"--device {name} asked for but MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DecorrError(f"--device {name} is not supported; use cpu or cuda")
    return device


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's intra-op CPU threads (None leaves torch's default)."""
    if threads is None:
        return
    check_at_least("threads", threads, 1)
    torch.set_num_threads(threads)
