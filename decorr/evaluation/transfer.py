"""Transferability evaluation (SPEC section 3): craft once per source and epsilon, evaluate every target.

For every source model and epsilon the adversarial examples are generated once, batch by batch, and
every target is evaluated on each batch right away, so K models cost K attacks per epsilon rather
than one attack per ordered pair. Reported (``evaluate_transfer`` returns a plain, JSON-able dict):

- natural accuracy of every model (on all ``num_candidates`` samples); each source's white-box
  accuracy on its own adversarial examples,
  and every target's accuracy on every source's examples;
- the transfer matrix ``T(i -> j) = P(f_j(x') != y | f_i(x') != y)`` over all evaluated samples
  (originally correct or not), with the counts behind it; ``T(i -> i)`` is not a transfer (null);
- for every pair of targets, the pair's figure, the mean of both directions (when both are sources);
- for pairs of the same architecture: the feature R^2 and the 1-D PCA Pearson correlation at the
  feature layer on natural inputs and on the adversarial examples of either member, and the
  parameter distance ``sum ||theta_a - theta_b||^2``.

Feature statistics, exactly: on natural inputs ``r2`` is the R^2 of b's features regressed on a's
(``decorr.loss.r_squared(z_a, z_b)``, a listed before b) and ``r2_reverse`` the other way round. On
the adversarial examples crafted on a member (``on_adv_of_a`` / ``on_adv_of_b``), ``r2`` regresses the
other member's features on the source's. ``pca_pearson`` is |Pearson| between the two models' first
principal-component scores (``decorr.loss.pca_pearson``). R^2 needs more samples than features plus
one (784 features for ``mnist_cnn``: over 785 samples); with fewer it is null and a note says why.

Randomness (PGD's random start, DI) comes from a CPU generator seeded by ``(seed, source name,
epsilon, batch index)`` (:func:`attack_generator`): a source's adversarial examples depend on its name,
the data, the batch size and the settings only, not on which other models are evaluated with it. That
is what makes the one-pass evaluation and a pair-by-pair one give identical numbers.

Samples: all of ``data`` (``num_candidates``), or with ``only_correct`` those that every model classifies
correctly (``num_samples`` of them; SGM's paper reports a target's error on such samples as the
attack's success rate). ``only_correct`` changes which samples the attacks, accuracies under attack,
transfer rates and feature statistics use; the natural accuracies are always over all candidates.

L2 attacks take epsilons (and the PGD step) in Linf-equivalent units, scaled by ``l2_scale``:
``sqrt-side`` (SPEC: ``eps * sqrt(d)``, d the image side, 28 for MNIST), ``sqrt-dim`` (d = C*H*W) or
``none``. The radius actually used is recorded as ``attack_eps``.

Ensembles (:class:`decorr.evaluation.ensembles.Ensemble`) are models like any other: as a target it predicts with
its rule, as a source it is attacked on its ``attack_loss`` (CE of log(mean softmax) for ``prob`` and
``vote``, CE of the mean logits for ``logit``, the members' mean CE for a surrogate ensemble). For every
ensemble target and every source, ``detection`` holds the members' disagreement detection
(:func:`decorr.evaluation.detection.detection_summary`).

Statistics: every accuracy and transfer rate has its count and a 95% Wilson interval ``[low, high]``
(:func:`decorr.evaluation.stats.wilson_interval`; null when the count is 0). ``fooled`` holds, per source and evaluated
model, the per-image outcome "this model misclassifies the source's adversarial example" packed with
:func:`decorr.evaluation.compare.pack_outcomes`; with ``samples_sha256`` (:func:`decorr.evaluation.compare.samples_fingerprint`
of the evaluated images and labels) it lets :func:`decorr.evaluation.compare.compare_results` test two runs paired.

Result schema (``format`` ``decorr-transfer/1``)::

    {"format", "settings": {attack, norm, eps[], attack_eps[], l2_scale, steps, step_size,
                            attack_step_size, random_start, gamma, momentum, diversity, ti_kernel,
                            seed, batch_size, sgm_exclude, num_samples, input_shape, features, only_correct,
                            num_candidates, samples_sha256},
     "models": {name: {role, arch, feature_layer, natural_accuracy, natural_correct, natural_accuracy_ci95,
                       [active_features, effective_rank,]
                       [ensembles: members, rule, attack_loss, member_specs, member_info],
                       ...model_info[name]}},
     "sources": [name], "targets": [name],
     "pairs": [{a, b, same_arch, parameter_distance, natural_features}],
     "by_eps": [{eps, attack_eps, white_box_accuracy: {src: acc}, white_box_accuracy_ci95: {src: [lo, hi]},
                 white_box_correct: {src: n}, accuracy: {src: {tgt: acc}}, accuracy_ci95: {src: {tgt: [lo, hi]}},
                 correct: {src: {tgt: n}}, transfer: {src: {tgt: T}}, transfer_ci95: {src: {tgt: [lo, hi]}},
                 source_fooled: {src: n}, transferred: {src: {tgt: n}},
                 fooled: {src: {model: packed bits}},
                 detection: {src: {ensemble: {fpr, fpr_ci95, natural_flagged, num_natural, detection_rate,
                             detection_rate_ci95, flagged, num_adversarial, detection_rate_fooled,
                             detection_rate_fooled_ci95, flagged_fooled, fooled, score, auc, auc_fooled}}},
                 pairs: [{a, b, a_to_b, b_to_a, mean, on_adv_of_a, on_adv_of_b}]}],
     "notes": [str], "timing": {natural_s, attack_s, evaluate_s, features_s, total_s}}

Denominators: natural accuracies count over ``num_candidates``, accuracies under attack over
``num_samples``, a transfer rate over ``source_fooled``.

A model whose features are evaluated (a member of a feature pair) also has ``active_features`` (feature
columns that vary over the natural samples) and ``effective_rank`` in its ``models`` entry
(``decorr.features.feature_diagnostics``). ``natural_features`` is ``{r2, r2_reverse, pca_pearson,
num_features, num_samples}``, ``on_adv_of_*``
``{r2, pca_pearson}``; both are null for pairs of different architectures. Numbers that do not exist
(a transfer rate whose source is never fooled, R^2 with too few samples) are null, never NaN.
"""

