"""Published transfer protocols as presets of ``eval/transfer.py --preset NAME``.

A preset is a set of flag values, applied like a ``--config`` file below it: a ``--config`` file overrides
the preset and an explicit flag overrides both (``--preset transferattack --attack mifgsm --steps 20``
keeps everything else of the protocol). The preset, its settings and which of them were overridden are
recorded in results.json (``config.preset``) and printed by ``--dry-run``. Each is read from the project's
own files (SPEC section 9); where the suite differs from the original, a note says how.

- ``transferattack``: TransferAttack's ImageNet protocol (Trustworthy-AI-Group/TransferAttack): source
  ResNet-50 (torchvision ``DEFAULT`` weights), targets VGG-16, MobileNet-v2, Inception-v3, ViT-B/16, PiT-B,
  Visformer-S, Swin-T, each wrapped as TransferAttack wraps them (resize to 224, 299 for Inception-v3, and
  the weights' mean/std); Linf eps 16/255, 10 steps of 1.6/255, decay 1.0, the suite's attacks; images
  resized and centre-cropped to 224 x 224 from an ImageNet-compatible folder with ``labels.csv``
  (``--dataset DIR``). Success over all images is 1 - accuracy; ``source_correct`` gives it over the images
  the source classifies correctly.
- ``dverge``: DVERGE's CIFAR-10 black-box protocol (``eval/eval_bbox.py``): eps 0.01 ... 0.07; PGD with
  momentum (random start), M-DI2 (DI probability 0.5, with momentum) and SGM (gamma 0.2), 100 steps, each
  with cross-entropy and CW (kappa 0.1) losses; the per-image worst case over every attack and surrogate
  (``worst_case`` ``all_sources``). Its surrogates (baseline ensembles of 3, 5 and 8 ResNet-20s) are given
  with ``--surrogate-ensemble NAME=SPEC,...``.
- ``p1``: the decorrelation paper's MNIST protocol (Wiedeman & Wang 2022, SPEC section 3): PGD with a random
  start, 40 steps of 3/255, eps 0.05 0.10 0.15, every target attacked, so both directions of every pair.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Mapping

from decorr.config import apply_settings
from decorr.errors import DecorrError

__all__ = ["PRESETS", "Preset", "apply_preset", "preset_record"]

IMAGENET = "@transforms=normalize,input_size="


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    settings: Mapping[str, Any]  # flag -> value, as in a --config file
    notes: tuple[str, ...] = field(default_factory=tuple)


def _transferattack() -> Preset:
    def tv(name: str, size: int = 224) -> str:
        return f"torchvision.{name}=DEFAULT{IMAGENET}{size}"

    def tm(name: str, label: str) -> str:
        return f"timm.{name}=pretrained{IMAGENET}224,name={label}"

    targets = [tv("vgg16"), tv("mobilenet_v2"), tv("inception_v3", 299), tv("vit_b_16"), tm("pit_b_224", "pit_b"),
               tm("visformer_small", "visformer_s"), tv("swin_t")]
    return Preset("transferattack", "TransferAttack's ImageNet protocol: ResNet-50 source, 7 black-box targets, "
                  "Linf 16/255, 10 steps of 1.6/255, decay 1.0", {
                      "checkpoints": targets, "surrogate": [tv("resnet50")],
                      "attack": ["mifgsm", "vmifgsm", "dim", "tim", "sim", "admix", "ssm", "bsr", "sgm"],
                      "eps": ["16/255"], "steps": 10, "step_size": "1.6/255", "decay": 1.0,
                      "image_size": 224, "no_features": True},
                  ("give the images with --dataset DIR (an ImageNet-compatible folder with labels.csv, filename,label "
                   "0-based)",
                   "success over all images = 1 - accuracy; by_eps[].source_correct: over the images the source "
                   "classifies correctly",
                   "TransferAttack saves its examples as uint8 by truncation; --save-adversarial rounds"))


def _dverge() -> Preset:
    attacks = []
    for base in ("mifgsm(random_start=true)", "dim", "sgm"):
        attacks += [base, f"{base}+cw"]
    return Preset("dverge", "DVERGE's CIFAR-10 black-box protocol: eps 0.01..0.07, PGD with momentum, M-DI2 and SGM, "
                  "100 steps, CE and CW losses, the per-image worst case", {
                      "dataset": "cifar10", "attack": attacks, "eps": [f"0.0{i}" for i in range(1, 8)],
                      "steps": 100, "dim_prob": 0.5, "gamma": 0.2, "cw_kappa": 0.1},
                  ("give the surrogates as --surrogate-ensemble base3=SPEC,SPEC,SPEC (DVERGE: 3, 5 and 8 ResNet-20s) "
                   "and the ensemble under test with --ensemble NAME=SPEC,...",
                   "DVERGE restarts PGD 3 times; here each attack runs once (one random start), so the worst case "
                   "is over 6 attack runs per surrogate, not 3 x 6",
                   "the worst case over every attack and surrogate is worst_case[].all_sources"))


def _p1() -> Preset:
    return Preset("p1", "the decorrelation paper's MNIST protocol: PGD, 40 steps of 3/255, eps 0.05 0.10 0.15, both "
                  "directions of every pair", {
                      "dataset": "mnist", "attack": ["pgd"], "eps": ["0.05", "0.10", "0.15"], "steps": 40,
                      "step_size": "3/255", "random_start": True},
                  ("every target is a source, so each pair is attacked in both directions (pairs[].a_to_b, b_to_a)",))


PRESETS: dict[str, Preset] = {p.name: p for p in (_transferattack(), _dverge(), _p1())}


def apply_preset(parser: argparse.ArgumentParser, name: str) -> dict[str, Any]:
    """Make preset ``name``'s settings ``parser``'s defaults; returns them by destination, as converted."""
    if name not in PRESETS:
        raise DecorrError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    apply_settings(parser, PRESETS[name].settings, source=f"--preset {name}")
    dests = {action.dest for action in parser._actions
             if action.dest in _dests(parser, PRESETS[name].settings)}
    return {dest: parser.get_default(dest) for dest in dests}


def _dests(parser: argparse.ArgumentParser, settings: Mapping[str, Any]) -> set[str]:
    names = {str(k).lstrip("-").replace("-", "_") for k in settings}
    found = set()
    for action in parser._actions:
        options = {o.lstrip("-").replace("-", "_") for o in action.option_strings}
        if action.dest in names or options & names:
            found.add(action.dest)
    return found


def preset_record(name: str | None, applied: Mapping[str, Any] | None, args: argparse.Namespace) -> dict[str, Any] | None:
    """The preset as results.json records it: name, summary, notes, its settings and the ones the command
    line or a --config file overrode (with the values used)."""
    if name is None:
        return None
    preset = PRESETS[name]
    applied = dict(applied or {})
    overridden = {dest: getattr(args, dest) for dest, value in applied.items() if getattr(args, dest, value) != value}
    return {"name": name, "summary": preset.summary, "settings": dict(preset.settings), "notes": list(preset.notes),
            "overridden": overridden}
