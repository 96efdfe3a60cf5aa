"""Command-line options generated from config dataclasses: one declaration per field.

A config field is declared once, with its help text and anything argparse needs beyond its type::

    @dataclass
    class PairConfig:
        epochs: int = opt(20, "number of epochs")
        mode: str = opt("dec", "cor, dec or param", choices=MODES)
        augment: bool = opt(True, "the dataset's augmentation")        # -> --no-augment

and a script turns the dataclass into flags and back::

    add_config_arguments(parser, PairConfig, exclude=("model_kwargs",))
    add_run_arguments(parser)          # decorr.training.entry: --run-dir, --resume, --data-root, ...
    config = config_from_args(PairConfig, parser.parse_args(argv))

The flag is ``--field-name``; a bool field that defaults to False is ``--field-name`` (store_true),
one that defaults to True is ``--no-field-name`` (``flag=`` renames either). ``int | None`` and
``float | None`` take a number (default None); ``tuple[T, ...]`` takes one or more values; a dict a
JSON object. The resolved config (every field, defaults filled in) is what the checkpoint records as
``hyperparameters``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from typing import Any, Callable, Iterable, Mapping, TypeVar

import torch

from decorr.errors import DecorrError, json_object

__all__ = ["add_config_arguments", "check_at_least", "check_finite", "check_positive", "check_seed",
           "check_subset", "config_from_args", "config_kwargs", "flag", "opt", "resolve_device", "set_threads"]

C = TypeVar("C")


def opt(default: Any, help: str = "", *, flag: str | None = None, type: Callable[[str], Any] | None = None,
        choices: Iterable[Any] | None = None, metavar: str | None = None, nargs: str | None = None) -> Any:
    """A dataclass field with its command-line option: help text and (optionally) the flag name,
    argparse ``type``, ``choices``, ``metavar`` and ``nargs``. Mutable defaults are copied per instance."""
    metadata = {"help": help, "flag": flag, "type": type, "choices": tuple(choices) if choices else None,
                "metavar": metavar, "nargs": nargs}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type_copy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def type_copy(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else list(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _flag(f: dataclasses.Field, default: Any, is_bool: bool) -> str:
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if is_bool and default else f"--{name}"


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, exclude: Iterable[str] = (),
                         defaults: Mapping[str, Any] | None = None, helps: Mapping[str, str] | None = None) -> None:
    """Add one option per field of the dataclass ``cls`` (but ``exclude``); ``defaults`` override the
    fields' defaults (e.g. a family's paper setting) and ``helps`` their help texts. Each option's
    ``dest`` is the field name."""
    hints = typing.get_type_hints(cls)
    skipped = set(exclude)
    for f in dataclasses.fields(cls):
        if f.name in skipped:
            continue
        default = defaults[f.name] if defaults and f.name in defaults else _default(f)
        hint = hints[f.name]
        meta = f.metadata
        is_bool = hint is bool
        kwargs: dict[str, Any] = {"dest": f.name, "help": (helps or {}).get(f.name) or meta.get("help") or None}
        if is_bool:
            kwargs["action"] = "store_false" if default else "store_true"
            kwargs["default"] = default
        else:
            base, many = _base_type(hint)
            kwargs["default"] = list(default) if many and default is not None else default
            kwargs["type"] = meta.get("type") or (json_object if base is dict else base)
            if many or meta.get("nargs"):
                kwargs["nargs"] = meta.get("nargs") or "+"
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if meta.get("metavar") or base is dict:
                kwargs["metavar"] = meta.get("metavar") or "JSON"
        parser.add_argument(_flag(f, default, is_bool), **kwargs)


def _base_type(hint: Any) -> tuple[Any, bool]:
    """The argparse type of an annotation and whether it takes several values."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _base_type(inner[0])
    if origin in (tuple, list):
        return (args[0] if args else str), True
    if origin is dict or hint is dict:
        return dict, False
    return hint, False


