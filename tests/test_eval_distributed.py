"""Evaluation at scale: ``torchrun --nproc_per_node 2 eval/transfer.py`` (gloo on the CPU) writes the
``results.json`` of one process on the same arguments: every rate, count, interval and per-image outcome,
only timing and host fields aside. Checked for PGD, an attack with randomness (DI), an ensemble target and
an image folder streamed under a memory budget, and the adversarial files written by both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from decorr.checkpoint import model_entry, save_checkpoint
from decorr.models import create_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "eval" / "transfer.py"
#: fields that say how a run went, not what it found
RUN_FIELDS = {"timing"}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    done = subprocess.run([sys.executable, *launcher, str(SCRIPT), *args], env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def comparable(path: Path, processes: int) -> dict:
    result = json.loads((path / "results.json").read_text())
    assert result["timing"]["processes"] == processes
    for key in RUN_FIELDS:
        result.pop(key)
    result["config"]["output"]["out"] = None
    result["config"]["command"] = result["settings"]["command"] = None  # the two commands name other --out folders
    if result["config"]["output"].get("save_adversarial"):
        result["config"]["output"]["save_adversarial"] = None
        result["settings"]["save_adversarial"] = None
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_eval")
    for i, arch in enumerate(("mnist_cnn", "mnist_cnn", "mnist_fc")):
        torch.manual_seed(i)
        save_checkpoint(root / f"m{i}", {"model0": create_model(arch)},
                        {"kind": "classifier", "models": {"model0": model_entry(arch)}, "dataset": "mnist", "epoch": 0})
    return root


@pytest.mark.slow
def test_two_processes_write_the_one_process_results(runs, tmp_path):
    common = [str(runs / "m0"), str(runs / "m1"), "--ensemble", f"ens={runs / 'm1'},{runs / 'm2'}",
              "--surrogate", str(runs / "m2"), "--attack-targets", "--attack", "pgd", "mifgsm+dim(prob=1)",
              "--eps", "0.1", "--steps", "2", "--num-samples", "50", "--batch-size", "16", "--no-plots"]
    run([*common, "--out", str(tmp_path / "one"), "--save-adversarial", str(tmp_path / "adv_one")], 1)
    run([*common, "--out", str(tmp_path / "two"), "--save-adversarial", str(tmp_path / "adv_two")], 2)
    one, two = comparable(tmp_path / "one", 1), comparable(tmp_path / "two", 2)
    assert one == two
    assert len(one["by_eps"]) == 2 and one["worst_case"] and one["models"]["ens"]["members"]
    assert (tmp_path / "adv_one" / "index.csv").read_text() == (tmp_path / "adv_two" / "index.csv").read_text()
    for png in (tmp_path / "adv_one").rglob("*.png"):
        twin = tmp_path / "adv_two" / png.relative_to(tmp_path / "adv_one")
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(twin))), png


@pytest.mark.slow
def test_a_streamed_image_folder_across_two_processes(runs, tmp_path):
    folder = tmp_path / "images"
    generator = np.random.default_rng(0)
    for label in range(3):
        (folder / str(label)).mkdir(parents=True)
        for k in range(9):
            pixels = generator.integers(0, 256, (28, 28), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / str(label) / f"{k}.png")
    common = [str(runs / "m0"), str(runs / "m1"), "--dataset", str(folder), "--memory-budget-mb", "0.005",
              "--workers", "0", "--attack", "pgd", "--eps", "0.1", "--steps", "2", "--batch-size", "5", "--no-plots"]
    run([*common, "--out", str(tmp_path / "one")], 1)
    run([*common, "--out", str(tmp_path / "two")], 2)
    one, two = comparable(tmp_path / "one", 1), comparable(tmp_path / "two", 2)
    assert one == two and one["settings"]["num_samples"] == 27


def _run_script(script: str, args: list[str], nproc: int) -> None:
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    done = subprocess.run([sys.executable, *launcher, str(REPO / "eval" / script), *args], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_gradient_alignment_and_dna_robustness_across_two_processes(runs, tmp_path):
    common = [str(runs / "m0"), str(runs / "m1"), "--num-samples", "30", "--batch-size", "8"]
    _run_script("gradient_alignment.py", [*common, "--out", str(tmp_path / "one.json")], 1)
    _run_script("gradient_alignment.py", [*common, "--out", str(tmp_path / "two.json")], 2)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one.pop("command") != two.pop("command") and one == two

    torch.manual_seed(0)
    dna = {"autoencoder": create_model("dna_mnist"), "classifier": create_model("dna_classifier_mnist")}
    save_checkpoint(tmp_path / "dna", dna, {"kind": "dna", "stage": 2, "dataset": "mnist", "epoch": 0,
                                            "models": {n: model_entry(a) for n, a in
                                                       (("autoencoder", "dna_mnist"),
                                                        ("classifier", "dna_classifier_mnist"))}})
    common = [str(tmp_path / "dna"), "--attack", "fgsm", "pgd", "--eps", "0.1", "--steps", "2", "--test-subset", "20",
              "--batch-size", "6", "--figure-samples", "0"]
    _run_script("dna_robustness.py", [*common, "--out", str(tmp_path / "dna_one")], 1)
    _run_script("dna_robustness.py", [*common, "--out", str(tmp_path / "dna_two")], 2)
    one, two = (json.loads((tmp_path / f"dna_{n}" / "results.json").read_text()) for n in ("one", "two"))
    one["settings"].pop("seconds"), two["settings"].pop("seconds")
    assert one == two and one["results"][0]["attack"] == "none"


@pytest.mark.slow
def test_more_processes_than_batches_is_one_line_error_and_nothing_written(runs, tmp_path):
    args = [str(runs / "m0"), "--attack", "pgd", "--eps", "0.1", "--steps", "1", "--num-samples", "10",
            "--batch-size", "10", "--no-plots", "--out", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(SCRIPT), *args], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    errors = {line for line in done.stderr.splitlines() if line.startswith("error: ")}
    assert len(errors) == 1, done.stderr[-3000:]
    message = errors.pop()
    assert "2 processes share 1 batch(es)" in message and "--batch-size" in message, message
    assert not (tmp_path / "out").exists()