from __future__ import annotations

import math
import os
import time
import zlib
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from decorr.attacks import ce_loss, fgsm, pgd, residual_branches, skip_gradient
from decorr.attacks.skip_gradient import DEFAULT_EXCLUDE, EXCLUDE_RULES
from decorr.checkpoint import load_checkpoint
from decorr.evaluation.compare import data_fingerprint, pack_outcomes
from decorr.data import ImageSplit, to_float
from decorr.evaluation.detection import detection_summary, disagreement
from decorr.evaluation.ensembles import Ensemble, load_ensembles
from decorr.errors import DecorrError
from decorr.features import feature_diagnostics, record_features
from decorr.loss import BatchTooSmallError, parameter_distance, pearson, r_squared
from decorr.evaluation.metrics import accuracy, transfer_rate
from decorr.specs import SpecOptions, check_input_shape, load_specs, parse_spec, split_model_selector
from decorr.evaluation.stats import wilson_interval

__all__ = [
    "ATTACKS",
    "FORMAT",
    "L2_SCALES",
    "TransferSettings",
    "attack_generator",
    "craft",
    "evaluate_checkpoints",
    "evaluate_transfer",
    "first_pc_scores",
    "load_named_models",
    "pair_transfer",
    "split_model_selector",
]

FORMAT = "decorr-transfer/1"
ATTACKS = ("fgsm", "pgd", "sgm")
L2_SCALES = ("sqrt-side", "sqrt-dim", "none")
#: SPEC section 3/5: the MNIST epsilons of P1's transfer experiments.
DEFAULT_EPS = (0.05, 0.10, 0.15)
#: SGM's decay when none is given: the paper's value for ResNets.
DEFAULT_SGM_GAMMA = 0.2

Data = ImageSplit | tuple[Tensor, Tensor]


