"""Reporting: text tables, JSON and CSV files, PNG plots (matplotlib, Agg), TensorBoard scalars.

The first part is generic (any evaluation can use it: ``format_table``, ``write_csv``,
``write_results_json``, ``prepare_output_dir``, ``plot_lines``, ``plot_heatmap``); the second renders
the result of :func:`decorr.transfer.evaluate_transfer` with it (``format_transfer``,
``save_transfer_report``).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import shutil
import textwrap
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from decorr.errors import DecorrError
from decorr.training import write_json

__all__ = [
    "RESULTS_FILE",
    "default_output_dir",
    "detection_rows",
    "eps_text",
    "format_comparison",
    "format_table",
    "format_transfer",
    "jsonable",
    "log_transfer_tensorboard",
    "plot_heatmap",
    "plot_lines",
    "plot_transfer",
    "prepare_output_dir",
    "save_transfer_report",
    "staged_output_dir",
    "tensorboard_writer",
    "transfer_rows",
    "pair_rows",
    "write_csv",
    "write_results_json",
]

RESULTS_FILE = "results.json"

# ------------------------------------------------------------------------------------------------
# Generic helpers


def default_output_dir(root: str | os.PathLike = "runs/eval") -> Path:
    """``root/<YYYYmmdd-HHMMSS>``: a fresh folder name per run."""
    return Path(root) / time.strftime("%Y%m%d-%H%M%S")


def prepare_output_dir(out: str | os.PathLike, *, overwrite: bool = False, marker: str = RESULTS_FILE) -> Path:
    """Check that results may be written to ``out``, without creating anything; return it as a Path.

    Refused (DecorrError): a file; a folder holding ``marker`` (earlier results) unless ``overwrite``;
    a non-empty folder without ``marker`` (not ours to replace); a parent that cannot be written.
    Call it before any long computation, so that a refusal costs nothing and damages nothing, then
    write into :func:`staged_output_dir`.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DecorrError(f"--out {out} is a file, not a folder; choose another --out")
    if (out / marker).exists() and not overwrite:
        raise DecorrError(f"{out / marker} already exists; choose another --out or pass --overwrite")
    if out.is_dir() and not (out / marker).exists() and any(out.iterdir()):
        raise DecorrError(f"--out {out} holds other files and no {marker}; choose a new or empty folder")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DecorrError(f"cannot write to {parent}; choose a writable --out")
    return out


@contextlib.contextmanager
def staged_output_dir(out: str | os.PathLike, *, overwrite: bool = False,
                      marker: str = RESULTS_FILE) -> Iterator[Path]:
    """Write an evaluation's outputs into a fresh staging folder that replaces ``out`` only on success.

    A failure leaves ``out`` as it was (no empty folder, no half of the files); a success replaces
    an earlier ``out`` whole, so no plot of an earlier run is left beside the new results.
    """
    out = prepare_output_dir(out, overwrite=overwrite, marker=marker)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = out.with_name(f".{out.name}.previous-{os.getpid()}")
    if out.exists():
        os.replace(out, previous)
    os.replace(staging, out)
    shutil.rmtree(previous, ignore_errors=True)


