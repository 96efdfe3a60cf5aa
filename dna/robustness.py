"""One robustness evaluation of a DNA (and its plain-autoencoder baseline) as a whole job: load, check,
evaluate, print and write ``--out`` (``eval/dna_robustness.py`` parses its flags into a :class:`RobustnessJob`)."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from decorr.config import check_at_least, check_subset, opt, resolve_device
from decorr.data import load_dataset
from decorr.distributed import rank, start_processes
from decorr.errors import DecorrError
from decorr.io import check_paths_apart, prepare_output_dir, staged_output_dir, write_results_json
from decorr.models import model_spec
from dna.evaluation import (RobustnessOptions, craft, evaluate_robustness, format_table, load_defended_model,
                            plot_accuracy, plot_reconstructions)

__all__ = ["DEFAULT_EPS", "RobustnessJob", "run_robustness_job"]

#: SPEC section 6: MNIST 0.05 / 0.10 / 0.15; CIFAR-10 2, 4, 8 / 255 (pixel units).
DEFAULT_EPS = {1: (0.05, 0.10, 0.15), 3: (2 / 255, 4 / 255, 8 / 255)}


@dataclass(frozen=True)
class RobustnessJob:
    """The models, data and outputs of one run (the attacks and objectives are :class:`RobustnessOptions`)."""

    checkpoint: str
    baseline: str | None = opt(None, "plain-autoencoder run directory to compare with")
    dataset: str | None = opt(None, "dataset (default: the one the checkpoint was trained on)")
    data_root: str | None = opt(None, "folder holding the dataset files")
    test_subset: int | None = opt(None, "evaluate on the first N test images only")
    figure_samples: int = opt(8, "images in the reconstruction figure")
    device: str | None = opt(None, "cpu or cuda (default: cuda when available)")
    out: str | None = opt(None, "output folder (default: RUN_DIR/robustness)")
    overwrite: bool = opt(False, "replace the results already in --out")
    options: RobustnessOptions = field(default_factory=RobustnessOptions)

    def __post_init__(self) -> None:
        check_subset("test_subset", self.test_subset)
        check_at_least("figure_samples", self.figure_samples, 0)


def _default_out(source: str) -> Path:
    directory = Path(source)  # RUN_DIR/stage2/checkpoint
    run_dir = directory.parent.parent if directory.parent.name == "stage2" else directory.parent
    return run_dir / "robustness"


def run_robustness_job(job: RobustnessJob) -> dict[str, Any]:
    """Evaluate, print the table and write results.json, table.txt, accuracy.png and the reconstructions."""
    device = start_processes(resolve_device(job.device))  # torchrun / accelerate launch: the batches split
    dna = load_defended_model(job.checkpoint, device)
    baseline = load_defended_model(job.baseline, device) if job.baseline else None
    shape = model_spec(dna.info["arch"]).input_shape
    if baseline is not None and model_spec(baseline.info["arch"]).input_shape != shape:
        raise DecorrError(f"--baseline {job.baseline} takes {model_spec(baseline.info['arch']).input_shape} images "
                          f"but the DNA takes {shape}; compare models of the same dataset")
    dataset = load_dataset(job.dataset or dna.info["dataset"], job.data_root)
    if job.test_subset is not None and job.test_subset > len(dataset.test):
        raise DecorrError(f"--test-subset {job.test_subset} is more than the {len(dataset.test)} test images of "
                          f"{dataset.name}; pass at most {len(dataset.test)}, or leave it out to evaluate them all")
    split = dataset.test if job.test_subset is None else dataset.test.subset(job.test_subset)
    options = job.options
    if not options.eps:
        options = dataclasses.replace(options, eps=DEFAULT_EPS[shape[0]])
    out = prepare_output_dir(job.out or _default_out(dna.source), overwrite=job.overwrite)  # before any work
    check_paths_apart({"--out": out}, {job.checkpoint: job.checkpoint, **({job.baseline: job.baseline}
                                                                          if job.baseline else {})})
    if dataset.input_shape != shape:
        raise DecorrError(f"{job.checkpoint} takes {shape} images but {dataset.name!r} has {dataset.input_shape}; "
                          "evaluate it on the dataset it was trained for")
    report = evaluate_robustness(dna, split, options, baseline=baseline,
                                 progress=lambda text: rank() == 0 and print(f"\r{text}", end="", file=sys.stderr, flush=True))
    print(file=sys.stderr)
    report["settings"]["dataset"] = job.dataset or dna.info["dataset"]
    if rank() != 0:
        return report
    table = format_table(report)
    print(table)
    n = min(job.figure_samples, len(split))
    with staged_output_dir(out, overwrite=job.overwrite) as staging:
        (staging / "table.txt").write_text(table + "\n")
        plot_accuracy(report, staging / "accuracy.png")
        x, y = split.images[:n].to(device).float() / 255, split.labels[:n].to(device)
        largest = max(options.eps)
        for attack in options.attacks if n else []:
            adversarial = {f"{attack} {objective} eps {largest:.3g}": craft(
                dna, x, y, attack=options.attack(attack, largest), objective=objective, eps=largest,
                kappa=options.kappa, generator=torch.Generator().manual_seed(options.seed))
                for objective in options.objectives}
            plot_reconstructions(dna, x, y, adversarial, staging / f"reconstructions_{_slug(attack)}.png")
        write_results_json(staging / "results.json", report)  # last: it marks a complete folder
    figures = ", reconstructions_*.png" if n else ""
    print(f"wrote {out}/results.json, table.txt, accuracy.png{figures}")
    return report


def _slug(attack: str) -> str:
    import re

    return re.sub(r"[^\w.+-]+", "_", attack).strip("_") or "attack"
