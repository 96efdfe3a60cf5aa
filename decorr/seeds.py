"""Summaries across training seeds: the ensemble measures of several ``eval/transfer.py`` runs, one per seed.

Seeds move transfer rates by more than many effects, and the images' Wilson intervals do not cover that
variation, so a method is summarised over seeds: each seed's evaluation gives one number per measure
(:func:`ensemble_measures`), and a group of seeds gives their mean with a 95% Student-t interval
(:func:`decorr.stats.t_interval`, ``n - 1`` degrees of freedom; none for one seed). Against a baseline group, the
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

from statistics import mean
from typing import Any, Mapping, Sequence

from decorr.checkpoint import load_checkpoint
from decorr.errors import DecorrError
from decorr.stats import t_interval

__all__ = ["ensemble_measures", "seed_table", "training_measures"]


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
    for record in result["by_eps"]:
        rates = [record["transfer"][s][t] for s in members if s in record["transfer"] for t in members
                 if t != s and record["transfer"][s].get(t) is not None]
        out[f"transfer@{record['eps']:g}"] = mean(rates) if rates else None
    return out


def training_measures(result: Mapping[str, Any]) -> dict[str, float] | None:
    """Accuracy, ensemble accuracy, R^2, active features and effective rank from the members' training log.

    Only when every member is a model of one decorr checkpoint whose last logged evaluation has them all
    (``test/acc_<model>``, ``test/acc_ensemble``, ``test/r2_mean``, ``test/active_features_<model>`` as a
    fraction, ``test/effective_rank_<model>``); otherwise None. ``test_images`` is the split's size when
    logged, else None.
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
    return {"accuracy": mean(last[f"test/acc_{n}"] for n in names), "ensemble_accuracy": last["test/acc_ensemble"],
            "r2": last["test/r2_mean"], "active_fraction": mean(last[f"test/active_features_{n}"] for n in names),
            "effective_rank": mean(last[f"test/effective_rank_{n}"] for n in names)}


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
                     ("effective_rank", "effective rank", 1, 0))


def seed_table(groups: Mapping[str, Sequence[Mapping[str, Any]]], *, baseline: str | None = None) -> str:
    """Markdown: per group (label -> its seeds' results), every measure's mean over seeds [95% t-interval].

    With ``baseline`` (a label), a second table gives each group's seed-by-seed difference to it in the
    transfer rates. All runs must have evaluated the same images and epsilons.
    """
    if not groups or any(not runs for runs in groups.values()):
        raise DecorrError("no evaluations to summarise; give LABEL=RESULTS,RESULTS,... groups")
    runs = [r for group in groups.values() for r in group]
    if len({r["settings"].get("samples_sha256") for r in runs}) > 1:
        raise DecorrError("the evaluations used different images (samples_sha256 differs); summarise runs on "
                          "the same images")
    eps = [record["eps"] for record in runs[0]["by_eps"]]
    if any([record["eps"] for record in r["by_eps"]] != eps for r in runs):
        raise DecorrError("the evaluations used different epsilons; summarise runs with the same --eps")
    if baseline is not None and baseline not in groups:
        raise DecorrError(f"baseline {baseline!r} is not one of the groups {sorted(groups)}")
    measures = {label: [ensemble_measures(r) for r in group] for label, group in groups.items()}
    logged = {label: [training_measures(r) for r in group] for label, group in groups.items()}
    from_log = all(m is not None for rows in logged.values() for m in rows)
    columns = _TRAINING_COLUMNS if from_log else _COLUMNS
    transfer_keys = [(f"transfer@{e:g}", f"T eps {e:g} %") for e in eps]
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
        base = measures[baseline]
        header = ["method", *[f"{title} minus {baseline}" for _, title in transfer_keys]]
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label, rows in measures.items():
            if label == baseline:
                continue
            if len(rows) != len(base):
                raise DecorrError(f"group {label!r} has {len(rows)} seeds and the baseline {len(base)}; pair them "
                                  "seed by seed")
            cells = [_cell([None if r[k] is None or b[k] is None else r[k] - b[k] for r, b in zip(rows, base)],
                           100, 1) for k, _ in transfer_keys]
            lines.append("| " + " | ".join([label, *cells]) + " |")
        lines += ["", f"Differences in points, seed by seed (the i-th run of each group against the i-th of "
                  f"{baseline}), mean [95% t-interval]."]
    return "\n".join(lines)
