"""Ensembles of classifiers as one model: combination rules and what a white-box attack maximises.

:class:`Ensemble` holds named members and a rule; its ``forward`` gives one (N, classes) tensor whose
argmax is the ensemble's prediction:

- ``prob`` (default): the log of the members' mean softmax probability, ``log(1/K sum_k softmax(f_k(x)))``
  (computed as a logsumexp of log-softmaxes), so cross-entropy on it is DVERGE's ensemble loss;
- ``logit``: the members' mean logits;
- ``vote``: ``votes + mean_prob / 2``, votes[c] the number of members whose argmax is c: its argmax is the
  majority vote, ties broken by the mean probability (a class with one more vote always wins, since
  mean_prob / 2 <= 1/2). Not differentiable.

The white-box attack objective (what the transfer evaluation maximises when the ensemble is a source;
:class:`decorr.attacks.Source` builds it) follows ``objective``:

- ``output`` (default): cross-entropy on the ensemble's own output: CE of log(mean prob) for ``prob``
  (DVERGE's evaluation), CE of the mean logits for ``logit``; a ``vote`` ensemble has no gradient, so it
  is attacked on the ``prob`` loss (CE of log(mean prob)) and its record says so (``attack_loss``);
- ``mean_ce``: the mean of the members' cross-entropies (Liu et al., ICLR 2017,
  the ``ce`` objective on ``combine="loss"``), the ``--surrogate-ensemble`` source.

SGM (``skip_gradient(ensemble, gamma)``) decays the residual branches inside every residual member.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from decorr.errors import DecorrError

__all__ = ["ENSEMBLE_RULES", "OBJECTIVES", "Ensemble", "Placed", "spread_members"]

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
    def attack_output_is_log_prob(self) -> bool:
        """Whether :meth:`attack_output` is log-probabilities (cross-entropy is then their NLL)."""
        return self.rule != "logit"

    def attack_output(self, x: Tensor) -> Tensor:
        """The differentiable output a white-box attack on the ensemble maximises its loss of: the log mean
        probability (``prob``, and ``vote``, whose own output has no gradient) or the mean logits
        (``logit``). A ``mean_ce`` ensemble is attacked on its members' mean loss instead
        (:class:`decorr.attacks.Source`)."""
        logits = self.member_logits(x)
        return logits.mean(dim=0) if self.rule == "logit" else _log_mean_prob(logits)

    def describe(self) -> dict[str, Any]:
        """``{members, rule, attack_loss}`` for a results record."""
        return {"members": list(self.member_names), "rule": self.rule, "attack_loss": self.attack_loss_name}


class Placed(nn.Module):
    """A member kept on its own device: inputs go there, outputs come back to the input's device (autograd
    follows). ``.to()`` of the ensemble leaves it where it is, so members spread over GPUs stay spread."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.module = module.to(device)
        self.device = torch.device(device)

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.to(self.device)).to(x.device)

    def _apply(self, fn: Any, recurse: bool = True) -> "Placed":  # noqa: D401 - nn.Module's hook of .to()/.cuda()
        return self


def spread_members(ensemble: Ensemble, devices: list[torch.device], per_device: int | None = None) -> Ensemble:
    """Put the ensemble's members on ``devices`` (``per_device`` members each, in order; None: as evenly as
    possible), for ensembles whose members do not fit one GPU together. Returns the ensemble."""
    if not devices:
        raise DecorrError("no devices to spread the ensemble's members over")
    count = len(ensemble.members)
    if per_device is None:
        per_device = -(-count // len(devices))
    if per_device < 1:
        raise DecorrError(f"--members-per-device must be at least 1, got {per_device}")
    if per_device * len(devices) < count:
        raise DecorrError(f"{count} members at {per_device} per device need {-(-count // per_device)} devices; this "
                          f"machine shows {len(devices)}; raise --members-per-device or use more GPUs")
    members = [m.module if isinstance(m, Placed) else m for m in ensemble.members]
    ensemble.members = nn.ModuleList(Placed(m, devices[i // per_device]) for i, m in enumerate(members))
    return ensemble


def _log_mean_prob(logits: Tensor) -> Tensor:
    return torch.logsumexp(F.log_softmax(logits, dim=2), dim=0) - math.log(logits.shape[0])