def jsonable(value: Any) -> Any:
    """``value`` with NaN/inf floats as None and tuples as lists, recursively (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_results_json(path: str | os.PathLike, data: Any) -> Path:
    """Write strict JSON (no NaN) atomically."""
    path = Path(path)
    write_json(path, jsonable(data))
    return path


def _cell(value: Any, float_format: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return float_format.format(value)
    return str(value)


def format_table(
    header: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    title: str | None = None,
    float_format: str = "{:.3f}",
    left_columns: int = 1,
) -> str:
    """An aligned text table: the first ``left_columns`` columns left-aligned, the rest right-aligned.

    Floats use ``float_format``; None and NaN print as ``-``.
    """
    cells = [list(map(str, header))] + [[_cell(v, float_format) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i < left_columns else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in cells
    ]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(([title] if title else []) + lines)


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV atomically; None and NaN become empty cells, floats keep full precision."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in row])
    os.replace(tmp, path)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_lines(
    path: str | os.PathLike,
    x: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    ylim: tuple[float, float] | None = None,
    dashed: Mapping[str, Sequence[float | None]] | None = None,
) -> Path:
    """One line per entry of ``series`` against ``x`` (None values are gaps); ``dashed`` lines too
    (e.g. published reference figures)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    nan = float("nan")
    for label, values in series.items():
        ax.plot(x, [nan if v is None else v for v in values], marker="o", label=label)
    for label, values in (dashed or {}).items():
        ax.plot(x, [nan if v is None else v for v in values], "--", marker="x", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    if series or dashed:
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_points(
    path: str | os.PathLike,
    groups: Mapping[str, Mapping[str, Any]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
) -> Path:
    """One colour per group: its points (``xs``, ``ys``, e.g. one per seed) small, their centre (``x``, ``y``)
    large with error bars ``x_ci`` / ``y_ci`` (``(low, high)`` or None)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for label, g in groups.items():
        line = ax.scatter(g["xs"], g["ys"], s=12, alpha=0.5)
        colour = line.get_facecolor()[0]
        xerr = None if g.get("x_ci") is None else [[g["x"] - g["x_ci"][0]], [g["x_ci"][1] - g["x"]]]
        yerr = None if g.get("y_ci") is None else [[g["y"] - g["y_ci"][0]], [g["y_ci"][1] - g["y"]]]
        ax.errorbar([g["x"]], [g["y"]], xerr=xerr, yerr=yerr, fmt="o", ms=7, color=colour, capsize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_heatmap(
    path: str | os.PathLike,
    matrix: Sequence[Sequence[float | None]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    vmin: float = 0.0,
    vmax: float = 1.0,
    colorbar_label: str = "",
) -> Path:
    """A matrix as a heatmap with the value written in each cell; None/NaN cells are grey, marked ``-``."""
    plt = _pyplot()
    import numpy as np

    values = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=float)
    rows, cols = values.shape if values.size else (len(row_labels), len(col_labels))
    fig, ax = plt.subplots(figsize=(max(6.0, 2.4 + 1.1 * cols), max(4.0, 2.0 + 0.8 * rows)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax)
    for i in range(rows):
        for j in range(cols):
            v = values[i, j]
            text = "-" if np.isnan(v) else f"{v:.3f}"
            colour = "black" if np.isnan(v) or v > vmin + 0.6 * (vmax - vmin) else "white"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=8)
    ax.set_xticks(range(cols), [str(c) for c in col_labels], rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(rows), [str(r) for r in row_labels], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(textwrap.fill(title, 70), fontsize=9)
    fig.colorbar(image, ax=ax, label=colorbar_label, fraction=0.046, pad=0.04)
    return _save(fig, path)


def tensorboard_writer(log_dir: str | os.PathLike) -> Any:
    """A TensorBoard ``SummaryWriter``; a clear DecorrError when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DecorrError("TensorBoard logging needs the tensorboard package; pip install tensorboard, "
                          "or leave out --tensorboard") from None
    return SummaryWriter(log_dir=str(log_dir))


# ------------------------------------------------------------------------------------------------
# The transfer evaluation (decorr.transfer.evaluate_transfer results)


def _attack_label(settings: Mapping[str, Any]) -> str:
    label = f"{settings['attack'].upper()} {settings['norm']}"
    if settings["attack"] != "fgsm" and settings.get("steps") is not None:
        label += f", {settings['steps']} steps of {eps_text(settings['step_size'])}"
        extras = []
        if settings["attack"] == "sgm":
            extras.append(f"gamma {settings['gamma']:g}")
        if settings.get("momentum"):
            extras.append(f"MI {settings['momentum']:g}")
        if settings.get("diversity"):
            extras.append(f"DI {settings['diversity']:g}")
        if settings.get("ti_kernel"):
            extras.append(f"TI {settings['ti_kernel']}")
        if extras:
            label += " (" + ", ".join(extras) + ")"
    return label


def eps_text(eps: float) -> str:
    """``0.05`` as ``0.05``, but ``8/255`` as ``8/255`` rather than ``0.0313725``."""
    text = f"{eps:g}"
    levels = eps * 255
    if len(text) > 6 and abs(levels - round(levels)) < 1e-6:
        return f"{round(levels)}/255"
    return text


def _eps_label(row: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    label = f"eps {eps_text(row['eps'])}"
    if settings["norm"] == "l2":
        label += f" (L2 radius {row['attack_eps']:.4g})"
    return label


def format_transfer(result: Mapping[str, Any]) -> str:
    """The evaluation as text: models, one transfer matrix per epsilon, and the pairs."""
    settings = result["settings"]
    blocks = []
    model_rows = [[name, m["role"], _arch_text(m), m["natural_accuracy"], _ci_text(m.get("natural_accuracy_ci95")),
                   _count_text(m.get("natural_correct"), settings.get("num_candidates"))]
                  for name, m in result["models"].items()]
    samples = f"{settings['num_samples']} samples"
    if settings.get("only_correct"):
        # Natural accuracies stay over all candidates, so say both counts.
        samples = (f"{settings['num_samples']} of {settings['num_candidates']} samples (those every model "
                   "classifies correctly; natural acc over all)")
    blocks.append(format_table(["model", "role", "arch", "natural acc", "95% CI", "correct"], model_rows,
                               title=f"{samples}; {_attack_label(settings)}", left_columns=3))
    targets = result["targets"]
    for row in result["by_eps"]:
        cis = row.get("transfer_ci95", {})
        white_cis = row.get("white_box_accuracy_ci95", {})
        rows = [[src] + [_with_ci(row["transfer"][src][tgt], cis.get(src, {}).get(tgt)) for tgt in targets]
                + [row["source_fooled"][src], _with_ci(row["white_box_accuracy"][src], white_cis.get(src))]
                for src in result["sources"]]
        blocks.append(format_table(
            ["T(source -> target)"] + targets + ["source fooled", "white-box acc"], rows,
            title=f"{_eps_label(row, settings)}: transfer rate [95% Wilson CI] (rows: sources, columns: targets; "
                  "over the images that fool the source)",
        ))
        detection = detection_rows(result, [row])
        if detection:
            blocks.append(format_table(
                ["source", "ensemble", "FPR (natural)", "flagged (adv)", "flagged | fools ens", "fools ens", "AUC",
                 "AUC | fools"],
                [[r[4], r[5], _with_ci(r[6], [r[7], r[8]]), _with_ci(r[11], [r[12], r[13]]),
                  _with_ci(r[16], [r[17], r[18]]), r[20], r[21], r[22]] for r in detection],
                title=f"{_eps_label(row, settings)}: disagreement detection (flag: the members' labels differ; "
                      "AUC of the mean total-variation score, natural vs adversarial)", left_columns=2,
            ))
    if result["pairs"]:
        natural_rows = []
        for pair in result["pairs"]:
            features = pair["natural_features"] or {}
            natural_rows.append([pair["a"], pair["b"], "yes" if pair["same_arch"] else "no",
                                 features.get("r2"), features.get("r2_reverse"), features.get("pca_pearson"),
                                 pair["parameter_distance"]])
        blocks.append(format_table(
            ["a", "b", "same arch", "R^2 b~a", "R^2 a~b", "PCA r", "param dist"], natural_rows,
            title="pairs on natural inputs (feature layer)", left_columns=3,
        ))
        adversarial_rows = []
        for row in result["by_eps"]:
            for pair in row["pairs"]:
                on_a = pair["on_adv_of_a"] or {}
                on_b = pair["on_adv_of_b"] or {}
                values = [pair["a_to_b"], pair["b_to_a"], pair["mean"], on_a.get("r2"), on_a.get("pca_pearson"),
                          on_b.get("r2"), on_b.get("pca_pearson")]
                if any(v is not None for v in values):
                    adversarial_rows.append([pair["a"], pair["b"], eps_text(row["eps"])] + values)
        if adversarial_rows:
            blocks.append(format_table(
                ["a", "b", "eps", "T(a->b)", "T(b->a)", "pair T", "R^2 adv(a)", "PCA r adv(a)", "R^2 adv(b)",
                 "PCA r adv(b)"], adversarial_rows,
                title="pairs on adversarial inputs (adv(a): crafted on a; R^2 of the other's features on the "
                      "source's)",
                left_columns=2,
            ))
    for note in result.get("notes", []):
        blocks.append(f"note: {note}")
    return "\n\n".join(blocks)


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
COMPARE_CSV_HEADER = ["source", "target", "eps", "transfer_a", "transfer_b", "difference", "error_a", "error_b",
                      "only_a", "only_b", "p_value"]
PAIRS_CSV_HEADER = ["attack", "norm", "eps", "attack_eps", "a", "b", "same_arch", "transfer_a_to_b",
                    "transfer_b_to_a", "transfer_mean", "r2_natural", "r2_natural_reverse", "pca_pearson_natural",
                    "r2_adv_of_a", "pca_pearson_adv_of_a", "r2_adv_of_b", "pca_pearson_adv_of_b",
                    "parameter_distance"]


def transfer_rows(result: Mapping[str, Any]) -> list[list[Any]]:
    """One CSV row per epsilon, source and target (``TRANSFER_CSV_HEADER``)."""
    settings, models = result["settings"], result["models"]
    rows = []
    for row in result["by_eps"]:
        for src in result["sources"]:
            for tgt in result["targets"]:
                rows.append([settings["attack"], settings["norm"], row["eps"], row["attack_eps"], src, tgt,
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
                rows.append([settings["attack"], settings["norm"], row["eps"], row["attack_eps"], src, ens, d["fpr"],
                             *_bounds(d["fpr_ci95"]), d["natural_flagged"], d["num_natural"], d["detection_rate"],
                             *_bounds(d["detection_rate_ci95"]), d["flagged"], d["num_adversarial"],
                             d["detection_rate_fooled"], *_bounds(d["detection_rate_fooled_ci95"]),
                             d["flagged_fooled"], d["fooled"], d["auc"], d["auc_fooled"], d["score"]])
    return rows


def compare_rows(comparison: Mapping[str, Any]) -> list[list[Any]]:
    """One CSV row per (source, target, eps) of :func:`decorr.compare.compare_results` (``COMPARE_CSV_HEADER``)."""
    return [[r[k] for k in COMPARE_CSV_HEADER] for r in comparison["rows"]]


def format_comparison(comparison: Mapping[str, Any]) -> str:
    """The paired comparison of two evaluations as a table."""
    a, b = comparison["a"], comparison["b"]
    rows = [[r["source"], r["target"], eps_text(r["eps"]), r["transfer_a"], r["transfer_b"], r["difference"],
             r["error_a"], r["error_b"], r["only_a"], r["only_b"], f"{r['p_value']:.3g}"] for r in comparison["rows"]]
    title = (f"A = {a}, B = {b}: {comparison['num_samples']} shared images; McNemar's exact test on the target's "
             "per-image error (fooled in A only / B only)")
    return format_table(["source", "target", "eps", "T A", "T B", "T B - A", "err A", "err B", "only A", "only B",
                         "p"], rows, title=title, left_columns=3)


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
            rows.append([settings["attack"], settings["norm"], row["eps"], row["attack_eps"], pair["a"], pair["b"],
                         base["same_arch"], pair["a_to_b"], pair["b_to_a"], pair["mean"], features.get("r2"),
                         features.get("r2_reverse"), features.get("pca_pearson"), on_a.get("r2"),
                         on_a.get("pca_pearson"), on_b.get("r2"), on_b.get("pca_pearson"),
                         base["parameter_distance"]])
    return rows


def _slug(value: float) -> str:
    return eps_text(value).replace("/", "_")


def plot_transfer(result: Mapping[str, Any], out: str | os.PathLike) -> list[Path]:
    """``heatmap_<attack>_<norm>_eps<eps>.png`` per epsilon and ``transfer_vs_eps_<attack>_<norm>.png``."""
    out = Path(out)
    settings = result["settings"]
    attack, norm = settings["attack"], settings["norm"]
    paths = []
    for row in result["by_eps"]:
        matrix = [[row["transfer"][src][tgt] for tgt in result["targets"]] for src in result["sources"]]
        paths.append(plot_heatmap(
            out / f"heatmap_{attack}_{norm}_eps{_slug(row['eps'])}.png", matrix, result["sources"], result["targets"],
            title=f"T(source -> target), {_attack_label(settings)}, {_eps_label(row, settings)}",
            xlabel="target", ylabel="source", colorbar_label="transfer rate",
        ))
    eps = [row["eps"] for row in result["by_eps"]]
    series: dict[str, list[float | None]] = {}
    for row in result["by_eps"]:
        for pair in row["pairs"]:
            if pair["a_to_b"] is not None or pair["b_to_a"] is not None:
                series.setdefault(f"{pair['a']} | {pair['b']}", []).append(pair["mean"])
    if not any(v is not None for values in series.values() for v in values):
        # No pair was attacked both ways (surrogate sources): one line per source -> target.
        series = {f"{src} -> {tgt}": [row["transfer"][src][tgt] for row in result["by_eps"]]
                  for src in result["sources"] for tgt in result["targets"] if src != tgt}
        ylabel = "transfer rate T(source -> target)"
    else:
        ylabel = "pair transfer rate (mean of both directions)"
    xlabel = "epsilon (pixel units" + (", Linf-equivalent)" if norm == "l2" else ", Linf)")
    paths.append(plot_lines(out / f"transfer_vs_eps_{attack}_{norm}.png", eps, series, xlabel=xlabel, ylabel=ylabel,
                            title=_attack_label(settings), ylim=(-0.02, 1.02)))
    return paths


def log_transfer_tensorboard(result: Mapping[str, Any], log_dir: str | os.PathLike) -> Path:
    """Scalars per epsilon (step = round(1000 * eps)): pair transfer rates, matrix entries, accuracies."""
    writer = tensorboard_writer(log_dir)
    attack = f"{result['settings']['attack']}_{result['settings']['norm']}"
    try:
        for name, model in result["models"].items():
            if model["natural_accuracy"] is not None:
                writer.add_scalar(f"natural_accuracy/{name}", model["natural_accuracy"], 0)
        for row in result["by_eps"]:
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