# ------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class TransferSettings:
    """What attack to run; validated on creation (a bad value is a one-line DecorrError)."""

    attack: str = "pgd"
    eps: tuple[float, ...] = DEFAULT_EPS
    norm: str = "linf"
    steps: int = 40
    step_size: float = 3 / 255
    random_start: bool = True
    gamma: float | None = None
    momentum: float = 0.0
    diversity: float = 0.0
    ti_kernel: int | None = None
    l2_scale: str = "sqrt-side"
    seed: int = 0
    batch_size: int = 1000
    #: SGM's ``skip_gradient(..., exclude=)``: "first-of-stage" (the authors' rule) or "none" (every unit).
    sgm_exclude: str = DEFAULT_EXCLUDE

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise DecorrError(f"unknown attack {self.attack!r}; choose one of {', '.join(ATTACKS)}")
        if self.norm not in ("linf", "l2"):
            raise DecorrError(f"unknown norm {self.norm!r}; use linf or l2")
        if self.l2_scale not in L2_SCALES:
            raise DecorrError(f"unknown L2 scale {self.l2_scale!r}; choose one of {', '.join(L2_SCALES)}")
        eps = tuple(float(e) for e in self.eps)
        object.__setattr__(self, "eps", eps)
        if not eps:
            raise DecorrError("no epsilon given; pass at least one, e.g. --eps 0.05 0.1 0.15")
        bad = [e for e in eps if not (e >= 0 and math.isfinite(e))]
        if bad:
            raise DecorrError(f"epsilon must be >= 0 (pixel units), got {bad[0]}; e.g. --eps 0.05 0.1 0.15")
        if len(set(eps)) != len(eps):
            raise DecorrError(f"epsilon {sorted(e for e in eps if eps.count(e) > 1)[0]} is given twice; list each once")
        if self.batch_size < 1:
            raise DecorrError(f"batch size must be >= 1, got {self.batch_size}")
        if self.attack == "fgsm":
            if self.momentum or self.diversity or self.ti_kernel or self.gamma not in (None, 1.0):
                raise DecorrError("FGSM is a single plain step; MI/DI/TI and SGM's gamma need --attack pgd or sgm")
        else:
            if self.steps < 1:
                raise DecorrError(f"PGD needs at least one step, got --steps {self.steps}")
            if not self.step_size > 0:
                raise DecorrError(f"PGD step size must be > 0 (pixel units), got {self.step_size}")
            if not self.momentum >= 0:
                raise DecorrError(f"momentum must be >= 0 (MI uses 1.0), got {self.momentum}")
            if not 0 <= self.diversity <= 1:
                raise DecorrError(f"input diversity is a probability in [0, 1] (DI uses 0.5), got {self.diversity}")
            if self.ti_kernel is not None and (self.ti_kernel < 1 or self.ti_kernel % 2 == 0):
                raise DecorrError(f"the TI kernel size must be odd and positive, got {self.ti_kernel}")
        if self.attack == "pgd" and self.gamma not in (None, 1.0):
            raise DecorrError(f"gamma {self.gamma} < 1 is the skip gradient method; use --attack sgm")
        if self.attack == "sgm":
            if self.gamma is None:
                object.__setattr__(self, "gamma", DEFAULT_SGM_GAMMA)
            if not 0 < self.gamma <= 1:
                raise DecorrError(f"SGM gamma must be in (0, 1] (the paper uses 0.2 for ResNets), got {self.gamma}")
        elif self.gamma is None:
            object.__setattr__(self, "gamma", 1.0)
        if self.sgm_exclude not in EXCLUDE_RULES:
            raise DecorrError(f"unknown --sgm-exclude {self.sgm_exclude!r}; use one of {', '.join(EXCLUDE_RULES)}")

    def scale(self, input_shape: Sequence[int]) -> float:
        """Factor from Linf-equivalent units to the attack's norm (1 for Linf)."""
        if self.norm == "linf" or self.l2_scale == "none":
            return 1.0
        dim = math.prod(input_shape)
        if self.l2_scale == "sqrt-dim":
            return math.sqrt(dim)
        # The image side (the geometric mean of height and width): eps * sqrt(28) on MNIST.
        spatial = input_shape[-2] * input_shape[-1] if len(input_shape) >= 2 else dim
        return math.sqrt(math.sqrt(spatial))

    def to_dict(self, input_shape: Sequence[int]) -> dict[str, Any]:
        scale = self.scale(input_shape)
        record = asdict(self)
        record["eps"] = list(self.eps)
        record["attack_eps"] = [e * scale for e in self.eps]
        record["attack_step_size"] = None if self.attack == "fgsm" else self.step_size * scale
        if self.attack == "fgsm":
            record["steps"], record["step_size"], record["random_start"] = 1, None, False
        if self.norm == "linf":
            record["l2_scale"] = None
        if self.attack != "sgm":
            record["sgm_exclude"] = None
        return record


