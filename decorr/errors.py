"""User-facing errors: one line that names the problem and the fix, and a non-zero exit."""

from __future__ import annotations

import argparse
import functools
import sys
from fractions import Fraction
from typing import Callable, TypeVar

T = TypeVar("T")


class DecorrError(Exception):
    """A problem with the user's input (data, checkpoint, settings), not a bug.

    The message is a single line saying what is wrong and how to fix it. Scripts wrapped with
    :func:`cli_entry` print it as ``error: <message>`` and exit with status 2.
    """


def cli_entry(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a script's ``main`` so that a :class:`DecorrError` becomes one line on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except DecorrError as err:
            message = " ".join(str(err).split())
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def pixel_value(text: str) -> float:
    """argparse type for radii and step sizes in pixel units: a float or a fraction such as ``8/255``."""
    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (use e.g. 0.05 or 8/255)") from None


def json_object(text: str) -> dict:
    """argparse type for keyword arguments given as a JSON object, e.g. ``'{"mean": [0], "std": [1]}'``."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r} ({err.msg}); use e.g. '{{\"std\": [1]}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"std\": [1]}}', got {text!r}")
    return value

