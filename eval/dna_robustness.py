"""White-box robustness of a dual-neck autoencoder + classifier, against a plain-autoencoder baseline.

    python eval/dna_robustness.py runs/dna_mnist --baseline runs/ae_mnist --attack fgsm pgd \\
        --eps 0.05 0.1 0.15 --objective paper adaptive-min
For each attack, objective and epsilon: the DNA's accuracy when either reconstruction is classified
correctly, each path's accuracy and their mean, and the baseline's accuracy under the same attack on
itself. Writes results.json, table.txt, accuracy.png (like P1's Fig. 6/8) and
reconstructions_<attack>.png (natural / perturbed images and their reconstructions, like Fig. 7/9)
to --out (default: RUN_DIR/robustness). Checkpoints are run directories of train/dna_*.py (or their
stage2 checkpoint folders).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from decorr.data import load_dataset
from decorr.errors import DecorrError, cli_entry, pixel_value
from decorr.models import model_spec
from decorr.io import check_paths_apart, prepare_output_dir, staged_output_dir, write_results_json
from decorr.config import check_at_least, check_seed, check_subset, resolve_device
from dna.evaluation import (
    ATTACKS,
    OBJECTIVES,
    craft,
    evaluate_robustness,
    format_table,
    load_defended_model,
    plot_accuracy,
    plot_reconstructions,
)

#: SPEC section 6: MNIST 0.05 / 0.10 / 0.15; CIFAR-10 2, 4, 8 / 255 (pixel units).
DEFAULT_EPS = {1: (0.05, 0.10, 0.15), 3: (2 / 255, 4 / 255, 8 / 255)}




def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="DNA run directory (or its stage-2 checkpoint)")
    p.add_argument("--baseline", default=None, help="plain-autoencoder run directory to compare with")
    p.add_argument("--attack", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    p.add_argument("--objective", nargs="+", choices=OBJECTIVES, default=["paper", "adaptive-min"],
                   help="paper: sum of squared per-path CE (P1); adaptive-*: must fool every path")
    p.add_argument("--eps", nargs="+", type=pixel_value, default=None,
                   help="Linf radii in pixel units (default MNIST 0.05 0.1 0.15, CIFAR-10 2/255 4/255 8/255)")
    p.add_argument("--steps", type=int, default=40, help="PGD steps")
    p.add_argument("--step-size", type=pixel_value, default=None,
                   help="PGD step in pixel units (default 2.5 * eps / steps)")
    p.add_argument("--kappa", type=float, default=0.0, help="cap of the per-path margin of adaptive-margin")
    p.add_argument("--dataset", default=None, help="dataset (default: the one the checkpoint was trained on)")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="seeds PGD's random starts")
    p.add_argument("--figure-samples", type=int, default=8, help="images in the reconstruction figure")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/robustness)")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    return p.parse_args(argv)


def _default_out(source: str) -> Path:
    directory = Path(source)  # RUN_DIR/stage2/checkpoint
    run_dir = directory.parent.parent if directory.parent.name == "stage2" else directory.parent
    return run_dir / "robustness"


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    check_seed(args.seed)
    check_subset("test_subset", args.test_subset)
    check_at_least("figure_samples", args.figure_samples, 0)
    check_at_least("batch_size", args.batch_size, 1)
    check_at_least("steps", args.steps, 1)
    dna = load_defended_model(args.checkpoint, device)
    baseline = load_defended_model(args.baseline, device) if args.baseline else None
    shape = model_spec(dna.info["arch"]).input_shape
    if baseline is not None and model_spec(baseline.info["arch"]).input_shape != shape:
        raise DecorrError(f"--baseline {args.baseline} takes {model_spec(baseline.info['arch']).input_shape} images "
                          f"but the DNA takes {shape}; compare models of the same dataset")
    dataset = load_dataset(args.dataset or dna.info["dataset"], args.data_root)
    if args.test_subset is not None and args.test_subset > len(dataset.test):
        raise DecorrError(f"--test-subset {args.test_subset} is more than the {len(dataset.test)} test images of "
                          f"{dataset.name}; pass at most {len(dataset.test)}, or leave it out to evaluate them all")
    split = dataset.test if args.test_subset is None else dataset.test.subset(args.test_subset)
    eps = args.eps or DEFAULT_EPS[shape[0]]
    out = prepare_output_dir(args.out or _default_out(dna.source), overwrite=args.overwrite)  # before any work
    check_paths_apart({"--out": out}, {args.checkpoint: args.checkpoint, **({args.baseline: args.baseline}
                                                                          if args.baseline else {})})
    if dataset.input_shape != shape:
        raise DecorrError(f"{args.checkpoint} takes {shape} images but {dataset.name!r} has {dataset.input_shape}; "
                          "evaluate it on the dataset it was trained for")

    report = evaluate_robustness(
        dna, split, baseline=baseline, attacks=args.attack, objectives=args.objective, eps=eps, steps=args.steps,
        step_size=args.step_size, kappa=args.kappa, batch_size=args.batch_size, seed=args.seed,
        progress=lambda text: print(f"\r{text}", end="", file=sys.stderr, flush=True),
    )
    print(file=sys.stderr)
    report["settings"]["dataset"] = args.dataset or dna.info["dataset"]
    table = format_table(report)
    print(table)
    with staged_output_dir(out, overwrite=args.overwrite) as staging:
        (staging / "table.txt").write_text(table + "\n")
        plot_accuracy(report, staging / "accuracy.png")
        n = min(args.figure_samples, len(split))
        x = split.images[:n].to(device).float() / 255
        y = split.labels[:n].to(device)
        largest = max(eps)
        for attack in args.attack if n else []:
            adversarial = {
                f"{attack} {objective} eps {largest:.3g}": craft(
                    dna, x, y, attack=attack, objective=objective, eps=largest, steps=args.steps,
                    step_size=args.step_size, kappa=args.kappa, generator=torch.Generator().manual_seed(args.seed))
                for objective in args.objective
            }
            plot_reconstructions(dna, x, y, adversarial, staging / f"reconstructions_{attack}.png")
        write_results_json(staging / "results.json", report)  # last: it marks a complete folder
    figures = ", reconstructions_*.png" if n else ""
    print(f"wrote {out}/results.json, table.txt, accuracy.png{figures}")


if __name__ == "__main__":
    main()
