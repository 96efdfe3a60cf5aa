"""One stage-1 DNA training step, through the real training code, on a fixed global batch.

Run as ``python tests/dist_dna_step.py OUT_DIR`` (one process, the whole batch) or under
``torchrun --nproc_per_node 2`` (gloo on CPU, each process its shard). Every process writes
``OUT_DIR/<case>_rank<r>.safetensors`` with the loss, the gradients the optimiser used (after the
data-parallel all-reduce) and the weights and buffers after the step; ``tests/test_dna_distributed.py``
compares the runs. Cases: the MNIST DNA (plain and with 2 accumulation steps), the CIFAR-10 DNA with
``sync_bn`` and, to show that the comparison can fail, the CIFAR-10 DNA without it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from decorr.batchnorm import convert_sync_batchnorm
from decorr.data import ImageSplit
from decorr.models import create_model
from decorr.training import TrainingRun, unwrap
from dna.training import DnaConfig, _optimizer_steps, accumulated_step, autoencoder_objective

#: name -> (family, global batch, sync_bn, gradient accumulation steps). Batches exceed the latent
#: width (64 / 448) by a little, to keep the step fast.
CASES = {
    "mnist": ("mnist", 132, False, 1),
    "mnist_accumulate": ("mnist", 264, False, 2),
    "cifar_sync_bn": ("cifar", 452, True, 1),
    "cifar_local_bn": ("cifar", 452, False, 1),
}


def images(family: str, n: int) -> ImageSplit:
    """A fixed batch of ``n`` random images (uint8, as datasets are stored) and labels."""
    g = torch.Generator().manual_seed(1234)
    shape = (1, 28, 28) if family == "mnist" else (3, 32, 32)
    return ImageSplit(torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
                      torch.randint(0, 10, (n,), generator=g))


def run_case(name: str, out: Path) -> None:
    family, batch, sync_bn, accumulate = CASES[name]
    config = DnaConfig.paper(family, batch_size=batch, sync_bn=sync_bn, gradient_accumulation_steps=accumulate)
    with tempfile.TemporaryDirectory() as run_dir:
        run = TrainingRun(Path(run_dir), {"kind": "dna"}, seed=0, cpu=True, log=False,
                          gradient_accumulation_steps=accumulate)
        torch.manual_seed(0)
        model = create_model(config.autoencoder_arch, **config.autoencoder_kwargs)
        if sync_bn:
            model = convert_sync_batchnorm(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        captured: dict[str, torch.Tensor] = {}
        names = {id(p): n for n, p in model.named_parameters()}

        def keep_grads(opt: torch.optim.Optimizer, *_: object) -> None:
            for group in opt.param_groups:
                for p in group["params"]:
                    captured[f"grad.{names[id(p)]}"] = p.grad.detach().clone()

        optimizer.register_step_pre_hook(keep_grads)
        prepared, optimizer = run.prepare(model, optimizer)
        split = images(family, batch)
        augment = None if family == "mnist" else config_augment()
        group = next(_optimizer_steps(split, config, 1, 0, augment, run))
        terms = accumulated_step(run, prepared, optimizer, group,
                                 lambda x, y: autoencoder_objective(prepared, x, config.lambda_corr))
        state = {f"state.{k}": v.detach().clone() for k, v in unwrap(prepared).state_dict().items()}
        tensors = {"loss": terms["loss"].reshape(1), **captured, **state}
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  str(out / f"{name}_rank{run.accelerator.process_index}.safetensors"))
        run.finish()


def config_augment():
    from decorr.data import Augment

    return Augment(crop_padding=4, flip=True)


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name in sys.argv[2:] or CASES:
        run_case(name, out)


if __name__ == "__main__":
    main()
