"""The command line of ``train/dna_mnist.py`` and ``train/dna_cifar.py``: flags from :class:`DnaConfig`."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any


from decorr.config import add_config_arguments, config_kwargs, env_int, parse_with_config
from decorr.io import strict_json
from decorr.training.entry import RunOptions, add_run_arguments

from dna.config import DnaConfig
from dna.training import train_dna

__all__ = ["main", "parse_args"]

def parse_args(family: str, argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The training scripts' options; defaults are the paper's setting of ``family``."""
    defaults = {**asdict(DnaConfig.paper(family)),
                "gradient_accumulation_steps": env_int("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", 1)}
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("1", "2", "both"), default="both",
                   help="1: autoencoder, 2: classifier on the frozen autoencoder, both: one after the other")
    p.add_argument("--from", dest="init_from", default=None,
                   help="stage-1 checkpoint whose autoencoder stage 2 uses (default: RUN_DIR/stage1)")
    add_config_arguments(p, DnaConfig, exclude=("family",), defaults=defaults)
    add_run_arguments(p, helps={"run_dir": "where both stages' checkpoints and TensorBoard logs go (default: a new "
                                          "runs/<model>_<family>/<timestamp>)",
                                "resume": "continue the stages in --run-dir from their checkpoints"})
    return parse_with_config(p, argv)


def main(family: str, argv: list[str] | None = None, description: str | None = None) -> dict[str, Any]:
    """Parse the command line, train, print the final metrics as JSON and return them."""
    args = parse_args(family, argv, description)
    config = DnaConfig.paper(family, **config_kwargs(DnaConfig, args, exclude=("family",)))
    results = train_dna(config, RunOptions.from_args(args), stage=args.stage, init_from=args.init_from)
    from decorr.distributed import rank

    if rank() == 0:
        print(strict_json(results))  # NaN (e.g. R^2 with too few images) as null
    return results
