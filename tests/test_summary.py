"""decorr.evaluation.summary: errors and Wilson intervals across runs, checked against scipy on hand-made results."""

from __future__ import annotations

import pytest
from scipy.stats import binomtest

from decorr.errors import DecorrError
from decorr.evaluation.summary import error_table


def result(white_box_correct: int, target_correct: int, sha: str = "abc") -> dict:
    return {"settings": {"num_samples": 200, "samples_sha256": sha}, "sources": ["src"], "targets": ["tgt"],
            "by_eps": [{"eps": 8 / 255, "white_box_correct": {"src": white_box_correct},
                        "correct": {"src": {"tgt": target_correct}}}]}


def test_cells_are_errors_with_scipy_wilson_intervals():
    table = error_table({"PGD": result(10, 150), "SGM": result(20, 120)})
    ci = binomtest(80, 200).proportion_ci(method="wilson")
    row = next(line for line in table.splitlines() if line.startswith("| SGM"))
    assert f"40.0 [{100 * ci.low:.1f}, {100 * ci.high:.1f}]" in row
    assert "| 8/255 | 90.0 [" in row
    assert table.splitlines()[0] == "| run | eps | src (white box) | tgt |"


def test_runs_on_different_images_are_refused():
    with pytest.raises(DecorrError, match="different images"):
        error_table({"a": result(1, 1, "x"), "b": result(1, 1, "y")})
