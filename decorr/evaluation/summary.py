"""Tables across several evaluations: one row per (run label, epsilon), the targets' errors with intervals.

For studies that compare attacks run separately on the same images (PGD against SGM at several gammas,
with and without MI): each ``results.json`` of :func:`decorr.evaluation.transfer.evaluate_transfer` is one run. The
cell of a target is its error on the source's adversarial examples, ``1 - correct / num_samples``, in
percent with its 95% Wilson interval (the images are the sample; seeds are not); the source's own
(white-box) error comes first. A markdown table, so it goes straight into ``docs/results.md``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from decorr.errors import DecorrError
from decorr.evaluation.compare import attack_worst_rows, row_attack
from decorr.evaluation.stats import wilson_interval

__all__ = ["error_cells", "error_table"]


def _percent(errors: int, n: int) -> str:
    low, high = wilson_interval(errors, n)
    return f"{100 * errors / n:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def error_cells(result: Mapping[str, Any], source: str, targets: Sequence[str]) -> list[list[str]]:
    """Per epsilon: the eps, the source's white-box error and every target's error (percent [95% CI])."""
    n = int(result["settings"]["num_samples"])
    several = len({row_attack(result, e) for e in result["by_eps"]}) > 1
    rows = []
    for entry in list(result["by_eps"]) + attack_worst_rows(result):
        if source not in entry["white_box_correct"]:
            raise DecorrError(f"{source!r} is not a source of this evaluation; sources: {', '.join(entry['white_box_correct'])}")
        eps = f"{entry['eps'] * 255:g}/255"
        cells = [f"{row_attack(result, entry)} {eps}" if several else eps,
                 _percent(n - entry["white_box_correct"][source], n)]
        cells += [_percent(n - entry["correct"][source][t], n) for t in targets]
        rows.append(cells)
    return rows


def error_table(runs: Mapping[str, Mapping[str, Any]], *, source: str | None = None,
                targets: Sequence[str] | None = None) -> str:
    """A markdown table over ``runs`` (label -> results.json dict) that used the same images."""
    if not runs:
        raise DecorrError("no evaluations to tabulate; give LABEL=results.json pairs")
    first = next(iter(runs.values()))
    source = source or first["sources"][0]
    targets = list(targets or [t for t in first["targets"] if t != source])
    fingerprints = {r["settings"].get("samples_sha256") for r in runs.values()}
    if len(fingerprints) > 1:
        raise DecorrError("the evaluations used different images (samples_sha256 differs); tabulate runs on the same images")
    header = ["run", "eps", f"{source} (white box)", *targets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, result in runs.items():
        for cells in error_cells(result, source, targets):
            lines.append("| " + " | ".join([label, *cells]) + " |")
    n = int(first["settings"]["num_samples"])
    lines.append("")
    lines.append(f"Error in % on the source's adversarial examples, {n} images, 95% Wilson interval in brackets.")
    return "\n".join(lines)
