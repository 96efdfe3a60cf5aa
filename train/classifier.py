"""Train one registry classifier on one dataset (surrogates and targets for transfer experiments).

    python train/classifier.py --arch resnet20 --dataset ../shared/data/cifar10-subset/cifar10_subset.npz \\
        --epochs 15 --run-dir runs/resnet20
    accelerate launch train/classifier.py --arch vgg_small --dataset cifar10 --run-dir runs/vgg ...
The checkpoint (kind "classifier", one model named "model") loads with decorr.checkpoint.load_models
and goes straight into eval/transfer.py, e.g. as --surrogate. Defaults: SGD 0.05, momentum 0.9,
weight decay 5e-4, cosine schedule, batch 128, the dataset's augmentation (CIFAR: crop pad 4 + flip).
"""

from __future__ import annotations

import argparse

from decorr.io import strict_json
from decorr.training.classifier import ClassifierConfig, train_classifier
from decorr.config import add_config_arguments, config_from_args, parse_with_config
from decorr.training.entry import RunOptions, add_run_arguments
from decorr.distributed import rank
from decorr.errors import cli_entry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, ClassifierConfig)
    add_run_arguments(p)
    return parse_with_config(p, argv)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    metrics = train_classifier(config_from_args(ClassifierConfig, args), RunOptions.from_args(args))
    if rank() == 0:
        print(strict_json(metrics))  # NaN (e.g. R^2 with too few images) as null
    return metrics


if __name__ == "__main__":
    main()
