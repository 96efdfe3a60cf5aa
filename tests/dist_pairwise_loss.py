"""Run under ``torchrun --nproc_per_node 2``: pairwise_correlation_loss on a split batch, value and gradients.

Rank 0 writes the loss and every member's full-batch gradient (gathered) to ``sys.argv[1]`` as safetensors.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from decorr.loss import pairwise_correlation_loss


def batch() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(301, 6, generator=g)
    return [torch.relu(base @ torch.randn(6, m, generator=g) + torch.randn(301, m, generator=g)) for m in (30, 24, 40)]


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # Uneven shards on purpose (301 samples): the gather must handle them.
    shards = [torch.tensor_split(z, world)[rank].clone().requires_grad_() for z in batch()]
    loss = pairwise_correlation_loss(shards, "both")
    loss.backward()
    out = {"loss": loss.detach().reshape(1)}
    for m, shard in enumerate(shards):
        grads = [torch.zeros(0)] * world
        dist.all_gather_object(grads, shard.grad)
        out[f"grad_{m}"] = torch.cat(grads) / world  # data-parallel training averages over processes
    if rank == 0:
        save_file(out, sys.argv[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
