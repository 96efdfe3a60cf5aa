"""Tables and plots any evaluation can use: aligned text tables, PNG line plots, heatmaps and scatter plots
(matplotlib, Agg), TensorBoard writers."""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from decorr.errors import DecorrError

__all__ = ["eps_text", "format_table", "plot_heatmap", "plot_lines", "plot_points", "tensorboard_writer"]

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

def eps_text(eps: float) -> str:
    """``0.05`` as ``0.05``, but ``8/255`` as ``8/255`` rather than ``0.0313725``."""
    text = f"{eps:g}"
    levels = eps * 255
    if len(text) > 6 and abs(levels - round(levels)) < 1e-6:
        return f"{round(levels)}/255"
    return text
