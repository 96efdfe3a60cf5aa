"""Run under ``torchrun --nproc_per_node 2``: correlation_loss on a split batch, value and gradients.

Rank 0 writes the loss and the full-batch gradients (gathered) to ``sys.argv[1]`` as safetensors.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from decorr.loss import correlation_loss


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z1 = torch.relu(torch.randn(301, 40, generator=g))
    z2 = z1 @ torch.randn(40, 24, generator=g) * 0.2 + torch.randn(301, 24, generator=g)
    return z1, z2


def main() -> None:
    backend = os.environ.get("DECORR_TEST_BACKEND", "gloo")
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    z1, z2 = batch()
    # Uneven shards on purpose (301 samples): the gather must handle them.
    a = torch.tensor_split(z1, world)[rank].to(device).clone().requires_grad_()
    b = torch.tensor_split(z2, world)[rank].to(device).clone().requires_grad_()
    loss = correlation_loss(a, b)
    loss.backward()
    grads_a = [torch.zeros(0)] * world
    grads_b = [torch.zeros(0)] * world
    dist.all_gather_object(grads_a, a.grad.cpu())
    dist.all_gather_object(grads_b, b.grad.cpu())
    if rank == 0:
        # Data-parallel training averages gradients over processes: report that average.
        save_file({"loss": loss.detach().cpu().reshape(1), "grad_z1": torch.cat(grads_a) / world,
                   "grad_z2": torch.cat(grads_b) / world}, sys.argv[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
