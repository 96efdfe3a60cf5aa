"""User-facing errors: one line that names the problem and the fix, and a non-zero exit."""

from __future__ import annotations

import argparse
import functools
import math
import re
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class DecorrError(Exception):
    """A problem with the user's input (data, checkpoint, settings), not a bug.

    The message is a single line saying what is wrong and how to fix it. Scripts wrapped with
    :func:`cli_entry` print it as ``error: <message>`` and exit with status 2.
    """


#: Exit status when the reader of the output went away (``script | head``): a shell's status of a command
#: killed by SIGPIPE (128 + 13), as ``cat`` and ``yes`` give in the same place. The work itself is done by then
#: (results are written before they are printed), but the printed output was cut, so it is not 0.
BROKEN_PIPE_EXIT = 141


def cli_entry(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a script's ``main`` so that a :class:`DecorrError` becomes one line on stderr and exit 2.

    Output piped into a reader that stops early (``| head``) ends the script quietly with
    :data:`BROKEN_PIPE_EXIT`, without a traceback; a broken pipe that is not the script's own output is a
    bug and keeps its traceback.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            result = main(*args, **kwargs)
            _flush_stdout()  # a reader gone away shows here, not at the interpreter's exit
            return result
        except DecorrError as err:
            message = " ".join(str(err).split())
            try:
                print(f"error: {message}", file=sys.stderr)
            except BrokenPipeError:
                _silence_broken_output()
            raise SystemExit(2) from None
        except BrokenPipeError:
            if not _output_closed():
                raise
            _silence_broken_output()
            raise SystemExit(BROKEN_PIPE_EXIT) from None

    return wrapper


def _flush_stdout() -> None:
    if sys.stdout is not None:
        sys.stdout.flush()


def _output_closed() -> bool:
    """Whether stdout or stderr is a pipe whose reader has gone (poll reports an error on it)."""
    import select

    for stream in (sys.stdout, sys.stderr):
        try:
            poller = select.poll()
            poller.register(stream.fileno(), select.POLLOUT)
            if any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0)):
                return True
        except (AttributeError, OSError, ValueError):  # no real file descriptor (e.g. captured by a test)
            continue
    return False


def _silence_broken_output() -> None:
    """Point stdout and stderr at /dev/null so that Python's flush at exit does not report the pipe again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (AttributeError, OSError, ValueError):
            pass
    os.close(devnull)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def short_reason(text: object, limit: int = 160) -> str:
    """A library's error text for one line: terminal escape codes removed, whitespace collapsed, and cut at
    a word boundary (with "...") when longer than ``limit``; "no message" when there is none."""
    words = " ".join(_ANSI.sub("", str(text)).split())
    if not words:
        return "no message"
    if len(words) <= limit:
        return words
    cut = words[: limit - 3].rsplit(" ", 1)[0] if " " in words[: limit - 3] else words[: limit - 3]
    return cut.rstrip(",;:") + "..."


def pixel_value(text: str) -> float:
    """argparse type for radii and step sizes in pixel units: a number or a fraction of numbers such as
    ``8/255`` or ``1.6/255``; a zero denominator and non-finite values are refused."""
    numerator, slash, denominator = text.partition("/")
    try:
        value = float(numerator)
        if slash:
            divisor = float(denominator)
            if divisor == 0:
                raise argparse.ArgumentTypeError(f"{text!r} divides by zero (use e.g. 0.05 or 8/255)")
            value /= divisor
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (use e.g. 0.05, 8/255 or 1.6/255)") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number (use e.g. 0.05 or 8/255)")
    return value


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

