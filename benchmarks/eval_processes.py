"""Benchmark: one transfer evaluation on 2 processes with 1 thread each (torchrun, gloo) against 1 process
with 1 thread, on this machine's 2 cores; the same results are required (results.json equal but for timing).

The evaluation: two ``resnet20`` (a few SGD steps each on the CIFAR-10 subset, so that they are not at
chance) attacked with PGD and MI-FGSM+DI at two radii on ``--num-samples`` test images of the subset, every
model a source and a target. Reported: the wall time of each command (Python start and imports included),
the evaluation's own time (``timing.total_s``), their ratios, and whether the results agree. Run it on an
otherwise idle machine (``uptime`` is recorded before and after).

    python benchmarks/eval_processes.py [--num-samples 256] [--repeats 2] [--json benchmarks/results/eval_processes.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from decorr.checkpoint import model_entry, save_checkpoint
from decorr.data import iterate_batches, load_dataset
from decorr.models import create_model

REPO = Path(__file__).resolve().parents[1]
SUBSET = REPO.parent / "shared" / "data" / "cifar10-subset" / "cifar10_subset.npz"


def train_models(root: Path, steps: int) -> list[str]:
    dataset = load_dataset(str(SUBSET))
    paths = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = create_model("resnet20")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for index, (x, y) in enumerate(iterate_batches(dataset.train, 64, seed=seed)):
            if index == steps:
                break
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        save_checkpoint(root / f"r20_{seed}", {"model0": model.eval()},
                        {"kind": "classifier", "models": {"model0": model_entry("resnet20")},
                         "dataset": str(SUBSET), "epoch": 0})
        paths.append(str(root / f"r20_{seed}"))
    return paths


def run(models: list[str], out: Path, processes: int, args: argparse.Namespace) -> tuple[float, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone",
                                          f"--nproc_per_node={processes}"]
    command = [sys.executable, *launcher, str(REPO / "eval" / "transfer.py"), *models, "--dataset", str(SUBSET),
               "--num-samples", str(args.num_samples), "--batch-size", str(args.batch_size), "--attack", "pgd",
               "mifgsm+dim", "--eps", "4/255", "8/255", "--steps", str(args.steps), "--threads", "1", "--no-plots",
               "--quiet", "--out", str(out)]
    tick = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tick
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return wall, json.loads((out / "results.json").read_text())


def comparable(result: dict) -> dict:
    result = dict(result)
    result.pop("timing")
    result["config"] = {**result["config"], "command": None, "output": None}
    result["settings"] = {**result["settings"], "command": None}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="eval_processes_") as tmp:
        root = Path(tmp)
        models = train_models(root, args.train_steps)
        walls: dict[int, list[float]] = {1: [], 2: []}
        evals: dict[int, list[float]] = {1: [], 2: []}
        results: dict[int, dict] = {}
        for repeat in range(args.repeats):  # interleaved, so that a change of load hits both alike
            for processes in (1, 2):
                wall, result = run(models, root / f"out_{processes}_{repeat}", processes, args)
                walls[processes].append(wall)
                evals[processes].append(result["timing"]["total_s"])
                results[processes] = result
        same = comparable(results[1]) == comparable(results[2])
    record = {
        "benchmark": "eval_processes",
        "command": "python benchmarks/eval_processes.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "threads_per_process": 1, "load_before": load_before,
                    "load_after": os.getloadavg()},
        "settings": {"models": "2 x resnet20 (CIFAR-10 subset)", "num_samples": args.num_samples,
                     "batch_size": args.batch_size, "attacks": ["pgd", "mifgsm+dim"], "eps": ["4/255", "8/255"],
                     "steps": args.steps, "repeats": args.repeats},
        "wall_s": {str(k): v for k, v in walls.items()},
        "evaluation_s": {str(k): v for k, v in evals.items()},
        "median_wall_s": {str(k): statistics.median(v) for k, v in walls.items()},
        "median_evaluation_s": {str(k): statistics.median(v) for k, v in evals.items()},
        "speedup_wall": statistics.median(walls[1]) / statistics.median(walls[2]),
        "speedup_evaluation": statistics.median(evals[1]) / statistics.median(evals[2]),
        "identical_results": same,
    }
    print(json.dumps(record, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
