"""The attacks by name: the one place that maps names to attacks, parses combinations, and makes flags.

A combination is written ``NAME[(KEY=VALUE,...)][+NAME[(KEY=VALUE,...)]...]``, one token a shell leaves
alone: ``mifgsm+dim+tim``, ``pgd(steps=100)+cw(kappa=0.1)``, ``sgm(gamma=0.5)``. Each name is a registered
component (:func:`register_attack`); a combination without an optimizer gets the base optimizer of its
components (MI-FGSM, TransferAttack's protocol), so ``dim`` is ``mifgsm+dim`` as in TransferAttack.

Every field of every component is also a command-line flag (:func:`add_attack_arguments`): the field's
``flag=`` if it has one (fields that mean the same in several attacks share it: ``--steps``,
``--step-size``, ``--decay``), else ``--NAME-FIELD`` (``--dim-prob``). A flag sets that field in every
attack of the run that has it, unless the attack's own ``(KEY=VALUE)`` sets it; a flag that no attack
of the run has is an error, so an old command never silently loses a setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Any, Callable, Iterable, Mapping, TypeVar

from decorr.attacks.base import KINDS, Attack, AttackComponent
from decorr.errors import DecorrError, pixel_value

__all__ = ["ATTACKS", "add_attack_arguments", "attack_class", "attack_flags", "attack_overrides", "list_attacks",
           "parse_attack", "parse_attacks", "register_attack"]

C = TypeVar("C", bound=type)

#: Component name -> class (filled by :func:`register_attack`; ``decorr.attacks`` imports every family).
ATTACKS: dict[str, type[AttackComponent]] = {}

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_PART = re.compile(r"^(?P<name>[A-Za-z][\w-]*)(?:\((?P<args>[^()]*)\))?$")


def register_attack(name: str) -> Callable[[C], C]:
    """Class decorator: register a component (a frozen dataclass subclassing one of the kinds of
    :mod:`decorr.attacks.base`) as ``name``."""

    def register(cls: C) -> C:
        if not _NAME.fullmatch(name):
            raise ValueError(f"attack names are lower-case identifiers, got {name!r}")
        if getattr(cls, "kind", "") not in KINDS:
            raise ValueError(f"{cls.__name__} is no attack component (kind {getattr(cls, 'kind', None)!r})")
        if name in ATTACKS and ATTACKS[name] is not cls:
            raise ValueError(f"attack {name!r} is already registered ({ATTACKS[name].__name__})")
        if not dataclasses.is_dataclass(cls):
            raise ValueError(f"{cls.__name__} must be a dataclass of its settings")
        cls.name = name  # type: ignore[attr-defined]
        ATTACKS[name] = cls  # type: ignore[assignment]
        return cls

    return register


def list_attacks(kind: str | None = None) -> list[str]:
    _load()
    return sorted(n for n, c in ATTACKS.items() if kind is None or c.kind == kind)


def attack_class(name: str) -> type[AttackComponent]:
    _load()
    if name not in ATTACKS:
        raise DecorrError(f"unknown attack {name!r}; choose from {', '.join(list_attacks())} (combine with +)")
    return ATTACKS[name]


def _load() -> None:
    import decorr.attacks  # noqa: F401  (importing the package registers every family)


# ------------------------------------------------------------------------------------------------
# Parsing combinations


def parse_attack(text: str, overrides: Mapping[str, Any] | None = None) -> Attack:
    """The :class:`Attack` written as ``text`` (module docstring); ``overrides`` are flag values by flag
    (``{"--steps": 10}``), applied to every component with that flag unless ``text`` sets the field."""
    text = str(text).strip()
    if not text:
        raise DecorrError("empty attack name; e.g. --attack pgd or --attack mifgsm+dim")
    overrides = dict(overrides or {})
    parsed: list[tuple[type[AttackComponent], dict[str, str]]] = []
    for part in text.split("+"):
        match = _PART.match(part.strip())
        if not match:
            raise DecorrError(f"cannot read {part!r} in attack {text!r}; write NAME or NAME(KEY=VALUE,...) joined "
                              "by +, e.g. mifgsm(decay=0.5)+dim")
        cls = attack_class(match.group("name").lower())
        parsed.append((cls, _split_args(match.group("args"), text)))
    by_kind: dict[str, list[AttackComponent]] = {kind: [] for kind in KINDS}
    seen: set[str] = set()
    for cls, args in parsed:
        if cls.name in seen:
            raise DecorrError(f"attack {text!r} names {cls.name} twice; name each component once")
        seen.add(cls.name)
        by_kind[cls.kind].append(build_component(cls, args, overrides, text))
    for kind in ("optimizer", "objective", "ensemble"):
        if len(by_kind[kind]) > 1:
            names = " and ".join(c.name for c in by_kind[kind])
            raise DecorrError(f"attack {text!r} combines {names}, two components of kind {kind}; keep one "
                              f"({', '.join(list_attacks(kind))})")
    if not by_kind["optimizer"]:
        bases = {c.base for comps in by_kind.values() for c in comps}
        base = sorted(bases)[0] if len(bases) == 1 else "mifgsm"
        by_kind["optimizer"].append(build_component(attack_class(base), {}, overrides, text))
    return Attack(
        optimizer=by_kind["optimizer"][0],  # type: ignore[arg-type]
        inputs=tuple(by_kind["input"]),  # type: ignore[arg-type]
        gradient_transforms=tuple(by_kind["gradient"]),  # type: ignore[arg-type]
        modifiers=tuple(by_kind["model"]),  # type: ignore[arg-type]
        objective=by_kind["objective"][0] if by_kind["objective"] else None,  # type: ignore[arg-type]
        ensemble=by_kind["ensemble"][0] if by_kind["ensemble"] else None,  # type: ignore[arg-type]
        text=text,
    )


def parse_attacks(texts: Iterable[str], overrides: Mapping[str, Any] | None = None) -> list[Attack]:
    """Several attacks of one run; every flag in ``overrides`` must be used by at least one of them, and
    no two may resolve to the same combination and settings."""
    attacks = [parse_attack(t, overrides) for t in texts]
    if not attacks:
        raise DecorrError("no attack given; e.g. --attack pgd, or several: --attack mifgsm dim bsr")
    for flag in overrides or {}:
        if not any(flag in _component_flags(type(c)) for a in attacks for c in a.components):
            users = sorted(n for n, cls in ATTACKS.items() if flag in _component_flags(cls))
            kind = ATTACKS[users[0]].kind
            fix = (f"--attack {users[0]}" if kind == "optimizer" else
                   f"--attack {users[0]} or {attacks[0].optimizer.name}+{users[0]}")
            raise DecorrError(f"{flag} sets {', '.join(users)}, but no attack of this run uses "
                              f"{'it' if len(users) == 1 else 'them'} (attacks: {', '.join(a.name for a in attacks)}); "
                              f"drop {flag} or use an attack with {users[0]} (e.g. {fix})")
    described = [a.describe()["components"] for a in attacks]
    for i, a in enumerate(attacks):
        for j in range(i):
            if described[i] == described[j]:
                raise DecorrError(f"attacks {attacks[j].text!r} and {a.text!r} are the same ({a.name}); list it once")
    return attacks


def _split_args(args: str | None, text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    if not args or not args.strip():
        return values
    for item in args.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise DecorrError(f"cannot read {item!r} in attack {text!r}; write KEY=VALUE, e.g. dim(prob=0.7)")
        values[key.replace("-", "_")] = value.strip()
    return values


def build_component(cls: type[AttackComponent], args: Mapping[str, str], overrides: Mapping[str, Any],
                    text: str) -> AttackComponent:
    """``cls`` with the fields of ``args`` (strings, from the written combination) and ``overrides``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, raw in args.items():
        if key not in fields:
            raise DecorrError(f"attack {cls.name} has no setting {key!r} (in {text!r}); its settings: "
                              f"{', '.join(fields) or 'none'}")
        values[key] = _convert(raw, hints[key], f"{cls.name}({key}=...)")
    for name, f in fields.items():
        flag = field_flag(cls, f)
        if name not in values and flag in overrides and overrides[flag] is not None:
            values[name] = overrides[flag]
    try:
        return cls(**values)
    except TypeError as err:
        raise DecorrError(f"attack {cls.name}: {err}") from None


