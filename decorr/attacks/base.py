"""The attack interface: registered components combined into one attack, crafting from a loss on a source.

An attack of the suite is a combination of components, written with ``+`` (``mifgsm+dim+tim``,
``pgd+sgm``, ``fia+cw``), each a small frozen dataclass of its settings registered by name
(:func:`decorr.attacks.registry.register_attack`). A component has one of these kinds:

================  ====================================================================  ================
kind              what it does                                                          at most
================  ====================================================================  ================
``optimizer``     the iteration: start, gradient queries, update (fgsm, ifgsm, pgd,     one (default:
                  mifgsm, nifgsm, vmifgsm, vnifgsm)                                     ``mifgsm``)
``input``         turns the point a gradient is taken at into copies whose gradients    any, applied in
                  are averaged (dim, sim, admix, ssm, bsr)                              the written order
``gradient``      post-processes each gradient (tim)                                    any
``model``         changes the source's backward (or forward) while crafting            any
                  (sgm, linbp, ghost)
``objective``     what is maximised: the classification loss (ce, cw, logit) or a      one (default
                  feature-level objective (ila, fia, naa)                               ``ce``)
``ensemble``      how an ensemble source's members are combined (ens, svre; default:    one
                  the members' mean loss)
================  ====================================================================  ================

What is attacked is a :class:`Source`: a classifier (any module returning logits), an ensemble of
members, or a bare loss closure ``loss_fn(x, y) -> scalar`` (the DNA's objectives) for attacks that
need nothing else. Crafting never changes the source: the train/eval mode of every submodule is
restored afterwards (the source is attacked in eval mode), and model-side components remove their hooks.

Randomness (random starts, DI, neighbours, copies) comes only from the ``generator`` given to
:meth:`Attack.craft` (a CPU generator; None: the global RNG, in the order torchattacks draws, so that
an attack and its torchattacks counterpart can be compared draw for draw).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from decorr.attacks._common import NORMS, LossFn, Norm, check_attack_inputs, project, random_start, step_direction
from decorr.errors import DecorrError
from decorr.features import eval_mode

__all__ = ["KINDS", "Attack", "AttackComponent", "Context", "GradientTransform", "InputTransform",
           "ModelModifier", "Objective", "Optimizer", "EnsembleStrategy", "Source"]

KINDS = ("optimizer", "input", "gradient", "model", "objective", "ensemble")


# ------------------------------------------------------------------------------------------------
# What is attacked


@dataclass
class Source:
    """A model (``module``: inputs in [0, 1] -> logits, or log-probabilities), an ensemble's ``members``,
    and/or a bare ``loss_fn``.

    ``members`` with ``combine="loss"`` is an ensemble surrogate attacked on the members' mean loss (Liu
    et al. 2017); with ``combine="output"`` the ensemble is attacked on its own output (``module``). The
    ``ens`` and ``svre`` components need ``members``. ``arch`` and ``feature_layer`` are what feature-level
    attacks choose their layer from.
    """

    module: nn.Module | None = None
    members: tuple[nn.Module, ...] = ()
    loss_fn: LossFn | None = None
    combine: str = "output"
    name: str = "source"
    arch: str | None = None
    feature_layer: str | None = None
    member_archs: tuple[str | None, ...] = ()
    #: The differentiable output attacked in place of ``module(x)`` (an ensemble's log mean probability,
    #: also for a vote ensemble, whose own output has no gradient), and whether it is log-probabilities
    #: (then the cross-entropy is their negative log-likelihood).
    output: Callable[[Tensor], Tensor] | None = None
    log_probs: bool = False

    def __post_init__(self) -> None:
        self.members = tuple(self.members)
        if self.module is None and not self.members and self.loss_fn is None:
            raise DecorrError("an attack needs a model, an ensemble or a loss function to attack")
        if self.combine not in ("output", "loss"):
            raise DecorrError(f"unknown ensemble combination {self.combine!r}; use output or loss")
        if self.combine == "loss" and not self.members:
            raise DecorrError("combine='loss' averages the members' losses; give the members")

    @classmethod
    def of(cls, model: nn.Module, *, name: str = "source", arch: str | None = None,
           feature_layer: str | None = None, member_archs: Sequence[str | None] = ()) -> "Source":
        """A source for ``model``; an ensemble module (one with ``members`` and ``objective``, as
        :class:`decorr.models.ensemble.Ensemble`) brings its members and how it is attacked."""
        members = tuple(getattr(model, "members", ()) or ())
        objective = getattr(model, "objective", None)
        if members and objective in ("output", "mean_ce"):
            combine = "loss" if objective == "mean_ce" else "output"
            output = getattr(model, "attack_output", None)
            return cls(module=model, members=members, combine=combine, name=name, arch=arch,
                       feature_layer=feature_layer, member_archs=tuple(member_archs), output=output,
                       log_probs=bool(getattr(model, "attack_output_is_log_prob", False)))
        return cls(module=model, name=name, arch=arch, feature_layer=feature_layer)

    @property
    def modules(self) -> list[nn.Module]:
        """Every module whose mode and hooks crafting touches (the model, else the members)."""
        if self.module is not None:
            return [self.module]
        return list(self.members)


# ------------------------------------------------------------------------------------------------
# Components


@dataclass(frozen=True)
class AttackComponent:
    """One registered piece of an attack: its settings as fields (declared with :func:`decorr.config.opt`,
    defaults from its paper), validated in :meth:`check`, which ``__post_init__`` calls."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    #: The optimizer a combination gets when it names none (TransferAttack's protocol: MI-FGSM).
    base: ClassVar[str] = "mifgsm"

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise a one-line DecorrError for a bad setting (e.g. a negative decay)."""

    def settings(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def fail(self, field_name: str, problem: str) -> None:
        """Raise the one-line error of a bad setting, naming the field and its flag."""
        flags = [f.metadata.get("flag") for f in dataclasses.fields(self) if f.name == field_name]
        flag = flags[0] if flags and flags[0] else f"--{self.name}-{field_name}".replace("_", "-")
        raise DecorrError(f"attack {self.name}: {field_name} {problem} (set by {flag} or {self.name}({field_name}=...))")


class Optimizer(AttackComponent):
    """The iteration. Subclasses have ``steps``, ``step_size`` (None: eps / steps) and ``random_start``
    fields and implement :meth:`run` with the context's gradient queries and updates."""

    kind = "optimizer"
    steps: int
    step_size: float | None
    random_start: bool

    def check(self) -> None:
        if not (isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 1):
            self.fail("steps", f"must be an integer >= 1, got {self.steps!r}")
        if self.step_size is not None and not (_is_number(self.step_size) and self.step_size > 0
                                               and math.isfinite(self.step_size)):
            self.fail("step_size", f"must be a positive number (pixel units), got {self.step_size!r}")

    def run(self, ctx: "Context") -> Tensor:
        raise NotImplementedError


