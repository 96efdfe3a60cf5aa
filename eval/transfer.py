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
overlap each other or hold an input. The schema is in decorr/evaluation/transfer.py. --preset NAME fills in a
published protocol (transferattack, dverge, p1; decorr/evaluation/presets.py), every setting overridable:
    python eval/transfer.py --preset transferattack --dataset imagenet_compatible/ --dry-run
"""

from __future__ import annotations

from decorr.config import set_threads
from decorr.errors import cli_entry
from decorr.evaluation.command import describe_job, job_from_args, parse_transfer_args, run_transfer_job, transfer_parser


def parse_args(argv: list[str] | None = None):
    return parse_transfer_args(transfer_parser(__doc__), argv)


@cli_entry
def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    set_threads(args.threads)
    job = job_from_args(args, argv)
    if args.dry_run:
        print(describe_job(job))
        return None
    return run_transfer_job(job)


if __name__ == "__main__":
    main()
