"""Benchmark: the transfer evaluation on foreign model specs against a bare PGD loop, same models, same images.

Models: a torchvision resnet18 (10 classes, at the data's 32x32) saved with ``torch.save(state_dict)`` and
the registry's resnet20 saved as ``.safetensors`` (random weights; the speed does not depend on them).
"ours" is ``decorr.evaluation.selection.evaluate_checkpoints`` on the specs ``torchvision.resnet18=r18.pth`` and
``resnet20=r20.safetensors`` (loading, input check, natural accuracy, both attacked, both evaluated on
every adversarial batch; feature statistics off). "bare" is the 20-line loop below on models loaded by
hand, drawing the same random starts (``batch_generator``), so every accuracy must be equal; the report
gives both times, their ratio (goal: ours <= 1.10 x bare) and the comparison. Runs alternate, best of
``--repeats`` each.

    OMP_NUM_THREADS=1 python benchmarks/transfer_eval_foreign.py --num-samples 200 --steps 10 --json OUT
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file

from decorr.data import load_dataset, to_float
from decorr.models import create_model
from decorr.io import write_results_json
from decorr.evaluation.passes import batch_generator
from decorr.evaluation.selection import ModelSelection, evaluate_checkpoints
from decorr.evaluation.options import TransferOptions

REPO = Path(__file__).resolve().parents[1]
CIFAR_SUBSET = REPO.parent / "shared" / "data" / "cifar10-subset" / "cifar10_subset.npz"


def bare_loop(files, x_all, y_all, eps_list, steps, step_size, batch_size, seed, device):
    """Load both models by hand, natural accuracy, PGD Linf on each, every model on every adversarial batch."""
    r18 = torchvision.models.resnet18(num_classes=10)
    r18.load_state_dict(torch.load(files["r18"], map_location="cpu", weights_only=True))
    r20 = create_model("resnet20")
    r20.load_state_dict(load_file(str(files["r20"])))
    models = {"r18": r18.to(device).eval(), "r20": r20.to(device).eval()}
    batches = [(x_all[i:i + batch_size].to(device), y_all[i:i + batch_size].to(device))
               for i in range(0, len(y_all), batch_size)]
    with torch.no_grad():
        natural = {n: sum((m(x).argmax(1) == y).sum().item() for x, y in batches) / len(y_all) for n, m in models.items()}
    accuracy = {}
    for eps in eps_list:
        for src, model in models.items():
            correct = dict.fromkeys(models, 0)
            for index, (x, y) in enumerate(batches):
                start = torch.empty(x.shape).uniform_(-eps, eps, generator=batch_generator(seed, src, "pgd", eps, index))
                start = start.to(device)
                x_adv = (x + start).clamp(0, 1)
                for _ in range(steps):
                    x_adv.requires_grad_(True)
                    (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
                    x_adv = x_adv.detach() + step_size * grad.sign()
                    x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1).detach()
                with torch.no_grad():
                    for tgt, target in models.items():
                        correct[tgt] += (target(x_adv).argmax(1) == y).sum().item()
            accuracy[(eps, src)] = {tgt: c / len(y_all) for tgt, c in correct.items()}
    return natural, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(CIFAR_SUBSET))
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--eps", nargs="+", type=float, default=[8 / 255])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-size", type=float, default=2 / 255)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    split = load_dataset(args.dataset).test.subset(args.num_samples)
    x_all, y_all = to_float(split.images), split.labels

    with tempfile.TemporaryDirectory(prefix="foreign_bench_") as tmp:
        files = {"r18": Path(tmp) / "r18.pth", "r20": Path(tmp) / "r20.safetensors"}
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), files["r18"])
        save_file({k: v.contiguous().clone() for k, v in create_model("resnet20").state_dict().items()}, str(files["r20"]))
        specs = [f"torchvision.resnet18={files['r18']}", f"resnet20={files['r20']}"]
        ours_s, bare_s = [], []
        for _ in range(args.repeats):
            tick = time.perf_counter()
            options = TransferOptions(attacks=("pgd",), eps=tuple(args.eps), batch_size=args.batch_size,
                                      seed=args.seed, features=False,
                                      attack_settings={"--steps": args.steps, "--step-size": args.step_size})
            result = evaluate_checkpoints(ModelSelection(targets=tuple(specs)), split, options, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            ours_s.append(time.perf_counter() - tick)
            tick = time.perf_counter()
            natural, accuracy = bare_loop(files, x_all, y_all, args.eps, args.steps, args.step_size,
                                          args.batch_size, args.seed, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            bare_s.append(time.perf_counter() - tick)

    mismatches = [f"natural {n}" for n in natural if result["models"][n]["natural_accuracy"] != natural[n]]
    for row in result["by_eps"]:
        for src in result["sources"]:
            for tgt in result["targets"]:
                if row["accuracy"][src][tgt] != accuracy[(row["eps"], src)][tgt]:
                    mismatches.append(f"eps {row['eps']} {src}->{tgt}: {row['accuracy'][src][tgt]} vs "
                                      f"{accuracy[(row['eps'], src)][tgt]}")
    report = {
        "benchmark": "transfer_eval_foreign",
        "specs": ["torchvision.resnet18=r18.pth", "resnet20=r20.safetensors"],
        "settings": {"num_samples": len(y_all), "eps": args.eps, "steps": args.steps, "step_size": args.step_size,
                     "batch_size": args.batch_size, "repeats": args.repeats, "dataset": Path(args.dataset).name},
        "ours_s": [round(t, 3) for t in ours_s], "bare_s": [round(t, 3) for t in bare_s],
        "ratio_best": round(min(ours_s) / min(bare_s), 3),
        "ours_timing": {k: round(v, 3) for k, v in result["timing"].items()},
        "identical": not mismatches, "mismatches": mismatches[:10],
        "natural_accuracy": natural,
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    if args.json:
        write_results_json(args.json, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
