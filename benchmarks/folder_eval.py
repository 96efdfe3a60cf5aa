"""Benchmark: the transfer evaluation on a generated image folder (streamed) against a bare PGD loop.

A folder of ``--num-images`` random PNGs (3 classes, sizes around 256) is read with ``--image-size`` (224:
torchvision's Resize + CenterCrop); a torchvision resnet18 source and vgg11 target (random weights saved
with ``torch.save`` in a temp dir, specs ``torchvision.resnet18=r18.pth`` ...) are evaluated by
``decorr.evaluation.selection.evaluate_checkpoints`` with the folder streamed (``memory_budget_mb`` below the set's
size, DataLoader workers decoding), PGD Linf. "bare" is a loop over the same decoded tensors (in memory),
the same random starts and the same models loaded by hand; every accuracy must be equal. Reported: time per
image of each and their ratio (goal <= 1.10), and where the memory goes. Three fresh child processes report
their RSS once their models are loaded and their peak RSS from then on (``VmHWM`` after a reset: the
lifetime peak is useless here, it is made by loading the models and, after fork and exec, inherited from
this parent, which holds the decoded set; Linux): "streamed"
(the timed evaluation, folder streamed through DataLoader workers, which are measured apart as
RUSAGE_CHILDREN; its decoded images are also counted, ``streamed_resident_images``: the most alive at once,
in any worker or the main process, against the stream's bound and the budget), "in memory" (the same evaluation with the decoded set held in memory: the same work, with
the images resident) and "models only" (the two models by the same spec loader and the same attack and
target pass on ``--memory-batches`` batches of random tensors, no dataset). ``added_after_load_mb`` is what
each adds once its models are in place; ``images_share_streamed_mb`` estimates the streamed run's images as
its peak minus the in-memory run's plus the decoded set (which the in-memory run holds throughout). Between
identical runs these peaks move by tens of MB (more with large models), so small budgets are below what
RSS can resolve. "bare" runs in the parent.

    OMP_NUM_THREADS=1 python benchmarks/folder_eval.py --num-images 40 --steps 2 --json benchmarks/results/folder_eval.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from decorr.data import load_dataset, to_float
from decorr.data.accounting import CountedSplit
from decorr.data.stream import StreamedSplit
from decorr.io import write_results_json
from decorr.evaluation.passes import batch_generator
from decorr.evaluation.selection import ModelSelection, evaluate_checkpoints
from decorr.evaluation.options import TransferOptions


def make_folder(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for k in range(n):
        path = root / f"class{k % 3}" / f"{k:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (256 + k % 17, 240 + k % 29, 3), dtype=np.uint8)).save(path)


def bare_loop(files, x_all, y_all, eps, steps, step_size, batch_size, seed, archs=("resnet18", "vgg11")):
    src = getattr(torchvision.models, archs[0])(num_classes=3)
    src.load_state_dict(torch.load(files["r18"], weights_only=True))
    tgt = getattr(torchvision.models, archs[1])(num_classes=3)
    tgt.load_state_dict(torch.load(files["vgg11"], weights_only=True))
    models = {"r18": src.eval(), "vgg11": tgt.eval()}
    batches = [(x_all[i:i + batch_size], y_all[i:i + batch_size]) for i in range(0, len(y_all), batch_size)]
    with torch.no_grad():
        natural = {n: sum((m(x).argmax(1) == y).sum().item() for x, y in batches) / len(y_all) for n, m in models.items()}
    correct = dict.fromkeys(models, 0)
    for index, (x, y) in enumerate(batches):
        start = torch.empty(x.shape).uniform_(-eps, eps, generator=batch_generator(seed, "r18", "pgd", eps, index))
        x_adv = (x + start).clamp(0, 1)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(src(x_adv), y), x_adv)
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1).detach()
        with torch.no_grad():
            for name, model in models.items():
                correct[name] += (model(x_adv).argmax(1) == y).sum().item()
    return natural, {n: c / len(y_all) for n, c in correct.items()}


def ours(args, folder, specs, budget):
    """The evaluation; a streamed split is counted (decorr.data.accounting) as it is streamed."""
    data = load_dataset(str(folder), image_size=args.image_size, memory_budget_mb=budget, workers=args.workers)
    split = CountedSplit(data.test) if isinstance(data.test, StreamedSplit) else data.test
    options = TransferOptions(attacks=("pgd",), eps=(args.eps,), batch_size=args.batch_size, seed=0, features=False,
                              attack_settings={"--steps": args.steps, "--step-size": args.step_size})
    result = evaluate_checkpoints(ModelSelection(targets=(specs[1],), surrogates=(specs[0],)), split, options)
    resident = None
    if isinstance(split, CountedSplit):
        plan = split.stream_plan(args.batch_size)
        resident = {"peak_images": split.peak_images, "peak_mb": round(split.peak_bytes / 2**20, 3),
                    "plan_chunk": plan.chunk, "plan_bound_images": plan.resident_images,
                    "plan_bound_mb": round(plan.resident_bytes / 2**20, 3),
                    "within_budget": split.peak_bytes <= plan.budget_bytes}
    return data, result, resident


def proc_status_mb(key: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def reset_peak() -> float:
    """Reset this process's peak RSS (``clear_refs`` 5, Linux >= 4.0) and return the RSS now, in MiB.

    Loading the models makes the lifetime peak (a state dict and a freshly built model side by side), so
    the memory of the evaluation itself is the peak after the models are in place."""
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status_mb("VmRSS")


def peak_rss_mb(after_load: float | None = None) -> dict[str, float | None]:
    """This process's RSS after loading and its peak since, and its finished children's peak (workers)."""
    return {"rss_after_load": after_load, "since_load": proc_status_mb("VmHWM"),
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def models_pass(args, specs, batches) -> dict[str, float | None]:
    """The attack and target pass of the evaluation on ``batches``, with the models decorr's loader builds."""
    from decorr.specs import load_specs

    loaded = load_specs(specs, log=lambda message: None)
    src, tgt = (loaded[name].module for name in loaded)
    after_load = reset_peak()
    for x, y in batches:
        x_adv = x.clone()
        for _ in range(args.steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(src(x_adv), y), x_adv)
            x_adv = (x + (x_adv.detach() + args.step_size * grad.sign() - x).clamp(-args.eps, args.eps)).clamp(0, 1)
        with torch.no_grad():
            src(x_adv), tgt(x_adv)
    return peak_rss_mb(after_load)


