"""Evaluating models named by specs: :class:`ModelSelection` (targets, surrogates, ensembles, how to load
them) and :func:`evaluate_checkpoints`, the one loader in front of :func:`~decorr.evaluation.transfer.evaluate_transfer`;
plus the two small readers scripts share (the specs' dataset, a result's pair figures)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from decorr.checkpoint import load_checkpoint
from decorr.distributed import world_size
from decorr.errors import DecorrError
from decorr.evaluation.compare import rows_of
from decorr.evaluation.ensembles import load_ensembles
from decorr.evaluation.options import Data, Reporter, TransferOptions
from decorr.evaluation.transfer import evaluate_transfer
from decorr.models.ensemble import Ensemble, spread_members
from decorr.specs import SpecOptions, check_input_shape, load_specs, parse_spec

__all__ = ["ModelSelection", "checkpoint_dataset", "evaluate_checkpoints", "pair_transfer"]

@dataclass(frozen=True)
class ModelSelection:
    """Which models an evaluation loads: targets and source-only surrogates (model specs, ``decorr.specs``),
    ensembles as targets and as surrogates (``NAME=SPEC,SPEC``), how ensembles combine, and the global
    options of ``ARCH=WEIGHTS`` specs."""

    targets: tuple[str, ...] = ()
    surrogates: tuple[str, ...] = ()
    ensembles: tuple[str, ...] = ()
    surrogate_ensembles: tuple[str, ...] = ()
    ensemble_rule: str = "prob"
    spec_options: SpecOptions | None = None
    #: Ensembles whose members do not fit one GPU together: N members per visible GPU, or "auto" (as evenly
    #: as the GPUs allow); None keeps every model on the evaluation's device.
    members_per_device: str | None = None

    def __post_init__(self) -> None:
        for name in ("targets", "surrogates", "ensembles", "surrogate_ensembles"):
            object.__setattr__(self, name, tuple(os.fspath(s) for s in getattr(self, name)))
        if not self.targets and not self.ensembles:
            raise DecorrError("no target models; pass checkpoints or specs (SPEC ...) or --ensemble NAME=SPEC,SPEC")
        spread = self.members_per_device
        if spread is not None and spread != "auto" and not (str(spread).isdigit() and int(spread) >= 1):
            raise DecorrError(f"--members-per-device takes a number >= 1 or auto, got {spread!r}")

    def spread(self, ensembles: Mapping[str, Ensemble]) -> None:
        """Spread the ensembles' members over the visible GPUs (``members_per_device``)."""
        if self.members_per_device is None or not ensembles:
            return
        if world_size() > 1:
            raise DecorrError("--members-per-device spreads one process's ensembles over the GPUs; run one process "
                              "(not torchrun / accelerate launch with several) or leave it out")
        if not torch.cuda.is_available():
            raise DecorrError("--members-per-device spreads ensemble members over GPUs, and this machine has none; "
                              "leave it out")
        devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        per_device = None if self.members_per_device == "auto" else int(self.members_per_device)
        for ensemble in ensembles.values():
            spread_members(ensemble, devices, per_device)

    @property
    def member_specs(self) -> list[str]:
        from decorr.evaluation.ensembles import parse_ensemble_spec

        return [spec for text in self.ensembles + self.surrogate_ensembles for spec in parse_ensemble_spec(text)[1]]


def evaluate_checkpoints(selection: ModelSelection, data: Data, options: TransferOptions = TransferOptions(), *,
                         device: torch.device | str = "cpu", report: Reporter | None = None,
                         on_adversarial: Callable[..., None] | None = None) -> dict[str, Any]:
    """:func:`evaluate_transfer` on the models of ``selection``, loaded with the one spec loader.

    Checks that every model (every ensemble member too) takes the data's input shape before any work;
    each model's load record goes to its ``models`` entry in the result.
    """
    options_ = selection.spec_options
    targets = load_specs(selection.targets, options_, device=device) if selection.targets else {}
    sources = load_specs(selection.surrogates, options_, device=device) if selection.surrogates else {}
    ensembles, ensemble_info, members = load_ensembles(selection.ensembles, rule=selection.ensemble_rule,
                                                       device=device, options=options_)
    surrogate_ensembles, surrogate_info, surrogate_members = load_ensembles(
        selection.surrogate_ensembles, rule=selection.ensemble_rule, objective="mean_ce", device=device, options=options_)
    for name in list(ensembles) + list(surrogate_ensembles):
        if name in targets or name in sources or (name in ensembles and name in surrogate_ensembles):
            raise DecorrError(f"ensemble name {name!r} is taken by another model; choose another NAME")
    selection.spread({**ensembles, **surrogate_ensembles})
    loaded = {**sources, **targets}
    shape = tuple(data.image_shape) if not isinstance(data, (tuple, list)) else tuple(data[0].shape[1:])
    every_member = {**members, **surrogate_members}
    check_input_shape({**loaded, **every_member}, shape)
    info = {**ensemble_info, **surrogate_info}
    archs = {**{k: m.info["arch"] for k, m in loaded.items()}, **{k: "ensemble" for k in info},
             **{k: m.info.get("arch") for k, m in every_member.items()}}
    model_info = {**{k: {key: v for key, v in m.info.items() if key not in ("arch", "feature_layer")}
                     for k, m in loaded.items()},
                  **{k: {"member_specs": i["member_specs"], "member_info": i["member_info"]} for k, i in info.items()}}
    return evaluate_transfer(
        {**{n: m.module for n, m in targets.items()}, **ensembles}, data, options,
        surrogates={**{n: m.module for n, m in sources.items()}, **surrogate_ensembles},
        feature_layers={k: m.info["feature_layer"] for k, m in loaded.items()}, archs=archs, model_info=model_info,
        device=device, report=report, on_adversarial=on_adversarial)


def checkpoint_dataset(specs: Sequence[str]) -> str:
    """The dataset the checkpoint specs were trained on; they must agree (``ARCH=WEIGHTS`` specs say none)."""
    names = {}
    for spec in specs:
        parsed = parse_spec(spec)
        names[spec] = load_checkpoint(parsed.checkpoint, load_weights=False).config.get("dataset") if parsed.checkpoint else None
    found = {name for name in names.values() if name}
    if len(found) != 1:
        listed = ", ".join(f"{path}: {name}" for path, name in names.items())
        raise DecorrError(f"cannot tell which dataset to evaluate on ({listed}); pass --dataset")
    return found.pop()


def pair_transfer(result: Mapping[str, Any], attack: str | None = None) -> dict[tuple[str, str], dict[float, float | None]]:
    """``{(a, b): {eps: mean of T(a -> b) and T(b -> a)}}`` of one attack (default: the first) of a result."""
    rows = rows_of(result, attack)
    table: dict[tuple[str, str], dict[float, float | None]] = {}
    for row in rows:
        for pair in row["pairs"]:
            table.setdefault((pair["a"], pair["b"]), {})[row["eps"]] = pair["mean"]
    return table

