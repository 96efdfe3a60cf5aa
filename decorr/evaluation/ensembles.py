"""Ensembles from model specs: ``--ensemble NAME=SPEC,SPEC`` and ``--surrogate-ensemble`` (the module itself
is :class:`decorr.models.ensemble.Ensemble`)."""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from decorr.errors import DecorrError
from decorr.models.ensemble import ENSEMBLE_RULES, OBJECTIVES, Ensemble
from decorr.specs import load_specs

__all__ = ["ENSEMBLE_RULES", "OBJECTIVES", "Ensemble", "load_ensembles", "parse_ensemble_spec"]


def parse_ensemble_spec(text: str) -> tuple[str, list[str]]:
    """``NAME=SPEC,SPEC[,...]`` -> ``(NAME, [SPEC, ...])``: split on the first ``=``, members on ``,``.

    The member specs are passed on untouched to the one model loader.
    """
    name, sep, members = str(text).partition("=")
    name = name.strip()
    specs = [m.strip() for m in members.split(",")] if sep else []
    if not name or not sep or not specs or any(not s for s in specs):
        raise DecorrError(f"ensemble {text!r} is not NAME=SPEC,SPEC[,...]; e.g. --ensemble ens=runs/a,runs/b:model1")
    if "/" in name:
        raise DecorrError(f"ensemble name {name!r} contains '/'; model names use it, so choose a plain name")
    return name, specs


def load_ensembles(
    specs: Sequence[str], *, rule: str = "prob", objective: str = "output", device: torch.device | str = "cpu",
    options: Any = None,
) -> tuple[dict[str, Ensemble], dict[str, dict[str, Any]], dict[str, Any]]:
    """Build one :class:`Ensemble` per ``NAME=SPEC,...``; members load with the one spec loader.

    Returns the ensembles (eval mode, on ``device``); per ensemble ``{arch: "ensemble", members, rule,
    attack_loss, member_specs, member_info}`` (``member_info``: the loader's record per member); and
    the members as ``decorr.specs.NamedModel`` under ``ENSEMBLE/MEMBER`` (for input checks).
    """
    ensembles: dict[str, Ensemble] = {}
    info: dict[str, dict[str, Any]] = {}
    loaded_members: dict[str, Any] = {}
    for text in specs:
        name, member_specs = parse_ensemble_spec(text)
        if name in ensembles:
            raise DecorrError(f"two ensembles are both named {name!r}; give each a distinct NAME")
        loaded = load_specs(member_specs, options, device=device)
        members = {n: m.module for n, m in loaded.items()}
        ensemble = Ensemble(members, rule=rule, objective=objective).to(device).eval()
        ensembles[name] = ensemble
        info[name] = {"arch": "ensemble", **ensemble.describe(), "member_specs": [os.fspath(s) for s in member_specs],
                      "member_info": {n: m.info for n, m in loaded.items()}}
        loaded_members.update({f"{name}/{n}": m for n, m in loaded.items()})
    return ensembles, info, loaded_members
