"""The settings of a transfer evaluation: :class:`TransferOptions` (every field a flag of ``eval/transfer.py``),
the default radii by image shape, the targets of a targeted run, and the :class:`Reporter` an evaluation talks
through. No evaluation code here: :mod:`decorr.evaluation.transfer` runs what these describe."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from decorr.attacks import Attack, parse_attacks
from decorr.config import check_at_least, check_seed, opt
from decorr.errors import DecorrError, pixel_value

__all__ = ["DEFAULT_EPS", "FORMAT", "L2_SCALES", "Data", "Reporter", "TransferOptions", "default_eps",
           "default_eps_text", "target_labels"]

FORMAT = "decorr-transfer/2"
L2_SCALES = ("sqrt-side", "sqrt-dim", "none")
#: SPEC section 3/5: the MNIST epsilons of P1's transfer experiments (one-channel 28x28 data).
DEFAULT_EPS = (0.05, 0.10, 0.15)

Data = Any  # an ImageSplit, a streamed split or (x, y)


def default_eps(input_shape: Sequence[int]) -> tuple[float, ...]:
    """The radii used without ``--eps``, by the images' shape (C, H, W) (:func:`default_eps_text` says why)."""
    return _default_eps(input_shape)[0]


def default_eps_text(input_shape: Sequence[int]) -> str:
    return _default_eps(input_shape)[1]


def _default_eps(shape: Sequence[int]) -> tuple[tuple[float, ...], str]:
    # MNIST's radii (SPEC section 3) suit 1-channel images only: on colour images the usual Linf budgets are a
    # few 255ths (SPEC section 6 for CIFAR-10: 2, 4, 8 / 255; the ImageNet transfer literature, e.g. SGM and
    # TransferAttack, goes up to 16/255).
    channels, height, width = (tuple(shape) + (0, 0, 0))[:3]
    if channels == 1:
        return DEFAULT_EPS, "1-channel images (MNIST-like, SPEC): 0.05 0.1 0.15"
    if min(height, width) <= 64:
        return (2 / 255, 4 / 255, 8 / 255), "colour images up to 64 px (CIFAR-like): 2/255 4/255 8/255"
    return (4 / 255, 8 / 255, 16 / 255), "colour images over 64 px (ImageNet-like): 4/255 8/255 16/255"


