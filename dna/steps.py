"""One optimiser step of either DNA stage: the objectives of a micro-batch, an epoch's micro-batches, the step.

The objectives see this process's shard of the global batch and gather what the global batch needs
(per-sample errors, latents, per-sample cross-entropy) with gradient, so N processes train like one
(see :mod:`dna.training`).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from decorr.data import Augment, ImageSplit, iterate_batches
from decorr.distributed import all_gather_with_grad
from decorr.training.loop import train_step
from decorr.loss import correlation_loss
from decorr.features import eval_mode
from decorr.training.run import TrainingRun
from decorr.distributed import unwrap
from dna.models import forward_with_latents
from dna.objectives import autoencoder_loss_from_errors, reconstruction_errors

from dna.config import DnaConfig

# ------------------------------------------------------------------------------------------------
# Objectives (one micro-batch; the global batch is gathered inside)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    # Reduced precision (autocast) is upcast; float64 (used by the exactness tests) is kept.
    return t if t.dtype == torch.float64 else t.float()


def autoencoder_objective(
    autoencoder: nn.Module, x: torch.Tensor, lambda_corr: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage-1 loss of the global batch (``x`` is this process's shard) and its terms for logging.

    The per-sample reconstruction errors are gathered with gradient, so the MSE of each path is the
    global batch's; the correlation loss gathers the latents itself. Reconstruction errors and the
    correlation loss are computed in float32 under autocast.
    """
    recons, latents = forward_with_latents(autoencoder, x)
    errors = reconstruction_errors([_at_least_float32(r) for r in recons], _at_least_float32(x))  # [P, n_local]
    errors = all_gather_with_grad(errors.T.contiguous()).T  # [P, N]: the global batch
    corr_values: list[torch.Tensor] = []

    def corr_fn(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        value = correlation_loss(z1, z2)
        corr_values.append(value.detach())
        return value

    loss = autoencoder_loss_from_errors(errors, latents, lambda_corr, corr_fn=corr_fn)
    mse = errors.detach().mean(dim=1)
    terms = {f"mse{n}": mse[n] for n in range(len(mse))}
    if corr_values:
        terms["corr"] = torch.stack(corr_values).sum()
    terms["loss"] = loss.detach()
    return loss, terms


def classifier_objective(
    autoencoder: nn.Module, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage-2 loss: mean cross-entropy over every path's reconstruction of the global batch.

    The autoencoder is frozen (no gradient); the classifier sees all reconstructions of the shard at
    once, so its batch norm (CIFAR-10) normalises over both paths' reconstructions together.
    """
    with torch.no_grad():
        recons = autoencoder(x)
    inputs = torch.cat([r.detach() for r in recons])
    labels = y.repeat(len(recons))
    per_sample = F.cross_entropy(_at_least_float32(classifier(inputs)), labels, reduction="none")
    loss = all_gather_with_grad(per_sample).mean()
    return loss, {"ce": loss.detach()}


# ------------------------------------------------------------------------------------------------
# Evaluation during training


@torch.no_grad()
def _device_of(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def latent_width(autoencoder: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Number of features of one path's latent (64 for MNIST, 448 for CIFAR-10)."""
    model = unwrap(autoencoder)
    with eval_mode(model):
        _, latents = forward_with_latents(model, torch.zeros(1, *input_shape, device=_device_of(model)))
    return int(latents[0][0].numel())


# ------------------------------------------------------------------------------------------------
# Training loop pieces


def optimizer_steps(
    split: ImageSplit, config: DnaConfig, stage: int, epoch: int, augment: Augment | None,
    run: TrainingRun,
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The micro-batches of each optimiser step of one epoch (``gradient_accumulation_steps`` each).

    Micro-batches are whole global batches, sharded over processes, so the samples of every loss are
    the same for any number of processes. Incomplete batches at the end of an epoch are dropped: the
    correlation loss needs full batches.
    """
    k = config.gradient_accumulation_steps
    batches = iterate_batches(split, config.micro_batch_size(stage), shuffle=True, seed=config.seed, epoch=epoch,
                              drop_last=True, augment=augment, shard=run.shard, device=run.device)
    group: list[tuple[torch.Tensor, torch.Tensor]] = []
    for batch in batches:
        group.append(batch)
        if len(group) == k:
            yield group
            group = []


def _steps_per_epoch(n: int, config: DnaConfig, stage: int) -> int:
    return (n // config.micro_batch_size(stage)) // config.gradient_accumulation_steps


def accumulated_step(
    run: TrainingRun,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    objective: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
) -> dict[str, torch.Tensor]:
    """One optimiser step over ``micro_batches``; returns the loss terms averaged over them.

    :func:`decorr.training.loop.train_step`: each micro-batch in ``accelerator.accumulate``, so
    ``accelerator.backward`` divides its loss by the number of accumulation steps, and the
    data-parallel gradient all-reduce and the optimiser step run once, on the last micro-batch.
    """
    return train_step(optimizer, micro_batches, lambda batch: objective(*batch), accelerator=run.accelerator,
                      models=[model])


