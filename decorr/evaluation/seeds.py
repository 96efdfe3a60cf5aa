"""Summaries across training seeds: the ensemble measures of several ``eval/transfer.py`` runs, one per seed.

Seeds move transfer rates by more than many effects, and the images' Wilson intervals do not cover that
variation, so a method is summarised over seeds: each seed's evaluation gives one number per measure
(:func:`ensemble_measures`), and a group of seeds gives their mean with a 95% Student-t interval
(:func:`decorr.evaluation.stats.t_interval`, ``n - 1`` degrees of freedom; none for one seed). Against a baseline group, the
difference is taken seed by seed (the i-th run of each group paired) and its mean and t-interval are
reported, which is tighter than comparing two intervals when seeds share data order and images.

The members of an evaluation are its targets that are not ensembles; every measure is a mean over them
(accuracy, active features, effective rank) or over their pairs (feature R^2, natural inputs, both
regression directions; the transfer rate, over the ordered pairs of members that were both attacked).

Feature R^2 is biased towards 1 when the samples are few against the features (1000 images and 784
features give 0.99 for pairs at 0.97 on 10,000), so when every member comes from one decorr checkpoint that
logged its final evaluation (the whole test split), :func:`training_measures` takes accuracy, ensemble
accuracy, R^2, active features and effective rank from that log instead; the transfer rates always come
from the evaluation.
"""

from __future__ import annotations

import os
from pathlib import Path
from statistics import mean, median
from typing import Any, Mapping, Sequence

from decorr.checkpoint import load_checkpoint
from decorr.errors import DecorrError
from decorr.evaluation.tables import plot_points
from decorr.evaluation.records import ALL_SOURCES
from decorr.evaluation.stats import t_interval
from decorr.evaluation.compare import attack_worst_rows, row_attack

__all__ = ["defence_measures", "defence_table", "ensemble_measures", "plot_accuracy_transfer", "seed_table",
           "training_measures"]


def _members(result: Mapping[str, Any]) -> list[str]:
    models = result["models"]
    return [name for name in result["targets"] if models[name].get("arch") != "ensemble"]


def ensemble_measures(result: Mapping[str, Any]) -> dict[str, float | None]:
    """One seed's numbers from one ``eval/transfer.py`` result: means over its members and their pairs.

    Keys: ``accuracy`` (natural, fraction), ``r2`` (mean of both directions over same-architecture pairs),
    ``active_features``, ``num_features``, ``effective_rank``, and ``transfer@EPS`` for every epsilon (the
    mean of T(i -> j) over ordered member pairs with a defined rate). A measure the run lacks is None.
    """
    members = _members(result)
    if len(members) < 2:
        raise DecorrError(f"a seed summary needs an evaluation of at least two member models, got {members}")
    models = result["models"]
    out: dict[str, float | None] = {"accuracy": mean(models[m]["natural_accuracy"] for m in members)}
    for key in ("active_features", "effective_rank"):
        values = [models[m].get(key) for m in members]
        out[key] = mean(values) if all(v is not None for v in values) else None
    r2, widths = [], set()
    for pair in result.get("pairs", []):
        feats = pair.get("natural_features") or {}
        if pair["a"] in members and pair["b"] in members:
            # a collapsed (constant) member has no R^2 as the regressor: null in that direction only
            values = [feats.get(key) for key in ("r2", "r2_reverse") if feats.get(key) is not None]
            r2 += values
            if values:
                widths.add(feats.get("num_features"))
    out["r2"] = mean(r2) if r2 else None
    out["num_features"] = widths.pop() if len(widths) == 1 else None
    for attack, record in attack_rows(result):
        rates = [record["transfer"][s][t] for s in members if s in record["transfer"] for t in members
                 if t != s and record["transfer"][s].get(t) is not None]
        out[f"transfer{attack}@{record['eps']:g}"] = mean(rates) if rates else None
    return out


