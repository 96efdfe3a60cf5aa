"""Reporting the transfer evaluation: its tables on screen, CSV files, plots and TensorBoard scalars, from the
result of :func:`decorr.evaluation.transfer.evaluate_transfer` (``format_transfer``, ``save_transfer_report``).
Generic tables and plots are in :mod:`decorr.evaluation.tables`, file writing in :mod:`decorr.io`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from decorr.evaluation.tables import eps_text, format_table, plot_heatmap, plot_lines, tensorboard_writer
from decorr.evaluation.records import ALL_SOURCES, ANY_ATTACK
from decorr.evaluation.compare import attack_worst_rows, row_attack
from decorr.io import RESULTS_FILE, write_csv, write_results_json

__all__ = ["COMPARE_CSV_HEADER", "DETECTION_CSV_HEADER", "PAIRS_CSV_HEADER", "TRANSFER_CSV_HEADER", "compare_rows",
           "detection_rows", "format_comparison", "format_transfer", "log_transfer_tensorboard", "pair_rows",
           "plot_transfer", "save_transfer_report", "transfer_rows"]


# ------------------------------------------------------------------------------------------------
# The transfer evaluation (decorr.evaluation.transfer.evaluate_transfer results)


def attack_description(result: Mapping[str, Any], attack: str) -> Mapping[str, Any] | None:
    """The resolved settings an evaluation recorded for ``attack`` (None for results without them)."""
    for described in result["settings"].get("attacks", []):
        if described.get("attack") == attack:
            return described
    return None


def _attack_label(result: Mapping[str, Any], attack: str) -> str:
    """``mifgsm+dim linf, 10 steps of eps/10 (decay 1, dim prob 0.5)``: the attack as run."""
    settings = result["settings"]
    described = attack_description(result, attack)
    if attack == ANY_ATTACK:
        return f"any attack of the run ({', '.join(a['attack'] for a in settings.get('attacks', []))}), {settings['norm']}"
    if described is None:
        return f"{attack} {settings['norm']}"
    components = dict(described["components"])
    optimizer = next(iter(components.items()))
    name, fields = optimizer
    label = f"{described['resolved']} {settings['norm']}"
    if "steps" in fields:
        step = fields.get("step_size")
        label += f", {fields['steps']} steps of {'eps/steps' if step is None else eps_text(step)}"
    extras = [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()
              if k not in ("steps", "step_size") and v not in (None, False)]
    for other, values in list(components.items())[1:]:
        extras += [f"{other} {k} {v:g}" if isinstance(v, float) else f"{other} {k} {v}" for k, v in values.items()
                   if v not in (None, False)]
    return label + (f" ({', '.join(extras)})" if extras else "")


def _eps_label(row: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    label = f"eps {eps_text(row['eps'])}"
    if settings["norm"] == "l2":
        label += f" (L2 radius {row['attack_eps']:.4g})"
    return label


def format_transfer(result: Mapping[str, Any]) -> str:
    """The evaluation as text: models, one transfer matrix per attack and epsilon, the worst case over the
    attacks (and sources), the ensembles' detection, and the pairs."""
    blocks = [_models_block(result)]
    for row in result["by_eps"]:
        blocks += _row_blocks(result, row)
    for row in attack_worst_rows(result):
        blocks += _row_blocks(result, row)
    for row in result.get("worst_case", []):
        blocks.append(_all_sources_block(result, row))
    if result["pairs"]:
        blocks += _pair_blocks(result)
    for note in result.get("notes", []):
        blocks.append(f"note: {note}")
    return "\n\n".join(blocks)


