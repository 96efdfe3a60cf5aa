"""Benchmark: one epoch of dec-mode CNN pair training on MNIST, decorr against a paper-style loop.

Paper-style: torchvision's MNIST dataset with a per-sample ``ToTensor`` through a DataLoader (batch
1000, shuffled) and the paper's correlation loss (pseudo-inverse, N x N projection). Ours: one epoch of
``decorr.training.recipes.train_pair`` as ``train/pair_classifiers.py`` runs it (the one training loop, uint8 tensors
in memory, batches made on the fly, the closed-form correlation loss). "ours_s" is the training part of
the epoch as the loop times it (what the ``dec`` method's ``end_epoch`` receives), "ours_total_s" the whole call
(dataset load, model creation, an evaluation on ``--test-subset`` test images, the checkpoint write).
Same architecture, seed, optimiser and batch size; the two run one after the other in one process
(``--repeats`` times, interleaved) and the JSON reports the median times, the ratio, and both runs'
losses.

    python benchmarks/pair_epoch.py [--data-root ../shared/data] [--repeats 1]
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from decorr.training.entry import RunOptions
from decorr.data import load_dataset
from decorr.features import record_features
from decorr.models import create_model
from decorr.training.recipes import PairConfig, train_pair
from decorr.training.methods.independent import DecorrelatedTask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from correlation_loss import paper_correlation_loss  # noqa: E402

LAYER = "features.pool2"


def torchvision_root(dataset_source: str) -> Path:
    """torchvision's MNIST wants the un-gzipped files in ROOT/MNIST/raw: unpack them to a temp folder."""
    root = Path(tempfile.mkdtemp(prefix="mnist-tv-"))
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    source = Path(dataset_source)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        packed = source / f"{name}.gz"
        if packed.exists():
            with gzip.open(packed, "rb") as src, open(raw / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copy(source / name, raw / name)
    return root


def paper_style_epoch(models, optimizer, root: Path, batch_size: int, lambda_corr: float, seed: int) -> float:
    from torchvision import datasets, transforms

    data = datasets.MNIST(str(root), train=True, download=False, transform=transforms.ToTensor())
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    model0, model1 = models
    model0.train()
    model1.train()
    loss = torch.zeros(())
    for x, y in loader:
        with record_features(model0, LAYER) as f0, record_features(model1, LAYER) as f1:
            out0, out1 = model0(x), model1(x)
        ce0, ce1 = F.cross_entropy(out0, y), F.cross_entropy(out1, y)
        loss = torch.sqrt(ce0**2 + ce1**2) + lambda_corr * paper_correlation_loss(f0[LAYER], f1[LAYER])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--test-subset", type=int, default=1000, help="test images of ours' end-of-epoch evaluation")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    config = PairConfig(mode="dec", batch_size=args.batch_size, epochs=1, test_subset=args.test_subset)
    dataset = load_dataset("mnist", args.data_root, download=False)
    tv_root = torchvision_root(dataset.source)
    torch.manual_seed(config.seed)
    initial = (create_model("mnist_cnn"), create_model("mnist_cnn"))
    epoch_seconds: list[float] = []
    end_epoch = DecorrelatedTask.end_epoch

    def timed_end_epoch(self, epoch, terms, seconds):  # the loop's own timing of the epoch's training steps
        epoch_seconds.append(seconds)
        return end_epoch(self, epoch, terms, seconds)

    DecorrelatedTask.end_epoch = timed_end_epoch

    def fresh(start=initial):
        models = tuple(copy.deepcopy(m) for m in start)
        optimizer = torch.optim.Adam([p for m in models for p in m.parameters()], lr=config.lr)
        return models, optimizer

    ours_times, ours_totals, paper_times, ours_loss, paper_loss = [], [], [], [], []
    try:
        for repeat in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="pair_epoch_") as run_dir:
                start = time.perf_counter()
                metrics = train_pair(config, RunOptions(run_dir=Path(run_dir) / "run", data_root=args.data_root, cpu=True,
                                                        no_tensorboard=True))
                ours_totals.append(time.perf_counter() - start)
            ours_times.append(epoch_seconds[-1])
            ours_loss.append(metrics["train/loss"])

            models, optimizer = fresh()
            start = time.perf_counter()
            paper_loss.append(paper_style_epoch(models, optimizer, tv_root, config.batch_size, config.lambda_corr, repeat))
            paper_times.append(time.perf_counter() - start)
    finally:
        shutil.rmtree(tv_root, ignore_errors=True)
    ours = statistics.median(ours_times)
    paper = statistics.median(paper_times)
    report = {
        "benchmark": "pair_epoch",
        "setting": "MNIST, mnist_cnn dec pair, batch %d, one epoch" % config.batch_size,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "ours_s": round(ours, 2),
        "ours_total_s": round(statistics.median(ours_totals), 2),
        "paper_style_s": round(paper, 2),
        "speedup": round(paper / ours, 2),
        "speedup_total": round(paper / statistics.median(ours_totals), 2),
        "ours_mean_train_loss": ours_loss,
        "paper_style_last_batch_loss": paper_loss,
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
