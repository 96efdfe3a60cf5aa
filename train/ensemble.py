"""Train an ensemble of N models with one diversity method on the one training loop.

    python train/ensemble.py --method dec --num-models 3 --run-dir runs/ens3_dec
    python train/ensemble.py --method trs --arch mnist_cnn mnist_fc mnist_cnn --run-dir runs/ens3_trs
    python train/ensemble.py --method dverge --init runs/ens3_dec --run-dir runs/ens3_dec_dverge   # dec+dverge
    python train/ensemble.py --method dec-frozen --surrogate runs/surrogate:model --run-dir runs/frozen
    accelerate launch train/ensemble.py --method dec ...
Methods: ce (independent), dec (decorrelated), dverge, adp, gal, trs, dec-frozen (one model decorrelated
from a frozen --surrogate). Defaults are the paper's MNIST pair recipe (Adam 5e-3, batch 1000, 20
epochs) with each objective's published coefficients. Writes RUN_DIR/checkpoint (kind "ensemble",
models model0 .. model{N-1}) and RUN_DIR/tensorboard; evaluate with eval/transfer.py RUN_DIR or
--ensemble ens=RUN_DIR.
"""

from __future__ import annotations

import argparse

from decorr.config import add_config_arguments, config_from_args, parse_with_config
from decorr.io import strict_json
from decorr.training.entry import RunOptions, add_run_arguments
from decorr.distributed import rank
from decorr.training.ensemble import EnsembleConfig, train_ensemble
from decorr.errors import cli_entry
from decorr.specs import SPEC_HELP, SpecOptions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=SPEC_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, EnsembleConfig)
    p.add_argument("--match-by-order", action="store_true",
                   help="--init / --surrogate ARCH=WEIGHTS: load weights whose names differ by position")
    add_run_arguments(p)
    return parse_with_config(p, argv)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    metrics = train_ensemble(config_from_args(EnsembleConfig, args), RunOptions.from_args(args),
                             spec_options=SpecOptions(match_by_order=args.match_by_order))
    if rank() == 0:
        print(strict_json(metrics))  # NaN (e.g. R^2 with too few images) as null
    return metrics


if __name__ == "__main__":
    main()
