"""Benchmark: a DVERGE epoch against the same feature distillations done by themselves.

The DVERGE epoch (per batch ``decorr.training.dverge.dverge_step``, the step the training loop runs: one
distillation per model, then the training step of every model on the others' distilled examples) runs on the first ``--batches``
batches of an MNIST epoch, with the paper's settings (batch 1000, eps 0.15, 20 steps of 3/255 at
``features.pool2``). The baseline runs exactly those distillations (same batches, same models, same
number of PGD steps) and nothing else. The ratio is the training overhead; the issue asks for <= 1.5.
Both start from the same weights and alternate batch by batch; over ``--repeats`` epochs the JSON
reports the median wall and CPU (``time.process_time``) times and their ratios.

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
from decorr.training.methods.dverge import TARGET_SEED_OFFSET, dverge_step, feature_distillation
from decorr.training.recipes import DvergeConfig
from decorr.training.ensemble import load_init_models
from decorr.models import create_model
from decorr.io import write_json

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

    def clocks() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    # The machine is shared, so the two are interleaved batch by batch (a slow spell hits both) and
    # both wall and CPU time (this process's own work, 1 thread) are kept.
    dverge_wall, dverge_cpu, distill_wall, distill_cpu = [], [], [], []
    for _ in range(args.repeats):
        models = [copy.deepcopy(m) for m in initial]
        optimizer = torch.optim.Adam([p for m in models for p in m.parameters()], lr=config.lr)
        baseline = [copy.deepcopy(m).eval() for m in initial]
        totals = [0.0, 0.0, 0.0, 0.0]
        for (xs, ys), (xt, yt) in batches():
            wall, cpu = clocks()
            dverge_step(models, optimizer, xs, ys, xt, config, layers)
            after_wall, after_cpu = clocks()
            totals[0] += after_wall - wall
            totals[1] += after_cpu - cpu
            wall, cpu = clocks()
            for model in baseline:
                feature_distillation(model, xs, xt, layer=LAYER, eps=config.eps, steps=config.steps,
                                     step_size=config.step_size)
            after_wall, after_cpu = clocks()
            totals[2] += after_wall - wall
            totals[3] += after_cpu - cpu
        dverge_wall.append(totals[0])
        dverge_cpu.append(totals[1])
        distill_wall.append(totals[2])
        distill_cpu.append(totals[3])
    med = statistics.median
    result = {
        "benchmark": "dverge_epoch",
        "setting": (f"MNIST mnist_cnn x{len(initial)}, {args.batches} batches of {args.batch_size}, distillation "
                    f"eps {config.eps} x {config.steps} steps of {config.step_size:.5f} at {LAYER}"),
        "init": args.init or "fresh models (seed 0)",
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "dverge_epoch_cpu_s": round(med(dverge_cpu), 3),
        "distillation_only_cpu_s": round(med(distill_cpu), 3),
        "ratio_cpu": round(med(dverge_cpu) / med(distill_cpu), 3),
        "dverge_epoch_wall_s": round(med(dverge_wall), 3),
        "distillation_only_wall_s": round(med(distill_wall), 3),
        "ratio_wall": round(med(dverge_wall) / med(distill_wall), 3),
        "per_repeat_ratio_cpu": [round(a / b, 3) for a, b in zip(dverge_cpu, distill_cpu)],
        "per_repeat_ratio_wall": [round(a / b, 3) for a, b in zip(dverge_wall, distill_wall)],
        "distillation_forward_backward_passes": len(initial) * args.batches * config.steps,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(Path(args.json), result)


if __name__ == "__main__":
    main()
