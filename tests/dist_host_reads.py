"""Count the host reads (device synchronisations on a GPU) of one data-parallel CIFAR DNA training step.

Run under ``torchrun --nproc_per_node 2 tests/dist_host_reads.py OUT_DIR`` (gloo on CPU). Each process
takes two steps of the real stage-1 code (``dna.training``: the global-batch objective, the correlation
loss, batch norm over the global batch) and counts, during the second, every call that reads a tensor
back to Python: ``.item()``, ``.tolist()``, ``.cpu()``, ``bool()``, ``float()``, ``int()``. The optimiser's
own step is not counted (torch.optim's Adam reads its step counters; that is PyTorch's, and on CUDA its
counters stay on the host). Writes ``OUT_DIR/reads_rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from decorr.training.batchnorm import convert_sync_batchnorm
from decorr.data import Augment, ImageSplit
from decorr.models import create_model
from decorr.training.run import TrainingRun
from dna.config import DnaConfig
from dna.steps import accumulated_step, autoencoder_objective, optimizer_steps

READERS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__")


@contextmanager
def counting_reads(counts: dict[str, int]):
    originals = {name: getattr(torch.Tensor, name) for name in READERS}

    def wrap(name):
        original = originals[name]

        def counted(self, *args, **kwargs):
            if counts.get("_on", 0):
                counts[name] = counts.get(name, 0) + 1
            return original(self, *args, **kwargs)
        return counted

    for name in READERS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = DnaConfig.paper("cifar", batch_size=452, sync_bn=True)
    g = torch.Generator().manual_seed(1)
    split = ImageSplit(torch.randint(0, 256, (904, 3, 32, 32), generator=g, dtype=torch.uint8),
                       torch.randint(0, 10, (904,), generator=g))
    with tempfile.TemporaryDirectory() as run_dir:
        run = TrainingRun(Path(run_dir), {"kind": "dna"}, seed=0, cpu=True, log=False)
        model = convert_sync_batchnorm(create_model(config.autoencoder_arch, **config.autoencoder_kwargs))
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        counts: dict[str, int] = {}
        original_step = optimizer.step

        def uncounted_step(*args, **kwargs):
            on, counts["_on"] = counts.get("_on", 0), 0
            try:
                return original_step(*args, **kwargs)
            finally:
                counts["_on"] = on

        optimizer.step = uncounted_step
        prepared, optimizer = run.prepare(model, optimizer)
        steps = optimizer_steps(split, config, 1, 0, Augment(crop_padding=4, flip=True), run)
        objective = lambda x, y: autoencoder_objective(prepared, x, config.lambda_corr)  # noqa: E731
        with counting_reads(counts):
            accumulated_step(run, prepared, optimizer, next(steps), objective)  # warm-up, not counted
            counts["_on"] = 1
            accumulated_step(run, prepared, optimizer, next(steps), objective)
            counts["_on"] = 0
        counts.pop("_on")
        (out / f"reads_rank{run.accelerator.process_index}.json").write_text(json.dumps(counts))
        run.finish()


if __name__ == "__main__":
    main()
