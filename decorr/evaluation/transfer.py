"""Transferability evaluation (SPEC section 3): every source attacked once per attack and epsilon, every
target evaluated on its examples, and the per-image worst case over the attacks.

For every attack of the run (a combination of the suite's components, :mod:`decorr.attacks`), every
epsilon and every source, the adversarial examples are crafted once, batch by batch, and every target is
evaluated on each batch right away, so K models cost K attacks per epsilon and attack rather than one per
ordered pair. ``evaluate_transfer`` returns a plain, JSON-able dict (schema below):

- natural accuracy of every model (on all ``num_candidates`` samples); each source's white-box accuracy
  on its own adversarial examples, and every target's accuracy on every source's examples;
- the transfer matrix ``T(i -> j) = P(f_j(x') != y | f_i(x') != y)`` over all evaluated samples, with the
  counts behind it; ``T(i -> i)`` is not a transfer (null);
- with several attacks, the worst case (``worst_case``): per source and epsilon an image counts as fooled
  when any attack fooled it (attack ``any``), and over every source and attack per target
  (``all_sources``: the defence's accuracy under the whole battery, DVERGE's per-image "all");
- for every pair of targets, the pair's figure, the mean of both directions (when both are sources);
- for pairs of the same architecture: the feature R^2 and the 1-D PCA Pearson correlation at the
  feature layer on natural inputs and on the adversarial examples of either member, and the parameter
  distance ``sum ||theta_a - theta_b||^2``.

Feature statistics: on natural inputs ``r2`` is the R^2 of b's features regressed on a's and
``r2_reverse`` the other way round; on the examples crafted on a member (``on_adv_of_a`` / ``on_adv_of_b``)
``r2`` regresses the other member's features on the source's. R^2 needs more samples than features plus
one; with fewer it is null and a note says why.

Randomness (random starts, DI, the transformations' draws) comes from a CPU generator per batch seeded by
``(seed, source, attack, epsilon, batch index)`` (:func:`decorr.evaluation.passes.batch_generator`): a
source's examples depend on its name, the attack, the data, the batch size and the settings only, not on
which other models are evaluated with it, nor on the number of processes (``torchrun`` /
``accelerate launch`` split the batches; the result is the one-process result).

Samples: all of ``data`` (``num_candidates``), or with ``only_correct`` those that every model classifies
correctly (``num_samples``; SGM's protocol). Targeted (``--targeted random`` or a class map): every image
gets a target class (seeded, per image), the attacks move towards it, and ``target_hit`` counts per source
and model the examples classified as their target; accuracies and transfer rates stay about the true class.

L2 attacks take epsilons and step sizes in Linf-equivalent units, scaled by ``l2_scale``: ``sqrt-side``
(SPEC: ``eps * sqrt(d)``, d the image side), ``sqrt-dim`` (d = C*H*W) or ``none``; the radius used is
recorded as ``attack_eps``.

Ensembles (:class:`decorr.models.ensemble.Ensemble`) are models like any other: as a target it predicts
with its rule, as a source it is attacked white-box (``ens``/``svre`` combine its members); for every
ensemble target ``detection`` holds the members' disagreement detection.

Result schema (``format`` ``decorr-transfer/2``)::

    {"format", "settings": {attacks: [{attack, resolved, components}], eps[], attack_eps[], norm, l2_scale,
                            targeted, seed, batch_size, num_samples, input_shape, features, only_correct,
                            num_candidates, samples_sha256},
     "models": {name: {role, arch, feature_layer, natural_accuracy, natural_correct, natural_accuracy_ci95,
                       [active_features, effective_rank], [members, rule, attack_loss, ...], ...}},
     "sources": [name], "targets": [name],
     "pairs": [{a, b, same_arch, parameter_distance, natural_features}],
     "by_eps": [{attack, eps, attack_eps, white_box_accuracy, white_box_accuracy_ci95, white_box_correct,
                 accuracy, accuracy_ci95, correct, transfer, transfer_ci95, source_fooled, transferred,
                 fooled: {src: {model: packed bits}}, [target_hit], detection, pairs,
                 source_correct: {src: {images, fooled: {model}, success: {model}}}}],  one per attack x eps
     "worst_case": [{attack: "any", eps, ... as by_eps ..., all_sources: {accuracy, accuracy_ci95, correct,
                     fooled: {target: packed bits}, sources}}],                              one per eps
     "notes": [str], "timing": {natural_s, attack_s, evaluate_s, features_s, total_s}}

Denominators: natural accuracies count over ``num_candidates``, accuracies under attack over
``num_samples``, a transfer rate over ``source_fooled``. Numbers that do not exist are null, never NaN.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from decorr.attacks import Attack, Source
from decorr.distributed import world_size
from decorr.errors import DecorrError
from decorr.evaluation.compare import data_fingerprint
from decorr.evaluation.detection import detection_summary
from decorr.evaluation.options import FORMAT, Data, Reporter, TransferOptions, default_eps, target_labels
from decorr.evaluation.passes import AttackJob, Collected, ModelRunner, attack_pass, batches, run_models
from decorr.evaluation.records import (FeatureSet, eps_record, interval, number, pair_features, pca_or_none,
                                       r2_or_none, source_correct_record, worst_case_record)
from decorr.features import feature_diagnostics
from decorr.loss import parameter_distance
from decorr.models.ensemble import Ensemble

__all__ = ["evaluate_transfer"]

# ------------------------------------------------------------------------------------------------
# The plan: which models attack and are evaluated, which pairs get feature statistics


@dataclass
class _Plan:
    targets: dict[str, nn.Module]
    surrogates: dict[str, nn.Module]
    sources: list[str]
    attacks: list[Attack]
    eps: tuple[float, ...]
    input_shape: tuple[int, ...]
    y: Tensor
    device: torch.device
    layers: dict[str, str]
    archs: dict[str, str]
    pairs: list[tuple[str, str]]
    same_arch: dict[tuple[str, str], bool]
    feature_pairs: list[tuple[str, str]]
    notes: set[str] = field(default_factory=set)
    timing: dict[str, float] = field(default_factory=lambda: {"natural_s": 0.0, "attack_s": 0.0, "evaluate_s": 0.0,
                                                              "features_s": 0.0})

    @property
    def models(self) -> dict[str, nn.Module]:
        return {**self.targets, **self.surrogates}

    @property
    def featured(self) -> set[str]:
        return {m for pair in self.feature_pairs for m in pair}

    @property
    def ensembles(self) -> list[str]:
        return [name for name, m in self.targets.items() if isinstance(m, Ensemble)]

    def partners(self, source: str) -> set[str]:
        """The models whose features are needed on ``source``'s examples (its feature-pair partners and itself)."""
        found = {b if a == source else a for a, b in self.feature_pairs if source in (a, b)}
        return found | {source} if found else set()