def config_kwargs(cls: type, args: argparse.Namespace, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The fields of ``cls`` found in ``args`` (lists become tuples where the field is a tuple)."""
    hints = typing.get_type_hints(cls)
    skipped = set(exclude)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skipped or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if isinstance(value, list) and typing.get_origin(hints[f.name]) is tuple:
            value = tuple(value)
        values[f.name] = value
    return values


def config_from_args(cls: type[C], args: argparse.Namespace, **overrides: Any) -> C:
    """``cls(**fields from args, **overrides)``: validation stays in the config's ``__post_init__``."""
    return cls(**{**config_kwargs(cls, args), **overrides})


def env_int(name: str, default: int) -> int:
    """An integer default from the environment (e.g. accelerate's ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS``)."""
    return int(os.environ.get(name, default))


# ------------------------------------------------------------------------------------------------
# Checks of settings, shared by the config dataclasses: each failure is a one-line DecorrError naming the
# command-line flag (``lambda_corr`` -> ``--lambda-corr``), since that is what the user typed; the Python API
# raises the same errors.


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


# ------------------------------------------------------------------------------------------------
# Settings files: --config FILE (YAML or JSON) with the flags' names; flags given win


def add_config_file_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML or JSON file of settings by flag name (e.g. eps: [8/255], attack: [pgd, mifgsm]); "
                             "flags given on the command line override it")


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with ``--config FILE``: the file's settings become the defaults (checked
    and converted like flags), the command line overrides them. An unknown setting is a one-line error."""
    if not any(a.dest == "config" for a in parser._actions):
        add_config_file_argument(parser)
    first, _ = parser.parse_known_args(argv)
    if first.config:
        apply_settings(parser, read_settings_file(first.config), source=first.config)
    return parser.parse_args(argv)


def read_settings_file(path: str | os.PathLike) -> dict[str, Any]:
    """A mapping of settings from a YAML (``.yaml``/``.yml``) or JSON file; anything else is a one-line error."""
    import json

    text_path = os.fspath(path)
    try:
        with open(text_path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        raise DecorrError(f"cannot read the settings file {text_path} ({err.strerror}); give an existing YAML or "
                          "JSON file") from None
    try:
        if text_path.lower().endswith(".json"):
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - yaml's and json's parse errors: the file is not readable
        detail = " ".join(str(err).split())[:160]
        raise DecorrError(f"{text_path} is not valid YAML/JSON ({detail}); fix the file") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise DecorrError(f"{text_path} holds a {type(values).__name__}, not a mapping of settings; write one "
                          "`name: value` per line")
    return values


def apply_settings(parser: argparse.ArgumentParser, values: Mapping[str, Any], *, source: str) -> None:
    """Make ``values`` (by flag name, with or without dashes, or by destination) the parser's defaults."""
    actions = {}
    for action in parser._actions:
        if action.dest in ("help", "config"):
            continue
        actions[action.dest] = action
        for option in action.option_strings:
            actions.setdefault(option.lstrip("-").replace("-", "_"), action)
    defaults: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).lstrip("-").replace("-", "_")
        action = actions.get(name)
        if action is None:
            import difflib

            close = difflib.get_close_matches(name, list(actions), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise DecorrError(f"{source}: unknown setting {key!r}{hint}; use the names of this script's flags "
                              "(see --help)")
        defaults[action.dest] = _setting_value(action, value, key, source)
    parser.set_defaults(**defaults)


def _setting_value(action: argparse.Action, value: Any, key: str, source: str) -> Any:
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise DecorrError(f"{source}: {key} is a switch; give true or false, not {value!r}")
        # a --no-x switch stores False when given: true in the file means "given"
        return (not value) if getattr(action, "const", None) is False else value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction)
    items = value if isinstance(value, list) else [value]
    if not many and isinstance(value, list):
        raise DecorrError(f"{source}: {key} takes one value, not a list")
    converted = []
    for item in items:
        if action.type is not None and isinstance(item, str):
            try:
                item = action.type(item)
            except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
                raise DecorrError(f"{source}: bad value {item!r} for {key} ({err})") from None
        elif action.type in (int, float) and not isinstance(item, (int, float)) or isinstance(item, bool) \
                and action.type in (int, float):
            raise DecorrError(f"{source}: {key} must be a number, got {item!r}")
        if action.choices is not None and item not in action.choices:
            raise DecorrError(f"{source}: {key} must be one of {', '.join(map(str, action.choices))}, got {item!r}")
        converted.append(item)
    return converted if many else converted[0]
