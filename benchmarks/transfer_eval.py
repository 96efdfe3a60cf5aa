"""Benchmark: the one-pass transfer evaluation against the pair-by-pair way, same seeds, same numbers.

One pass (``eval/transfer.py`` with four models): each of the 4 sources is attacked once per
epsilon and all 4 targets are evaluated on its adversarial examples, so 4 attacks per epsilon.
Pair by pair: each of the 6 pairs evaluated on its own, as a script given two checkpoints would
(load both, natural accuracy, attack both members, evaluate both, feature statistics): 12 attacks per
epsilon. Both call ``decorr.evaluation.selection.evaluate_checkpoints`` with the same settings; random starts are
seeded per (seed, source name, epsilon, batch), so both ways craft identical adversarial examples and
every shared number (transfer rates and counts, accuracies, feature R^2 / PCA Pearson, parameter
distance) must be equal exactly. Prints (and with --json writes) times, ratios and the comparison.

    OMP_NUM_THREADS=1 python benchmarks/transfer_eval.py [--checkpoints C1 C2 C3 C4 | --fresh] [--json OUT]
Without --checkpoints it uses copies of runs/mnist_cnn_cor and runs/mnist_cnn_dec (two models each)
when both hold a checkpoint, else (or with --fresh) trains four small mnist_cnn classifiers in a
temporary folder first. Defaults: 1000 MNIST test images, PGD Linf 40 steps of 3/255, eps 0.05,
0.10, 0.15, batch 500, one thread.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from decorr.checkpoint import load_checkpoint, model_entry, save_checkpoint
from decorr.data import iterate_batches, load_dataset
from decorr.errors import DecorrError
from decorr.models import create_model
from decorr.io import write_results_json
from decorr.evaluation.selection import ModelSelection, evaluate_checkpoints
from decorr.evaluation.options import TransferOptions

REPO = Path(__file__).resolve().parents[1]
PAIR_RUNS = [REPO / "runs" / "mnist_cnn_cor", REPO / "runs" / "mnist_cnn_dec"]


def train_small_checkpoints(folder: Path, data_root: str | None, *, count: int = 4, train_samples: int = 10000,
                            steps_per_model: int = 100) -> list[str]:
    """``count`` mnist_cnn trained briefly (Adam 5e-3, batch 100) from different seeds, one checkpoint each."""
    dataset = load_dataset("mnist", data_root).subset(train=train_samples)
    paths = []
    for index in range(count):
        torch.manual_seed(index)
        model = create_model("mnist_cnn")
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
        for step, (x, y) in enumerate(iterate_batches(dataset.train, 100, seed=index)):
            if step == steps_per_model:
                break
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        path = folder / f"mnist_cnn_{index}" / "checkpoint"
        save_checkpoint(path, {"model": model}, {"kind": "single", "models": {"model": model_entry("mnist_cnn")},
                                                 "dataset": "mnist", "epoch": 1})
        paths.append(str(path.parent))
    return paths


def snapshot_pair_runs(folder: Path) -> list[str] | None:
    """The four models of the cor and dec pair runs, when both exist, from a copy of their checkpoints
    (a run still training rewrites its checkpoint every epoch)."""
    try:
        checkpoints = [load_checkpoint(run, load_weights=False) for run in PAIR_RUNS]
    except DecorrError:
        return None
    paths = []
    for run, checkpoint in zip(PAIR_RUNS, checkpoints):
        copy = folder / run.name / "checkpoint"
        shutil.copytree(checkpoint.path, copy)
        paths += [f"{copy.parent}:{name}" for name in checkpoint.model_names]
    return paths


def timed(fn, *args, **kwargs) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - wall, time.process_time() - cpu


def compare(one_pass: dict[str, Any], pair_results: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    """Every number of every pair run against the same number of the one-pass run (exact equality)."""
    compared, mismatches = 0, []

    def check(what: str, ours: Any, theirs: Any) -> None:
        nonlocal compared
        compared += 1
        same = ours == theirs or (isinstance(ours, float) and isinstance(theirs, float) and math.isnan(ours) and math.isnan(theirs))
        if not same:
            mismatches.append({"what": what, "one_pass": ours, "pair_by_pair": theirs})

    one_pairs = {(p["a"], p["b"]): p for p in one_pass["pairs"]}
    for (a, b), result in pair_results.items():
        for name in (a, b):
            check(f"natural_accuracy {name}", one_pass["models"][name]["natural_accuracy"],
                  result["models"][name]["natural_accuracy"])
        (pair,) = result["pairs"]
        for key in ("parameter_distance", "natural_features", "same_arch"):
            check(f"{key} {a}|{b}", one_pairs[(a, b)][key], pair[key])
        for ours, theirs in zip(one_pass["by_eps"], result["by_eps"]):
            eps = theirs["eps"]
            for src, tgt in ((a, b), (b, a)):
                check(f"T({src}->{tgt}) eps {eps}", ours["transfer"][src][tgt], theirs["transfer"][src][tgt])
                check(f"transferred {src}->{tgt} eps {eps}", ours["transferred"][src][tgt], theirs["transferred"][src][tgt])
                check(f"accuracy of {tgt} on {src} eps {eps}", ours["accuracy"][src][tgt], theirs["accuracy"][src][tgt])
                check(f"source_fooled {src} eps {eps}", ours["source_fooled"][src], theirs["source_fooled"][src])
                check(f"white_box_accuracy {src} eps {eps}", ours["white_box_accuracy"][src],
                      theirs["white_box_accuracy"][src])
            ours_pair = next(p for p in ours["pairs"] if (p["a"], p["b"]) == (a, b))
            (theirs_pair,) = theirs["pairs"]
            for key in ("a_to_b", "b_to_a", "mean", "on_adv_of_a", "on_adv_of_b"):
                check(f"{key} {a}|{b} eps {eps}", ours_pair[key], theirs_pair[key])
    return {"identical": not mismatches, "compared_values": compared, "mismatches": mismatches[:20]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs=4, default=None, metavar="CKPT",
                        help="four models (run dirs, checkpoint dirs or PATH:MODEL)")
    parser.add_argument("--fresh", action="store_true",
                        help="train four small mnist_cnn in a temporary folder even when the pair runs exist")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--num-samples", type=int, default=1000, help="first N MNIST test images")
    parser.add_argument("--eps", nargs="+", type=float, default=[0.05, 0.10, 0.15])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--step-size", type=float, default=3 / 255)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the JSON report to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="transfer_bench_") as tmp:
        checkpoints = args.checkpoints or (None if args.fresh else snapshot_pair_runs(Path(tmp)))
        origin = "given" if args.checkpoints else "copies of runs/mnist_cnn_cor and runs/mnist_cnn_dec"
        if checkpoints is None:
            checkpoints = train_small_checkpoints(Path(tmp), args.data_root)
            origin = "four mnist_cnn trained for 100 steps of batch 100 in a temporary folder"
        split = load_dataset("mnist", args.data_root).test.subset(args.num_samples)
        options = TransferOptions(attacks=("pgd",), eps=tuple(args.eps), norm="linf", seed=args.seed,
                                  batch_size=args.batch_size,
                                  attack_settings={"--steps": args.steps, "--step-size": args.step_size})

        one_pass, one_wall, one_cpu = timed(evaluate_checkpoints, ModelSelection(targets=tuple(checkpoints)), split,
                                            options)
        pair_results: dict[tuple[str, str], dict[str, Any]] = {}
        pair_wall = pair_cpu = 0.0
        for first, second in itertools.combinations(checkpoints, 2):
            result, wall, cpu = timed(evaluate_checkpoints, ModelSelection(targets=(first, second)), split, options)
            pair_results[tuple(result["targets"])] = result  # type: ignore[index]
            pair_wall += wall
            pair_cpu += cpu
        if set(pair_results) != {(p["a"], p["b"]) for p in one_pass["pairs"]}:
            raise SystemExit("model names differ between the runs; cannot compare")
        comparison = compare(one_pass, pair_results)

    report = {
        "benchmark": "transfer_eval",
        "checkpoints": checkpoints,
        "checkpoint_origin": origin,
        "models": {name: m["natural_accuracy"] for name, m in one_pass["models"].items()},
        "settings": {**one_pass["settings"], "num_samples": len(split)},
        "one_pass": {"wall_s": round(one_wall, 2), "cpu_s": round(one_cpu, 2),
                     "attacks": len(one_pass["sources"]) * len(args.eps),
                     "timing": {k: round(v, 2) for k, v in one_pass["timing"].items()}},
        "pair_by_pair": {"wall_s": round(pair_wall, 2), "cpu_s": round(pair_cpu, 2), "runs": len(pair_results),
                         "attacks": 2 * len(pair_results) * len(args.eps),
                         "timing": {k: round(sum(r["timing"][k] for r in pair_results.values()), 2)
                                    for k in one_pass["timing"]}},
        "ratio_wall": round(pair_wall / one_wall, 3),
        "ratio_cpu": round(pair_cpu / one_cpu, 3),
        **comparison,
        "pair_transfer": {f"{p['a']} | {p['b']}": {str(row["eps"]): p2["mean"] for row in one_pass["by_eps"]
                                                    for p2 in row["pairs"] if (p2["a"], p2["b"]) == (p["a"], p["b"])}
                          for p in one_pass["pairs"]},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    if args.json:
        write_results_json(args.json, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