@dataclass(frozen=True)
class TransferOptions:
    """How to evaluate (every field a flag of ``eval/transfer.py``; validated on creation). ``attacks`` are
    the suite's combinations (``pgd``, ``mifgsm+dim``, ...); ``attack_settings`` the attack flags given
    (``{"--steps": 10}``), applied to every attack that has the field."""

    attacks: tuple[str, ...] = opt(("pgd",), "attacks of the suite, several per run, components joined by + "
                                             "(e.g. pgd mifgsm+dim+tim sgm bsr); see decorr.attacks",
                                   flag="--attack", metavar="ATTACK")
    attack_settings: dict[str, Any] = opt({}, "attack flags by name (not a flag: the attack flags set it)")
    eps: tuple[float, ...] = opt((), "radii in pixel units, e.g. 8/255 (default by image shape: 1-channel 0.05 0.1 "
                                     "0.15, colour up to 64 px 2/255 4/255 8/255, larger 4/255 8/255 16/255)",
                                 type=pixel_value)
    norm: str = opt("linf", "the attacks' norm", choices=("linf", "l2"))
    l2_scale: str = opt("sqrt-side", "L2 radius = eps * sqrt(image side) (SPEC), * sqrt(C*H*W), or eps itself",
                        choices=L2_SCALES)
    targeted: str | None = opt(None, "targeted attacks: 'random' (another class per image, from --seed) or a JSON "
                                     "class map FILE ({\"true class\": target class})", metavar="RULE")
    seed: int = opt(0, "seeds the attacks' randomness (per source, attack, eps and batch) and random targets")
    batch_size: int = opt(1000, "images per batch")
    features: bool = opt(True, "skip feature R^2 / PCA Pearson of same-architecture pairs", flag="--no-features")
    only_correct: bool = opt(False, "evaluate only the images every model classifies correctly (SGM's protocol)")
    attack_targets: bool = opt(False, "with --surrogate: attack the targets too (without --surrogate they always are)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "attacks", tuple(self.attacks))
        object.__setattr__(self, "eps", tuple(float(e) for e in self.eps))
        object.__setattr__(self, "attack_settings", dict(self.attack_settings))
        if self.norm not in ("linf", "l2"):
            raise DecorrError(f"unknown norm {self.norm!r}; use linf or l2")
        if self.l2_scale not in L2_SCALES:
            raise DecorrError(f"unknown L2 scale {self.l2_scale!r}; choose one of {', '.join(L2_SCALES)}")
        bad = [e for e in self.eps if not (e >= 0 and math.isfinite(e))]
        if bad:
            raise DecorrError(f"epsilon must be >= 0 (pixel units), got {bad[0]}; e.g. --eps 0.05 0.1 0.15")
        if len(set(self.eps)) != len(self.eps):
            raise DecorrError(f"epsilon {sorted(e for e in self.eps if self.eps.count(e) > 1)[0]} is given twice; "
                              "list each once")
        check_at_least("batch_size", self.batch_size, 1)
        check_seed(self.seed)
        if self.targeted is not None and self.targeted != "random" and not Path(self.targeted).is_file():
            raise DecorrError(f"--targeted {self.targeted!r} is neither 'random' nor a class map file; give "
                              "--targeted random or the path of a JSON {\"true class\": target class} file")
        self.parsed_attacks()  # every attack and setting checked before any work

    def parsed_attacks(self) -> list[Attack]:
        return parse_attacks(self.attacks, self.attack_settings)

    def scale(self, input_shape: Sequence[int]) -> float:
        """Factor from Linf-equivalent units to the attacks' norm (1 for Linf)."""
        if self.norm == "linf" or self.l2_scale == "none":
            return 1.0
        dim = math.prod(input_shape)
        if self.l2_scale == "sqrt-dim":
            return math.sqrt(dim)
        spatial = input_shape[-2] * input_shape[-1] if len(input_shape) >= 2 else dim
        return math.sqrt(math.sqrt(spatial))  # the image side: eps * sqrt(28) on MNIST

    def record(self, attacks: Sequence[Attack], eps: Sequence[float], input_shape: Sequence[int]) -> dict[str, Any]:
        scale = self.scale(input_shape)
        record = {k: v for k, v in asdict(self).items() if k not in ("attacks", "attack_settings")}
        record.update(attacks=[a.describe() for a in attacks], attack_settings=dict(self.attack_settings),
                      eps=list(eps), attack_eps=[e * scale for e in eps],
                      l2_scale=None if self.norm == "linf" else self.l2_scale)
        return record


@dataclass
class Reporter:
    """Where an evaluation says what it does: ``say`` (progress lines) and ``progress(total)`` (a
    callable that makes a progress counter advanced by image counts, or None)."""

    say: Callable[[str], None] = lambda _message: None
    progress: Callable[[int, str], Callable[[int, str], None] | None] | None = None


def target_labels(y: Tensor, num_classes: int, rule: str, seed: int) -> Tensor:
    """The target class of every image: ``random`` draws another class per image from ``seed`` (the same
    draws whatever the process count), a JSON file maps true classes to targets."""
    if rule == "random":
        generator = torch.Generator().manual_seed(int(seed) + 7919)
        offset = torch.randint(1, num_classes, (len(y),), generator=generator)
        return (y.cpu() + offset) % num_classes
    try:
        mapping = json.loads(Path(rule).read_text())
        table = {int(k): int(v) for k, v in mapping.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        raise DecorrError(f"--targeted {rule}: not a JSON object of class -> target class, e.g. "
                          "{\"0\": 1, \"1\": 2}") from None
    missing = sorted({int(c) for c in y.tolist()} - set(table))
    if missing:
        raise DecorrError(f"--targeted {rule} maps no target for class {missing[0]}; give every class a target")
    bad = [(k, v) for k, v in table.items() if not 0 <= v < num_classes or v == k]
    if bad:
        raise DecorrError(f"--targeted {rule}: class {bad[0][0]} -> {bad[0][1]} is not another class of the "
                          f"models' {num_classes}; fix the map")
    return torch.tensor([table[int(c)] for c in y.tolist()], dtype=torch.int64)
