"""DVERGE fine-tuning of a pair (or an ensemble of N models), measuring the transfer rate every epoch.

    python train/dverge.py --init-from runs/mnist_cnn_dec --run-dir runs/dverge_from_dec
    python train/dverge.py --init runs/a:model0 runs/b:model0 runs/c:model0 --run-dir runs/dverge3
    python train/dverge.py --init resnet20=a.safetensors resnet20=b.pth --dataset cifar10 --run-dir runs/dv
    accelerate launch train/dverge.py --init-from runs/mnist_cnn_cor --run-dir runs/dverge_from_cor
--init takes model specs: every model of each checkpoint (CKPT:MODEL picks one) or ARCH=WEIGHTS files
(grammar below; a model needs a feature layer: its registry default, feature_layer=, or --layer);
--init-from PAIR_DIR is the same for one pair run. Defaults are P1's MNIST setting (SPEC section 5):
distillation eps 0.15, 20 steps of 3/255 at each model's decorrelation layer, 10 epochs, Adam 5e-3,
batch 1000; the pairs' PGD transfer rates (40 steps of 3/255, eps 0.05 / 0.10 / 0.15) are measured
before the first epoch and after every epoch. DVERGE's own setting: --eps 0.07 --steps 10 --step-size 0.007 --layer L1 L2 ... (one drawn per
epoch). Writes RUN_DIR/checkpoint, RUN_DIR/tensorboard and RUN_DIR/dverge.json.
"""

from __future__ import annotations

import argparse

from decorr.config import add_config_arguments, config_from_args, parse_with_config
from decorr.errors import cli_entry
from decorr.evaluation.monitor import TransferMonitor, format_history
from decorr.specs import SPEC_HELP, add_spec_arguments, spec_options
from decorr.training.entry import RunOptions, add_run_arguments
from decorr.training.recipes import DvergeConfig, train_dverge


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=SPEC_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--init", nargs="+", metavar="SPEC",
                       help="starting models: checkpoints (all their models; CKPT:MODEL for one) or ARCH=WEIGHTS")
    start.add_argument("--init-from", metavar="PAIR_DIR", help="a pair run whose models are the starting point")
    add_config_arguments(p, DvergeConfig)
    p.add_argument("--json", default=None, help="the run's JSON record (default RUN_DIR/dverge.json)")
    add_run_arguments(p, helps={"run_dir": "where checkpoints, TensorBoard logs and dverge.json go "
                                          "(default: a new runs/dverge/<timestamp>)"})
    add_spec_arguments(p)
    return parse_with_config(p, argv)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = config_from_args(DvergeConfig, args)
    init = args.init if args.init else [args.init_from]
    record = train_dverge(config, init, RunOptions.from_args(args), spec_options=spec_options(args),
                          monitors=[TransferMonitor(config, args.json)])
    print(format_history(record))
    return record


if __name__ == "__main__":
    main()
