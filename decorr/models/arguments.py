"""Architecture arguments in a model spec: ``ARCH(KEY=VALUE,...)=WEIGHTS``, one token a shell keeps whole when
quoted (``"mnist_cnn(mean=0,std=1)=paper_cnn"``).

A value is a number (``0``, ``0.5``, ``1e-3``), several numbers joined by ``/`` (``0.485/0.456/0.406``, a
tuple), ``true``/``false``, ``none``, or else a string. ``mean`` and ``std`` are always tuples (one value per
channel). The arguments go to the architecture's builder (the registry's, ``torchvision.models.get_model``
or ``timm.create_model``); one it does not take is a one-line error naming the ones it does.
"""

from __future__ import annotations

import re
from typing import Any

from decorr.errors import DecorrError

__all__ = ["ARCH_HEAD", "format_arguments", "parse_arguments"]

#: ``ARCH`` or ``ARCH(ARGS)`` before the ``=`` of a spec.
ARCH_HEAD = re.compile(r"(?P<arch>[A-Za-z_][\w.\-]*)(?:\((?P<args>[^()]*)\))?")
_TUPLE_KEYS = ("mean", "std")


def parse_arguments(text: str, spec: str) -> dict[str, Any]:
    """``KEY=VALUE,...`` (the inside of the parentheses) as keyword arguments."""
    arguments: dict[str, Any] = {}
    if not text.strip():
        return arguments
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key) or not value:
            raise DecorrError(f"bad architecture argument {item!r} in spec {spec!r}; write ARCH(KEY=VALUE,...)=WEIGHTS, "
                              "e.g. mnist_cnn(mean=0,std=1)=FILE")
        if key in arguments:
            raise DecorrError(f"architecture argument {key} is given twice in spec {spec!r}; give it once")
        parsed = _value(value)
        if key in _TUPLE_KEYS and not isinstance(parsed, tuple):
            if isinstance(parsed, bool) or not isinstance(parsed, (int, float)):
                raise DecorrError(f"architecture argument {key}={value} in spec {spec!r} must be numbers joined by /")
            parsed = (float(parsed),)
        if key in _TUPLE_KEYS:
            parsed = tuple(float(v) for v in parsed)
        arguments[key] = parsed
    return arguments


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    if "/" in text:
        try:
            return tuple(_number(v) for v in text.split("/"))
        except ValueError:
            return text
    try:
        return _number(text)
    except ValueError:
        return text


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def format_arguments(arguments: dict[str, Any]) -> str:
    """The ``(KEY=VALUE,...)`` text of ``arguments`` (empty without any)."""
    if not arguments:
        return ""
    def text(value: Any) -> str:
        if isinstance(value, (tuple, list)):
            return "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        return str(value).lower() if isinstance(value, bool) or value is None else str(value)
    return "(" + ",".join(f"{k}={text(v)}" for k, v in arguments.items()) + ")"
