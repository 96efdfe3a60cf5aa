"""Train a pair of classifiers: independent ("cor"), decorrelated ("dec") or parameter-distance ("param").

    python train/pair_classifiers.py --mode dec --dataset mnist --run-dir runs/mnist_cnn_dec
    accelerate launch train/pair_classifiers.py --mode cor ...
Defaults are the paper's MNIST hyperparameters (SPEC section 2).
"""

from __future__ import annotations

import argparse
import json

from decorr.distributed import rank
from decorr.errors import cli_entry, json_object
from decorr.pairs import MODES, PairConfig, train_pair
from decorr.training import add_run_arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = PairConfig.__dataclass_fields__
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=defaults["arch"].default, help="registry model name (mnist_cnn, mnist_fc, ...)")
    p.add_argument("--mode", choices=MODES, default=defaults["mode"].default)
    p.add_argument("--dataset", default=defaults["dataset"].default, help="dataset name or path to an .npz")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files (else $DECORR_DATA_ROOT, ./data)")
    p.add_argument("--run-dir", default=None, help="where checkpoints and TensorBoard logs go (default: a new runs/<name>/<timestamp>)")
    p.add_argument("--epochs", type=int, default=defaults["epochs"].default)
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"].default, help="global batch size")
    p.add_argument("--lr", type=float, default=defaults["lr"].default)
    p.add_argument("--lambda-corr", type=float, default=defaults["lambda_corr"].default)
    p.add_argument("--target-distance", type=float, default=defaults["target_distance"].default,
                   help="D of the parametric-distance pairs (mode param)")
    p.add_argument("--distance-weight", type=float, default=defaults["distance_weight"].default)
    p.add_argument("--feature-layer", default=None, help="module name of the decorrelated layer (default: the model's)")
    p.add_argument("--corr-direction", choices=("forward", "both"), default="forward",
                   help="regress model1 on model0 (the paper) or average both directions")
    p.add_argument("--corr-warmup-epochs", type=int, default=0,
                   help="epochs of cross-entropy alone before the correlation loss starts (paper: 0); "
                        "guards against a model collapsing to constant features")
    p.add_argument("--model-kwargs", type=json_object, default={}, metavar="JSON",
                   help='keyword arguments for the registry model, e.g. \'{"mean": [0], "std": [1]}\' (raw pixels)')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-subset", type=int, default=None, help="use only the first N test images")
    add_run_arguments(p)
    return p.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = PairConfig(
        model_kwargs=args.model_kwargs,
        arch=args.arch, mode=args.mode, dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, lambda_corr=args.lambda_corr, target_distance=args.target_distance,
        distance_weight=args.distance_weight, feature_layer=args.feature_layer, corr_direction=args.corr_direction,
        corr_warmup_epochs=args.corr_warmup_epochs, seed=args.seed,
        train_subset=args.train_subset, test_subset=args.test_subset,
    )
    metrics = train_pair(config, args.run_dir, resume=args.resume, data_root=args.data_root,
                         mixed_precision=args.mixed_precision, cpu=args.cpu, log=not args.no_tensorboard)
    if rank() == 0:
        print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