def attack_rows(result: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """``(tag, row)`` for every row of a result: the tag is empty for a run of one attack (the keys of
    earlier summaries), ``|ATTACK`` otherwise, and the worst case over the attacks is ``|any``."""
    rows = list(result["by_eps"])
    attacks = list(dict.fromkeys(row_attack(result, r) for r in rows))
    if len(attacks) < 2:
        return [("", r) for r in rows]
    return [(f"|{row_attack(result, r)}", r) for r in rows + attack_worst_rows(result)]


def training_measures(result: Mapping[str, Any]) -> dict[str, float] | None:
    """Accuracy, ensemble accuracy, R^2, active features and effective rank from the members' training log.

    Only when every member is a model of one decorr checkpoint whose last logged evaluation has them all
    (``test/acc_<model>``, ``test/acc_ensemble``, ``test/r2_mean``, ``test/active_features_<model>`` as a
    fraction, ``test/effective_rank_<model>``); otherwise None. ``epoch_seconds``: the median of the logged
    epochs' training time (``time/train_epoch_s``), None when none is logged.
    """
    members = _members(result)
    paths = {result["models"][m].get("checkpoint") for m in members}
    if len(paths) != 1 or None in paths:
        return None
    try:
        history = load_checkpoint(paths.pop(), load_weights=False).config.get("history") or []
    except (DecorrError, OSError):
        return None
    last = history[-1] if history else {}
    names = [m.rsplit("/", 1)[-1] for m in members]
    keys = [f"test/{kind}_{n}" for n in names for kind in ("acc", "active_features", "effective_rank")]
    if not all(k in last for k in (*keys, "test/acc_ensemble", "test/r2_mean")):
        return None
    seconds = [h["time/train_epoch_s"] for h in history if "time/train_epoch_s" in h]
    return {"accuracy": mean(last[f"test/acc_{n}"] for n in names), "ensemble_accuracy": last["test/acc_ensemble"],
            "r2": last["test/r2_mean"], "active_fraction": mean(last[f"test/active_features_{n}"] for n in names),
            "effective_rank": mean(last[f"test/effective_rank_{n}"] for n in names),
            "epoch_seconds": median(seconds) if seconds else None}


def _eps_text(eps: float | str) -> str:
    """An epsilon for a column title: ``k/255`` when it is one (within float rounding), else ``%g``."""
    value = float(eps)
    k = round(value * 255)
    return f"{k}/255" if k and abs(value * 255 - k) < 1e-4 else f"{value:g}"


def _cell(values: Sequence[float | None], scale: float, digits: int) -> str:
    if any(v is None for v in values):
        return "-"
    centre, interval = t_interval([scale * v for v in values])
    if interval is None:
        return f"{centre:.{digits}f}"
    return f"{centre:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


_COLUMNS = (("accuracy", "member accuracy %", 100, 1), ("r2", "feature R^2", 1, 3),
            ("active_features", "active features", 1, 0), ("effective_rank", "effective rank", 1, 0))
_TRAINING_COLUMNS = (("accuracy", "member accuracy %", 100, 1), ("ensemble_accuracy", "ensemble accuracy %", 100, 1),
                     ("r2", "feature R^2", 1, 3), ("active_fraction", "active features %", 100, 1),
                     ("effective_rank", "effective rank", 1, 0), ("epoch_seconds", "s / epoch", 1, 0))


def _check_groups(results: Sequence[Mapping[str, Any]], groups: Mapping[str, Any], baseline: str | None) -> None:
    if len({r["settings"].get("samples_sha256") for r in results}) > 1:
        raise DecorrError("the evaluations used different images (samples_sha256 differs); summarise runs on "
                          "the same images")
    if baseline is not None and baseline not in groups:
        raise DecorrError(f"baseline {baseline!r} is not one of the groups {sorted(groups)}")


def _difference_rows(measures: Mapping[str, Sequence[Mapping[str, float | None]]], baseline: str,
                     columns: Sequence[tuple[str, float, int]]) -> list[str]:
    """Table rows: every group's seed-by-seed difference to ``baseline`` in ``columns`` (key, scale, digits)."""
    base, lines = measures[baseline], []
    for label, rows in measures.items():
        if label == baseline:
            continue
        if len(rows) != len(base):
            raise DecorrError(f"group {label!r} has {len(rows)} seeds and the baseline {len(base)}; pair them "
                              "seed by seed")
        cells = [_cell([None if r.get(k) is None or b.get(k) is None else r[k] - b[k] for r, b in zip(rows, base)],
                       scale, digits) for k, scale, digits in columns]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return lines


def seed_table(groups: Mapping[str, Sequence[Mapping[str, Any]]], *, baseline: str | None = None,
               transpose: bool = False) -> str:
    """Markdown: per group (label -> its seeds' results), every measure's mean over seeds [95% t-interval].

    With ``baseline`` (a label), a second table gives each group's seed-by-seed difference to it in the
    transfer rates. All runs must have evaluated the same images and epsilons.
    """
    if not groups or any(not runs for runs in groups.values()):
        raise DecorrError("no evaluations to summarise; give LABEL=RESULTS,RESULTS,... groups")
    runs = [r for group in groups.values() for r in group]
    _check_groups(runs, groups, baseline)
    keys = [(tag, record["eps"]) for tag, record in attack_rows(runs[0])]
    if any([(tag, record["eps"]) for tag, record in attack_rows(r)] != keys for r in runs):
        raise DecorrError("the evaluations used different epsilons (or attacks); summarise runs with the same "
                          "--eps and --attack")
    measures = {label: [ensemble_measures(r) for r in group] for label, group in groups.items()}
    logged = {label: [training_measures(r) for r in group] for label, group in groups.items()}
    from_log = all(m is not None for rows in logged.values() for m in rows)
    columns = _TRAINING_COLUMNS if from_log else _COLUMNS
    transfer_keys = [(f"transfer{tag}@{e:g}", f"T{' ' + tag[1:] if tag else ''} eps {_eps_text(e)} %")
                     for tag, e in keys]
    header = ["method", "seeds", *[title for _, title, _, _ in columns], *[title for _, title in transfer_keys]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, rows in measures.items():
        source = logged[label] if from_log else rows
        cells = [_cell([row[key] for row in source], scale, digits) for key, _, scale, digits in columns]
        cells += [_cell([row[key] for row in rows], 100, 1) for key, _ in transfer_keys]
        lines.append("| " + " | ".join([label, str(len(rows)), *cells]) + " |")
    n = runs[0]["settings"]["num_samples"]
    widths = {row["num_features"] for rows in measures.values() for row in rows}
    width = f" of {widths.pop()}" if len(widths) == 1 and None not in widths else ""
    if from_log:
        where = ("accuracy, R^2 (mean over member pairs), active features and effective rank from each run's last "
                 f"logged evaluation on its whole test split; T (the members' mean transfer rate over ordered pairs) "
                 f"on the evaluation's {n} images")
    else:
        where = (f"R^2 over member pairs, both directions; active features{width}; T: the members' mean transfer "
                 f"rate over ordered pairs; all on the evaluation's {n} images")
    lines += ["", f"Means over seeds with 95% t-intervals (not clipped to the possible range; few seeds make them wide); "
              f"each seed's number is the mean over its members ({where})."]
    if baseline is not None:
        header = ["method", *[f"{title} minus {baseline}" for _, title in transfer_keys]]
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += _difference_rows(measures, baseline, [(k, 100, 1) for k, _ in transfer_keys])
        lines += ["", f"Differences in points, seed by seed (the i-th run of each group against the i-th of "
                  f"{baseline}), mean [95% t-interval]."]
    return "\n".join(transpose_tables(lines) if transpose else lines)


def _defended(result: Mapping[str, Any], target: str | None) -> str:
    """The target a defence summary reads: ``target``, or the result's only ensemble target."""
    models, targets = result["models"], result["targets"]
    if target is not None:
        if target not in targets:
            raise DecorrError(f"{target!r} is not a target of this evaluation (targets: {', '.join(targets)})")
        return target
    ensembles = [name for name in targets if "members" in models[name]]
    if len(ensembles) != 1:
        raise DecorrError(f"the evaluation has {len(ensembles)} ensemble targets ({', '.join(ensembles) or 'none'}); "
                          "name the one to summarise as RESULTS:TARGET")
    return ensembles[0]


def defence_measures(result: Mapping[str, Any], target: str | None = None) -> dict[str, float | None]:
    """One seed's numbers for one defended target (an ensemble, or one model) of an ``eval/transfer.py`` result.

    Keys: ``natural`` (accuracy, fraction); per epsilon ``white_box@EPS`` when the target was attacked itself;
    and for every other source that is not one of the target's members (the attacker's surrogates),
    ``accuracy[SOURCE]@EPS`` (the target's accuracy on that source's examples) and, for an ensemble target,
    ``auc[SOURCE]@EPS`` (the members' disagreement detector, ROC AUC natural against adversarial).
    """
    name = _defended(result, target)
    entry = result["models"][name]
    members = set(entry.get("members") or [])
    out: dict[str, float | None] = {"natural": entry["natural_accuracy"]}
    for attack, record in attack_rows(result):
        eps = f"{record['eps']:g}"
        if name in record.get("white_box_accuracy", {}):
            out[f"white_box{attack}@{eps}"] = record["white_box_accuracy"][name]
        for source, row in record["accuracy"].items():
            if source == name or source in members:
                continue
            out[f"accuracy[{source}{attack}]@{eps}"] = row.get(name)
            detection = (record.get("detection") or {}).get(source, {}).get(name)
            if detection is not None:
                out[f"auc[{source}{attack}]@{eps}"] = detection.get("auc")
    for record in result.get("worst_case", []):
        outside = [s for s in record[ALL_SOURCES]["sources"] if s != name and s not in members]
        if outside and len(outside) == len(record[ALL_SOURCES]["sources"]):
            out[f"accuracy[all sources|any]@{record['eps']:g}"] = record[ALL_SOURCES]["accuracy"].get(name)
    return out


def _defence_title(key: str) -> tuple[str, float, int]:
    if key == "natural":
        return "clean accuracy %", 100, 1
    kind, _, eps = key.partition("@")
    eps = _eps_text(eps)
    if kind.startswith("white_box"):
        attack = kind.partition("|")[2]
        return f"white box{' ' + attack if attack else ''} eps {eps} %", 100, 1
    what, _, source = kind.partition("[")
    source = source.rstrip("]").replace("|", " ")
    if what == "auc":
        return f"AUC {source} eps {eps}", 1, 3
    return f"from {source} eps {eps} %", 100, 1


def defence_table(groups: Mapping[str, Sequence[tuple[Mapping[str, Any], str | None]]], *,
                  baseline: str | None = None, eps: Sequence[float] | None = None, transpose: bool = False) -> str:
    """Markdown: per group (label -> its seeds' ``(result, target)``), each defence measure's mean over seeds.

    Columns are the keys of :func:`defence_measures` (the union over all rows, in order of appearance; a
    seed without one shows "-"), restricted to the epsilons ``eps`` when given. With ``baseline``, a second
    table gives every group's seed-by-seed difference to it. All results must have evaluated the same images.
    """
    if not groups or any(not rows for rows in groups.values()):
        raise DecorrError("no evaluations to summarise; give LABEL=RESULTS[:TARGET],... groups")
    results = [r for rows in groups.values() for r, _ in rows]
    _check_groups(results, groups, baseline)
    measures = {label: [defence_measures(r, t) for r, t in rows] for label, rows in groups.items()}
    wanted = None if eps is None else {f"{e:g}" for e in eps}
    keys: list[str] = []
    for rows in measures.values():
        for row in rows:
            keys += [k for k in row if k not in keys and (wanted is None or k == "natural"
                                                           or k.partition("@")[2] in wanted)]
    if not keys[1:]:
        raise DecorrError(f"no measure at eps {sorted(wanted or [])}; the evaluations have "
                          f"{sorted({k.partition('@')[2] for rows in measures.values() for r in rows for k in r} - {''})}")
    titles = [_defence_title(k) for k in keys]
    lines = ["| " + " | ".join(["method", "seeds", *[t for t, _, _ in titles]]) + " |", "|" + "---|" * (len(keys) + 2)]
    for label, rows in measures.items():
        cells = [_cell([row.get(k) for row in rows], scale, digits) for k, (_, scale, digits) in zip(keys, titles)]
        lines.append("| " + " | ".join([label, str(len(rows)), *cells]) + " |")
    lines += ["", f"Means over seeds with 95% t-intervals, on the evaluation's {results[0]['settings']['num_samples']} "
              "images; accuracies of the defended model (the ensemble's prediction) in %, AUC of its members' "
              "disagreement detector."]
    if baseline is not None:
        lines += ["", "| " + " | ".join(["method", *[f"{t} minus {baseline}" for t, _, _ in titles]]) + " |",
                  "|" + "---|" * (len(keys) + 1)]
        lines += _difference_rows(measures, baseline, [(k, scale, digits) for k, (_, scale, digits) in zip(keys, titles)])
        lines += ["", f"Differences seed by seed (the i-th run of each group against the i-th of {baseline}), "
                  "mean [95% t-interval]."]
    return "\n".join(transpose_tables(lines) if transpose else lines)


def transpose_tables(lines: Sequence[str]) -> list[str]:
    """Every markdown table among ``lines`` with its rows and columns swapped (other lines kept)."""
    out: list[str] = []
    table: list[list[str]] = []
    for line in [*lines, ""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):  # the separator row is rebuilt
                table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if table:
            columns = [list(column) for column in zip(*table)]
            out += ["| " + " | ".join(columns[0]) + " |", "|" + "---|" * len(columns[0])]
            out += ["| " + " | ".join(column) + " |" for column in columns[1:]]
            table = []
        out.append(line)
    return out[:-1]


def plot_accuracy_transfer(groups: Mapping[str, Sequence[Mapping[str, Any]]], eps: float,
                           path: str | os.PathLike) -> Path:
    """PNG: per group, the members' mean transfer rate at ``eps`` against their clean accuracy, one small point
    per seed and the mean over seeds with 95% t-intervals (accuracy from the training log when every run has
    it, as in :func:`seed_table`, else from the evaluation)."""
    key = f"transfer@{eps:g}"
    points = {}
    for label, runs in groups.items():
        measures = [ensemble_measures(r) for r in runs]
        if any(m.get(key) is None for m in measures):
            available = sorted(k.partition("@")[2] for k in measures[0] if k.startswith("transfer@"))
            raise DecorrError(f"group {label!r} has no members' transfer rate at eps {eps:g} (evaluated: "
                              f"{', '.join(available)}); give one of those to --plot-eps")
        logged = [training_measures(r) for r in runs]
        xs = [100 * (lg["accuracy"] if lg is not None else m["accuracy"]) for lg, m in zip(logged, measures)]
        ys = [100 * m[key] for m in measures]
        (x, x_ci), (y, y_ci) = t_interval(xs), t_interval(ys)
        points[label] = {"xs": xs, "ys": ys, "x": x, "y": y, "x_ci": x_ci, "y_ci": y_ci}
    return plot_points(path, points, xlabel="members' clean accuracy %",
                       ylabel=f"members' mean transfer rate % (eps {eps:.4g})",
                       title="mean over seeds, 95% t-intervals; small points: seeds")
