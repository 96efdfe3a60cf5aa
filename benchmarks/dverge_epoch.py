"""Benchmark: a DVERGE epoch against the same feature distillations done by themselves.

The DVERGE epoch (``decorr.dverge.train_epoch``: per batch, one distillation per model, then the
training step of every model on the others' distilled examples) runs on the first ``--batches``
batches of an MNIST epoch, with the paper's settings (batch 1000, eps 0.15, 20 steps of 3/255 at
``features.pool2``). The baseline runs exactly those distillations (same batches, same models, same
number of PGD steps) and nothing else. The ratio is the training overhead; the issue asks for <= 1.5.
Both start from the same weights; they alternate ``--repeats`` times, the JSON reports the medians.

    OMP_NUM_THREADS=1 python benchmarks/dverge_epoch.py [--init runs/mnist_cnn_cor] [--batches 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from decorr.data import iterate_batches, load_dataset
from decorr.dverge import (
    TARGET_SEED_OFFSET,
    DvergeConfig,
    feature_distillation,
    load_init_models,
    train_epoch,
)
from decorr.models import create_model
from decorr.training import write_json

LAYER = "features.pool2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", nargs="*", default=[], help="starting checkpoints (default: two freshly initialised CNNs)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--batches", type=int, default=10, help="batches of the epoch to time")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = DvergeConfig(batch_size=args.batch_size, steps=args.steps)
    dataset = load_dataset("mnist", args.data_root, download=False)
    split = dataset.train.subset(args.batches * args.batch_size)
    if args.init:
        initial = list(load_init_models(args.init)[0].values())
    else:
        torch.manual_seed(0)
        initial = [create_model("mnist_cnn"), create_model("mnist_cnn")]
    layers = [LAYER] * len(initial)

    def batches():
        sources = iterate_batches(split, config.batch_size, seed=config.seed, epoch=0)
        targets = iterate_batches(split, config.batch_size, seed=config.seed + TARGET_SEED_OFFSET, epoch=0)
        return zip(sources, targets)

    def dverge_epoch() -> float:
        models = [copy.deepcopy(m) for m in initial]
        optimizer = torch.optim.Adam([p for m in models for p in m.parameters()], lr=config.lr)
        start = time.perf_counter()
        train_epoch(models, optimizer, batches(), config, layers)
        return time.perf_counter() - start

    def distillation_only() -> float:
        models = [copy.deepcopy(m).eval() for m in initial]
        start = time.perf_counter()
        for (xs, _ys), (xt, _yt) in batches():
            for model in models:
                feature_distillation(model, xs, xt, layer=LAYER, eps=config.eps, steps=config.steps,
                                     step_size=config.step_size)
        return time.perf_counter() - start

    dverge_times, distill_times = [], []
    for _ in range(args.repeats):
        dverge_times.append(dverge_epoch())
        distill_times.append(distillation_only())
    dverge_s = statistics.median(dverge_times)
    distill_s = statistics.median(distill_times)
    result = {
        "benchmark": "dverge_epoch",
        "setting": (f"MNIST mnist_cnn x{len(initial)}, {args.batches} batches of {args.batch_size}, distillation "
                    f"eps {config.eps} x {config.steps} steps of {config.step_size:.5f} at {LAYER}"),
        "init": args.init or "fresh models (seed 0)",
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "dverge_epoch_s": round(dverge_s, 3),
        "distillation_only_s": round(distill_s, 3),
        "ratio": round(dverge_s / distill_s, 3),
        "dverge_times_s": [round(t, 3) for t in dverge_times],
        "distillation_times_s": [round(t, 3) for t in distill_times],
        "distillation_forward_backward_passes": len(initial) * args.batches * config.steps,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(Path(args.json), result)


if __name__ == "__main__":
    main()