def _models_block(result: Mapping[str, Any]) -> str:
    settings = result["settings"]
    model_rows = [[name, m["role"], _arch_text(m), m["natural_accuracy"], _ci_text(m.get("natural_accuracy_ci95")),
                   _count_text(m.get("natural_correct"), settings.get("num_candidates"))]
                  for name, m in result["models"].items()]
    samples = f"{settings['num_samples']} samples"
    if settings.get("only_correct"):
        # Natural accuracies stay over all candidates, so say both counts.
        samples = (f"{settings['num_samples']} of {settings['num_candidates']} samples (those every model "
                   "classifies correctly; natural acc over all)")
    attacks = ", ".join(a["attack"] for a in settings.get("attacks", [])) or settings.get("attack", "")
    targeted = f"; targeted ({settings['targeted']})" if settings.get("targeted") else ""
    return format_table(["model", "role", "arch", "natural acc", "95% CI", "correct"], model_rows,
                        title=f"{samples}; attacks: {attacks} ({settings['norm']}){targeted}", left_columns=3)


def _row_blocks(result: Mapping[str, Any], row: Mapping[str, Any]) -> list[str]:
    settings, targets = result["settings"], result["targets"]
    attack = row_attack(result, row)
    cis = row.get("transfer_ci95", {})
    white_cis = row.get("white_box_accuracy_ci95", {})
    rows = [[src] + [_with_ci(row["transfer"][src][tgt], cis.get(src, {}).get(tgt)) for tgt in targets]
            + [row["source_fooled"][src], _with_ci(row["white_box_accuracy"][src], white_cis.get(src))]
            for src in result["sources"]]
    blocks = [format_table(
        ["T(source -> target)"] + targets + ["source fooled", "white-box acc"], rows,
        title=f"{_attack_label(result, attack)}, {_eps_label(row, settings)}: transfer rate [95% Wilson CI] (rows: "
              "sources, columns: targets; over the images that fool the source)")]
    detection = detection_rows(result, [row])
    if detection:
        blocks.append(format_table(
            ["source", "ensemble", "FPR (natural)", "flagged (adv)", "flagged | fools ens", "fools ens", "AUC",
             "AUC | fools"],
            [[r[4], r[5], _with_ci(r[6], [r[7], r[8]]), _with_ci(r[11], [r[12], r[13]]),
              _with_ci(r[16], [r[17], r[18]]), r[20], r[21], r[22]] for r in detection],
            title=f"{attack}, {_eps_label(row, settings)}: disagreement detection (flag: the members' labels differ; "
                  "AUC of the mean total-variation score, natural vs adversarial)", left_columns=2))
    return blocks


