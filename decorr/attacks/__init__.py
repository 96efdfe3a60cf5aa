"""Gradient attacks in pixel units on [0, 1] inputs: FGSM, PGD (Linf/L2, MI/DI/TI) and SGM.

Each attack maximises a loss closure ``loss_fn(x_adv, y) -> scalar`` (see ``losses``), so one attack
serves a single model, an ensemble or an autoencoder plus classifier. Typical transfer evaluation::

    for source in sources:
        with skip_gradient(source, 0.2):   # SGM; omit for plain PGD
            advs = eps_sweep(pgd, ce_loss(source), x, y, eps_list=[0.05, 0.1], steps=40, step_size=3 / 255)
        # evaluate every target on advs[eps]
"""

from decorr.attacks.fgsm import fgsm
from decorr.attacks.losses import LossFn, ce_loss, ensemble_ce_loss, mean_ce_loss
from decorr.attacks.pgd import eps_sweep, pgd
from decorr.attacks.skip_gradient import register_residual_branch, residual_branches, skip_gradient
from decorr.attacks.transforms import gaussian_kernel, input_diversity, smooth_gradient

__all__ = [
    "LossFn",
    "ce_loss",
    "ensemble_ce_loss",
    "eps_sweep",
    "fgsm",
    "gaussian_kernel",
    "input_diversity",
    "mean_ce_loss",
    "pgd",
    "register_residual_branch",
    "residual_branches",
    "skip_gradient",
    "smooth_gradient",
]