def attack_generator(seed: int, source: str, eps: float, batch_index: int) -> torch.Generator:
    """The CPU generator for one batch of one source's attack at one epsilon.

    Seeded from ``(seed, crc32(source name), round(eps * 1e9), batch index)``, so the adversarial
    examples of a source do not depend on which other models are evaluated in the same run.
    """
    words = [int(seed), zlib.crc32(source.encode()), int(round(float(eps) * 1e9)), int(batch_index)]
    state = np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def craft(source: nn.Module, x: Tensor, y: Tensor, settings: TransferSettings, eps: float,
          generator: torch.Generator | None) -> Tensor:
    """Adversarial examples of one batch against ``source`` (``eps`` in Linf-equivalent units)."""
    scale = settings.scale(tuple(x.shape[1:]))
    loss = source.attack_loss if isinstance(source, Ensemble) else ce_loss(source)
    if settings.attack == "fgsm":
        return fgsm(loss, x, y, eps=eps * scale, norm=settings.norm)  # type: ignore[arg-type]
    kwargs = dict(
        eps=eps * scale, steps=settings.steps, step_size=settings.step_size * scale, norm=settings.norm,
        random_start=settings.random_start, momentum=settings.momentum, input_diversity=settings.diversity,
        translation_kernel=settings.ti_kernel, generator=generator,
    )
    sgm = settings.attack == "sgm"
    context = skip_gradient(source, settings.gamma, exclude=settings.sgm_exclude) if sgm else nullcontext()
    with context:
        return pgd(loss, x, y, **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Loading


def load_named_models(
    paths: Sequence[str | os.PathLike], device: torch.device | str = "cpu", options: SpecOptions | None = None
) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
    """Load every model of every spec (``decorr.specs``), by unique name, in eval mode on ``device``.

    A checkpoint (run directory or its ``checkpoint/`` folder; ``PATH:MODEL`` for one model) gives
    models named ``<run name>/<model name>`` (``mnist_cnn_cor/model0``), rebuilt from the registry with
    strictly fitting weights, with ``{arch, kwargs, feature_layer, checkpoint, dataset, epoch}``; an
    ``ARCH=WEIGHTS`` spec one model named after its file, with ``{arch, spec, weights, sha256,
    num_classes, mean, std, input_size, feature_layer, match_by_order}``. Returns the models and
    those records.
    """
    loaded = load_specs(paths, options, device=device)
    return {name: m.module for name, m in loaded.items()}, {name: m.info for name, m in loaded.items()}


# ------------------------------------------------------------------------------------------------
# Feature statistics


def first_pc_scores(z: Tensor) -> Tensor:
    """Scores of the samples on their first principal axis (float64), as in ``decorr.loss.pca_pearson``.

    The axis is the top eigenvector of the centred Gram matrix ``z^T z`` (the top right singular
    vector, found without a full SVD), so ``|pearson(first_pc_scores(a), first_pc_scores(b))|`` is
    ``pca_pearson(a, b)``; computed once per model and input set, it is shared by every pair.
    """
    z = z.reshape(z.shape[0], -1).double()
    z = z - z.mean(dim=0, keepdim=True)
    _, vectors = torch.linalg.eigh(z.T @ z)
    return z @ vectors[:, -1]


class _FeatureSet:
    """One model's features on one input set, with its PCA scores computed at most once."""

    def __init__(self, features: Tensor) -> None:
        self.features = features
        self._scores: Tensor | None = None

    @property
    def scores(self) -> Tensor:
        if self._scores is None:
            self._scores = first_pc_scores(self.features)
        return self._scores


def _r2_or_none(z1: Tensor, z2: Tensor, notes: set[str]) -> float | None:
    try:
        value = r_squared(z1, z2, gather=False)
    except BatchTooSmallError:
        notes.add(
            f"feature R^2 needs more than {z1[0].numel() + 1} samples for {z1[0].numel()} features; "
            f"got {z1.shape[0]}, so it is null (use more samples)"
        )
        return None
    return _number(value)


def _pca_pearson(a: _FeatureSet, b: _FeatureSet) -> float | None:
    value = pearson(a.scores, b.scores)
    return None if math.isnan(value) else abs(value)


def _number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _interval(successes: int, n: int) -> list[float] | None:
    """The 95% Wilson interval as ``[low, high]``; None when there is no sample."""
    interval = wilson_interval(successes, n)
    return None if interval is None else list(interval)


def _cat_disagreement(parts: list[tuple]) -> tuple[Tensor, Tensor]:
    return torch.cat([flag for flag, _ in parts]), torch.cat([score for _, score in parts])


# ------------------------------------------------------------------------------------------------
# Evaluation


def _is_split(data: Data) -> bool:
    """An ``ImageSplit`` or a split like it (``decorr.data.StreamedSplit``: ``batches``, ``image_shape``)."""
    return not isinstance(data, (tuple, list))


def _batches(data: Data, batch_size: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    if _is_split(data):
        for images, labels in data.batches(batch_size):
            yield to_float(images).to(device), labels.to(device)
    else:
        x, y = data
        for start in range(0, len(y), batch_size):
            yield x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)


def _check_data(data: Data) -> tuple[int, tuple[int, ...], Tensor]:
    if _is_split(data):
        return len(data), tuple(data.image_shape), data.labels
    x, y = data
    if not (torch.is_tensor(x) and torch.is_tensor(y)) or x.dim() < 2 or y.shape != x.shape[:1]:
        raise DecorrError("data must be an ImageSplit or a pair (x (N, C, H, W) in [0, 1], y (N,))")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise DecorrError("the inputs hold NaN or inf; evaluate finite pixels in [0, 1]")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise DecorrError("inputs must be pixels in [0, 1]; put any normalisation inside the model")
    return len(y), tuple(x.shape[1:]), y


def _same_architecture(a: nn.Module, b: nn.Module, arch_a: str | None, arch_b: str | None) -> bool:
    if arch_a is not None and arch_b is not None and arch_a != arch_b:
        return False
    if type(a) is not type(b):
        return False
    shapes_a = [p.shape for p in a.parameters()]
    shapes_b = [p.shape for p in b.parameters()]
    return shapes_a == shapes_b


class _Evaluator:
    """Runs models on batches, keeping each model's predictions and (when asked) features."""

    def __init__(self, models: Mapping[str, nn.Module], layers: Mapping[str, str], num_classes_check: Tensor):
        self.models = models
        self.layers = layers
        self.label_max = int(num_classes_check.max()) if num_classes_check.numel() else 0

    @torch.no_grad()
    def run(self, name: str, x: Tensor, want_features: bool) -> tuple[Tensor, Tensor | None, tuple | None]:
        """Labels, features (when asked) and, for an ensemble, its members' disagreement ``(flag, score)``."""
        model = self.models[name]
        layer = self.layers.get(name) if want_features else None
        disagree = None
        with record_features(model, layer) if layer else nullcontext({}) as recorded:
            if isinstance(model, Ensemble):
                member_logits = model.member_logits(x)
                logits = model.combine(member_logits)
                disagree = disagreement(member_logits)
            else:
                logits = model(x)
        if not torch.is_tensor(logits) or logits.dim() != 2:
            shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
            raise DecorrError(f"model {name} outputs {shape}, not logits (N, classes); the transfer "
                              "evaluation needs classifiers")
        if logits.shape[1] <= self.label_max:
            raise DecorrError(f"model {name} has {logits.shape[1]} outputs but the labels go up to "
                              f"{self.label_max}; evaluate it on the dataset it was trained for")
        features = None
        if layer:
            if layer not in recorded:
                raise DecorrError(f"feature layer {layer!r} of model {name} is not called in its forward "
                                  "pass; choose another feature layer")
            features = recorded[layer].flatten(1).float().cpu()
        return logits.argmax(dim=1).cpu(), features, disagree


def evaluate_transfer(
    models: Mapping[str, nn.Module],
    data: Data,
    *,
    feature_layers: Mapping[str, str | None] | None = None,
    archs: Mapping[str, str] | None = None,
    surrogates: Mapping[str, nn.Module] | None = None,
    attack_targets: bool | None = None,
    attack: str = "pgd",
    eps_list: Sequence[float] = DEFAULT_EPS,
    norm: str = "linf",
    steps: int = 40,
    step_size: float = 3 / 255,
    random_start: bool = True,
    gamma: float | None = None,
    momentum: float = 0.0,
    diversity: float = 0.0,
    ti_kernel: int | None = None,
    l2_scale: str = "sqrt-side",
    seed: int = 0,
    batch_size: int = 1000,
    sgm_exclude: str = DEFAULT_EXCLUDE,
    features: bool = True,
    only_correct: bool = False,
    device: torch.device | str | None = None,
    model_info: Mapping[str, Mapping[str, Any]] | None = None,
    log: Callable[[str], None] | None = None,
    on_adversarial: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Transfer matrix, accuracies and feature statistics of ``models`` (see the module docstring).

    ``models`` are the targets; they are also the sources unless ``surrogates`` (source-only models,
    e.g. a ResNet for SGM) are given, in which case the targets are attacked too only with
    ``attack_targets=True``. ``data`` is an ``ImageSplit`` or ``(x, y)`` with pixels in [0, 1], taken
    in order in batches of ``batch_size``. ``feature_layers`` names each model's feature layer (module
    name) and ``archs`` its architecture; pairs of the same architecture (and parameter shapes) get
    feature statistics (``features=False`` skips them). Attack settings as in :class:`TransferSettings`;
    ``eps_list`` in pixel units (Linf-equivalent for L2). ``only_correct=True`` keeps only the samples
    that every model (targets and surrogates) classifies correctly, the protocol of SGM's paper, where
    a target's error on the adversarial examples is the attack's success rate; natural accuracies are
    still those of all samples. Models are moved to ``device`` (default: where the first model is) and
    put in eval mode. ``log`` receives progress lines. ``on_adversarial(source, eps, indices, x_adv, y,
    source_pred)`` is called after every attacked batch (``indices``: the samples' positions in ``data``;
    ``source_pred``: the source's labels on ``x_adv``), e.g. ``decorr.evaluation.adversarial_files.AdversarialWriter``.
    ``data`` may also be a streamed split (``decorr.data.StreamedSplit``), read batch by batch.
    """
    started = time.perf_counter()
    settings = TransferSettings(
        attack=attack, eps=tuple(eps_list), norm=norm, steps=steps, step_size=step_size,
        random_start=random_start, gamma=gamma, momentum=momentum, diversity=diversity, ti_kernel=ti_kernel,
        l2_scale=l2_scale, seed=seed, batch_size=batch_size, sgm_exclude=sgm_exclude,
    )
    targets = dict(models)
    surrogates = dict(surrogates or {})
    if not targets:
        raise DecorrError("no target models to evaluate; pass at least one checkpoint")
    clash = sorted(set(targets) & set(surrogates))
    if clash:
        raise DecorrError(f"model {clash[0]} is both a target and a surrogate; pass it once")
    if attack_targets is None:
        attack_targets = not surrogates
    sources = list(surrogates) + (list(targets) if attack_targets else [])
    if not sources:
        raise DecorrError("no source models to attack; pass --surrogate models or attack the targets")
    all_models = {**targets, **surrogates}
    if settings.attack == "sgm":
        for name in sources:
            if not residual_branches(all_models[name], settings.sgm_exclude):
                raise DecorrError(
                    f"SGM source {name} ({type(all_models[name]).__name__}) has no residual units to decay "
                    f"(--sgm-exclude {settings.sgm_exclude}); attack it with --attack pgd, or use a residual "
                    "surrogate (--surrogate) for SGM"
                )
    n, input_shape, labels = _check_data(data)
    if n == 0:
        raise DecorrError("no samples to evaluate; check --num-samples")
    if device is None:
        first = next(iter(all_models.values()))
        param = next(iter(first.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    for model in all_models.values():
        model.to(device).eval()
    say = log or (lambda _message: None)
    feature_layers = dict(feature_layers or {})
    archs = dict(archs or {})
    notes: set[str] = set()
    y = labels.cpu()

    # Pairs of targets; those of one architecture with a feature layer get feature statistics.
    target_names = list(targets)
    pairs = [(a, b) for i, a in enumerate(target_names) for b in target_names[i + 1 :]]
    same_arch = {
        (a, b): _same_architecture(targets[a], targets[b], archs.get(a), archs.get(b)) for a, b in pairs
    }
    feature_pairs = [
        (a, b) for a, b in pairs
        if features and same_arch[(a, b)] and feature_layers.get(a) and feature_layers.get(a) == feature_layers.get(b)
    ]
    featured = {m for pair in feature_pairs for m in pair}
    evaluator = _Evaluator(all_models, {k: v for k, v in feature_layers.items() if v}, y)
    timing = {"natural_s": 0.0, "attack_s": 0.0, "evaluate_s": 0.0, "features_s": 0.0}

    # Natural inputs: every model's predictions, features for the feature pairs.
    tick = time.perf_counter()
    natural_preds: dict[str, list[Tensor]] = {name: [] for name in all_models}
    natural_feats: dict[str, list[Tensor]] = {name: [] for name in featured}
    ensembles = [name for name in target_names if isinstance(targets[name], Ensemble)]
    natural_disagree: dict[str, list[tuple]] = {name: [] for name in ensembles}
    for x, _ in _batches(data, settings.batch_size, device):
        for name in all_models:
            pred, feats, disagree = evaluator.run(name, x, name in featured)
            natural_preds[name].append(pred)
            if feats is not None:
                natural_feats[name].append(feats)
            if name in natural_disagree:
                natural_disagree[name].append(disagree)
    natural = {name: torch.cat(p) for name, p in natural_preds.items()}
    natural_accuracy = {name: _number(accuracy(pred, y)) for name, pred in natural.items()}
    natural_correct = {name: int((pred == y).sum()) for name, pred in natural.items()}
    natural_features = {name: torch.cat(f) for name, f in natural_feats.items()}
    natural_flags = {name: _cat_disagreement(parts) for name, parts in natural_disagree.items()}
    candidates = n
    positions = torch.arange(n)
    if only_correct:
        keep = torch.stack([pred == y for pred in natural.values()]).all(dim=0)
        kept = keep.nonzero().flatten()
        if len(kept) == 0:
            raise DecorrError(f"none of the {n} samples is classified correctly by every model; "
                              "drop --only-correct or evaluate more samples")
        data = data.subset(kept) if _is_split(data) else (data[0][kept], data[1][kept])
        y, n, positions = y[kept], len(kept), kept
        natural = {name: pred[kept] for name, pred in natural.items()}
        natural_features = {name: z[kept] for name, z in natural_features.items()}
        natural_flags = {name: (flag[kept], score[kept]) for name, (flag, score) in natural_flags.items()}
        say(f"only_correct: {n} of {candidates} samples are classified correctly by every model")
    fingerprint = data_fingerprint(data)
    timing["natural_s"] += time.perf_counter() - tick

    tick = time.perf_counter()
    natural_sets = {name: _FeatureSet(z) for name, z in natural_features.items()}
    pair_records = []
    for a, b in pairs:
        record: dict[str, Any] = {"a": a, "b": b, "same_arch": same_arch[(a, b)], "parameter_distance": None,
                                  "natural_features": None}
        if same_arch[(a, b)]:
            with torch.no_grad():
                record["parameter_distance"] = _number(float(parameter_distance(targets[a], targets[b])))
        if (a, b) in feature_pairs:
            za, zb = natural_sets[a], natural_sets[b]
            record["natural_features"] = {
                "r2": _r2_or_none(za.features, zb.features, notes),
                "r2_reverse": _r2_or_none(zb.features, za.features, notes),
                "pca_pearson": _pca_pearson(za, zb),
                "num_features": int(za.features.shape[1]),
                "num_samples": int(za.features.shape[0]),
            }
        pair_records.append(record)
    timing["features_s"] += time.perf_counter() - tick

    # Adversarial inputs: each source attacked once per epsilon; every target evaluated on each batch.
    evaluated_on = {src: ([src] if src not in targets else []) + target_names for src in sources}
    by_eps = []
    for eps in settings.eps:
        preds: dict[str, dict[str, Tensor]] = {}
        adv_sets: dict[str, dict[str, _FeatureSet]] = {}
        adv_flags: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
        for k, src in enumerate(sources):
            say(f"{settings.attack} {settings.norm} eps {eps:g}: attacking {src} ({k + 1}/{len(sources)})")
            partners = {b if a == src else a for a, b in feature_pairs if src in (a, b)}
            want = {src} | partners if partners else set()
            collected: dict[str, list[Tensor]] = {name: [] for name in evaluated_on[src]}
            collected_feats: dict[str, list[Tensor]] = {name: [] for name in want}
            collected_disagree: dict[str, list[tuple]] = {name: [] for name in ensembles}
            for index, (x, yb) in enumerate(_batches(data, settings.batch_size, device)):
                tick = time.perf_counter()
                generator = attack_generator(settings.seed, src, eps, index)
                x_adv = craft(all_models[src], x, yb, settings, eps, generator)
                timing["attack_s"] += time.perf_counter() - tick
                tick = time.perf_counter()
                for name in evaluated_on[src]:
                    pred, feats, disagree = evaluator.run(name, x_adv, name in want)
                    collected[name].append(pred)
                    if feats is not None:
                        collected_feats[name].append(feats)
                    if name in collected_disagree:
                        collected_disagree[name].append(disagree)
                timing["evaluate_s"] += time.perf_counter() - tick
                if on_adversarial is not None:
                    tick = time.perf_counter()
                    start = index * settings.batch_size
                    on_adversarial(src, eps, positions[start : start + len(yb)], x_adv, yb, collected[src][-1])
                    timing["save_s"] = timing.get("save_s", 0.0) + time.perf_counter() - tick
            preds[src] = {name: torch.cat(p) for name, p in collected.items()}
            adv_sets[src] = {name: _FeatureSet(torch.cat(f)) for name, f in collected_feats.items()}
            adv_flags[src] = {name: _cat_disagreement(parts) for name, parts in collected_disagree.items()}
        record = _eps_record(eps, settings, input_shape, sources, target_names, preds, y, pair_records,
                             feature_pairs, adv_sets, notes, timing)
        record["detection"] = {
            src: {ens: detection_summary(*natural_flags[ens], *adv_flags[src][ens], preds[src][ens] != y)
                  for ens in ensembles}
            for src in sources
        } if ensembles else {}
        by_eps.append(record)

    roles = {name: "target+source" if name in sources else "target" for name in targets}
    roles.update({name: "source" for name in surrogates})
    model_records = {}
    for name in all_models:
        record = {"role": roles[name], "arch": archs.get(name), "feature_layer": feature_layers.get(name),
                  "natural_accuracy": natural_accuracy[name], "natural_correct": natural_correct[name],
                  "natural_accuracy_ci95": _interval(natural_correct[name], candidates)}
        model = all_models[name]
        if isinstance(model, Ensemble):
            record.update({"arch": archs.get(name) or "ensemble", **model.describe()})
            if model.rule == "vote" and name in sources:
                notes.add(f"ensemble {name} predicts by majority vote, which has no gradient; it is attacked "
                          "white-box on the prob rule's loss, CE of log(mean softmax)")
        record.update(dict((model_info or {}).get(name, {})))
        if len(natural_features.get(name, ())):  # dead columns and effective rank of the natural features
            diagnostics = feature_diagnostics(natural_features[name])
            record.update(active_features=diagnostics["active_features"],
                          effective_rank=_number(diagnostics["effective_rank"]))
        model_records[name] = record
    timing["total_s"] = time.perf_counter() - started
    settings_record = settings.to_dict(input_shape)
    settings_record.update({"num_samples": n, "input_shape": list(input_shape), "features": features,
                            "only_correct": only_correct, "num_candidates": candidates,
                            "samples_sha256": fingerprint})
    return {
        "format": FORMAT,
        "settings": settings_record,
        "models": model_records,
        "sources": sources,
        "targets": target_names,
        "pairs": pair_records,
        "by_eps": by_eps,
        "notes": sorted(notes),
        "timing": timing,
    }


def _eps_record(
    eps: float,
    settings: TransferSettings,
    input_shape: tuple[int, ...],
    sources: list[str],
    targets: list[str],
    preds: dict[str, dict[str, Tensor]],
    y: Tensor,
    pair_records: list[dict[str, Any]],
    feature_pairs: list[tuple[str, str]],
    adv_sets: dict[str, dict[str, _FeatureSet]],
    notes: set[str],
    timing: dict[str, float],
) -> dict[str, Any]:
    """Metrics of one epsilon from every source's and target's labels on the sources' examples."""
    n = len(y)
    white_box = {src: _number(accuracy(preds[src][src], y)) for src in sources}
    white_box_correct = {src: int((preds[src][src] == y).sum()) for src in sources}
    acc = {src: {tgt: _number(accuracy(preds[src][tgt], y)) for tgt in targets} for src in sources}
    correct = {src: {tgt: int((preds[src][tgt] == y).sum()) for tgt in targets} for src in sources}
    matrix: dict[str, dict[str, float | None]] = {}
    transferred: dict[str, dict[str, int | None]] = {}
    fooled: dict[str, int] = {}
    for src in sources:
        matrix[src], transferred[src] = {}, {}
        for tgt in targets:
            result = transfer_rate(preds[src][src], preds[src][tgt], y)
            fooled[src] = result.source_fooled
            if tgt == src:
                matrix[src][tgt], transferred[src][tgt] = None, None
            else:
                matrix[src][tgt], transferred[src][tgt] = _number(result.rate), result.transferred
    tick = time.perf_counter()
    pairs = []
    for record in pair_records:
        a, b = record["a"], record["b"]
        a_to_b = matrix[a][b] if a in matrix else None
        b_to_a = matrix[b][a] if b in matrix else None
        entry: dict[str, Any] = {
            "a": a, "b": b, "a_to_b": a_to_b, "b_to_a": b_to_a,
            "mean": 0.5 * (a_to_b + b_to_a) if a_to_b is not None and b_to_a is not None else None,
            "on_adv_of_a": None, "on_adv_of_b": None,
        }
        if (a, b) in feature_pairs:
            for key, src, other in (("on_adv_of_a", a, b), ("on_adv_of_b", b, a)):
                if src in adv_sets:
                    zs, zo = adv_sets[src][src], adv_sets[src][other]
                    entry[key] = {"r2": _r2_or_none(zs.features, zo.features, notes),
                                  "pca_pearson": _pca_pearson(zs, zo)}
        pairs.append(entry)
    timing["features_s"] += time.perf_counter() - tick
    return {
        "eps": eps,
        "attack_eps": eps * settings.scale(input_shape),
        "white_box_accuracy": white_box,
        "white_box_accuracy_ci95": {src: _interval(white_box_correct[src], n) for src in sources},
        "white_box_correct": white_box_correct,
        "accuracy": acc,
        "accuracy_ci95": {src: {tgt: _interval(correct[src][tgt], n) for tgt in targets} for src in sources},
        "correct": correct,
        "transfer": matrix,
        "transfer_ci95": {src: {tgt: None if transferred[src][tgt] is None else
                                _interval(transferred[src][tgt], fooled[src]) for tgt in targets} for src in sources},
        "source_fooled": fooled,
        "transferred": transferred,
        "pairs": pairs,
        "fooled": {src: {name: pack_outcomes((p != y).numpy()) for name, p in preds[src].items()} for src in sources},
    }


# ------------------------------------------------------------------------------------------------
# Conveniences


def evaluate_checkpoints(
    specs: Sequence[str | os.PathLike],
    data: Data,
    *,
    surrogates: Sequence[str | os.PathLike] = (),
    device: torch.device | str = "cpu",
    spec_options: SpecOptions | None = None,
    ensembles: Sequence[str] = (),
    surrogate_ensembles: Sequence[str] = (),
    ensemble_rule: str = "prob",
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`evaluate_transfer` on the models of ``specs`` (targets) and ``surrogates``.

    Specs are checkpoints (``PATH``, ``PATH:MODEL``) or ``ARCH=WEIGHTS[@KEY=VALUE,...]``
    (``decorr.specs``; ``spec_options`` are the global options of the latter). ``ensembles``
    (targets) and ``surrogate_ensembles`` (sources attacked on the members' mean CE) are
    ``NAME=SPEC,SPEC`` strings (:func:`decorr.evaluation.ensembles.load_ensembles`), combined by ``ensemble_rule``.
    Checks that every model (every ensemble member too) takes the data's input shape; ``kwargs`` go to
    ``evaluate_transfer``. Each model's load record goes to its ``models`` entry in the result.
    """
    targets = load_specs(specs, spec_options, device=device) if specs else {}
    sources = load_specs(surrogates, spec_options, device=device) if surrogates else {}
    ensemble_models, ensemble_info, ensemble_members = load_ensembles(
        ensembles, rule=ensemble_rule, device=device, options=spec_options)
    surrogate_ensemble_models, surrogate_ensemble_info, surrogate_members = load_ensembles(
        surrogate_ensembles, rule=ensemble_rule, objective="mean_ce", device=device, options=spec_options)
    for name in list(ensemble_models) + list(surrogate_ensemble_models):
        if name in targets or name in sources or (name in ensemble_models and name in surrogate_ensemble_models):
            raise DecorrError(f"ensemble name {name!r} is taken by another model; choose another NAME")
    loaded = {**sources, **targets}
    shape = tuple(data.image_shape) if _is_split(data) else tuple(data[0].shape[1:])
    check_input_shape({**loaded, **ensemble_members, **surrogate_members}, shape)
    models = {**{n: m.module for n, m in targets.items()}, **ensemble_models}
    surrogate_models = {**{n: m.module for n, m in sources.items()}, **surrogate_ensemble_models}
    ensemble_info = {**ensemble_info, **surrogate_ensemble_info}
    return evaluate_transfer(
        models, data, surrogates=surrogate_models,
        feature_layers={k: m.info["feature_layer"] for k, m in loaded.items()},
        archs={**{k: m.info["arch"] for k, m in loaded.items()}, **{k: "ensemble" for k in ensemble_info}},
        device=device,
        model_info={**{k: {key: v for key, v in m.info.items() if key not in ("arch", "feature_layer")}
                       for k, m in loaded.items()},
                    **{k: {"member_specs": i["member_specs"], "member_info": i["member_info"]}
                       for k, i in ensemble_info.items()}},
        **kwargs,
    )


def checkpoint_dataset(specs: Sequence[str]) -> str:
    """The dataset the checkpoint specs were trained on; they must agree (``ARCH=WEIGHTS`` specs say none)."""
    names = {}
    for spec in specs:
        parsed = parse_spec(spec)
        names[spec] = load_checkpoint(parsed.checkpoint, load_weights=False).config.get("dataset") if parsed.checkpoint else None
    found = {name for name in names.values() if name}
    if len(found) != 1:
        listed = ", ".join(f"{path}: {name}" for path, name in names.items())
        raise DecorrError(f"cannot tell which dataset to evaluate on ({listed}); pass --dataset")
    return found.pop()


def pair_transfer(result: Mapping[str, Any]) -> dict[tuple[str, str], dict[float, float | None]]:
    """``{(a, b): {eps: mean of T(a -> b) and T(b -> a)}}`` from an ``evaluate_transfer`` result."""
    table: dict[tuple[str, str], dict[float, float | None]] = {}
    for row in result["by_eps"]:
        for pair in row["pairs"]:
            table.setdefault((pair["a"], pair["b"]), {})[row["eps"]] = pair["mean"]
    return table
