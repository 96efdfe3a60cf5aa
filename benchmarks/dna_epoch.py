"""Benchmark: one epoch of the CIFAR DNA (stage 1) through decorr's trainer against a bare training loop.

"ours" is ``dna.training.train_autoencoder`` (accelerate, the global-batch objective, the non-finite
guard, evaluation on ``--test-subset`` images and the checkpoint); "bare" is a plain PyTorch loop over the
same batches (same augmentation, same objective: sqrt(MSE1^2 + MSE2^2) + lambda * L_corr, Adam),
with no evaluation and no checkpoint. Both run in one process, alternately, on the same device and
precision. Reports seconds per epoch, training images per second, their ratio (goal: ours within 1.3x of
bare), and on CUDA the number of host synchronisations per training step, counted by
``torch.cuda.set_sync_debug_mode("warn")`` over one extra epoch of each.

    python benchmarks/dna_epoch.py --dataset ../shared/data/cifar10-subset/cifar10_subset.npz \\
        --device cuda --mixed-precision bf16 --json benchmarks/results/dna_epoch_gpu.json
On CPU (``--device cpu``) it runs the same code at any size (``--train-subset``), for checking the script.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch

from decorr.training.entry import RunOptions
from decorr.data import dataset_augment, iterate_batches, load_dataset
from decorr.loss import correlation_loss
from decorr.models import create_model
from dna.models import forward_with_latents
from dna.objectives import autoencoder_loss_from_errors, reconstruction_errors
from dna.config import DnaConfig
from dna.training import train_autoencoder

REPO = Path(__file__).resolve().parents[1]
CIFAR_SUBSET = REPO.parent / "shared" / "data" / "cifar10-subset" / "cifar10_subset.npz"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_epoch(dataset, config: DnaConfig, device: torch.device, precision: str, epoch: int) -> int:
    """The same computation as one stage-1 epoch, written as a plain loop; returns the number of steps."""
    torch.manual_seed(config.seed)
    model = create_model(config.autoencoder_arch, **config.autoencoder_kwargs).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    augment = dataset_augment(dataset) if config.augment else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    steps = 0
    for x, _ in iterate_batches(dataset.train, config.batch_size, shuffle=True, seed=config.seed, epoch=epoch,
                                drop_last=True, augment=augment, device=device):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            recons, latents = forward_with_latents(model, x)
            errors = reconstruction_errors([r.float() for r in recons], x.float())
            loss = autoencoder_loss_from_errors(errors, latents, config.lambda_corr, corr_fn=correlation_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    return steps


def ours_epoch(dataset, config: DnaConfig, device: torch.device, precision: str, run_dir: Path) -> None:
    train_autoencoder(config, RunOptions(run_dir=run_dir, dataset=dataset, mixed_precision=precision, cpu=device.type == "cpu", no_tensorboard=True))


def count_syncs(fn) -> int:
    """How many host synchronisations ``fn()`` makes on CUDA (0 on CPU, where there is nothing to count)."""
    if not torch.cuda.is_available():
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(CIFAR_SUBSET))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="bf16")
    parser.add_argument("--batch-size", type=int, default=1250, help="the paper's CIFAR batch")
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--test-subset", type=int, default=250, help="evaluation images of 'ours' after the epoch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and args.mixed_precision == "fp16":
        raise SystemExit("error: fp16 needs a GPU; use --mixed-precision bf16 or no")
    dataset = load_dataset(args.dataset).subset(train=args.train_subset, test=args.test_subset)
    config = DnaConfig.paper("cifar", dataset=args.dataset, epochs=1, batch_size=args.batch_size, image_samples=0,
                             train_subset=args.train_subset, test_subset=args.test_subset)
    ours_s, bare_s = [], []
    with tempfile.TemporaryDirectory(prefix="dna_epoch_") as tmp:
        for repeat in range(args.repeats):
            _sync(device)
            tick = time.perf_counter()
            ours_epoch(dataset, config, device, args.mixed_precision, Path(tmp) / f"ours{repeat}")
            _sync(device)
            ours_s.append(time.perf_counter() - tick)
            tick = time.perf_counter()
            steps = bare_epoch(dataset, config, device, args.mixed_precision, epoch=0)
            _sync(device)
            bare_s.append(time.perf_counter() - tick)
        syncs_ours = count_syncs(lambda: ours_epoch(dataset, config, device, args.mixed_precision, Path(tmp) / "sync"))
        syncs_bare = count_syncs(lambda: bare_epoch(dataset, config, device, args.mixed_precision, epoch=0))
    images = steps * args.batch_size
    report = {
        "benchmark": "dna_epoch",
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "mixed_precision": args.mixed_precision, "batch_size": args.batch_size, "steps_per_epoch": steps,
        "train_images": len(dataset.train), "test_images_ours": len(dataset.test),
        "ours_s": [round(t, 3) for t in ours_s], "bare_s": [round(t, 3) for t in bare_s],
        "ours_images_per_s": round(images / min(ours_s), 1), "bare_images_per_s": round(images / min(bare_s), 1),
        "ratio_best": round(min(ours_s) / min(bare_s), 3),
        "host_syncs_per_step": {"ours_epoch_including_eval_and_save": round(syncs_ours / max(steps, 1), 2),
                                "bare": round(syncs_bare / max(steps, 1), 2)} if device.type == "cuda" else None,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
