"""Sweeps: cells keyed by what they compute, a sweep killed mid-cell and restarted ends with the files of
an uninterrupted one and recomputes no finished cell; bad sweep files are one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from decorr.checkpoint import model_entry, save_checkpoint
from decorr.errors import DecorrError
from decorr.evaluation.sweep import load_sweep
from decorr.models import create_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "eval" / "sweep.py"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_models")
    for i in range(2):
        torch.manual_seed(i)
        save_checkpoint(root / f"m{i}", {"model0": create_model("mnist_cnn")},
                        {"kind": "classifier", "models": {"model0": model_entry("mnist_cnn")}, "dataset": "mnist",
                         "epoch": 0})
    return root


def sweep_file(path: Path, models: Path, *, attacks=("pgd", "mifgsm+dim", "mifgsm+ssm"), steps: int = 3,
               extra: str = "") -> Path:
    path.write_text(f"""
models:
  pair: {{targets: [{models / 'm0'}, {models / 'm1'}]}}
attacks: [{', '.join(attacks)}]
eps: [0.1, 0.2]
settings: {{num_samples: 40, steps: {steps}, batch_size: 20, ssm_copies: 4}}
{extra}""")
    return path


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=600, **kwargs)


def tree(root: Path) -> dict[str, bytes]:
    """Every file of a sweep but the timing of its cells (how the work went, not what it found)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "timing.json"}


@pytest.mark.slow
def test_killed_mid_cell_and_restarted_equals_uninterrupted(models, tmp_path):
    spec = sweep_file(tmp_path / "sweep.yaml", models)
    whole = run([str(spec), "--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert "3 cells, 3 computed now, 0 reused" in whole.stdout

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(spec), "--out", str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = ""
    deadline = time.time() + 300
    while "computing (2/3)" not in seen and time.time() < deadline:  # cell 1 finished, cell 2 started
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            pytest.fail("the sweep ended before it could be killed: " + seen[-1000:])
        seen += line
    time.sleep(1.0)  # into cell 2's attacks
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cells = tmp_path / "killed" / "cells"
    assert len(list(cells.glob("*/results.json"))) == 1, "the kill should land inside the second cell"

    again = run([str(spec), "--out", str(tmp_path / "killed")])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "3 cells, 2 computed now, 1 reused" in again.stdout  # the finished cell is not computed again
    assert tree(tmp_path / "killed") == tree(tmp_path / "whole")


def test_changed_settings_make_new_cells_and_the_plan_says_what_is_done(models, tmp_path):
    spec = sweep_file(tmp_path / "sweep.yaml", models, attacks=("pgd",), steps=1)
    done = run([str(spec), "--out", str(tmp_path / "out")])
    assert done.returncode == 0, done.stderr[-2000:]
    cells = load_sweep(spec)
    changed = load_sweep(sweep_file(tmp_path / "other.yaml", models, attacks=("pgd",), steps=2))
    assert cells[0].key != changed[0].key and cells[0].name == changed[0].name
    plan = run([str(tmp_path / "other.yaml"), "--out", str(tmp_path / "out"), "--dry-run"])
    entries = json.loads(plan.stdout)
    assert [e["done"] for e in entries] == [False] and entries[0]["gradients"] == 40 * 2 * 2 * 2
    assert entries[0]["estimated_s"] is not None  # from the done cell's timing
    again = run([str(spec), "--out", str(tmp_path / "out"), "--dry-run"])
    assert [e["done"] for e in json.loads(again.stdout)] == [True]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| pgd | 0.1 |" in summary and "| any attack | 0.2 |" in summary


@pytest.mark.parametrize("text, message", [
    ("models: {pair: {targets: [x]}}\nattacks: [pgd]\ncolour: red\n", "unknown key 'colour'"),
    ("models: {pair: {targets: [x], surrogate: [y]}}\n", "unknown key 'surrogate'"),
    ("models: {pair: {targets: [x]}}\nsettings: {num_sample: 3}\n", "unknown setting 'num_sample'"),
    ("models: {pair: {targets: [x]}}\nattacks: [mifgsm+nosuch]\n", "unknown attack 'nosuch'"),
    ("models: []\n", "'models' must name at least one group"),
    ("models: {pair: {targets: [x]}}\nsettings: {out: here}\n", "may not name --out"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(DecorrError, match=message):
        load_sweep(path)


def test_a_cell_that_cannot_load_is_refused_before_any_work_and_finished_cells_stay(models, tmp_path):
    good = f"""
models:
  good: {{targets: [{models / 'm0'}]}}
attacks: [pgd]
eps: [0.1]
settings: {{num_samples: 20, steps: 1, dataset: mnist}}
"""
    spec = tmp_path / "sweep.yaml"
    spec.write_text(good)
    assert run([str(spec), "--out", str(tmp_path / "out")]).returncode == 0
    before = tree(tmp_path / "out")
    spec.write_text(good.replace("models:\n", "models:\n  bad: {targets: [" + str(tmp_path / "missing") + "]}\n"))
    done = run([str(spec), "--out", str(tmp_path / "out")])
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0]
    assert tree(tmp_path / "out") == before  # nothing finished is lost, nothing half-written added