def _all_sources_block(result: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    every = row[ALL_SOURCES]
    n = result["settings"]["num_samples"]
    rows = [[tgt, _with_ci(every["accuracy"][tgt], every["accuracy_ci95"][tgt]), _count_text(every["correct"][tgt], n)]
            for tgt in result["targets"]]
    return format_table(["target", "accuracy [95% CI]", "correct"], rows,
                        title=f"worst case over every attack and source ({', '.join(every['sources'])}), "
                              f"{_eps_label(row, result['settings'])}: an image counts as correct only if no attack "
                              "of any source fooled the target")


def _pair_blocks(result: Mapping[str, Any]) -> list[str]:
    natural_rows = []
    for pair in result["pairs"]:
        features = pair["natural_features"] or {}
        natural_rows.append([pair["a"], pair["b"], "yes" if pair["same_arch"] else "no", features.get("r2"),
                             features.get("r2_reverse"), features.get("pca_pearson"), pair["parameter_distance"]])
    blocks = [format_table(["a", "b", "same arch", "R^2 b~a", "R^2 a~b", "PCA r", "param dist"], natural_rows,
                           title="pairs on natural inputs (feature layer)", left_columns=3)]
    adversarial_rows = []
    for row in result["by_eps"]:
        for pair in row["pairs"]:
            on_a, on_b = pair["on_adv_of_a"] or {}, pair["on_adv_of_b"] or {}
            values = [pair["a_to_b"], pair["b_to_a"], pair["mean"], on_a.get("r2"), on_a.get("pca_pearson"),
                      on_b.get("r2"), on_b.get("pca_pearson")]
            if any(v is not None for v in values):
                adversarial_rows.append([pair["a"], pair["b"], row_attack(result, row), eps_text(row["eps"])] + values)
    if adversarial_rows:
        blocks.append(format_table(
            ["a", "b", "attack", "eps", "T(a->b)", "T(b->a)", "pair T", "R^2 adv(a)", "PCA r adv(a)", "R^2 adv(b)",
             "PCA r adv(b)"], adversarial_rows,
            title="pairs on adversarial inputs (adv(a): crafted on a; R^2 of the other's features on the source's)",
            left_columns=3))
    return blocks


TRANSFER_CSV_HEADER = ["attack", "norm", "eps", "attack_eps", "source", "target", "transfer_rate", "source_fooled",
                       "transferred", "target_adv_accuracy", "target_natural_accuracy", "source_white_box_accuracy",
                       "transfer_ci95_low", "transfer_ci95_high", "num_samples", "target_adv_correct",
                       "target_adv_accuracy_ci95_low", "target_adv_accuracy_ci95_high", "num_candidates",
                       "target_natural_correct", "target_natural_accuracy_ci95_low",
                       "target_natural_accuracy_ci95_high", "source_white_box_correct",
                       "source_white_box_accuracy_ci95_low", "source_white_box_accuracy_ci95_high"]
DETECTION_CSV_HEADER = ["attack", "norm", "eps", "attack_eps", "source", "ensemble", "fpr", "fpr_ci95_low",
                        "fpr_ci95_high", "natural_flagged", "num_natural", "detection_rate", "detection_rate_ci95_low",
                        "detection_rate_ci95_high", "flagged", "num_adversarial", "detection_rate_fooled",
                        "detection_rate_fooled_ci95_low", "detection_rate_fooled_ci95_high", "flagged_fooled",
                        "fooled", "auc", "auc_fooled", "score"]
COMPARE_CSV_HEADER = ["attack", "source", "target", "eps", "transfer_a", "transfer_b", "difference", "error_a", "error_b",
                      "only_a", "only_b", "p_value"]
PAIRS_CSV_HEADER = ["attack", "norm", "eps", "attack_eps", "a", "b", "same_arch", "transfer_a_to_b",
                    "transfer_b_to_a", "transfer_mean", "r2_natural", "r2_natural_reverse", "pca_pearson_natural",
                    "r2_adv_of_a", "pca_pearson_adv_of_a", "r2_adv_of_b", "pca_pearson_adv_of_b",
                    "parameter_distance"]


def transfer_rows(result: Mapping[str, Any]) -> list[list[Any]]:
    """One CSV row per attack, epsilon, source and target (``TRANSFER_CSV_HEADER``); the worst case's rows
    have attack ``any``."""
    settings, models = result["settings"], result["models"]
    rows = []
    for row in list(result["by_eps"]) + attack_worst_rows(result):
        for src in result["sources"]:
            for tgt in result["targets"]:
                rows.append([row_attack(result, row), settings["norm"], row["eps"], row["attack_eps"], src, tgt,
                             row["transfer"][src][tgt], row["source_fooled"][src], row["transferred"][src][tgt],
                             row["accuracy"][src][tgt], models[tgt]["natural_accuracy"],
                             row["white_box_accuracy"][src], *_bounds(row["transfer_ci95"][src][tgt]),
                             settings["num_samples"], row["correct"][src][tgt], *_bounds(row["accuracy_ci95"][src][tgt]),
                             settings["num_candidates"], models[tgt]["natural_correct"],
                             *_bounds(models[tgt]["natural_accuracy_ci95"]), row["white_box_correct"][src],
                             *_bounds(row["white_box_accuracy_ci95"][src])])
    return rows


def detection_rows(result: Mapping[str, Any], by_eps: Sequence[Mapping[str, Any]] | None = None) -> list[list[Any]]:
    """One CSV row per epsilon, source and ensemble target (``DETECTION_CSV_HEADER``)."""
    settings = result["settings"]
    rows = []
    for row in result["by_eps"] if by_eps is None else by_eps:
        for src, per_ensemble in row.get("detection", {}).items():
            for ens, d in per_ensemble.items():
                rows.append([row_attack(result, row), settings["norm"], row["eps"], row["attack_eps"], src, ens, d["fpr"],
                             *_bounds(d["fpr_ci95"]), d["natural_flagged"], d["num_natural"], d["detection_rate"],
                             *_bounds(d["detection_rate_ci95"]), d["flagged"], d["num_adversarial"],
                             d["detection_rate_fooled"], *_bounds(d["detection_rate_fooled_ci95"]),
                             d["flagged_fooled"], d["fooled"], d["auc"], d["auc_fooled"], d["score"]])
    return rows


def compare_rows(comparison: Mapping[str, Any]) -> list[list[Any]]:
    """One CSV row per (source, target, eps) of :func:`decorr.evaluation.compare.compare_results` (``COMPARE_CSV_HEADER``)."""
    return [[r[k] for k in COMPARE_CSV_HEADER] for r in comparison["rows"]]


def format_comparison(comparison: Mapping[str, Any]) -> str:
    """The paired comparison of two evaluations as a table."""
    a, b = comparison["a"], comparison["b"]
    rows = [[r.get("attack", ""), r["source"], r["target"], eps_text(r["eps"]), r["transfer_a"], r["transfer_b"], r["difference"],
             r["error_a"], r["error_b"], r["only_a"], r["only_b"], f"{r['p_value']:.3g}"] for r in comparison["rows"]]
    title = (f"A = {a}, B = {b}: {comparison['num_samples']} shared images; McNemar's exact test on the target's "
             "per-image error (fooled in A only / B only)")
    return format_table(["attack", "source", "target", "eps", "T A", "T B", "T B - A", "err A", "err B", "only A", "only B",
                         "p"], rows, title=title, left_columns=4)


def _bounds(interval: Sequence[float] | None) -> list[float | None]:
    return [None, None] if interval is None else [interval[0], interval[1]]


def _ci_text(interval: Sequence[float] | None) -> str:
    return "-" if interval is None else f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def _with_ci(value: float | None, interval: Sequence[float | None] | None) -> str | None:
    if value is None:
        return None
    if interval is None or interval[0] is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def _count_text(k: int | None, n: int | None) -> str:
    return "-" if k is None or n is None else f"{k}/{n}"


def _arch_text(model: Mapping[str, Any]) -> str:
    if "members" in model:
        return f"ensemble ({model['rule']}) of {', '.join(model['members'])}"
    return model.get("arch") or "-"


def pair_rows(result: Mapping[str, Any]) -> list[list[Any]]:
    """One CSV row per epsilon and pair of targets (``PAIRS_CSV_HEADER``)."""
    settings = result["settings"]
    natural = {(p["a"], p["b"]): p for p in result["pairs"]}
    rows = []
    for row in result["by_eps"]:
        for pair in row["pairs"]:
            base = natural[(pair["a"], pair["b"])]
            features = base["natural_features"] or {}
            on_a, on_b = pair["on_adv_of_a"] or {}, pair["on_adv_of_b"] or {}
            rows.append([row_attack(result, row), settings["norm"], row["eps"], row["attack_eps"], pair["a"], pair["b"],
                         base["same_arch"], pair["a_to_b"], pair["b_to_a"], pair["mean"], features.get("r2"),
                         features.get("r2_reverse"), features.get("pca_pearson"), on_a.get("r2"),
                         on_a.get("pca_pearson"), on_b.get("r2"), on_b.get("pca_pearson"),
                         base["parameter_distance"]])
    return rows


def _slug(value: float) -> str:
    return eps_text(value).replace("/", "_")


def plot_transfer(result: Mapping[str, Any], out: str | os.PathLike) -> list[Path]:
    """Per attack: ``heatmap_<attack>_<norm>_eps<eps>.png`` per epsilon and ``transfer_vs_eps_<attack>_<norm>.png``
    (the worst case's as attack ``any``)."""
    out = Path(out)
    settings, norm = result["settings"], result["settings"]["norm"]
    rows = list(result["by_eps"]) + attack_worst_rows(result)
    paths = []
    for attack in dict.fromkeys(row_attack(result, row) for row in rows):
        chosen = [row for row in rows if row_attack(result, row) == attack]
        slug = _file_slug(attack)
        for row in chosen:
            matrix = [[row["transfer"][src][tgt] for tgt in result["targets"]] for src in result["sources"]]
            paths.append(plot_heatmap(
                out / f"heatmap_{slug}_{norm}_eps{_slug(row['eps'])}.png", matrix, result["sources"],
                result["targets"], title=f"T(source -> target), {_attack_label(result, attack)}, "
                                         f"{_eps_label(row, settings)}",
                xlabel="target", ylabel="source", colorbar_label="transfer rate"))
        paths.append(_plot_eps_lines(result, chosen, out / f"transfer_vs_eps_{slug}_{norm}.png",
                                     _attack_label(result, attack)))
    return paths


def _plot_eps_lines(result: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    eps = [row["eps"] for row in rows]
    series: dict[str, list[float | None]] = {}
    for row in rows:
        for pair in row.get("pairs", []):
            if pair["a_to_b"] is not None or pair["b_to_a"] is not None:
                series.setdefault(f"{pair['a']} | {pair['b']}", []).append(pair["mean"])
    if not any(v is not None for values in series.values() for v in values):
        # No pair was attacked both ways (surrogate sources): one line per source -> target.
        series = {f"{src} -> {tgt}": [row["transfer"][src][tgt] for row in rows]
                  for src in result["sources"] for tgt in result["targets"] if src != tgt}
        ylabel = "transfer rate T(source -> target)"
    else:
        ylabel = "pair transfer rate (mean of both directions)"
    xlabel = "epsilon (pixel units" + (", Linf-equivalent)" if result["settings"]["norm"] == "l2" else ", Linf)")
    return plot_lines(path, eps, series, xlabel=xlabel, ylabel=ylabel, title=title, ylim=(-0.02, 1.02))


def _file_slug(attack: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", attack).strip("_") or "attack"


def log_transfer_tensorboard(result: Mapping[str, Any], log_dir: str | os.PathLike) -> Path:
    """Scalars per epsilon (step = round(1000 * eps)): pair transfer rates, matrix entries, accuracies."""
    writer = tensorboard_writer(log_dir)
    try:
        for name, model in result["models"].items():
            if model["natural_accuracy"] is not None:
                writer.add_scalar(f"natural_accuracy/{name}", model["natural_accuracy"], 0)
        for row in list(result["by_eps"]) + attack_worst_rows(result):
            attack = f"{_file_slug(row_attack(result, row))}_{result['settings']['norm']}"
            step = int(round(1000 * row["eps"]))
            for pair in row["pairs"]:
                if pair["mean"] is not None:
                    writer.add_scalar(f"{attack}/pair_transfer/{pair['a']}|{pair['b']}", pair["mean"], step)
            for src in result["sources"]:
                writer.add_scalar(f"{attack}/white_box_accuracy/{src}", row["white_box_accuracy"][src], step)
                for tgt in result["targets"]:
                    value = row["transfer"][src][tgt]
                    if value is not None:
                        writer.add_scalar(f"{attack}/transfer/{src}->{tgt}", value, step)
        writer.add_text("transfer/table", "```\n" + format_transfer(result) + "\n```", 0)
    finally:
        writer.close()
    return Path(log_dir)


def save_transfer_report(
    result: Mapping[str, Any], out: str | os.PathLike, *, plots: bool = True, tensorboard: bool = False
) -> list[Path]:
    """Write results.json, transfer.csv, pairs.csv, (with ensembles) detection.csv, table.txt, the plots and
    (optionally) TensorBoard."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        write_csv(out / "transfer.csv", TRANSFER_CSV_HEADER, transfer_rows(result)),
        write_csv(out / "pairs.csv", PAIRS_CSV_HEADER, pair_rows(result)),
    ]
    detection = detection_rows(result)
    if detection:
        paths.append(write_csv(out / "detection.csv", DETECTION_CSV_HEADER, detection))
    table = out / "table.txt"
    table.write_text(format_transfer(result) + "\n")
    paths.append(table)
    if plots:
        paths += plot_transfer(result, out)
    if tensorboard:
        paths.append(log_transfer_tensorboard(result, out / "tensorboard"))
    # results.json last: its presence marks a complete output folder.
    paths.append(write_results_json(out / RESULTS_FILE, result))
    return paths
