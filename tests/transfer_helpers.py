"""The transfer tests' short way of naming an evaluation: the keyword arguments of a single-attack run
(``attack="pgd", eps_list=..., steps=..., momentum=..., diversity=...``) translated into the evaluation's
:class:`~decorr.evaluation.options.TransferOptions` (attacks of the suite and their settings)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from decorr.attacks import Source
from decorr.evaluation.passes import batch_generator
from decorr.evaluation.selection import ModelSelection, evaluate_checkpoints
from decorr.evaluation.options import Reporter, TransferOptions
from decorr.evaluation.transfer import evaluate_transfer
from decorr.specs import load_specs

#: the attack flags of the old single-attack keywords
FLAGS = {"steps": "--steps", "step_size": "--step-size", "random_start": "--random-start", "gamma": "--gamma",
         "momentum": "--momentum", "sgm_exclude": "--sgm-exclude", "diversity": "--dim-prob", "ti_kernel": "--ti-kernel"}
OPTIONS = ("norm", "l2_scale", "seed", "batch_size", "features", "only_correct", "targeted")


def options(attack: str = "pgd", eps_list: Sequence[float] = (), eps: Sequence[float] = (), **legacy: Any) -> TransferOptions:
    """``attack`` fgsm, pgd or sgm (PGD with the skip gradient, as the evaluation's sgm was), with MI (momentum),
    DI (diversity > 0) and TI (ti_kernel) as components."""
    name = {"sgm": "pgd+sgm"}.get(attack, attack)
    if legacy.get("diversity"):
        name += "+dim"
    if legacy.get("ti_kernel"):
        name += "+tim"
    settings = {FLAGS[k]: v for k, v in legacy.items() if k in FLAGS and v is not None
                and not (k in ("diversity",) and not v)}
    chosen = {k: legacy[k] for k in OPTIONS if k in legacy}
    if legacy.get("attack_targets"):
        chosen["attack_targets"] = True
    return TransferOptions(attacks=(name,), eps=tuple(eps_list or eps), attack_settings=settings, **chosen)


def evaluate(models: Any, data: Any, *, surrogates: Any = None, feature_layers: Any = None, archs: Any = None,
             device: Any = None, model_info: Any = None, log: Callable[[str], None] | None = None,
             on_adversarial: Any = None, **legacy: Any) -> dict:
    return evaluate_transfer(models, data, options(**legacy), surrogates=surrogates, feature_layers=feature_layers,
                             archs=archs, device=device, model_info=model_info,
                             report=Reporter(say=log) if log else None, on_adversarial=on_adversarial)


def evaluate_specs(specs: Sequence[str], data: Any, *, surrogates: Sequence[str] = (), device: Any = "cpu",
                   spec_options: Any = None, ensembles: Sequence[str] = (), surrogate_ensembles: Sequence[str] = (),
                   ensemble_rule: str = "prob", log: Callable[[str], None] | None = None, on_adversarial: Any = None,
                   **legacy: Any) -> dict:
    selection = ModelSelection(targets=tuple(specs), surrogates=tuple(surrogates), ensembles=tuple(ensembles),
                               surrogate_ensembles=tuple(surrogate_ensembles), ensemble_rule=ensemble_rule,
                               spec_options=spec_options)
    return evaluate_checkpoints(selection, data, options(**legacy), device=device,
                                report=Reporter(say=log) if log else None, on_adversarial=on_adversarial)


def attack_generator(seed: int, source: str, eps: float, index: int, attack: str = "pgd") -> torch.Generator:
    """The generator the evaluation gives batch ``index`` of ``source``'s ``attack`` at ``eps``."""
    return batch_generator(seed, source, attack, eps, index)


def craft(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: TransferOptions, eps: float,
          generator: torch.Generator | None) -> torch.Tensor:
    """The examples the evaluation crafts on ``model`` (its first attack) for one batch."""
    attack = settings.parsed_attacks()[0]
    scale = settings.scale(tuple(x.shape[1:]))
    return attack.craft(Source.of(model), x, y, eps=eps, norm=settings.norm, scale=scale, generator=generator)


def load_named_models(paths: Sequence[str], device: Any = "cpu", options: Any = None) -> tuple[dict, dict]:
    loaded = load_specs(paths, options, device=device)
    return {n: m.module for n, m in loaded.items()}, {n: m.info for n, m in loaded.items()}


def record(settings: TransferOptions, shape: Sequence[int]) -> dict:
    """The settings record a run with these options writes for images of ``shape``."""
    return settings.record(settings.parsed_attacks(), settings.eps, shape)
