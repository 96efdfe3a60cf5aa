"""Transferability of adversarial examples between classifiers, under the field's transfer attacks.

    python eval/transfer.py runs/mnist_cnn_cor runs/mnist_cnn_dec --attack pgd --eps 0.05 0.1 0.15
    python eval/transfer.py runs/r20 runs/vgg runs/dense --attack mifgsm dim tim admix ssm bsr sgm --eps 16/255 --steps 10
    python eval/transfer.py runs/a runs/b --attack pgd+sgm --gamma 0.2 --surrogate runs/resnet --eps 8/255
    python eval/transfer.py torchvision.resnet18=r18.pth resnet20=r20.safetensors --num-classes 10 \
        --dataset cifar10 --eps 8/255
    torchrun --nproc_per_node 2 eval/transfer.py ...     (or accelerate launch: the images split by batches)
Every model of every spec (checkpoints, PATH:MODEL for one of their models, or ARCH=WEIGHTS files; the
grammar below) is a target; each source (the targets, or the --surrogate models) is attacked once per attack
and epsilon and every target is evaluated on its examples; with several attacks (or sources) the per-image
worst case comes beside them. Attacks are the suite's (decorr.attacks: fgsm ifgsm pgd mifgsm nifgsm vmifgsm
vnifgsm dim tim sim admix ssm bsr ila fia naa sgm linbp ghost ens svre, losses ce cw logit), combined with +
and given settings inline (mifgsm(decay=0.5)+dim) or by the attack flags below. Prints the tables and writes
results.json, transfer.csv, pairs.csv, table.txt and plots to --out (default runs/eval/<timestamp>).
--dataset also takes an image folder (class subfolders, or images with a labels .csv); --save-adversarial
DIR writes the examples as 8-bit PNGs with an index.csv, and --adversarial DIR evaluates the targets on such
a folder instead of attacking (docs/transfer.md). Epsilons and step sizes are in pixel units ([0, 1]); for
--norm l2 in Linf-equivalent units, scaled by --l2-scale. The outputs (--out, --save-adversarial) may not
overlap each other or hold an input. The schema is in decorr/evaluation/transfer.py.
"""

from __future__ import annotations

import argparse
import sys

from decorr.attacks import add_attack_arguments, attack_overrides
from decorr.config import add_config_arguments, config_kwargs, set_threads
from decorr.errors import cli_entry
from decorr.evaluation.command import DataOptions, OutputOptions, TransferJob, run_transfer_job
from decorr.evaluation.ensembles import ENSEMBLE_RULES
from decorr.evaluation.transfer import ModelSelection, TransferOptions
from decorr.specs import SPEC_HELP, add_spec_arguments, spec_options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=SPEC_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", metavar="SPEC", help="target models: checkpoints or ARCH=WEIGHTS specs")
    p.add_argument("--ensemble", action="append", default=[], metavar="NAME=SPEC,SPEC",
                   help="a target that combines its members (repeatable); attacked white-box like every target")
    p.add_argument("--ensemble-rule", choices=ENSEMBLE_RULES, default="prob",
                   help="ensembles predict with the mean softmax (prob), the mean logits or a majority vote")
    p.add_argument("--surrogate-ensemble", action="append", default=[], metavar="NAME=SPEC,SPEC",
                   help="a source attacked on its members' mean loss (Liu et al. 2017; repeatable)")
    p.add_argument("--surrogate", nargs="+", default=[], metavar="SPEC",
                   help="source-only models whose adversarial examples are evaluated on every target")
    add_config_arguments(p, TransferOptions, exclude=("attack_settings",))
    add_config_arguments(p.add_argument_group("data"), DataOptions)
    add_config_arguments(p.add_argument_group("outputs and adversarial files (docs/transfer.md)"), OutputOptions)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (e.g. 1 on a shared machine)")
    add_attack_arguments(p)
    add_spec_arguments(p)
    return p.parse_args(argv)


def job_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> TransferJob:
    """The :class:`TransferJob` the flags describe (every setting checked here, before any work)."""
    selection = ModelSelection(targets=tuple(args.checkpoints), surrogates=tuple(args.surrogate),
                               ensembles=tuple(args.ensemble), surrogate_ensembles=tuple(args.surrogate_ensemble),
                               ensemble_rule=args.ensemble_rule, spec_options=spec_options(args))
    options = TransferOptions(**config_kwargs(TransferOptions, args, exclude=("attack_settings",)),
                              attack_settings=attack_overrides(args))
    return TransferJob(selection, DataOptions(**config_kwargs(DataOptions, args)), options,
                       OutputOptions(**config_kwargs(OutputOptions, args)), device=args.device,
                       command=tuple(sys.argv[1:] if argv is None else argv))


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    return run_transfer_job(job_from_args(args, argv))


if __name__ == "__main__":
    main()
