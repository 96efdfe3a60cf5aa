"""Ensembles of classifiers as one model: combination rules, white-box attack losses, loading from specs.

:class:`Ensemble` holds named members and a rule; its ``forward`` gives one (N, classes) tensor whose
argmax is the ensemble's prediction:

- ``prob`` (default): the log of the members' mean softmax probability, ``log(1/K sum_k softmax(f_k(x)))``
  (computed as a logsumexp of log-softmaxes), so cross-entropy on it is DVERGE's ensemble loss;
- ``logit``: the members' mean logits;
- ``vote``: ``votes + mean_prob / 2``, votes[c] the number of members whose argmax is c: its argmax is the
  majority vote, ties broken by the mean probability (a class with one more vote always wins, since
  mean_prob / 2 <= 1/2). Not differentiable.

The white-box attack objective (:attr:`Ensemble.attack_loss`, what the transfer evaluation maximises when
the ensemble is a source) follows ``objective``:

- ``output`` (default): cross-entropy on the ensemble's own output: CE of log(mean prob) for ``prob``
  (DVERGE's evaluation), CE of the mean logits for ``logit``; a ``vote`` ensemble has no gradient, so it
  is attacked on the ``prob`` loss (CE of log(mean prob)) and its record says so (``attack_loss``);
- ``mean_ce``: the mean of the members' cross-entropies (Liu et al., ICLR 2017,
  :func:`decorr.attacks.mean_ce_loss`), the ``--surrogate-ensemble`` source.

SGM (``skip_gradient(ensemble, gamma)``) decays the residual branches inside every residual member.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from decorr.attacks.losses import LossFn, mean_ce_loss
from decorr.errors import DecorrError

__all__ = ["ENSEMBLE_RULES", "OBJECTIVES", "Ensemble", "load_ensembles", "parse_ensemble_spec"]

ENSEMBLE_RULES = ("prob", "logit", "vote")
OBJECTIVES = ("output", "mean_ce")


class Ensemble(nn.Module):
    """Named members combined by ``rule``; see the module docstring."""

    def __init__(self, members: Mapping[str, nn.Module], rule: str = "prob", objective: str = "output") -> None:
        super().__init__()
        if rule not in ENSEMBLE_RULES:
            raise DecorrError(f"unknown ensemble rule {rule!r}; choose one of {', '.join(ENSEMBLE_RULES)}")
        if objective not in OBJECTIVES:
            raise DecorrError(f"unknown ensemble attack objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if not members:
            raise DecorrError("an ensemble needs at least one member; list them as NAME=SPEC,SPEC")
        self.member_names = list(members)
        self.members = nn.ModuleList(members.values())
        self.rule = rule
        self.objective = objective

    # -- combination -------------------------------------------------------------------------------

    def member_logits(self, x: Tensor) -> Tensor:
        """Every member's logits, stacked: (K, N, classes)."""
        return torch.stack([member(x) for member in self.members])

    def combine(self, logits: Tensor) -> Tensor:
        """The ensemble's output from stacked member logits (K, N, classes)."""
        if self.rule == "logit":
            return logits.mean(dim=0)
        log_mean_prob = _log_mean_prob(logits)
        if self.rule == "prob":
            return log_mean_prob
        votes = F.one_hot(logits.argmax(dim=2), logits.shape[2]).sum(dim=0).to(logits.dtype)
        return votes + log_mean_prob.exp() / 2

    def forward(self, x: Tensor) -> Tensor:
        return self.combine(self.member_logits(x))

    # -- attack ------------------------------------------------------------------------------------

    @property
    def attack_loss_name(self) -> str:
        """What :attr:`attack_loss` maximises: ``log_mean_prob``, ``mean_logits`` or ``mean_ce``."""
        if self.objective == "mean_ce":
            return "mean_ce"
        return "mean_logits" if self.rule == "logit" else "log_mean_prob"

    @property
    def attack_loss(self) -> LossFn:
        """The white-box attack objective ``loss_fn(x, y) -> scalar`` (module docstring)."""
        name = self.attack_loss_name
        if name == "mean_ce":
            return mean_ce_loss(self.members)
        if name == "mean_logits":
            return lambda x, y: F.cross_entropy(self.member_logits(x).mean(dim=0), y)
        return lambda x, y: F.nll_loss(_log_mean_prob(self.member_logits(x)), y)

    def describe(self) -> dict[str, Any]:
        """``{members, rule, attack_loss}`` for a results record."""
        return {"members": list(self.member_names), "rule": self.rule, "attack_loss": self.attack_loss_name}


def _log_mean_prob(logits: Tensor) -> Tensor:
    return torch.logsumexp(F.log_softmax(logits, dim=2), dim=0) - math.log(logits.shape[0])


# ------------------------------------------------------------------------------------------------
# Specs and loading


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
    from decorr.specs import load_specs

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
