"""Benchmark: one epoch of dec-mode CNN pair training on MNIST, decorr against a paper-style loop.

Paper-style: torchvision's MNIST dataset with a per-sample ``ToTensor`` through a DataLoader (batch
1000, shuffled) and the paper's correlation loss (pseudo-inverse, N x N projection). Ours:
``decorr.pairs.train_epoch`` on uint8 tensors in memory, batches made on the fly, the closed-form
correlation loss. Same models, same initial weights, same optimiser; the two epochs run one after the
other in one process (``--repeats`` times, interleaved) and the JSON reports the median times, the ratio,
and both runs' final losses.

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

from decorr.data import iterate_batches, load_dataset
from decorr.features import record_features
from decorr.models import create_model
from decorr.pairs import PairConfig, train_epoch

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
    args = parser.parse_args()
    config = PairConfig(mode="dec", batch_size=args.batch_size)
    dataset = load_dataset("mnist", args.data_root, download=False)
    tv_root = torchvision_root(dataset.source)
    torch.manual_seed(0)
    initial = (create_model("mnist_cnn"), create_model("mnist_cnn"))
    # Ours as train_pair runs it: channels-last weights (the paper-style loop keeps the default layout).
    ours_initial = tuple(copy.deepcopy(m).to(memory_format=torch.channels_last) for m in initial)

    def fresh(start=initial):
        models = tuple(copy.deepcopy(m) for m in start)
        optimizer = torch.optim.Adam([p for m in models for p in m.parameters()], lr=config.lr)
        return models, optimizer

    ours_times, paper_times, ours_loss, paper_loss = [], [], [], []
    try:
        for repeat in range(args.repeats):
            models, optimizer = fresh(ours_initial)
            start = time.perf_counter()
            terms = train_epoch(models[0], models[1], optimizer,
                                iterate_batches(dataset.train, config.batch_size, seed=repeat, epoch=0), config)
            ours_times.append(time.perf_counter() - start)
            ours_loss.append(terms["loss"])

            models, optimizer = fresh()
            start = time.perf_counter()
            paper_loss.append(paper_style_epoch(models, optimizer, tv_root, config.batch_size, config.lambda_corr, repeat))
            paper_times.append(time.perf_counter() - start)
    finally:
        shutil.rmtree(tv_root, ignore_errors=True)
    ours = statistics.median(ours_times)
    paper = statistics.median(paper_times)
    print(json.dumps({
        "benchmark": "pair_epoch",
        "setting": "MNIST, mnist_cnn dec pair, batch %d, one epoch" % config.batch_size,
        "threads": torch.get_num_threads(),
        "ours_s": round(ours, 2),
        "paper_style_s": round(paper, 2),
        "speedup": round(paper / ours, 2),
        "ours_mean_train_loss": ours_loss,
        "paper_style_last_batch_loss": paper_loss,
    }, indent=2))


if __name__ == "__main__":
    main()
