"""GPU check of evaluation at scale: a transfer matrix on 1 process against N processes (one GPU each,
NCCL; on the CPU, ``--device cpu``, 2 gloo processes), results required equal; and an ensemble whose members
are spread over devices (all visible GPUs, or GPU 0 and the CPU on a one-GPU machine) against the same
ensemble in one place: outputs, a PGD attack and the memory each device holds.

    python benchmarks/gpu_scale.py --device cuda --json benchmarks/results/gpu_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from decorr.attacks import Source, parse_attack
from decorr.checkpoint import model_entry, save_checkpoint
from decorr.models import create_model
from decorr.models.ensemble import Ensemble, spread_members

REPO = Path(__file__).resolve().parents[1]


def matrix(root: Path, device: str, processes: int, args: argparse.Namespace) -> tuple[float, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone",
                                          f"--nproc_per_node={processes}"]
    models = [str(root / f"m{i}") for i in range(3)]
    out = root / f"out_{processes}"
    command = [sys.executable, *launcher, str(REPO / "eval" / "transfer.py"), *models, "--dataset", args.dataset,
               "--num-samples", str(args.num_samples), "--batch-size", str(args.batch_size), "--attack", "pgd",
               "mifgsm+dim", "--eps", "8/255", "--steps", str(args.steps), "--device", device, "--no-plots",
               "--quiet", "--out", str(out)]
    tick = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return time.perf_counter() - tick, json.loads((out / "results.json").read_text())


def spread(device: str, members: int) -> dict:
    torch.manual_seed(0)
    models = {str(i): create_model("resnet20").eval() for i in range(members)}
    base = torch.device(device)
    whole = Ensemble({k: m for k, m in models.items()}, objective="mean_ce").to(base)
    if device == "cuda":
        devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        devices = devices if len(devices) > 1 else [torch.device("cuda", 0), torch.device("cpu")]
    else:
        devices = [torch.device("cpu"), torch.device("cpu")]
    copies = {k: create_model("resnet20").eval() for k in models}
    for k in copies:
        copies[k].load_state_dict(models[k].state_dict())
    spread_ensemble = spread_members(Ensemble(copies, objective="mean_ce"), devices)
    x, y = torch.rand(16, 3, 32, 32, device=base), torch.randint(0, 10, (16,), device=base)
    with torch.no_grad():
        difference = float((spread_ensemble(x) - whole(x)).abs().max())
    attack = parse_attack("pgd(steps=3,step_size=2/255)")
    ours = attack.craft(Source.of(spread_ensemble), x, y, eps=8 / 255, generator=torch.Generator().manual_seed(0))
    plain = attack.craft(Source.of(whole), x, y, eps=8 / 255, generator=torch.Generator().manual_seed(0))
    memory = {}
    if device == "cuda":
        memory = {str(d): torch.cuda.memory_allocated(d) for d in devices if d.type == "cuda"}
    return {"devices": [str(d) for d in devices], "members": members, "max_output_difference": difference,
            "max_attack_difference": float((ours - plain).abs().max()), "cuda_memory_allocated": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dataset", default=str(REPO.parent / "shared" / "data" / "cifar10-subset"
                                                 / "cifar10_subset.npz"))
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    processes = gpus if gpus > 1 else (2 if args.device == "cpu" else 1)
    record: dict = {"benchmark": "gpu_scale", "device": args.device, "gpus": gpus,
                    "gpu_name": torch.cuda.get_device_name(0) if gpus else None, "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="gpu_scale_") as tmp:
        root = Path(tmp)
        for i in range(3):
            torch.manual_seed(i)
            save_checkpoint(root / f"m{i}", {"model0": create_model("resnet20")},
                            {"kind": "classifier", "models": {"model0": model_entry("resnet20")},
                             "dataset": args.dataset, "epoch": 0})
        one_s, one = matrix(root, args.device, 1, args)
        record["one_process_s"] = one_s
        if processes > 1:
            many_s, many = matrix(root, args.device, processes, args)
            for result in (one, many):
                result.pop("timing")
                result["config"]["output"] = result["config"]["command"] = result["settings"]["command"] = None
            record.update({"processes": processes, "many_processes_s": many_s, "speedup": one_s / many_s,
                           "identical_results": one == many})
        else:
            record["processes"] = "one GPU: the comparison with several processes needs 2 or more"
    record["ensemble_spread"] = spread(args.device, args.members)
    print(json.dumps(record, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
