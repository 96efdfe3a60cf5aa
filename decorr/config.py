"""Command-line options generated from config dataclasses: one declaration per field.

A config field is declared once, with its help text and anything argparse needs beyond its type::

    @dataclass
    class PairConfig:
        epochs: int = opt(20, "number of epochs")
        mode: str = opt("dec", "cor, dec or param", choices=MODES)
        augment: bool = opt(True, "the dataset's augmentation")        # -> --no-augment

and a script turns the dataclass into flags and back::

    add_config_arguments(parser, PairConfig, exclude=("model_kwargs",))
    add_run_arguments(parser)          # --data-root, --run-dir, --resume, --mixed-precision, --cpu, ...
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
import os
import typing
from typing import Any, Callable, Iterable, Mapping, TypeVar

from decorr.errors import json_object
from decorr.validation import set_threads

__all__ = ["add_config_arguments", "add_run_arguments", "config_from_args", "config_kwargs", "opt"]

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
                         defaults: Mapping[str, Any] | None = None) -> None:
    """Add one option per field of the dataclass ``cls`` (but ``exclude``); ``defaults`` override the
    fields' defaults (e.g. a family's paper setting). Each option's ``dest`` is the field name."""
    hints = typing.get_type_hints(cls)
    skipped = set(exclude)
    for f in dataclasses.fields(cls):
        if f.name in skipped:
            continue
        default = defaults[f.name] if defaults and f.name in defaults else _default(f)
        hint = hints[f.name]
        meta = f.metadata
        is_bool = hint is bool
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta.get("help") or None}
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


def add_run_arguments(parser: argparse.ArgumentParser, *, run_dir_help: str | None = None,
                      resume_help: str | None = None) -> None:
    """The options every training script shares: data and run directory, resume, precision, device, logging."""
    parser.add_argument("--data-root", default=None,
                        help="folder holding the dataset files (else $DECORR_DATA_ROOT, ./data)")
    parser.add_argument("--run-dir", default=None, help=run_dir_help or
                        "where checkpoints and TensorBoard logs go (default: a new runs/<name>/<timestamp>)")
    parser.add_argument("--resume", action="store_true",
                        help=resume_help or "continue the run in --run-dir from its last checkpoint")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
                        help="autocast the models (default: accelerate launch's --mixed_precision, else no)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--no-tensorboard", action="store_true", help="write no TensorBoard logs")
    parser.add_argument("--deterministic", action=_Deterministic, nargs=0,
                        help="torch.use_deterministic_algorithms and no cuDNN autotuning (slower; see docs/design.md)")
    parser.add_argument("--threads", type=int, default=None, action=_Threads,
                        help="torch CPU threads (e.g. 1 on a shared machine)")


class _Threads(argparse.Action):
    """``--threads N`` sets torch's intra-op CPU threads when parsed (validated there: a positive integer)."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        set_threads(values)
        setattr(namespace, self.dest, values)


class _Deterministic(argparse.Action):
    """``--deterministic`` sets ``$DECORR_DETERMINISTIC``, which every TrainingRun of the process reads."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        os.environ["DECORR_DETERMINISTIC"] = "1"
        setattr(namespace, self.dest, True)


def env_int(name: str, default: int) -> int:
    """An integer default from the environment (e.g. accelerate's ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS``)."""
    return int(os.environ.get(name, default))
