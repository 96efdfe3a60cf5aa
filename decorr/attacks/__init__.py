"""Transfer attacks in pixel units on [0, 1] inputs: registered components combined into attacks.

    from decorr.attacks import Source, parse_attack
    attack = parse_attack("mifgsm+dim+tim")             # or "pgd", "sgm(gamma=0.5)", "fia+cw", ...
    x_adv = attack.craft(Source.of(model), x, y, eps=16 / 255, generator=torch.Generator().manual_seed(0))

Every attack works on a :class:`Source` (a model, an ensemble, or a bare loss closure ``loss_fn(x, y)``),
so the same attack runs on a model, on an ensemble as target or surrogate, and on the DNA. The names
(:func:`list_attacks`) are TransferAttack's; one file per family: ``gradient`` (fgsm, ifgsm, pgd, mifgsm,
nifgsm, vmifgsm, vnifgsm), ``inputs`` (dim, tim, sim, admix, ssm, bsr), ``feature_level`` (ila, fia, naa),
``model_side`` (sgm, linbp, ghost), ``ensemble`` (ens, svre), ``losses`` (ce, cw, logit). ``pgd`` and
``fgsm`` are also functions of a loss closure (:mod:`decorr.attacks.functional`), as DVERGE's distillation,
TRS and the DNA use them. docs/design.md, "Adding an attack", says how to add one.
"""

from decorr.attacks.base import Attack, AttackComponent, Context, Source
from decorr.attacks.registry import (ATTACKS, add_attack_arguments, attack_class, attack_overrides, list_attacks,
                                     parse_attack, parse_attacks, register_attack)
from decorr.attacks import ensemble, feature_level, gradient, inputs, losses, model_side  # noqa: F401  (they register themselves)
from decorr.attacks.functional import eps_sweep, fgsm, pgd
from decorr.attacks.losses import LossFn, ce_loss, ensemble_ce_loss, mean_ce_loss
from decorr.attacks.skip_gradient import register_residual_branch, residual_branches, skip_gradient
from decorr.attacks.transforms import gaussian_kernel, input_diversity, smooth_gradient

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackComponent",
    "Context",
    "LossFn",
    "Source",
    "add_attack_arguments",
    "attack_class",
    "attack_overrides",
    "ce_loss",
    "ensemble_ce_loss",
    "eps_sweep",
    "fgsm",
    "gaussian_kernel",
    "input_diversity",
    "list_attacks",
    "mean_ce_loss",
    "parse_attack",
    "parse_attacks",
    "pgd",
    "register_attack",
    "register_residual_branch",
    "residual_branches",
    "skip_gradient",
    "smooth_gradient",
]
