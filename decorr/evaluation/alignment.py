"""Input-gradient alignment between sources (plain or SGM-decayed) and targets.

SGM (Wu et al. 2020) argues that decaying the gradient through residual branches makes a ResNet's
input gradient closer to other models' gradients, which is why its adversarial examples transfer
better. This module measures that directly, without attacking: for every source, every SGM decay
``gamma`` and every target, the mean per-sample cosine similarity (and sign agreement) of the source's
cross-entropy input gradient with the target's, on natural inputs; and the cosine of the decayed
gradient with the source's own true gradient (how much of the white-box direction is kept).

    result = evaluate_gradient_alignment({"resnet20": r}, {"vgg": v, "densenet": d}, split, gammas=[1, 0.5, 0.2])
    result["by_gamma"][1]["cosine"]["resnet20"]["vgg"]
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from decorr.attacks import residual_branches, skip_gradient
from decorr.attacks.skip_gradient import DEFAULT_EXCLUDE, EXCLUDE_RULES, Exclude
from decorr.data import ImageSplit
from decorr.evaluation.passes import batches, gather_rows
from decorr.errors import DecorrError
from decorr.evaluation.metrics import gradient_alignment

FORMAT = "decorr-gradient-alignment/1"


def input_gradient(model: nn.Module, x: Tensor, y: Tensor, gamma: float = 1.0, *,
                   exclude: Exclude = DEFAULT_EXCLUDE) -> Tensor:
    """Per-sample gradient of ``model``'s cross-entropy w.r.t. ``x`` (summed loss: samples are independent
    in eval mode), through ``skip_gradient(model, gamma, exclude=exclude)`` when ``gamma < 1``."""
    x = x.detach().requires_grad_(True)
    context = skip_gradient(model, gamma, exclude=exclude) if gamma < 1.0 else nullcontext()
    with torch.enable_grad(), context:
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return grad


def evaluate_gradient_alignment(
    sources: Mapping[str, nn.Module],
    targets: Mapping[str, nn.Module],
    data: ImageSplit | tuple[Tensor, Tensor],
    *,
    gammas: Sequence[float] = (1.0,),
    batch_size: int = 250,
    device: torch.device | str = "cpu",
    sgm_exclude: str = DEFAULT_EXCLUDE,
) -> dict[str, Any]:
    """Mean gradient alignment of every source (at every ``gamma``) with every target; a JSON-able dict.

    Schema ``decorr-gradient-alignment/1``: ``{format, num_samples, gammas, sgm_exclude, sources, targets,
    by_gamma: {gamma: {cosine: {src: {tgt: mean}}, sign_agreement: {src: {tgt: mean}},
    self_cosine: {src: mean cosine of the decayed with the undecayed gradient}}}}``. gamma < 1 needs
    residual sources (SGM); gamma = 1 is the plain gradient. ``sgm_exclude`` is ``skip_gradient``'s
    ``exclude`` (``"first-of-stage"``, the SGM authors' rule, or ``"none"``: decay every unit).
    """
    if not sources or not targets:
        raise DecorrError("gradient alignment needs at least one source and one target model")
    if sgm_exclude not in EXCLUDE_RULES:
        raise DecorrError(f"unknown SGM exclude {sgm_exclude!r}; use one of {', '.join(EXCLUDE_RULES)}")
    gammas = [float(g) for g in gammas]
    for gamma in gammas:
        if not 0.0 < gamma <= 1.0:
            raise DecorrError(f"SGM gamma must be in (0, 1], got {gamma}")
    if any(g < 1.0 for g in gammas):
        for name, model in sources.items():
            if not residual_branches(model, sgm_exclude):
                raise DecorrError(f"source {name} has no residual units to decay (--sgm-exclude {sgm_exclude}), so SGM "
                                  "gamma < 1 means nothing for it; use a residual source or --gamma 1")
    if batch_size < 1:
        raise DecorrError(f"batch size must be at least 1, got {batch_size}")
    n = len(data[1]) if isinstance(data, (tuple, list)) else len(data)
    if n == 0:
        raise DecorrError("no samples to evaluate; check --num-samples")
    device = torch.device(device)
    for model in [*sources.values(), *targets.values()]:
        model.to(device).eval()
    per_sample = _per_sample_alignment(sources, targets, data, gammas, batch_size, device, sgm_exclude, n)
    # Summed batch by batch in image order: N processes give one process's numbers exactly.
    sums = {g: {"cosine": {s: {t: _batched_sum(per_sample[(g, "cosine", s, t)], batch_size) for t in targets}
                           for s in sources},
                "sign_agreement": {s: {t: _batched_sum(per_sample[(g, "sign", s, t)], batch_size) for t in targets}
                                   for s in sources},
                "self_cosine": {s: _batched_sum(per_sample[(g, "self", s, None)], batch_size) for s in sources}}
            for g in gammas}

    def mean(value: Any) -> Any:
        return {k: mean(v) for k, v in value.items()} if isinstance(value, dict) else value / n

    return {"format": FORMAT, "num_samples": n, "gammas": gammas, "sgm_exclude": sgm_exclude, "sources": list(sources),
            "targets": list(targets), "by_gamma": {str(g): mean(sums[g]) for g in gammas}}


def _per_sample_alignment(sources: Mapping[str, nn.Module], targets: Mapping[str, nn.Module], data: Any,
                          gammas: Sequence[float], batch_size: int, device: torch.device, sgm_exclude: str,
                          n: int) -> dict[tuple, Tensor]:
    """Every per-sample cosine and sign agreement, over all ``n`` images (this process's batches gathered
    with the others')."""
    values: dict[tuple, list[Tensor]] = {}
    positions = []
    for batch in batches(data, batch_size, device):
        x, y = batch.x, batch.y
        positions.append(batch.positions)
        target_grads = {t: input_gradient(m, x, y) for t, m in targets.items()}
        for s, model in sources.items():
            true = target_grads[s] if s in target_grads else input_gradient(model, x, y)
            for gamma in gammas:
                grad = true if gamma == 1.0 else input_gradient(model, x, y, gamma, exclude=sgm_exclude)
                values.setdefault((gamma, "self", s, None), []).append(gradient_alignment(grad, true).cosine.cpu())
                for t, tgrad in target_grads.items():
                    aligned = gradient_alignment(grad, tgrad)
                    values.setdefault((gamma, "cosine", s, t), []).append(aligned.cosine.cpu())
                    values.setdefault((gamma, "sign", s, t), []).append(aligned.sign_agreement.cpu())
    where = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long)
    keys = [(g, kind, s, t) for g in gammas for s in sources
            for kind, t in [("self", None), *[(k, t) for t in targets for k in ("cosine", "sign")]]]
    return {key: gather_rows(where, torch.cat(values[key]) if key in values else torch.zeros(0), n) for key in keys}


def _batched_sum(values: Tensor, batch_size: int) -> float:
    """The sum of per-sample values as one process adds them: batch by batch, in order."""
    total = 0.0
    for start in range(0, len(values), batch_size):
        total += float(values[start:start + batch_size].sum())
    return total


def format_gradient_alignment(result: Mapping[str, Any]) -> str:
    """The result as text: one line per source and gamma."""
    lines = [f"input-gradient alignment on {result['num_samples']} samples (mean per-sample cosine; sign agreement)"]
    width = max(len(s) for s in result["sources"]) + 12
    header = "source (gamma)".ljust(width) + "self cos".rjust(9) + "".join(f"  {t:>24s}" for t in result["targets"])
    lines.append(header)
    for s in result["sources"]:
        for g in result["gammas"]:
            row = result["by_gamma"][str(g)]
            cells = "".join(f"  {row['cosine'][s][t]:>13.4f} ({row['sign_agreement'][s][t]:.4f})" for t in result["targets"])
            lines.append(f"{s} ({g:g})".ljust(width) + f"{row['self_cosine'][s]:9.4f}" + cells)
    return "\n".join(lines)


__all__ = ["FORMAT", "evaluate_gradient_alignment", "format_gradient_alignment", "input_gradient"]