class InputTransform(AttackComponent):
    """Maps the copies a gradient is taken at to new copies (their gradients are averaged)."""

    kind = "input"

    def expand(self, copies: list[Tensor], ctx: "Context") -> list[Tensor]:
        raise NotImplementedError


class GradientTransform(AttackComponent):
    """Post-processes each gradient the optimizer receives (TI's smoothing)."""

    kind = "gradient"

    def apply(self, grad: Tensor, ctx: "Context") -> Tensor:
        raise NotImplementedError


class ModelModifier(AttackComponent):
    """Changes the source model while crafting (hooks installed in :meth:`applied`, removed after)."""

    kind = "model"
    needs_module: ClassVar[bool] = True

    @contextlib.contextmanager
    def applied(self, ctx: "Context") -> Iterator[None]:
        yield


class Objective(AttackComponent):
    """What the attack maximises; :meth:`prepare` gives ``loss(x_in, member) -> scalar`` for one batch
    (``member``: an ensemble member's index, for SVRE's member gradients; None: the whole source)."""

    kind = "objective"
    base = "mifgsm"
    targeted_ok: ClassVar[bool] = True

    def prepare(self, ctx: "Context") -> Callable[[Tensor, int | None], Tensor]:
        raise NotImplementedError


class EnsembleStrategy(AttackComponent):
    """How the members of an ensemble source are combined: :meth:`logits` (their combined output, for
    the classification objectives) and optionally :meth:`gradient` (SVRE's variance-reduced estimate)."""

    kind = "ensemble"

    def logits(self, ctx: "Context", x: Tensor) -> Tensor:
        raise NotImplementedError

    def gradient(self, ctx: "Context", point: Tensor) -> Tensor | None:
        """A gradient estimate at ``point`` replacing the plain one (None: the plain one)."""
        return None


# ------------------------------------------------------------------------------------------------
# One crafting call


