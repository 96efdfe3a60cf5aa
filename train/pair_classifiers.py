"""Train a pair of classifiers: independent ("cor"), decorrelated ("dec") or parameter-distance ("param").

    python train/pair_classifiers.py --mode dec --dataset mnist --run-dir runs/mnist_cnn_dec
    accelerate launch train/pair_classifiers.py --mode cor ...
Defaults are the paper's MNIST hyperparameters (SPEC section 2).
"""

from __future__ import annotations

import argparse

from decorr.io import strict_json
from decorr.distributed import rank
from decorr.config import add_config_arguments, config_from_args, parse_with_config
from decorr.training.entry import RunOptions, add_run_arguments
from decorr.errors import cli_entry
from decorr.training.recipes import PairConfig, train_pair


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, PairConfig)
    add_run_arguments(p)
    return parse_with_config(p, argv)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    metrics = train_pair(config_from_args(PairConfig, args), RunOptions.from_args(args))
    if rank() == 0:
        print(strict_json(metrics))  # NaN (e.g. R^2 with too few images) as null


if __name__ == "__main__":
    main()
