"""Benchmark: seconds per training epoch of every ensemble method against ``ce`` on the same data.

Each method trains N = 3 ``mnist_cnn`` members (``dec-frozen``: one model beside a frozen surrogate)
for one epoch on the first ``--train-subset`` MNIST training images through ``train_ensemble``, with
the method's defaults (batch 1000, the default feature layer ``features.pool2``, 784 features; DVERGE
20 distillation steps; TRS with and without ``--trs-plus-adv``). The time is the loop's training time
of the epoch (``time/train_epoch_s``: batches, losses, steps; not the evaluation). A first ``ce`` epoch
warms up (oneDNN kernels, allocator) and is not reported; then the methods run side by side in one
process, ``--repeats`` times each in turn, and the JSON reports each method's median and its ratio
to ``ce``'s median.

    OMP_NUM_THREADS=1 python benchmarks/ensemble_methods.py [--train-subset 3000] [--repeats 1] \
        [--json benchmarks/results/ensemble_methods.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from decorr.training.entry import RunOptions
from decorr.checkpoint import model_entry, save_checkpoint
from decorr.training.ensemble import EnsembleConfig, train_ensemble
from decorr.models import create_model
from decorr.io import write_json

#: name in the results -> (method, extra settings)
CASES = {
    "ce": ("ce", {}),
    "dec": ("dec", {}),
    "dec-both-relative": ("dec", {"corr_direction": "both", "corr_eps": "relative"}),
    "adp": ("adp", {}),
    "gal": ("gal", {}),
    "trs": ("trs", {}),
    "trs-plus-adv": ("trs", {"trs_plus_adv": True}),
    "dverge": ("dverge", {}),
    "dec-frozen": ("dec-frozen", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-subset", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="benchmarks/results/ensemble_methods.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="ensemble_methods_"))
    torch.manual_seed(0)
    surrogate = work / "surrogate"
    save_checkpoint(surrogate, {"model": create_model("mnist_cnn")},
                    {"kind": "classifier", "models": {"model": model_entry("mnist_cnn")}, "dataset": "mnist", "epoch": 0})
    common = dict(epochs=1, batch_size=args.batch_size, train_subset=args.train_subset, test_subset=1000)

    def epoch_seconds(name: str, run: int) -> tuple[float, float]:
        method, extra = CASES[name]
        if method == "dec-frozen":
            extra = {**extra, "surrogate": str(surrogate)}
        config = EnsembleConfig(method=method, **common, **extra)
        wall = time.perf_counter()
        metrics = train_ensemble(config, RunOptions(run_dir=work / f"{name}_{run}", no_tensorboard=True, cpu=True))
        return float(metrics["time/train_epoch_s"]), time.perf_counter() - wall

    epoch_seconds("ce", -1)  # warm-up, not reported
    times: dict[str, list[float]] = {name: [] for name in args.cases}
    totals: dict[str, list[float]] = {name: [] for name in args.cases}
    for run in range(args.repeats):
        for name in ["ce", *[c for c in args.cases if c != "ce"]]:
            if name not in times:
                times[name], totals[name] = [], []
            seconds, total = epoch_seconds(name, run)
            times[name].append(seconds)
            totals[name].append(total)
            print(f"{name:18s} {seconds:8.2f} s/epoch (run {run + 1}; {total:.1f} s with setup and evaluation)", flush=True)
    base = statistics.median(times["ce"])
    results = {name: {"method": CASES[name][0], "settings": CASES[name][1],
                      "num_models": 1 if CASES[name][0] == "dec-frozen" else 3,
                      "epoch_s": statistics.median(values), "runs_s": values,
                      "ratio_to_ce": statistics.median(values) / base,
                      "total_with_eval_s": statistics.median(totals[name])}
               for name, values in times.items()}
    record = {"benchmark": "ensemble_methods", "arch": "mnist_cnn", "feature_layer": "features.pool2",
              "train_images": args.train_subset, "batch_size": args.batch_size, "repeats": args.repeats,
              "threads": args.threads, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "note": "seconds of one training epoch (time/train_epoch_s), median over repeats; dec-frozen trains 1 "
                      "model (plus a frozen surrogate's forward), all others 3",
              "results": results}
    write_json(args.json, record)
    print(f"\n{'method':18s} {'s/epoch':>8s} {'x ce':>6s}")
    for name, r in results.items():
        print(f"{name:18s} {r['epoch_s']:8.2f} {r['ratio_to_ce']:6.2f}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
