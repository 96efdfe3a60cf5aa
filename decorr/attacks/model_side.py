"""Model-side attacks of the suite: SGM (sgm), LinBP (linbp), Ghost networks (ghost).

They change how the source model is differentiated (SGM, LinBP) or evaluated (Ghost) while the attack
crafts, through hooks installed on entry and removed on exit; the model itself is never modified.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from decorr.attacks.base import Context, ModelModifier, Source
from decorr.attacks.registry import register_attack
from decorr.attacks.skip_gradient import DEFAULT_EXCLUDE, EXCLUDE_RULES, residual_branches, skip_gradient
from decorr.config import opt
from decorr.errors import DecorrError

__all__ = ["SGM"]


@register_attack("sgm")
@dataclass(frozen=True)
class SGM(ModelModifier):
    """SGM (Wu et al. 2020): the gradient through every residual branch times ``gamma`` (the skip path's
    kept), the first unit of each stage left alone as in the authors' code (:mod:`decorr.attacks.skip_gradient`;
    equal to their hooks' gradient). The paper: gamma 0.2 for ResNets, 0.5 for DenseNets."""

    gamma: float = opt(0.2, "decay of the gradient through residual branches (ResNet 0.2, DenseNet 0.5)",
                       flag="--gamma")
    exclude: str = opt(DEFAULT_EXCLUDE, "residual units left undecayed: first-of-stage (the authors') or none",
                       flag="--sgm-exclude")

    def check(self) -> None:
        if not (isinstance(self.gamma, (int, float)) and 0 < self.gamma <= 1):
            self.fail("gamma", f"must be in (0, 1] (the paper uses 0.2 for ResNets), got {self.gamma!r}")
        if self.exclude not in EXCLUDE_RULES:
            self.fail("exclude", f"must be one of {', '.join(EXCLUDE_RULES)}, got {self.exclude!r}")

    def check_source(self, source: Source) -> None:
        model = source.module
        if model is None or not residual_branches(model, self.exclude):
            raise DecorrError(f"sgm: source {source.name} ({type(model).__name__}) has no residual units to decay "
                              f"(--sgm-exclude {self.exclude}); attack it without sgm, or use a residual surrogate")

    @contextlib.contextmanager
    def applied(self, ctx: Context) -> Iterator[None]:
        assert ctx.source.module is not None
        with skip_gradient(ctx.source.module, float(self.gamma), exclude=self.exclude):
            yield
