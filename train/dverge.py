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

from decorr.dverge import DEFAULT_EVAL_EPS, DvergeConfig, format_history, train_dverge
from decorr.errors import cli_entry, pixel_value
from decorr.models.specs import SPEC_HELP, add_spec_arguments, spec_options
from decorr.validation import set_threads
from decorr.training import add_run_arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = {name: f.default for name, f in DvergeConfig.__dataclass_fields__.items()}
    p = argparse.ArgumentParser(description=__doc__, epilog=SPEC_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--init", nargs="+", metavar="SPEC",
                       help="starting models: checkpoints (all their models; CKPT:MODEL for one) or ARCH=WEIGHTS")
    start.add_argument("--init-from", metavar="PAIR_DIR", help="a pair run whose models are the starting point")
    p.add_argument("--run-dir", default=None, help="where checkpoints, TensorBoard logs and dverge.json go (default: a new runs/<name>/<timestamp>)")
    p.add_argument("--dataset", default=None, help="dataset name or .npz (default: the checkpoints' dataset)")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files (else $DECORR_DATA_ROOT, ./data)")
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="global batch size")
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--layer", nargs="+", default=[], metavar="MODULE",
                   help="distillation layer; several: one drawn at random every epoch (default: each model's feature layer)")
    p.add_argument("--eps", type=pixel_value, default=d["eps"], help="distillation Linf radius (pixel units)")
    p.add_argument("--steps", type=int, default=d["steps"], help="distillation steps")
    p.add_argument("--step-size", type=pixel_value, default=d["step_size"], help="distillation step (pixel units)")
    p.add_argument("--random-start", action="store_true", help="start the distillation at a random point of the ball")
    p.add_argument("--momentum", type=float, default=d["momentum"], help="MI momentum of the distillation")
    p.add_argument("--plus-adv", action="store_true", help="also train each model on its own PGD examples")
    p.add_argument("--adv-weight", type=float, default=d["adv_weight"])
    p.add_argument("--adv-eps", type=pixel_value, default=None, help="plus-adv PGD radius (default: --eps)")
    p.add_argument("--adv-steps", type=int, default=d["adv_steps"])
    p.add_argument("--adv-step-size", type=pixel_value, default=None, help="plus-adv PGD step (default: --step-size)")
    p.add_argument("--eval-eps", nargs="+", type=pixel_value, default=list(DEFAULT_EVAL_EPS))
    p.add_argument("--eval-steps", type=int, default=d["eval_steps"])
    p.add_argument("--eval-step-size", type=pixel_value, default=d["eval_step_size"])
    p.add_argument("--eval-subset", type=int, default=None, help="transfer rates on the first N test images (default all)")
    p.add_argument("--eval-batch-size", type=int, default=d["eval_batch_size"])
    p.add_argument("--train-subset", type=int, default=None, help="train on the first N training images")
    p.add_argument("--batches-per-epoch", type=int, default=None,
                   help="stop every epoch after N batches of its shuffle (a shorter epoch; default: all)")
    p.add_argument("--accuracy-subset", type=int, default=None,
                   help="natural accuracy on the first N test images (default all)")
    p.add_argument("--no-features", action="store_true", help="skip the pairs' feature R^2 in the evaluation")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (e.g. 1 on a shared machine)")
    p.add_argument("--json", default=None, help="the run's JSON record (default RUN_DIR/dverge.json)")
    add_run_arguments(p)
    add_spec_arguments(p)
    return p.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    config = DvergeConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, layers=tuple(args.layer), eps=args.eps,
        steps=args.steps, step_size=args.step_size, random_start=args.random_start, momentum=args.momentum,
        plus_adv=args.plus_adv, adv_weight=args.adv_weight, adv_eps=args.adv_eps, adv_steps=args.adv_steps,
        adv_step_size=args.adv_step_size, seed=args.seed, dataset=args.dataset, train_subset=args.train_subset,
        eval_subset=args.eval_subset, eval_eps=tuple(args.eval_eps), eval_steps=args.eval_steps,
        eval_step_size=args.eval_step_size, eval_batch_size=args.eval_batch_size,
        batches_per_epoch=args.batches_per_epoch, accuracy_subset=args.accuracy_subset,
        eval_features=not args.no_features,
    )
    init = args.init if args.init else [args.init_from]
    record = train_dverge(config, init, args.run_dir, resume=args.resume, data_root=args.data_root,
                          mixed_precision=args.mixed_precision, cpu=args.cpu, log=not args.no_tensorboard,
                          json_path=args.json, spec_options=spec_options(args))
    print(format_history(record))
    return record


if __name__ == "__main__":
    main()