class Context:
    """What the components of one :meth:`Attack.craft` call share: the batch, the radius and step, the
    generator, and the gradient oracle that chains objective, input copies, gradient transforms."""

    def __init__(self, attack: "Attack", source: Source, x: Tensor, y: Tensor, *, eps: float, norm: Norm,
                 scale: float, targeted: bool, generator: torch.Generator | None) -> None:
        self.attack, self.source = attack, source
        self.x, self.y = x, y
        self.eps = eps * scale
        self.norm = norm
        self.scale = scale
        self.targeted = targeted
        self.generator = generator
        optimizer = attack.optimizer
        self.steps = optimizer.steps
        base_step = optimizer.step_size if optimizer.step_size is not None else eps / optimizer.steps
        self.step_size = base_step * scale
        self.loss: Callable[[Tensor, int | None], Tensor] | None = None
        self.gradient_queries = 0

    # -- points ------------------------------------------------------------------------------------
    def start(self, random: bool | None = None) -> Tensor:
        """The first iterate: a random point of the ball (``random_start``) or the clean image."""
        use_random = self.attack.optimizer.random_start if random is None else random
        if use_random:
            return random_start(self.x, eps=self.eps, norm=self.norm, generator=self.generator)
        return self.x.clone()

    def update(self, x_adv: Tensor, direction: Tensor, step: float | None = None) -> Tensor:
        """``x_adv`` moved by ``step`` (default the attack's) along ``direction``'s steepest-ascent step in
        the norm, projected onto the eps-ball around the clean image and clipped to [0, 1]."""
        moved = x_adv.detach() + (self.step_size if step is None else step) * step_direction(direction, self.norm)
        return self.project(moved)

    def project(self, point: Tensor) -> Tensor:
        delta = project(point - self.x, eps=self.eps, norm=self.norm)
        return torch.clamp(self.x + delta, min=0, max=1).detach()

    # -- the model ---------------------------------------------------------------------------------
    def logits(self, x: Tensor, member: int | None = None) -> Tensor:
        """The source's output on ``x`` (one member's with ``member``); ensembles through the strategy."""
        source = self.source
        if member is not None:
            return source.members[member](x)
        strategy = self.attack.ensemble
        if strategy is not None:
            return strategy.logits(self, x)
        if source.output is not None:
            return source.output(x)
        if source.module is None:
            raise DecorrError(f"attack {self.attack.name} needs a model's outputs, but the source is a bare loss "
                              "function; use an attack with the default (ce) objective")
        return source.module(x)

    def member_count(self) -> int:
        return len(self.source.members)

    # -- gradients ---------------------------------------------------------------------------------
    def loss_value(self, x_in: Tensor, member: int | None = None) -> Tensor:
        assert self.loss is not None
        value = self.loss(x_in, member)
        if value.dim() != 0:
            raise DecorrError(f"the attack's loss function must return a scalar, got shape {tuple(value.shape)}; "
                              "reduce it with .mean() or .sum()")
        return value

    def raw_gradient(self, point: Tensor, member: int | None = None) -> Tensor:
        """The loss's gradient at ``point`` averaged over the input transforms' copies (no gradient
        transform, no ensemble strategy): one copy is one forward and backward."""
        self.gradient_queries += 1
        with torch.enable_grad():
            point = point.detach().requires_grad_(True)
            copies = [point]
            for transform in self.attack.inputs:
                copies = transform.expand(copies, self)
            total: Tensor | int = 0
            for index, copy in enumerate(copies):
                # Chained transforms (sim+admix) give copies that share the first one's graph: keep it
                # until the last copy (only input-sized tensors; each copy's model graph is freed).
                (grad,) = torch.autograd.grad(self.loss_value(copy, member), point,
                                              retain_graph=index < len(copies) - 1)
                total = total + grad
        return total / len(copies)  # type: ignore[operator]

    def gradient(self, point: Tensor) -> Tensor:
        """What an optimizer receives at ``point``: the (SVRE-reduced) gradient, then the gradient
        transforms (TI)."""
        strategy = self.attack.ensemble
        grad = strategy.gradient(self, point) if strategy is not None else None
        if grad is None:
            grad = self.raw_gradient(point)
        for transform in self.attack.gradient_transforms:
            grad = transform.apply(grad, self)
        return grad

    # -- randomness --------------------------------------------------------------------------------
    def uniform(self, shape: Sequence[int], low: float, high: float) -> Tensor:
        """Uniform draws on ``[low, high)`` from the attack's generator (on the batch's device)."""
        device = self.generator.device if self.generator is not None else self.x.device
        values = torch.empty(tuple(shape), dtype=self.x.dtype, device=device).uniform_(low, high,
                                                                                       generator=self.generator)
        return values.to(self.x.device)

    def normal(self, shape: Sequence[int], std: float = 1.0) -> Tensor:
        device = self.generator.device if self.generator is not None else self.x.device
        values = torch.empty(tuple(shape), dtype=self.x.dtype, device=device).normal_(0.0, std,
                                                                                      generator=self.generator)
        return values.to(self.x.device)

    def randint(self, low: int, high: int, shape: Sequence[int] = (1,)) -> Tensor:
        device = self.generator.device if self.generator is not None else torch.device("cpu")
        return torch.randint(low, high, tuple(shape), generator=self.generator, device=device)

    def randperm(self, n: int) -> Tensor:
        device = self.generator.device if self.generator is not None else torch.device("cpu")
        return torch.randperm(n, generator=self.generator, device=device)


