"""Collectives that keep gradients, so losses that couple samples see the global batch.

``torch.distributed.all_gather`` cuts the autograd graph. The correlation loss (and the
sqrt-of-squares objectives) need every process to compute the loss of the *global* batch and send the
gradient of each sample back to the process that owns it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every process's tensor along dim 0 (shards may differ in length).

    Backward: every process computed the same loss of the global batch, so the gradient of one
    process's shard is the sum over processes of their gradients for that shard (all-reduce), exactly
    what ``torch.distributed.nn.all_gather`` does. Data-parallel training then averages parameter
    gradients over processes, which turns that sum back into the gradient of the global loss.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n_world = dist.get_world_size()
        local_len = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        lengths = [torch.zeros_like(local_len) for _ in range(n_world)]
        dist.all_gather(lengths, local_len)
        sizes = torch.cat(lengths).tolist()  # one host read for all ranks' lengths
        longest = max(sizes)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        pieces = [torch.empty_like(padded) for _ in range(n_world)]
        dist.all_gather(pieces, padded.contiguous())
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The global batch (all processes' ``x`` concatenated in rank order); identity in one process."""
    if not is_distributed():
        return x
    return _AllGatherWithGrad.apply(x)


def global_mean(per_sample: torch.Tensor) -> torch.Tensor:
    """Mean of a per-sample quantity over the global batch, with gradient (the batch mean of 1 process)."""
    return all_gather_with_grad(per_sample).mean()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over processes, without gradient (for metrics and counts)."""
    if not is_distributed():
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a data-parallel wrapper (DDP keeps it as ``.module``)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def launched_processes() -> int:
    """How many processes the launcher (``torchrun``, ``accelerate launch``) started: ``$WORLD_SIZE``, else 1."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def start_processes(device: torch.device) -> torch.device:
    """Join the launcher's process group (gloo on the CPU, NCCL on GPUs; through accelerate, which reads
    ``torchrun``'s and ``accelerate launch``'s environment) when several processes were launched, and
    return this process's device: ``device`` itself, or on GPUs the local rank's GPU. One process: nothing
    to join, ``device`` as it is."""
    if launched_processes() == 1 or is_distributed():
        return _local(device)
    from accelerate import PartialState

    PartialState(cpu=device.type == "cpu")
    return _local(device)


def _local(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank())) % max(torch.cuda.device_count(), 1))
    return device


def barrier() -> None:
    """Wait for every process (nothing to wait for in one process)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(value: object) -> object:
    """The main process's ``value`` on every process (e.g. a path it chose)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
