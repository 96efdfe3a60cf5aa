"""What several methods' objectives share: checks of per-member tensors, the members' summed cross-entropy,
their input gradients kept differentiable (GAL, TRS), pairwise cosines, and per-epoch random streams."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from decorr.errors import DecorrError

__all__ = ["ce_or_zero", "check_labels", "coefficient", "input_gradients", "member_input_gradients", "member_tensors", "pairwise_cosine",
           "stream_generator", "sum_ce", "with_loss"]

# The authors' offsets: DVERGE train/train_adp.py and TRS train/Empirical/trainer.py (ADP_Trainer:
# ``1e-20`` in the entropy's log, ``1e-6 * I`` in the log-det; GAL_Trainer: ``1e-20`` in the log).
LOG_OFFSET = 1e-20
DET_OFFSET = 1e-6


def stream_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator for one purpose (``stream``) in one epoch; unrelated across the three numbers."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(stream)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def member_tensors(values: Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    if isinstance(values, torch.Tensor) or not all(isinstance(v, torch.Tensor) for v in values):
        raise DecorrError(f"{name} must be a sequence (list or tuple) of tensors, one per member")
    values = list(values)
    if len(values) < 2:
        raise DecorrError(f"{name}: an ensemble objective needs at least 2 members, got {len(values)}")
    for m, v in enumerate(values[1:], start=1):
        if v.shape != values[0].shape:
            raise DecorrError(f"{name}: every member must have the same shape, got {tuple(values[0].shape)} "
                              f"for member 0 and {tuple(v.shape)} for member {m}")
    if values[0].dim() < 2 or values[0].shape[0] == 0:
        raise DecorrError(f"{name}: expected (batch, ...) tensors with a non-empty batch, "
                          f"got shape {tuple(values[0].shape)}")
    return values

def coefficient(name: str, value: float, *, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise DecorrError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)

def check_labels(y: torch.Tensor, logits: list[torch.Tensor], name: str = "logits") -> None:
    if logits[0].dim() != 2 or logits[0].shape[1] < 2:
        raise DecorrError(f"{name} must be (batch, classes) with at least 2 classes, "
                          f"got shape {tuple(logits[0].shape)}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != logits[0].shape[0] or y.is_floating_point():
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise DecorrError(f"y must be a 1-D tensor of {logits[0].shape[0]} integer class labels, got {shape}")

def sum_ce(logits: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Sum over members of each member's batch-mean cross-entropy."""
    return torch.stack([F.cross_entropy(z, y) for z in logits]).sum()

def member_input_gradients(
    models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, *, create_graph: bool = True
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(input gradients, logits) of every member: ``d CE_m(model_m(x), y) / dx``, CE the batch mean.

    As in the authors' code (DVERGE ``train_gal.py``, TRS ``trainer.py``) the loss differentiated is
    ``nn.CrossEntropyLoss()`` of the whole batch, so a sample's gradient is 1/batch times that of its own
    loss: cosines do not care, TRS's smoothness term does (it is on this scale in their code). With
    ``create_graph=True`` the gradients are differentiable w.r.t. the parameters (double backprop); the
    logits keep their graph either way, for the CE terms. ``x`` is detached first: no gradient flows
    back into whatever produced it.
    """
    return input_gradients(models, x.detach().requires_grad_(True), y, create_graph=create_graph)

def input_gradients(models, x: torch.Tensor, y: torch.Tensor, *, create_graph: bool):
    if isinstance(models, nn.Module) or len(models) < 2:
        raise DecorrError("models must be a sequence of at least 2 modules, one per member")
    grads, logits = [], []
    for model in models:
        z = model(x)
        if z.dim() != 2 or z.shape[0] != x.shape[0]:
            raise DecorrError(f"a member returned shape {tuple(z.shape)}; expected (batch, classes) logits")
        check_labels(y, [z])
        (g,) = torch.autograd.grad(F.cross_entropy(z, y), x, create_graph=create_graph, retain_graph=True)
        grads.append(g)
        logits.append(z)
    return grads, logits

def pairwise_cosine(input_grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """(batch, pairs) cosine similarities of the members' flattened per-sample gradients, pairs i < j.

    ``F.cosine_similarity`` on ``grad.flatten(1)``, as DVERGE ``train_gal.py`` and TRS ``trainer.py``
    (its ``eps`` 1e-8 keeps a zero gradient at cosine 0).
    """
    grads = [g.flatten(start_dim=1) for g in member_tensors(input_grads, "input_grads")]
    count = len(grads)
    return torch.stack([F.cosine_similarity(grads[i], grads[j], dim=-1)
                        for i in range(count) for j in range(i + 1, count)], dim=-1)

def ce_or_zero(logits, y, count: int, batch: int, like: torch.Tensor) -> torch.Tensor:
    if logits is None and y is None:
        return like.new_zeros(())
    if logits is None or y is None:
        raise DecorrError("give both logits and y (for the CE terms), or neither")
    logits = member_tensors(logits, "logits")
    if len(logits) != count or logits[0].shape[0] != batch:
        raise DecorrError(f"logits must hold one (batch {batch}, classes) tensor per member ({count}), "
                          f"got {len(logits)} of shape {tuple(logits[0].shape)}")
    check_labels(y, logits)
    return sum_ce(logits, y)


def with_loss(loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, terms)`` with the detached loss among the logged terms."""
    return loss, {**terms, "loss": loss.detach()}