# ------------------------------------------------------------------------------------------------
# A combination


@dataclass(frozen=True)
class Attack:
    """One attack of the suite: its components by kind (see the module docstring). Build it with
    :func:`decorr.attacks.registry.parse_attack` (``"mifgsm+dim(prob=0.7)"``) or directly."""

    optimizer: Optimizer
    inputs: tuple[InputTransform, ...] = ()
    gradient_transforms: tuple[GradientTransform, ...] = ()
    modifiers: tuple[ModelModifier, ...] = ()
    objective: Objective | None = None
    ensemble: EnsembleStrategy | None = None
    #: How the user wrote it (e.g. ``sgm``); :attr:`name` is the resolved combination (``mifgsm+sgm``).
    text: str = ""
    components: tuple[AttackComponent, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.components:
            parts: list[AttackComponent] = [self.optimizer, *self.inputs, *self.gradient_transforms,
                                            *self.modifiers]
            parts += [c for c in (self.objective, self.ensemble) if c is not None]
            object.__setattr__(self, "components", tuple(parts))
        if not self.text:
            object.__setattr__(self, "text", self.name)

    @property
    def name(self) -> str:
        return "+".join(c.name for c in self.components)

    def describe(self) -> dict[str, Any]:
        """The resolved settings of every component (what ``results.json`` records)."""
        return {"attack": self.text, "resolved": self.name,
                "components": {c.name: c.settings() for c in self.components}}

    # -- checks ------------------------------------------------------------------------------------
    def check_source(self, source: Source, *, targeted: bool = False) -> None:
        """A one-line error, before any work, when this attack cannot run on ``source``."""
        if self.ensemble is not None and not source.members:
            raise DecorrError(f"attack {self.text}: {self.ensemble.name} combines an ensemble's members, but "
                              f"{source.name} is a single model; use it with --surrogate-ensemble or --ensemble")
        for modifier in self.modifiers:
            if modifier.needs_module and source.module is None and not source.members:
                raise DecorrError(f"attack {self.text}: {modifier.name} changes the source model, but the source "
                                  "is a bare loss function")
        if source.loss_fn is not None and self.objective is not None and self.objective.name != "ce":
            raise DecorrError(f"attack {self.text}: the objective {self.objective.name} replaces the loss, but this "
                              "source is attacked on its own loss function; drop it")
        if targeted and self.objective is not None and not self.objective.targeted_ok:
            raise DecorrError(f"attack {self.text}: {self.objective.name} is untargeted; drop --targeted for it")
        for component in self.components:
            check = getattr(component, "check_source", None)
            if check is not None:
                check(source)

    # -- crafting ----------------------------------------------------------------------------------
    def craft(self, source: Source | nn.Module | LossFn, x: Tensor, y: Tensor, *, eps: float, norm: Norm = "linf",
              scale: float = 1.0, targeted: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Adversarial examples for the batch ``x`` (pixels in [0, 1]) with labels ``y`` (target labels
        when ``targeted``) within the ``norm`` ball of radius ``eps * scale``.

        ``scale`` converts Linf-equivalent radii and step sizes to the norm's (L2: the evaluation's
        ``--l2-scale``). Returns a detached tensor; the source's modes and hooks are as before.
        """
        if norm not in NORMS:
            raise DecorrError(f"unknown attack norm {norm!r}; use 'linf' or 'l2'")
        check_attack_inputs(x, y, eps=eps * scale, norm=norm)
        source = _as_source(source)
        self.check_source(source, targeted=targeted)
        ctx = Context(self, source, x.detach(), y.detach(), eps=eps, norm=norm, scale=scale, targeted=targeted,
                      generator=generator)
        with contextlib.ExitStack() as stack:
            stack.enter_context(eval_mode(*source.modules, *source.members))
            for modifier in self.modifiers:
                stack.enter_context(modifier.applied(ctx))
            ctx.loss = self._loss(ctx)
            return self.optimizer.run(ctx).detach()

    def _loss(self, ctx: Context) -> Callable[[Tensor, int | None], Tensor]:
        source = ctx.source
        if source.loss_fn is not None:
            loss_fn = source.loss_fn
            return lambda x_in, member=None: loss_fn(x_in, ctx.y)
        objective = self.objective
        if objective is None:
            from decorr.attacks.losses import CrossEntropy

            objective = CrossEntropy()
        return objective.prepare(ctx)


def _as_source(source: Source | nn.Module | LossFn) -> Source:
    if isinstance(source, Source):
        return source
    if isinstance(source, nn.Module):
        return Source.of(source)
    if callable(source):
        return Source(loss_fn=source)
    raise DecorrError(f"cannot attack a {type(source).__name__}; pass a model, a Source or a loss function")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