def _plan(models: Mapping[str, nn.Module], surrogates: Mapping[str, nn.Module] | None, data: Data,
          options: TransferOptions, feature_layers: Mapping[str, str | None] | None, archs: Mapping[str, str] | None,
          device: torch.device | str | None) -> _Plan:
    targets, surrogates = dict(models), dict(surrogates or {})
    if not targets:
        raise DecorrError("no target models to evaluate; pass at least one checkpoint")
    clash = sorted(set(targets) & set(surrogates))
    if clash:
        raise DecorrError(f"model {clash[0]} is both a target and a surrogate; pass it once")
    sources = list(surrogates) + (list(targets) if options.attack_targets or not surrogates else [])
    n, input_shape, labels = _check_data(data)
    if n == 0:
        raise DecorrError("no samples to evaluate; check --num-samples")
    batches_count = math.ceil(n / options.batch_size)
    if world_size() > batches_count:  # the work is shared by whole batches
        raise DecorrError(f"{world_size()} processes share {batches_count} batch(es) of {options.batch_size} of the "
                          f"{n} images, so some would have none; use a --batch-size of at most "
                          f"{max(n // world_size(), 1)} or fewer processes")
    all_models = {**targets, **surrogates}
    if device is None:
        param = next(iter(next(iter(all_models.values())).parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    for model in all_models.values():
        model.to(device).eval()
    layers = {k: v for k, v in (feature_layers or {}).items() if v}
    archs = dict(archs or {})
    names = list(targets)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    same = {(a, b): _same_architecture(targets[a], targets[b], archs.get(a), archs.get(b)) for a, b in pairs}
    feature_pairs = [(a, b) for a, b in pairs if options.features and same[(a, b)] and layers.get(a)
                     and layers.get(a) == layers.get(b)]
    plan = _Plan(targets, surrogates, sources, options.parsed_attacks(), options.eps or default_eps(input_shape),
                 input_shape, labels.cpu(), device, layers, archs, pairs, same, feature_pairs)
    for attack in plan.attacks:
        for name in sources:
            attack.check_source(_source(plan, name), targeted=options.targeted is not None)
    return plan


def _source(plan: _Plan, name: str) -> Source:
    model = plan.models[name]
    members = getattr(model, "member_names", ())
    return Source.of(model, name=name, arch=plan.archs.get(name), feature_layer=plan.layers.get(name),
                     member_archs=tuple(plan.archs.get(f"{name}/{m}") for m in members))


def _check_data(data: Data) -> tuple[int, tuple[int, ...], Tensor]:
    if not isinstance(data, (tuple, list)):
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
    return [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]


# ------------------------------------------------------------------------------------------------
# The evaluation


def evaluate_transfer(
    models: Mapping[str, nn.Module],
    data: Data,
    options: TransferOptions = TransferOptions(),
    *,
    surrogates: Mapping[str, nn.Module] | None = None,
    feature_layers: Mapping[str, str | None] | None = None,
    archs: Mapping[str, str] | None = None,
    model_info: Mapping[str, Mapping[str, Any]] | None = None,
    device: torch.device | str | None = None,
    report: Reporter | None = None,
    on_adversarial: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Transfer matrices, accuracies, worst cases and feature statistics of ``models`` (module docstring).

    ``models`` are the targets; they are also the sources unless ``surrogates`` (source-only models) are
    given, in which case the targets are attacked too only with ``options.attack_targets``. ``data`` is an
    ``ImageSplit``, a streamed split or ``(x, y)`` with pixels in [0, 1], taken in order in batches.
    ``feature_layers`` names each model's feature layer and ``archs`` its architecture (``ENS/MEMBER``
    for ensemble members; feature-level attacks choose their layer from it). ``model_info`` is added to
    the models' records. ``on_adversarial(source, attack, eps, positions, x_adv, y, source_pred)`` is
    called after every attacked batch (e.g. :class:`decorr.evaluation.adversarial_files.AdversarialWriter`).
    Under ``torchrun`` / ``accelerate launch`` every process takes every ``world``-th batch; every process
    returns the whole result.
    """
    started = time.perf_counter()
    report = report or Reporter()
    plan = _plan(models, surrogates, data, options, feature_layers, archs, device)
    natural = _natural_pass(plan, data, options.batch_size, report)
    data, natural, candidates = _restrict(plan, data, natural, options.only_correct, report)
    fingerprint = data_fingerprint(data)
    tick = time.perf_counter()
    natural_sets = {name: FeatureSet(z) for name, z in natural["features"].items()}
    pair_records = _pair_records(plan, natural_sets)
    plan.timing["features_s"] += time.perf_counter() - tick
    targets = None
    if options.targeted is not None:
        targets = target_labels(plan.y, natural["classes"], options.targeted, options.seed)
    rows = _adversarial_rows(plan, data, options, natural, pair_records, targets, report, on_adversarial)
    by_eps = [row for row, _ in rows]
    worst = _worst_case_rows(plan, options, rows)
    settings = options.record(plan.attacks, plan.eps, plan.input_shape)
    settings.update(num_samples=len(plan.y), input_shape=list(plan.input_shape), num_candidates=candidates,
                    samples_sha256=fingerprint)
    plan.timing["total_s"] = time.perf_counter() - started
    plan.timing["processes"] = world_size()  # how the work was shared; the results do not depend on it
    return {"format": FORMAT, "settings": settings, "models": _model_records(plan, natural, model_info, candidates),
            "sources": plan.sources, "targets": list(plan.targets), "pairs": pair_records, "by_eps": by_eps,
            "worst_case": worst, "notes": sorted(plan.notes), "timing": plan.timing}


def _natural_pass(plan: _Plan, data: Data, batch_size: int, report: Reporter) -> dict[str, Any]:
    """Every model on the natural images: labels, features of the feature pairs' members, disagreement."""
    tick = time.perf_counter()
    label_max = int(plan.y.max()) if len(plan.y) else 0
    runner = ModelRunner(plan.models, plan.layers, label_max)
    out = Collected()
    for batch in batches(data, batch_size, plan.device):
        out.positions.append(batch.positions)
        run_models(runner, list(plan.models), plan.featured, batch.x, out)
    report.say(f"natural images: {len(plan.y)} evaluated by {len(plan.models)} models")
    gathered = out.gathered(len(plan.y))
    gathered["classes"] = runner.classes
    plan.timing["natural_s"] += time.perf_counter() - tick
    return gathered


def _restrict(plan: _Plan, data: Data, natural: dict[str, Any], only_correct: bool,
              report: Reporter) -> tuple[Data, dict[str, Any], int]:
    """With ``only_correct``, the images every model classifies correctly (natural accuracies stay those of
    all candidates: kept under ``all_preds``)."""
    candidates = len(plan.y)
    natural["all_preds"], natural["all_y"] = dict(natural["preds"]), plan.y
    if not only_correct:
        return data, natural, candidates
    keep = torch.stack([pred == plan.y for pred in natural["preds"].values()]).all(dim=0)
    kept = keep.nonzero().flatten()
    if len(kept) == 0:
        raise DecorrError(f"none of the {candidates} samples is classified correctly by every model; drop "
                          "--only-correct or evaluate more samples")
    data = data.subset(kept) if not isinstance(data, (tuple, list)) else (data[0][kept], data[1][kept])
    plan.y = plan.y[kept]
    for kind in ("preds", "features", "flags", "scores"):
        natural[kind] = {name: value[kept] for name, value in natural[kind].items()}
    report.say(f"only_correct: {len(kept)} of {candidates} samples are classified correctly by every model")
    return data, natural, candidates


def _pair_records(plan: _Plan, natural_sets: Mapping[str, FeatureSet]) -> list[dict[str, Any]]:
    records = []
    for a, b in plan.pairs:
        record: dict[str, Any] = {"a": a, "b": b, "same_arch": plan.same_arch[(a, b)], "parameter_distance": None,
                                  "natural_features": None}
        if plan.same_arch[(a, b)]:
            with torch.no_grad():
                record["parameter_distance"] = number(float(parameter_distance(plan.targets[a], plan.targets[b])))
        if (a, b) in plan.feature_pairs:
            record["natural_features"] = pair_features(natural_sets[a], natural_sets[b], plan.notes)
        records.append(record)
    return records


def _adversarial_rows(plan: _Plan, data: Data, options: TransferOptions, natural: dict[str, Any],
                      pair_records: list[dict[str, Any]], targets: Tensor | None, report: Reporter,
                      on_adversarial: Callable[..., None] | None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """One row per attack and epsilon (and the per-image outcomes behind it, for the worst case)."""
    scale = options.scale(plan.input_shape)
    runner = ModelRunner(plan.models, plan.layers, int(plan.y.max()) if len(plan.y) else 0)
    target_names = list(plan.targets)
    evaluated = {src: ([src] if src not in plan.targets else []) + target_names for src in plan.sources}
    work = len(plan.attacks) * len(plan.eps) * len(plan.sources) * len(plan.y)
    advance = report.progress(work, "attacks") if report.progress else None
    rows = []
    for attack in plan.attacks:
        for eps in plan.eps:
            outcomes: dict[str, dict[str, Tensor]] = {}
            gathered: dict[str, dict[str, Any]] = {}
            for k, src in enumerate(plan.sources):
                label = f"{attack.text} eps {eps:g}: {src} ({k + 1}/{len(plan.sources)})"
                if advance is None:
                    report.say(f"attacking {label}")
                job = AttackJob(attack, src, _source(plan, src), eps, evaluated[src], plan.partners(src),
                                norm=options.norm, scale=scale, seed=options.seed, targets=targets)
                hook = None if on_adversarial is None else (
                    lambda batch, x_adv, pred, src=src: on_adversarial(src, attack.text, eps, batch.positions, x_adv,
                                                                       batch.y, pred))
                step = None if advance is None else (lambda count, label=label: advance(count, label))
                collected = attack_pass(job, runner, data, options.batch_size, plan.device, on_batch=hook,
                                        progress=step, timing=plan.timing)
                gathered[src] = collected.gathered(len(plan.y))
                outcomes[src] = {name: pred != plan.y for name, pred in gathered[src]["preds"].items()}
            row = eps_record(eps, eps * scale, attack.text, plan.sources, target_names, outcomes)
            _add_details(plan, row, gathered, natural, pair_records, targets)
            rows.append((row, outcomes))
    return rows


def _add_details(plan: _Plan, row: dict[str, Any], gathered: Mapping[str, dict[str, Any]],
                 natural: dict[str, Any], pair_records: list[dict[str, Any]], targets: Tensor | None) -> None:
    """Detection by the ensembles' disagreement, targeted hits, and the pairs' figures on this row."""
    row["detection"] = {
        src: {ens: detection_summary(natural["flags"][ens], natural["scores"][ens], gathered[src]["flags"][ens],
                                     gathered[src]["scores"][ens], gathered[src]["preds"][ens] != plan.y)
              for ens in plan.ensembles}
        for src in plan.sources} if plan.ensembles else {}
    row["source_correct"] = {src: source_correct_record(natural["preds"][src] == plan.y, g["preds"], plan.y)
                             for src, g in gathered.items()}
    if targets is not None:
        row["target_hit"] = {src: {name: int((pred == targets).sum()) for name, pred in g["preds"].items()}
                             for src, g in gathered.items()}
    tick = time.perf_counter()
    row["pairs"] = [_adversarial_pair(plan, row, record, gathered) for record in pair_records]
    plan.timing["features_s"] += time.perf_counter() - tick


def _adversarial_pair(plan: _Plan, row: dict[str, Any], record: Mapping[str, Any],
                      gathered: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    a, b = record["a"], record["b"]
    entry = _pair_figure(row, a, b)
    if (a, b) in plan.feature_pairs:
        for key, src, other in (("on_adv_of_a", a, b), ("on_adv_of_b", b, a)):
            if src in gathered:
                zs, zo = FeatureSet(gathered[src]["features"][src]), FeatureSet(gathered[src]["features"][other])
                entry[key] = {"r2": r2_or_none(zs.features, zo.features, plan.notes), "pca_pearson": pca_or_none(zs, zo)}
    return entry


def _worst_case_rows(plan: _Plan, options: TransferOptions,
                     rows: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per epsilon, the worst case over the run's attacks (and sources); none with one attack and one source."""
    if len(plan.attacks) < 2 and len(plan.sources) < 2:
        return []
    scale = options.scale(plan.input_shape)
    worst = []
    for eps in plan.eps:
        by_attack = [outcomes for row, outcomes in rows if row["eps"] == eps]
        row = worst_case_record(eps, eps * scale, plan.sources, list(plan.targets), by_attack)
        row["pairs"] = [_pair_figure(row, a, b) for a, b in plan.pairs]
        worst.append(row)
    return worst


def _pair_figure(row: Mapping[str, Any], a: str, b: str) -> dict[str, Any]:
    a_to_b = row["transfer"][a][b] if a in row["transfer"] else None
    b_to_a = row["transfer"][b][a] if b in row["transfer"] else None
    return {"a": a, "b": b, "a_to_b": a_to_b, "b_to_a": b_to_a,
            "mean": 0.5 * (a_to_b + b_to_a) if a_to_b is not None and b_to_a is not None else None,
            "on_adv_of_a": None, "on_adv_of_b": None}


def _model_records(plan: _Plan, natural: dict[str, Any], model_info: Mapping[str, Mapping[str, Any]] | None,
                   candidates: int) -> dict[str, dict[str, Any]]:
    roles = {name: "target+source" if name in plan.sources else "target" for name in plan.targets}
    roles.update({name: "source" for name in plan.surrogates})
    records = {}
    for name, model in plan.models.items():
        pred, y = natural["all_preds"][name], natural["all_y"]
        correct = int((pred == y).sum())
        record = {"role": roles[name], "arch": plan.archs.get(name), "feature_layer": plan.layers.get(name),
                  "natural_accuracy": number(correct / len(y)) if len(y) else None, "natural_correct": correct,
                  "natural_accuracy_ci95": interval(correct, candidates)}
        if isinstance(model, Ensemble):
            record.update({"arch": plan.archs.get(name) or "ensemble", **model.describe()})
            if model.rule == "vote" and name in plan.sources:
                plan.notes.add(f"ensemble {name} predicts by majority vote, which has no gradient; it is attacked "
                               "white-box on the prob rule's loss, CE of log(mean softmax)")
        record.update(dict((model_info or {}).get(name, {})))
        features = natural["features"].get(name)
        if features is not None and len(features):
            diagnostics = feature_diagnostics(features)
            record.update(active_features=diagnostics["active_features"],
                          effective_rank=number(diagnostics["effective_rank"]))
        records[name] = record
    return records
