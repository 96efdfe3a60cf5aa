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
import json

from decorr.classifier import OPTIMIZERS, SCHEDULES, ClassifierConfig, train_classifier
from decorr.distributed import rank
from decorr.errors import cli_entry, json_object
from decorr.training import add_run_arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ClassifierConfig.__dataclass_fields__
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=defaults["arch"].default,
                   help="registry model name (resnet20, vgg_small, densenet_small, resnet18_small, mnist_cnn, ...)")
    p.add_argument("--dataset", default=defaults["dataset"].default, help="dataset name or path to an .npz")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files (else $DECORR_DATA_ROOT, ./data)")
    p.add_argument("--run-dir", default=None, help="where checkpoints and TensorBoard logs go (default: a new runs/<name>/<timestamp>)")
    p.add_argument("--epochs", type=int, default=defaults["epochs"].default)
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"].default, help="global batch size")
    p.add_argument("--lr", type=float, default=defaults["lr"].default, help="(peak) learning rate")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults["optimizer"].default)
    p.add_argument("--momentum", type=float, default=defaults["momentum"].default, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=defaults["weight_decay"].default)
    p.add_argument("--schedule", choices=SCHEDULES, default=defaults["schedule"].default,
                   help="cosine: decay the learning rate to 0 over the run, per step")
    p.add_argument("--no-augment", action="store_true",
                   help="no training augmentation (default: the dataset's; colour images: random crop + flip)")
    p.add_argument("--sync-bn", action="store_true",
                   help="with several processes: batch norm statistics of the global batch")
    p.add_argument("--feature-layer", default=None, help="module name recorded as the feature layer (default: the model's)")
    p.add_argument("--model-kwargs", type=json_object, default={}, metavar="JSON",
                   help='keyword arguments for the registry model, e.g. \'{"mean": [0], "std": [1]}\' (raw pixels)')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-subset", type=int, default=None, help="use only the first N test images")
    add_run_arguments(p)
    return p.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = ClassifierConfig(
        model_kwargs=args.model_kwargs,
        arch=args.arch, dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
        augment=not args.no_augment, sync_bn=args.sync_bn, feature_layer=args.feature_layer, seed=args.seed,
        train_subset=args.train_subset, test_subset=args.test_subset,
    )
    metrics = train_classifier(config, args.run_dir, resume=args.resume, data_root=args.data_root,
                               mixed_precision=args.mixed_precision, cpu=args.cpu, log=not args.no_tensorboard)
    if rank() == 0:
        print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
