"""One training step through the real training code on a fixed global batch, in N processes.

Run under ``torchrun --nproc_per_node 2 tests/dist_dna_step.py OUT_DIR [CASE ...]`` (gloo on CPU, each
process its shard of the batch), or call :func:`run_case` in one process for the reference on the
whole batch. Every process writes ``OUT_DIR/<case>_rank<r>.safetensors``: the loss, the gradients the
optimiser used (after the data-parallel all-reduce) and the weights and buffers after the step;
``tests/test_dna_distributed.py`` compares them.

Cases: ``mnist`` (the MNIST DNA), ``mnist_accumulate`` (with 2 accumulation steps), ``cifar_sync_bn``
(the CIFAR-10 DNA with ``sync_bn``), and ``batchnorm_global`` / ``batchnorm_local``, a small
conv + batch-norm net with and without :func:`decorr.training.batchnorm.convert_sync_batchnorm` (the local one
must differ from the whole-batch reference: that shows the comparison can fail).

Models and batches are float64: the test checks that N processes compute the same function as one.
In float32 the rounding differences of another batch split are amplified up to ~1e-3 in some
gradients of a freshly initialised CIFAR-10 autoencoder on random images (batch-norm backward cancels
large terms), which would blur a real mismatch of that size. Gradients are compared as well as the
weights because Adam's first step is close to lr * sign(gradient) and hides a wrongly scaled gradient.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from decorr.training.batchnorm import convert_sync_batchnorm
from decorr.data import Augment, ImageSplit
from decorr.distributed import all_gather_with_grad
from decorr.models import create_model
from decorr.training.run import TrainingRun
from decorr.distributed import unwrap
from dna.config import DnaConfig
from dna.steps import accumulated_step, autoencoder_objective, optimizer_steps

#: DNA cases: name -> (family, global batch, sync_bn, gradient accumulation steps). The batches exceed
#: the latent width (64 / 448) by a little, to keep the step fast.
DNA_CASES = {
    "mnist": ("mnist", 132, None, 1),
    "mnist_accumulate": ("mnist", 264, None, 2),
    # None: the default, batch norm over the global batch (no --no-sync-bn)
    "cifar_sync_bn": ("cifar", 452, None, 1),
}
BATCHNORM_CASES = {"batchnorm_global": True, "batchnorm_local": False}
CASES = [*DNA_CASES, *BATCHNORM_CASES]


def images(shape: tuple[int, ...], n: int) -> ImageSplit:
    """A fixed batch of ``n`` random uint8 images (as datasets are stored) and labels."""
    g = torch.Generator().manual_seed(1234)
    return ImageSplit(torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
                      torch.randint(0, 10, (n,), generator=g))


def small_bn_net() -> nn.Module:
    """Conv + BatchNorm2d, and a BatchNorm1d with a cumulative average (momentum None)."""
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 6 * 6, 10), nn.BatchNorm1d(10, momentum=None))


def _step(out: Path, name: str, model: nn.Module, config: DnaConfig, split: ImageSplit, augment: Augment | None,
          objective: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]) -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        run = TrainingRun(Path(run_dir), {"kind": "dna"}, seed=0, cpu=True, log=False,
                          gradient_accumulation_steps=config.gradient_accumulation_steps)
        model = model.double()
        if config.sync_bn:
            model = convert_sync_batchnorm(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        names = {id(p): n for n, p in model.named_parameters()}
        grads: dict[str, torch.Tensor] = {}

        def keep_grads(opt: torch.optim.Optimizer, *_: object) -> None:
            for group in opt.param_groups:
                for p in group["params"]:
                    grads[f"grad.{names[id(p)]}"] = p.grad.detach().clone()

        optimizer.register_step_pre_hook(keep_grads)
        prepared, optimizer = run.prepare(model, optimizer)
        group = next(optimizer_steps(split, config, 1, 0, augment, run))
        terms = accumulated_step(run, prepared, optimizer, group, lambda x, y: objective(prepared, x.double(), y))
        state = {f"state.{k}": v.detach().clone() for k, v in unwrap(prepared).state_dict().items()}
        tensors = {"loss": terms["loss"].reshape(1), **grads, **state}
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  str(out / f"{name}_rank{run.accelerator.process_index}.safetensors"))
        run.finish()


def _cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    loss = all_gather_with_grad(F.cross_entropy(model(x), y, reduction="none")).mean()
    return loss, {"loss": loss.detach()}


def run_case(name: str, out: str | Path) -> None:
    """Run one case in this process (one process: the whole batch) and write its file to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if name in DNA_CASES:
        family, batch, sync_bn, accumulate = DNA_CASES[name]
        config = DnaConfig.paper(family, batch_size=batch, gradient_accumulation_steps=accumulate,
                                 **({} if sync_bn is None else {"sync_bn": sync_bn}))
        model = create_model(config.autoencoder_arch, **config.autoencoder_kwargs)
        augment = None if family == "mnist" else Augment(crop_padding=4, flip=True)
        _step(out, name, model, config, images(config.input_shape, batch), augment,
              lambda m, x, y: autoencoder_objective(m, x, config.lambda_corr))
    elif name in BATCHNORM_CASES:
        config = DnaConfig(batch_size=30, sync_bn=BATCHNORM_CASES[name])
        _step(out, name, small_bn_net(), config, images((3, 8, 8), 30), None, _cross_entropy)
    else:
        raise SystemExit(f"unknown case {name!r}; choose from {', '.join(CASES)}")


def main() -> None:
    torch.set_num_threads(1)
    for name in sys.argv[2:] or CASES:
        run_case(name, sys.argv[1])


if __name__ == "__main__":
    main()
