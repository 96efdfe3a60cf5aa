"""White-box robustness of a dual-neck autoencoder + classifier, against a plain-autoencoder baseline.

    python eval/dna_robustness.py runs/dna_mnist --baseline runs/ae_mnist --attack fgsm pgd \\
        --eps 0.05 0.1 0.15 --objective paper adaptive-min
    python eval/dna_robustness.py runs/dna_mnist --attack pgd mifgsm+dim ssm --objective adaptive-min
For each attack, objective and epsilon: the DNA's accuracy when either reconstruction is classified
correctly, each path's accuracy and their mean, and the baseline's accuracy under the same attack on
itself. Attacks are the suite's (decorr.attacks, as eval/transfer.py's --attack), crafted on the objective
as a loss closure; PGD steps 2.5 * eps / steps unless --step-size says otherwise. Writes results.json,
table.txt, accuracy.png (like P1's Fig. 6/8) and reconstructions_<attack>.png (natural / perturbed images
and their reconstructions, like Fig. 7/9) to --out (default: RUN_DIR/robustness). Checkpoints are run
directories of train/dna_*.py (or their stage2 checkpoint folders).
"""

from __future__ import annotations

import argparse

from decorr.attacks import add_attack_arguments, attack_overrides
from decorr.config import add_config_arguments, config_kwargs, parse_with_config
from decorr.errors import cli_entry
from dna.evaluation import RobustnessOptions
from dna.robustness import RobustnessJob, run_robustness_job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="DNA run directory (or its stage-2 checkpoint)")
    add_config_arguments(p, RobustnessJob, exclude=("checkpoint", "options"))
    add_config_arguments(p, RobustnessOptions, exclude=("attack_settings",))
    add_attack_arguments(p)
    return parse_with_config(p, argv)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    options = RobustnessOptions(**config_kwargs(RobustnessOptions, args, exclude=("attack_settings",)),
                                attack_settings=attack_overrides(args))
    job = RobustnessJob(args.checkpoint, **config_kwargs(RobustnessJob, args, exclude=("checkpoint", "options")),
                        options=options)
    return run_robustness_job(job)


if __name__ == "__main__":
    main()
