"""User-facing errors: one line that names the problem and the fix, and a non-zero exit."""

from __future__ import annotations

import functools
import sys
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
