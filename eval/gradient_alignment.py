"""Input-gradient alignment of sources (plain and SGM-decayed) with targets, without attacking.

    python eval/gradient_alignment.py runs/fm_vgg_small runs/fm_densenet_small --surrogate runs/fm_resnet20 \
        --gamma 1 0.7 0.5 0.2 --num-samples 500 --out runs/eval/fm_alignment.json
For every source, gamma and target: the mean per-sample cosine similarity of the source's cross-entropy
input gradient (through skip_gradient(source, gamma, exclude=--sgm-exclude)) with the target's, and the fraction of input
coordinates whose signs agree, on natural test images; plus each decayed gradient's cosine with the
source's own true gradient. Without --surrogate every checkpoint's models are sources and targets.
Models are specs: checkpoints (PATH, PATH:MODEL) or ARCH=WEIGHTS files (grammar below).
Prints a table and writes JSON (schema in decorr/evaluation/alignment.py).
"""

from __future__ import annotations

import argparse
import sys


from decorr.evaluation.alignment import evaluate_gradient_alignment, format_gradient_alignment
from decorr.attacks.skip_gradient import DEFAULT_EXCLUDE, EXCLUDE_RULES
from decorr.data import load_dataset
from decorr.distributed import rank, start_processes
from decorr.errors import DecorrError, cli_entry
from decorr.specs import SPEC_HELP, add_spec_arguments, check_input_shape, load_specs, spec_options, spec_paths
from decorr.io import check_output_file, check_paths_apart, write_results_json
from decorr.evaluation.selection import checkpoint_dataset
from decorr.config import check_at_least, parse_with_config, resolve_device, set_threads

#: Test images used without --num-samples (all of them when the split is smaller).
DEFAULT_SAMPLES = 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=SPEC_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="SPEC", help="target models: checkpoints or ARCH=WEIGHTS specs")
    p.add_argument("--surrogate", nargs="+", default=[], metavar="SPEC", help="source models (default: the targets)")
    p.add_argument("--gamma", nargs="+", type=float, default=[1.0], help="SGM decays to compare (1 = plain gradient)")
    p.add_argument("--sgm-exclude", choices=EXCLUDE_RULES, default=DEFAULT_EXCLUDE,
                   help="residual units SGM leaves undecayed: the first of each stage (the SGM authors' rule) or none")
    p.add_argument("--dataset", default=None, help="dataset name or .npz (default: the checkpoints' dataset)")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files (else $DECORR_DATA_ROOT)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="first N test images (default: 1000, or all when the split is smaller)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="JSON file to write (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    add_spec_arguments(p)
    return parse_with_config(p, argv)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    if args.num_samples is not None:
        check_at_least("num_samples", args.num_samples, 1)
    check_at_least("batch_size", args.batch_size, 1)
    device = start_processes(resolve_device(args.device))  # torchrun / accelerate launch: the batches split
    if args.out:  # checked before any work
        check_output_file(args.out, overwrite=args.overwrite)
        check_paths_apart({"--out": args.out}, spec_paths(args.checkpoints + args.surrogate))
    dataset = load_dataset(args.dataset or checkpoint_dataset(args.checkpoints + args.surrogate), args.data_root)
    if args.num_samples is not None and args.num_samples > len(dataset.test):
        raise DecorrError(f"--num-samples {args.num_samples} is more than the {len(dataset.test)} test images of "
                          f"{dataset.name}; pass at most {len(dataset.test)}, or leave it out")
    split = dataset.test.subset(min(args.num_samples or DEFAULT_SAMPLES, len(dataset.test)))
    options = spec_options(args)
    loaded = load_specs(args.checkpoints, options, device=device)
    loaded_sources = load_specs(args.surrogate, options, device=device) if args.surrogate else loaded
    check_input_shape({**loaded_sources, **loaded}, split.images.shape[1:])
    targets = {name: m.module for name, m in loaded.items()}
    sources = {name: m.module for name, m in loaded_sources.items()}
    result = evaluate_gradient_alignment(sources, targets, split, gammas=args.gamma, batch_size=args.batch_size,
                                         device=device, sgm_exclude=args.sgm_exclude)
    result.update({"dataset": dataset.name, "command": sys.argv[1:] if argv is None else list(argv)})
    if rank() == 0:
        print(format_gradient_alignment(result))
        if args.out:
            write_results_json(args.out, result)
            print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