def specs_of(args, r18: str, vgg: str) -> list[str]:
    return [f"torchvision.{args.source_arch}={r18}", f"torchvision.{args.target_arch}={vgg}"]


def models_only_child(args, specs: list[str]) -> dict[str, float | None]:
    """Peak RSS of the two models alone: the attack and target pass on random batches of the set's shape."""
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    batches = [(torch.rand(shape, generator=generator), torch.randint(0, 3, (shape[0],), generator=generator))
               for _ in range(args.memory_batches)]
    return models_pass(args, specs, batches)


def run_child(argv: list[str]) -> dict:
    child = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--step-size", type=float, default=2 / 255)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--source-arch", default="resnet18", help="torchvision source (named r18 in the JSON)")
    parser.add_argument("--target-arch", default="vgg11", help="torchvision target (named vgg11 in the JSON)")
    parser.add_argument("--memory-batches", type=int, default=3, help="batches of the models-only run")
    parser.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)  # folder r18 vgg11 budget
    parser.add_argument("--memory-child", nargs=3, default=None, help=argparse.SUPPRESS)  # folder r18 vgg11
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = args.num_images * 3 * args.image_size ** 2 / 2 ** 20
    budget = round(size / 4, 3)  # a quarter of the set: streamed
    if args.memory_child:
        folder, r18, vgg = args.memory_child
        print(json.dumps(models_only_child(args, specs_of(args, r18, vgg))))
        return
    if args.child:
        folder, r18, vgg, budget = args.child
        budget = float(budget)
        import decorr.evaluation.selection

        loads, load_specs = [], decorr.evaluation.selection.load_specs

        def load_then_reset(*a, **k):  # the peak of the evaluation itself starts when the models are in place
            models = load_specs(*a, **k)
            loads.append(reset_peak())
            return models

        decorr.evaluation.selection.load_specs = load_then_reset
        tick = time.perf_counter()
        data, result, resident = ours(args, Path(folder), specs_of(args, r18, vgg), budget)
        print(json.dumps({"max_rss_mb": peak_rss_mb(loads[-1]), "ours_s": time.perf_counter() - tick,
                          "split": type(data.test).__name__, "result": result, "resident": resident}))
        return
    with tempfile.TemporaryDirectory(prefix="folder_bench_") as tmp:
        tmp = Path(tmp)
        make_folder(tmp / "images", args.num_images)
        torch.manual_seed(0)
        files = {"r18": tmp / "r18.pth", "vgg11": tmp / "vgg11.pth"}
        torch.save(getattr(torchvision.models, args.source_arch)(num_classes=3).state_dict(), files["r18"])
        torch.save(getattr(torchvision.models, args.target_arch)(num_classes=3).state_dict(), files["vgg11"])
        memory = load_dataset(str(tmp / "images"), image_size=args.image_size).test
        x_all, y_all = to_float(memory.images), memory.labels
        tick = time.perf_counter()
        natural, adv = bare_loop(files, x_all, y_all, args.eps, args.steps, args.step_size, args.batch_size, 0,
                                 (args.source_arch, args.target_arch))
        bare_s = time.perf_counter() - tick
        paths = [str(tmp / "images"), str(files["r18"]), str(files["vgg11"])]
        measured = run_child([*sys.argv[1:], "--child", *paths, str(budget)])
        in_memory_run = run_child([*sys.argv[1:], "--child", *paths, "4096"])
        models_only = run_child([*sys.argv[1:], "--memory-child", *paths])
        rss, ours_s, streamed, result = measured["max_rss_mb"], measured["ours_s"], measured["split"], measured["result"]
        in_memory = in_memory_run["max_rss_mb"]
        assert streamed == "StreamedSplit" and in_memory_run["split"] != "StreamedSplit", (streamed, in_memory_run["split"])
        assert in_memory_run["result"]["by_eps"][0]["accuracy"] == result["by_eps"][0]["accuracy"], "streamed != in memory"
    row = result["by_eps"][0]
    ours_acc = {"r18": row["white_box_accuracy"]["r18"], "vgg11": row["accuracy"]["r18"]["vgg11"]}
    ours_natural = {n: result["models"][n]["natural_accuracy"] for n in ("r18", "vgg11")}
    n = args.num_images
    report = {
        "benchmark": "folder_eval",
        "settings": {"num_images": n, "image_size": args.image_size, "eps": args.eps, "steps": args.steps,
                     "step_size": args.step_size, "batch_size": args.batch_size, "workers": args.workers,
                     "attack": f"pgd linf, {args.source_arch} source (r18), {args.target_arch} target (vgg11), random weights, 3 classes",
                     "memory_batches": args.memory_batches},
        "split": streamed, "decoded_set_mb": round(size, 2), "memory_budget_mb": budget,
        "ours_s": round(ours_s, 2), "bare_s": round(bare_s, 2),
        "ours_s_per_image": round(ours_s / n, 4), "bare_s_per_image": round(bare_s / n, 4),
        "ratio": round(ours_s / bare_s, 3), "ours_timing": {k: round(v, 2) for k, v in result["timing"].items()},
        "identical": ours_acc == adv and ours_natural == natural, "accuracy_under_attack": adv,
        "natural_accuracy": natural,
        # decoded images alive at once while streaming, counted (the budget's own measure; RSS cannot resolve it)
        "streamed_resident_images": measured["resident"],
        "streamed_peak_rss_mb": round(rss["since_load"], 1),
        # what each evaluation adds to its process once the models are in place (peak minus RSS after loading)
        "added_after_load_mb": {name: round(m["since_load"] - m["rss_after_load"], 1)
                                for name, m in (("streamed", rss), ("in_memory", in_memory), ("models_only", models_only))},
        "memory_mb": {  # each child process: RSS after loading its models, peak since, its workers' peak
            "streamed": {k: round(v, 1) for k, v in rss.items()},
            "models_only": {k: round(v, 1) for k, v in models_only.items()},
            "in_memory": {k: round(v, 1) for k, v in in_memory.items()},
        },
        "ours_in_memory_s": round(in_memory_run["ours_s"], 2),
        # the images' share of the streamed evaluation: the same work in memory holds the decoded set throughout
        "images_share_streamed_mb": round(rss["since_load"] - in_memory["since_load"] + size, 1),
        "images_share_in_memory_mb": round(size, 1),
        "streaming_saves_mb": round(in_memory["since_load"] - rss["since_load"], 1),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0],
    }
    if args.json:
        write_results_json(args.json, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
