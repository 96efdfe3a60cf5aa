"""The short demo behind ``make demo``: a cor and a dec CNN pair on Fashion-MNIST, then one table.

    python -m decorr.demo --out runs/demo [--epochs 3] [--dataset fashion-mnist]

Trains an independent ("cor") and a decorrelated ("dec") pair of the paper's CNN, then reports each
model's test accuracy, the feature R^2 between the two models of a pair, and the pair's PGD transfer rate
(the mean of both directions). Runs that already finished in ``--out`` are reused (it says so; delete
the folder, or ``make clean-demo``, to train again), so a second ``make demo`` only evaluates. Every stage
(training a pair, evaluating, writing) is announced as it starts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from decorr.config import parse_with_config
from decorr.training.entry import RunOptions
from decorr.checkpoint import load_checkpoint
from decorr.data import load_dataset
from decorr.errors import DecorrError, cli_entry
from decorr.training.recipes import PairConfig, train_pair
from decorr.evaluation.tables import format_table
from decorr.io import write_results_json, write_text
from decorr.evaluation.options import TransferOptions
from decorr.evaluation.progress import terminal_reporter
from decorr.evaluation.selection import ModelSelection, evaluate_checkpoints, pair_transfer

MODES = ("cor", "dec")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="folder for the two runs, results.json and table.txt")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.1], help="PGD Linf radii (pixel units)")
    p.add_argument("--attack-samples", type=int, default=1000, help="test images attacked for the transfer rates")
    p.add_argument("--seed", type=int, default=0)
    return parse_with_config(p, argv)


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _say(message: str) -> None:
    print(message, flush=True)


def _train(mode: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    run_dir = out / mode
    config = PairConfig(arch="mnist_cnn", mode=mode, dataset=args.dataset, epochs=args.epochs, seed=args.seed)
    resume = (run_dir / "checkpoint").exists()
    if resume:
        saved = load_checkpoint(run_dir, load_weights=False).config
        hyper = saved.get("hyperparameters", {})
        if (hyper.get("dataset"), hyper.get("seed"), hyper.get("mode")) != (args.dataset, args.seed, mode):
            raise DecorrError(f"{run_dir} holds a run with other settings; remove it (make clean-demo) or pick another --out")
        done = int(saved.get("epoch") or 0)
        if done >= args.epochs and saved.get("metrics"):
            # Nothing to train: say so plainly rather than "resumed", which would suggest training.
            _say(f"== reusing the finished {mode} pair in {run_dir} ({_epochs(done)} on {args.dataset}); "
                 "delete that folder (make clean-demo) to train it again ==")
            return dict(saved["metrics"])
        _say(f"== continuing the {mode} pair in {run_dir} from epoch {done} to {args.epochs} ==")
    else:
        _say(f"== training the {mode} pair in {run_dir} ({_epochs(args.epochs)} on {args.dataset}) ==")
    return train_pair(config, RunOptions(run_dir=run_dir, resume=resume, data_root=args.data_root))


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    started = time.time()
    dataset = load_dataset(args.dataset, args.data_root)
    final = {mode: _train(mode, args, out) for mode in MODES}
    test = dataset.test.subset(min(args.attack_samples, len(dataset.test)))
    _say(f"== evaluating: PGD Linf transfer between the models of each pair, 40 steps of 3/255 at eps "
         f"{' '.join(f'{e:g}' for e in args.eps)}, {len(test)} test images ==")
    selection = ModelSelection(targets=tuple(str(out / m) for m in MODES))
    options = TransferOptions(attacks=("pgd",), eps=tuple(args.eps), features=False)
    result = evaluate_checkpoints(selection, test, options, report=terminal_reporter())
    transfer = pair_transfer(result)
    rows = []
    summary: dict[str, Any] = {"dataset": args.dataset, "epochs": args.epochs, "eps": args.eps, "pairs": {}}
    for mode in MODES:
        metrics = final[mode]
        pair = (f"{mode}/model0", f"{mode}/model1")
        rates = transfer.get(pair) or transfer.get(pair[::-1]) or {}
        entry = {
            "acc_model0": metrics["test/acc_model0"],
            "acc_model1": metrics["test/acc_model1"],
            "feature_r2": metrics["test/r2_model0_model1"],
            "transfer_rate": {str(e): rates.get(e) for e in args.eps},
        }
        summary["pairs"][mode] = entry
        rows.append([mode, entry["acc_model0"], entry["acc_model1"], entry["feature_r2"],
                     *[rates.get(e) for e in args.eps]])
    header = ["pair", "acc model0", "acc model1", "feature R^2", *[f"transfer eps={e:g}" for e in args.eps]]
    table = format_table(header, rows, float_format="{:.3f}")
    summary["seconds"] = round(time.time() - started, 1)
    _say(f"== writing {out / 'results.json'} and {out / 'table.txt'} ==")
    write_results_json(out / "results.json", summary)  # strict JSON: an R^2 that does not exist is null
    write_text(out / "table.txt", table + "\n")
    print()
    print(table)
    print(f"\nwritten to {out / 'results.json'} and {out / 'table.txt'} ({summary['seconds']} s)")


if __name__ == "__main__":
    main()
