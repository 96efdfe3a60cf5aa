"""Transferability of adversarial examples between classifiers (SPEC section 3).

    python eval/transfer.py runs/mnist_cnn_cor runs/mnist_cnn_dec --attack pgd --eps 0.05 0.1 0.15
    python eval/transfer.py runs/a runs/b --attack sgm --gamma 0.2 --surrogate runs/resnet --eps 0.03
    python eval/transfer.py torchvision.resnet18=r18.pth resnet20=r20.safetensors --num-classes 10 \
        --dataset cifar10 --eps 8/255
Every model of every spec (checkpoints, ``PATH:MODEL`` for one of their models, or ``ARCH=WEIGHTS``
files; see the spec grammar below) is a target; each source (the
targets, or the --surrogate models) is attacked once per epsilon and every target is evaluated on
its adversarial examples. Prints the tables and writes results.json, transfer.csv, pairs.csv,
table.txt, heatmap_<attack>_<norm>_eps<eps>.png, transfer_vs_eps_<attack>_<norm>.png (and with
--tensorboard a tensorboard/ folder) to --out (default runs/eval/<timestamp>).
--dataset also takes an image folder (class subfolders, or images with a labels .csv; --image-size N
resizes and centre-crops); --save-adversarial DIR writes the examples as 8-bit PNGs with an index.csv, and
--adversarial DIR evaluates the targets on such a folder instead of attacking (docs/transfer.md).
Epsilons and the PGD step are in pixel units ([0, 1]); for --norm l2 in Linf-equivalent units,
scaled by --l2-scale (SPEC: eps * sqrt(image side)). Without --eps the radii follow the images: 1-channel
(MNIST-like) 0.05 0.1 0.15, colour up to 64 px (CIFAR-like) 2/255 4/255 8/255, larger colour images
(ImageNet-like) 4/255 8/255 16/255; results record the choice (settings.eps_default). The outputs (--out,
--save-adversarial) may not overlap each other or hold an input. The schema is in decorr/evaluation/transfer.py.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from decorr.attacks.skip_gradient import DEFAULT_EXCLUDE, EXCLUDE_RULES
from decorr.data import load_dataset
from decorr.evaluation.adversarial_files import AdversarialWriter, evaluate_adversarial_specs, read_index
from decorr.evaluation.ensembles import ENSEMBLE_RULES, parse_ensemble_spec
from decorr.errors import DecorrError, cli_entry, pixel_value
from decorr.specs import SPEC_HELP, add_spec_arguments, spec_options, spec_paths
from decorr.io import check_paths_apart, default_output_dir, prepare_output_dir, staged_output_dir
from decorr.evaluation.report import format_transfer, save_transfer_report
from decorr.config import check_seed, check_subset, resolve_device, set_threads
from decorr.evaluation.transfer import (
    ATTACKS,
    DEFAULT_EPS,
    L2_SCALES,
    TransferSettings,
    checkpoint_dataset,
    evaluate_checkpoints,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=SPEC_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", metavar="SPEC", help="target models: checkpoints or ARCH=WEIGHTS specs")
    p.add_argument("--ensemble", action="append", default=[], metavar="NAME=SPEC,SPEC",
                   help="a target that combines its members (repeatable); attacked white-box like every target")
    p.add_argument("--ensemble-rule", choices=ENSEMBLE_RULES, default="prob",
                   help="ensembles predict with the mean softmax (prob), the mean logits or a majority vote")
    p.add_argument("--surrogate-ensemble", action="append", default=[], metavar="NAME=SPEC,SPEC",
                   help="a source attacked on its members' mean cross-entropy (Liu et al. 2017; repeatable)")
    p.add_argument("--surrogate", nargs="+", default=[], metavar="SPEC",
                   help="source-only models whose adversarial examples are evaluated on every target")
    p.add_argument("--attack-targets", action="store_true",
                   help="with --surrogate: attack the targets too (without --surrogate they always are)")
    p.add_argument("--dataset", default=None,
                   help="dataset name, .npz, or image folder / labels .csv (default: the checkpoints' dataset)")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files (else $DECORR_DATA_ROOT)")
    p.add_argument("--num-samples", type=int, default=None, help="first N test images (default: all)")
    p.add_argument("--only-correct", action="store_true",
                   help="evaluate only the images every model classifies correctly (SGM paper's protocol)")
    p.add_argument("--attack", choices=ATTACKS, default="pgd", help="sgm: PGD with --gamma on residual sources")
    p.add_argument("--norm", choices=("linf", "l2"), default="linf")
    p.add_argument("--eps", nargs="+", type=pixel_value, default=None,
                   help="radii in pixel units (default by image shape: 1-channel 0.05 0.1 0.15, colour up to 64 px "
                        "2/255 4/255 8/255, larger 4/255 8/255 16/255)")
    p.add_argument("--l2-scale", choices=L2_SCALES, default="sqrt-side",
                   help="L2 radius = eps * sqrt(image side) (SPEC), * sqrt(C*H*W), or eps itself")
    p.add_argument("--steps", type=int, default=40, help="PGD/SGM steps")
    p.add_argument("--step-size", type=pixel_value, default=3 / 255, help="PGD/SGM step (pixel units)")
    p.add_argument("--no-random-start", action="store_true", help="start PGD at the natural image")
    p.add_argument("--gamma", type=float, default=None, help="SGM gradient decay on residual branches (default 0.2)")
    p.add_argument("--sgm-exclude", choices=EXCLUDE_RULES, default=DEFAULT_EXCLUDE,
                   help="residual units SGM leaves undecayed: the first of each stage (the SGM authors' rule) or none")
    p.add_argument("--momentum", type=float, default=0.0, help="MI momentum (MI-FGSM uses 1.0)")
    p.add_argument("--diversity", type=float, default=0.0, help="DI probability (0.5 in the DI paper)")
    p.add_argument("--ti-kernel", type=int, default=None, help="TI Gaussian kernel size (odd)")
    p.add_argument("--seed", type=int, default=0, help="seeds the random starts (per source, eps and batch)")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--no-features", action="store_true", help="skip feature R^2 / PCA Pearson of same-arch pairs")
    g = p.add_argument_group("image folders and adversarial files (docs/transfer.md)")
    g.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="folder images: resize (shorter side) and centre-crop to N x N, as torchvision's Resize + CenterCrop")
    g.add_argument("--resize", type=int, default=None, metavar="R",
                   help="with --image-size: resize the shorter side to R before the N x N crop (e.g. 256 for 224)")
    g.add_argument("--class-map", default=None, help="folder labels: JSON or text file mapping label names to indices")
    g.add_argument("--label-offset", type=int, default=0, help="added to a labels .csv's integer labels (NIPS 2017: -1)")
    g.add_argument("--memory-budget-mb", type=float, default=None,
                   help="decoded folder images up to this size stay in memory, larger sets are streamed (default 4096)")
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers decoding streamed images")
    g.add_argument("--save-adversarial", default=None, metavar="DIR",
                   help="write every source's adversarial examples per eps as PNG (round(255 x)) + DIR/index.csv")
    g.add_argument("--save-float", action="store_true", help="with --save-adversarial: also a float32 .npy per image")
    g.add_argument("--adversarial", default=None, metavar="DIR",
                   help="evaluate the targets (and named --surrogate sources) on the saved examples in DIR; no attack")
    g.add_argument("--adversarial-float", action="store_true",
                   help="with --adversarial: evaluate the float copies (8-bit results given beside them)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (e.g. 1 on a shared machine)")
    p.add_argument("--out", default=None, help="output folder (default: runs/eval/<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace the results in an existing --out")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars to OUT/tensorboard")
    add_spec_arguments(p)
    return p.parse_args(argv)


def default_eps(shape: tuple[int, ...]) -> tuple[tuple[float, ...], str]:
    """The radii used without --eps, by the images' shape (C, H, W), and a description for the results.

    MNIST's radii (SPEC section 3) suit 1-channel images only: on colour images the usual Linf budgets are
    a few 255ths (SPEC section 6 for CIFAR-10: 2, 4, 8 / 255; the ImageNet transfer literature, e.g. SGM
    and TransferAttack, goes up to 16/255).
    """
    channels, height, width = (tuple(shape) + (0, 0, 0))[:3]
    if channels == 1:
        return tuple(DEFAULT_EPS), "1-channel images (MNIST-like, SPEC): 0.05 0.1 0.15"
    if min(height, width) <= 64:
        return (2 / 255, 4 / 255, 8 / 255), "colour images up to 64 px (CIFAR-like): 2/255 4/255 8/255"
    return (4 / 255, 8 / 255, 16 / 255), "colour images over 64 px (ImageNet-like): 4/255 8/255 16/255"


def _input_paths(args: argparse.Namespace, member_specs: list[str]) -> dict[str, str]:
    """Every existing file or folder this command reads, by the text that named it."""
    paths = spec_paths(args.checkpoints + args.surrogate + member_specs)
    for flag in ("dataset", "adversarial", "class_map"):
        value = getattr(args, flag)
        if value and os.path.exists(value):
            paths[f"--{flag.replace('_', '-')} {value}"] = value
    return paths


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    check_subset("num_samples", args.num_samples)
    check_seed(args.seed)
    device = resolve_device(args.device)
    attack_settings = dict(
        attack=args.attack, norm=args.norm, steps=args.steps, step_size=args.step_size,
        random_start=not args.no_random_start, gamma=args.gamma, momentum=args.momentum, diversity=args.diversity,
        ti_kernel=args.ti_kernel, l2_scale=args.l2_scale, seed=args.seed, batch_size=args.batch_size,
        sgm_exclude=args.sgm_exclude,
    )
    TransferSettings(eps=tuple(args.eps or DEFAULT_EPS), **attack_settings)  # bad settings fail before any work
    options = spec_options(args)
    member_specs = [spec for text in args.ensemble + args.surrogate_ensemble for spec in parse_ensemble_spec(text)[1]]
    if not args.checkpoints and not args.ensemble:
        raise DecorrError("no target models; pass checkpoints or specs (SPEC ...) or --ensemble NAME=SPEC,SPEC")
    out = prepare_output_dir(args.out or default_output_dir(), overwrite=args.overwrite)  # before any work
    # --out is replaced whole when the results are written: it may hold neither an input nor the examples
    # that --save-adversarial writes during the same run.
    check_paths_apart({"--out": out, "--save-adversarial": args.save_adversarial}, _input_paths(args, member_specs))
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    folder_options = {k: v for k, v in dict(
        image_size=args.image_size, resize=args.resize, class_map=args.class_map, label_offset=args.label_offset,
        memory_budget_mb=args.memory_budget_mb, workers=args.workers).items() if v not in (None, 0)}
    if args.adversarial:
        if args.save_adversarial:
            raise DecorrError("--adversarial evaluates saved examples and --save-adversarial saves new ones; use one")
        if args.ensemble or args.surrogate_ensemble:
            raise DecorrError("--adversarial evaluates single models on saved examples; drop --ensemble/--surrogate-ensemble")
        if args.num_samples is not None:
            raise DecorrError("--adversarial evaluates every image its index.csv lists; drop --num-samples")
        if args.eps:
            listed = sorted({eps for _, eps in read_index(args.adversarial)})
            if len(listed) != len(args.eps) or not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
                                                       for a, b in zip(listed, sorted(args.eps))):
                raise DecorrError(f"--adversarial {args.adversarial} holds the radii {' '.join(f'{e:g}' for e in listed)}, "
                                  f"not --eps {' '.join(f'{e:g}' for e in args.eps)}; drop --eps (the folder's radii "
                                  "are evaluated)")
        result = evaluate_adversarial_specs(
            args.checkpoints, args.adversarial, surrogates=args.surrogate, device=device, spec_options=options,
            use_float=args.adversarial_float, batch_size=args.batch_size, log=log,
            memory_budget_mb=args.memory_budget_mb, workers=args.workers)
        dataset_name = None
    else:
        if args.adversarial_float:
            raise DecorrError("--adversarial-float needs --adversarial DIR")
        # Checks the folder now; it is created with the first adversarial batch.
        writer = AdversarialWriter(args.save_adversarial, save_float=args.save_float) if args.save_adversarial else None
        if args.save_float and writer is None:
            raise DecorrError("--save-float needs --save-adversarial DIR")
        dataset = load_dataset(args.dataset or checkpoint_dataset(args.checkpoints + args.surrogate + member_specs),
                               args.data_root, **folder_options)
        split = dataset.test
        if args.num_samples is not None:
            if args.num_samples > len(split):
                raise DecorrError(f"--num-samples {args.num_samples} is more than the {len(split)} test images of "
                                  f"{dataset.name}; pass at most {len(split)}, or leave it out to evaluate them all")
            split = split.subset(args.num_samples)
        eps, eps_default = (tuple(args.eps), None) if args.eps else default_eps(tuple(dataset.input_shape))
        try:
            result = evaluate_checkpoints(
                args.checkpoints, split, surrogates=args.surrogate, device=device, spec_options=options,
                ensembles=args.ensemble, surrogate_ensembles=args.surrogate_ensemble, ensemble_rule=args.ensemble_rule,
                attack_targets=True if args.attack_targets else None, eps_list=list(eps), features=not args.no_features,
                only_correct=args.only_correct, **attack_settings, log=log, on_adversarial=writer,
            )
        except BaseException:
            if writer is not None:
                writer.discard()  # no half-written folder
            raise
        result["settings"]["eps_default"] = eps_default
        if eps_default:  # printed with the tables' notes
            result["notes"] = sorted([*result["notes"], f"no --eps given: the default radii for {eps_default}"])
        dataset_name = dataset.name
        if writer is not None:
            writer.close(result["settings"])
            result["settings"]["save_adversarial"] = str(args.save_adversarial)
    result["settings"].update({"dataset": dataset_name, "device": str(device), "command": sys.argv[1:] if argv is None else list(argv)})
    with staged_output_dir(out, overwrite=args.overwrite) as staging:
        save_transfer_report(result, staging, plots=not args.no_plots, tensorboard=args.tensorboard)
    print(format_transfer(result))
    print(f"\nwrote {out}/results.json, transfer.csv, pairs.csv, table.txt" + ("" if args.no_plots else " and plots"))
    return result


if __name__ == "__main__":
    main()