def _convert(raw: str, hint: Any, where: str) -> Any:
    base, optional = _base_type(hint)
    if optional and raw.lower() in ("none", "null", "default"):
        return None
    try:
        if base is bool:
            return {"1": True, "true": True, "yes": True, "on": True,
                    "0": False, "false": False, "no": False, "off": False}[raw.lower()]
        if base is int:
            return int(raw)
        if base is float:
            return pixel_value(raw)
    except (KeyError, ValueError, argparse.ArgumentTypeError):
        raise DecorrError(f"bad value {raw!r} for {where}; expected {getattr(base, '__name__', base)}") from None
    return raw


def _base_type(hint: Any) -> tuple[Any, bool]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return inner[0], len(inner) < len(args)
    return hint, False


# ------------------------------------------------------------------------------------------------
# Flags


def field_flag(cls: type, f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or f"--{cls.name}-{f.name}".replace("_", "-")


def _component_flags(cls: type) -> set[str]:
    return {field_flag(cls, f) for f in dataclasses.fields(cls)}


def attack_flags() -> dict[str, dict[str, Any]]:
    """Every attack flag: ``{flag: {"type", "help", "users", "is_bool"}}``, in registration order."""
    _load()
    flags: dict[str, dict[str, Any]] = {}
    for name, cls in ATTACKS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = field_flag(cls, f)
            base, _ = _base_type(hints[f.name])
            entry = flags.setdefault(flag, {"type": base, "help": f.metadata.get("help", ""), "users": [],
                                            "defaults": {}})
            if entry["type"] is not base:
                raise ValueError(f"flag {flag} has type {entry['type']} in one attack and {base} in {name}")
            entry["users"].append(name)
            entry["defaults"][name] = f.default if f.default is not dataclasses.MISSING else None
    return flags


def _dest(flag: str) -> str:
    return "attack__" + flag.lstrip("-").replace("-", "_")


def add_attack_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per attack flag (default: not given, so each attack keeps its paper's default)."""
    group = parser.add_argument_group(
        "attack settings (each sets the field in every attack of the run that has it; NAME(KEY=VALUE) in "
        "--attack sets one attack's; defaults are each attack's paper's)")
    for flag, entry in attack_flags().items():
        users = entry["users"]
        defaults = ", ".join(f"{u} {_default_text(entry['defaults'][u], flag)}" for u in users[:4])
        more = f", ... ({len(users)} attacks)" if len(users) > 4 else ""
        text = f"{entry['help']} [{defaults}{more}]".replace("%", "%%")
        if entry["type"] is bool:
            group.add_argument(flag, dest=_dest(flag), action="store_const", const=True, default=None, help=text)
            negative = "--no-" + flag[2:]
            group.add_argument(negative, dest=_dest(flag), action="store_const", const=False,
                               help=argparse.SUPPRESS)
        else:
            kind = pixel_value if entry["type"] is float else entry["type"]
            group.add_argument(flag, dest=_dest(flag), type=kind, default=None, metavar="X", help=text)


def _default_text(value: Any, flag: str = "") -> str:
    if isinstance(value, float):
        levels = value * 255
        if abs(levels - round(levels)) < 1e-9 and value < 1 and value > 0:
            return f"{round(levels)}/255"
        return f"{value:g}"
    if value is None:
        return "eps/steps" if flag == "--step-size" else "auto"
    return str(value)


def attack_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The attack flags given on the command line: ``{flag: value}``."""
    return {flag: getattr(args, _dest(flag)) for flag in attack_flags()
            if getattr(args, _dest(flag), None) is not None}
