"""Hostile input, one case per row: a non-zero exit, one `error:` line, no traceback, nothing damaged.

Each row of ``CASES`` prepares whatever it needs in a temporary folder (copies of small real runs
trained once per session), runs one script's ``main`` in this process, and checks that

- it exits with status 2 and prints exactly one line on stderr, ``error: ...`` containing the row's
  expected words (an uncaught exception fails the test with its traceback);
- every file that existed before (runs, results) is byte-identical afterwards, and no file was added
  where the row says nothing may appear.

A few behaviours need real processes (two runs racing for one directory, ``accelerate launch``); they
follow the table as separate tests.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from decorr.checkpoint import file_sha256, load_models
from decorr.errors import DecorrError
from decorr.loss import correlation_loss, r_squared

REPO = Path(__file__).resolve().parents[1]
TINY_PAIR = ["--dataset", "mnist", "--arch", "mnist_cnn", "--epochs", "1", "--train-subset", "1000",
             "--test-subset", "200", "--batch-size", "1000", "--no-tensorboard"]


def _script(path: str):
    spec = importlib.util.spec_from_file_location(f"script_{Path(path).stem}_{abs(hash(path))}", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


SCRIPTS = {name: f"{kind}/{name}.py" for kind, names in
           {"train": ("pair_classifiers", "classifier", "dverge", "dna_mnist", "dna_cifar", "ensemble"),
            "eval": ("transfer", "dna_robustness", "gradient_alignment", "compare", "summarize")}.items()
           for name in names}
SCRIPTS["convert"] = "decorr/convert.py"  # python -m decorr.convert


def tree_digest(root: Path) -> dict[str, str]:
    """Every file below ``root`` with the SHA-256 of its bytes."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# Small real runs, trained once


@pytest.fixture(scope="session")
def made(tmp_path_factory, mnist):
    """Runs the cases copy: a dec pair, a cor pair, a CIFAR classifier, a CIFAR AE, a DVERGE run."""
    root = tmp_path_factory.mktemp("hostile_runs")
    pair = _script(SCRIPTS["pair_classifiers"])
    pair(["--mode", "cor", "--run-dir", str(root / "cor"), *TINY_PAIR])
    pair(["--mode", "dec", "--run-dir", str(root / "dec"), *TINY_PAIR])
    cifar = str(REPO.parent / "shared" / "data" / "cifar10-subset" / "cifar10_subset.npz")
    _script(SCRIPTS["classifier"])(["--arch", "resnet20", "--dataset", cifar, "--epochs", "1", "--train-subset", "64",
                                    "--test-subset", "32", "--batch-size", "32", "--run-dir", str(root / "r20"),
                                    "--no-tensorboard"])
    _script(SCRIPTS["dna_cifar"])(["--model", "ae", "--dataset", cifar, "--epochs", "1", "--classifier-epochs", "1",
                                   "--train-subset", "64", "--test-subset", "32", "--batch-size", "32",
                                   "--classifier-batch-size", "32", "--run-dir", str(root / "ae_cifar"),
                                   "--no-tensorboard"])
    _script(SCRIPTS["dverge"])(["--init-from", str(root / "cor"), "--run-dir", str(root / "dverge"), "--epochs", "1",
                                "--train-subset", "200", "--batch-size", "100", "--batches-per-epoch", "1",
                                "--steps", "1", "--eval-subset", "50", "--eval-steps", "1", "--eval-eps", "0.1",
                                "--no-tensorboard"])
    np.savez(root / "empty_test.npz", x_train=np.zeros((10, 28, 28), np.uint8), y_train=np.zeros(10, np.int64),
             x_test=np.zeros((0, 28, 28), np.uint8), y_test=np.zeros(0, np.int64))
    np.save(root / "single.npy", np.zeros((4, 28, 28), np.uint8))
    os.replace(root / "single.npy", root / "single_array.npz")
    # Two evaluations of the same images (for eval/compare.py and eval/summarize.py), and saved examples.
    transfer = _script(SCRIPTS["transfer"])
    quick = ["--num-samples", "20", "--steps", "1", "--eps", "0.1", "--no-plots", "--no-features"]
    transfer([str(root / "cor"), *quick, "--out", str(root / "resA"), "--save-adversarial", str(root / "adv")])
    transfer([str(root / "cor"), *quick, "--seed", "1", "--out", str(root / "resB")])
    (root / "empty.pth").write_bytes(b"")
    torch.save({"layer": torch.nn.Linear(2, 2)}, root / "module.pth")  # a pickled module, not a state dict
    (root / "text.npz").write_text("x_train,y_train\n1,2\n")
    for name in ("0", "1", "cat"):  # class folders named by number and by word
        (root / "mixed" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(root / "mixed" / name / "a.png")
    return root


def _copy(made: Path, tmp: Path, name: str) -> Path:
    target = tmp / name
    shutil.copytree(made / name, target)
    return target


def _rewrite_config(run: Path, edit: Callable[[dict], object]) -> None:
    path = run / "checkpoint" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(edit(config)))


def _flip_tensor_bytes(file: Path) -> None:
    data = bytearray(file.read_bytes())
    header = int.from_bytes(data[:8], "little")
    start = 8 + header + 16  # inside the first tensor's data
    for i in range(start, start + 8):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def _nan_weights(run: Path) -> None:
    """A checkpoint whose weights hold NaN, with a checksum that matches (so only the NaN is wrong)."""
    from safetensors.torch import load_file, save_file

    file = run / "checkpoint" / "model0.safetensors"
    tensors = load_file(str(file))
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(file))
    _rewrite_config(run, lambda c: {**c, "checksums": {**c["checksums"], "model0.safetensors": file_sha256(file)}})


# ------------------------------------------------------------------------------------------------
# The table


@dataclass
class Case:
    id: str
    script: str
    #: (made runs, tmp folder) -> argv; may damage copies in tmp first.
    argv: Callable[[Path, Path], list[str]]
    expect: str
    #: Paths below tmp where nothing may appear.
    absent: tuple[str, ...] = ()


def _pair(*extra: str) -> Callable[[Path, Path], list[str]]:
    return lambda m, t: ["--run-dir", str(t / "new"), *TINY_PAIR, *extra]


def _resume(name: str, *changed: str) -> Callable[[Path, Path], list[str]]:
    def argv(m: Path, t: Path) -> list[str]:
        run = _copy(m, t, name)
        return ["--mode", name, "--run-dir", str(run), "--resume", *TINY_PAIR, "--epochs", "2", *changed]
    return argv


def _eval_damaged(damage: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    def argv(m: Path, t: Path) -> list[str]:
        run = _copy(m, t, "cor")
        damage(run)
        return [str(run), "--num-samples", "20", "--steps", "1", "--out", str(t / "out"), "--no-plots"]
    return argv


def _adversarial_damaged(damage: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    def argv(m: Path, t: Path) -> list[str]:
        adv = _copy(m, t, "adv")
        damage(adv)
        return [str(m / "cor"), "--adversarial", str(adv), "--out", str(t / "out")]
    return argv


def _each_png(change: Callable[[Image.Image], Image.Image]) -> Callable[[Path], None]:
    def damage(adv: Path) -> None:
        for file in adv.rglob("*.png"):
            with Image.open(file) as image:
                changed = change(image)
            changed.save(file)
    return damage


def _edit_index(edit: Callable[[list[list[str]]], list[list[str]]]) -> Callable[[Path], None]:
    def damage(adv: Path) -> None:
        with open(adv / "index.csv", newline="") as handle:
            rows = list(csv.reader(handle))
        with open(adv / "index.csv", "w", newline="") as handle:
            csv.writer(handle).writerows(edit(rows))
    return damage


def _set_cell(row: int, column: str, value: str) -> Callable[[list[list[str]]], list[list[str]]]:
    def edit(rows: list[list[str]]) -> list[list[str]]:
        rows[row][rows[0].index(column)] = value
        return rows
    return edit


def _model_kwargs(kwargs: dict) -> Callable[[Path], None]:
    return lambda run: _rewrite_config(run, lambda c: {**c, "models": {k: {**v, "kwargs": kwargs}
                                                                        for k, v in c["models"].items()}})


def _file(t: Path, name: str = "file") -> Path:
    (t / name).write_text("not a folder")
    return t / name


def _earlier_results(t: Path) -> Path:
    (t / "out").mkdir()
    (t / "out" / "results.json").write_text("{}")
    return t / "out"


CASES = [
    # 2. --resume with changed settings
    Case("resume-lr", "pair_classifiers", _resume("cor", "--lr", "0.1"), "lr: 0.005 -> 0.1"),
    Case("resume-mode", "pair_classifiers", lambda m, t: ["--mode", "dec", "--run-dir", str(_copy(m, t, "cor")),
         "--resume", *TINY_PAIR, "--epochs", "2"], "mode: 'cor' -> 'dec'"),
    Case("resume-lambda", "pair_classifiers", _resume("dec", "--lambda-corr", "0.1"), "lambda_corr"),
    Case("resume-seed", "pair_classifiers", _resume("cor", "--seed", "3"), "seed: 0 -> 3"),
    Case("resume-batch", "pair_classifiers", _resume("cor", "--batch-size", "500"), "batch_size"),
    Case("resume-dverge-init", "dverge", lambda m, t: ["--init-from", str(m / "dec"), "--run-dir",
         str(_copy(m, t, "dverge")), "--resume", "--epochs", "2", "--train-subset", "200", "--batch-size", "100",
         "--batches-per-epoch", "1", "--steps", "1", "--eval-subset", "50", "--eval-steps", "1", "--eval-eps", "0.1",
         "--no-tensorboard"], "init"),
    Case("resume-nothing", "pair_classifiers", _pair("--resume"), "has no checkpoint", absent=("new/checkpoint",)),
    # 3. bad numbers, refused before any work
    Case("lambda-negative", "pair_classifiers", _pair("--mode", "dec", "--lambda-corr", "-1"), "--lambda-corr",
         absent=("new",)),
    Case("lambda-nan", "pair_classifiers", _pair("--mode", "dec", "--lambda-corr", "nan"), "--lambda-corr",
         absent=("new",)),
    Case("lambda-zero-dec", "pair_classifiers", _pair("--mode", "dec", "--lambda-corr", "0"), "--mode cor",
         absent=("new",)),
    Case("lr-negative", "pair_classifiers", _pair("--lr", "-0.01"), "--lr", absent=("new",)),
    Case("lr-inf", "classifier", lambda m, t: ["--lr", "inf", "--run-dir", str(t / "new")], "--lr", absent=("new",)),
    Case("seed-negative-train", "pair_classifiers", _pair("--seed", "-1"), "--seed", absent=("new",)),
    Case("train-subset-zero", "pair_classifiers", _pair("--train-subset", "0"), "--train-subset", absent=("new",)),
    Case("epochs-zero-dna", "dna_mnist", lambda m, t: ["--epochs", "0", "--run-dir", str(t / "new")], "--epochs",
         absent=("new",)),
    Case("dverge-eval-steps-zero", "dverge", lambda m, t: ["--init-from", str(m / "cor"), "--eval-steps", "0",
         "--run-dir", str(t / "new")], "--eval-steps", absent=("new",)),
    Case("dverge-threads", "dverge", lambda m, t: ["--init-from", str(m / "cor"), "--threads", "-1",
         "--run-dir", str(t / "new")], "--threads", absent=("new",)),
    # --threads is a shared run option: every training script takes and checks it
    Case("pair-threads", "pair_classifiers", _pair("--threads", "0"), "--threads", absent=("new",)),
    Case("dna-threads", "dna_mnist", lambda m, t: ["--threads", "0", "--run-dir", str(t / "new")], "--threads",
         absent=("new",)),
    # 4. too small a batch for the correlation loss
    Case("batch-too-small-dec", "pair_classifiers", _pair("--mode", "dec", "--batch-size", "500"), "786",
         absent=("new",)),
    # 5. non-finite numbers
    Case("diverged-run", "pair_classifiers", lambda m, t: ["--mode", "cor", "--lr", "1e12", "--run-dir",
         str(t / "new"), *TINY_PAIR, "--batch-size", "100"], "diverged", absent=("new/checkpoint",)),
    Case("nan-weights-eval", "transfer", _eval_damaged(_nan_weights), "NaN", absent=("out",)),
    # 6. tracebacks that were
    Case("run-dir-under-a-file", "pair_classifiers", lambda m, t: (t / "file").write_text("x") and
         ["--run-dir", str(t / "file" / "run"), *TINY_PAIR], "run directory"),
    Case("damaged-optimizer", "pair_classifiers", lambda m, t: (_flip_tensor_bytes(_copy(m, t, "cor") / "checkpoint" /
         "optimizer.safetensors"), ["--mode", "cor", "--run-dir", str(t / "cor"), "--resume", *TINY_PAIR,
         "--epochs", "2"])[1], "damaged"),
    Case("config-is-a-list", "transfer", _eval_damaged(lambda r: _rewrite_config(r, lambda c: [c])), "JSON list",
         absent=("out",)),
    Case("models-is-a-list", "transfer", _eval_damaged(lambda r: _rewrite_config(r, lambda c: {**c, "models":
         list(c["models"].values())})), "'models'", absent=("out",)),
    Case("model-lacks-arch", "transfer", _eval_damaged(lambda r: _rewrite_config(r, lambda c: {**c, "models":
         {k: {kk: vv for kk, vv in v.items() if kk != "arch"} for k, v in c["models"].items()}})), "'arch'",
         absent=("out",)),
    Case("config-is-binary", "transfer", _eval_damaged(lambda r: (r / "checkpoint" / "config.json").write_bytes(
         bytes(range(256)))), "not valid JSON", absent=("out",)),
    Case("npz-from-np-save", "classifier", lambda m, t: ["--dataset", str(m / "single_array.npz"), "--run-dir",
         str(t / "new")], "single array", absent=("new",)),
    Case("npz-empty-test", "classifier", lambda m, t: ["--arch", "mnist_cnn", "--dataset", str(m / "empty_test.npz"),
         "--run-dir", str(t / "new")], "x_test holds no images", absent=("new",)),
    Case("rgb-model-on-grayscale", "transfer", lambda m, t: [str(m / "r20"), "--dataset", "mnist", "--num-samples",
         "10", "--steps", "1", "--out", str(t / "out")], "takes inputs (3, 32, 32)", absent=("out",)),
    Case("cifar-dna-on-mnist", "dna_robustness", lambda m, t: [str(m / "ae_cifar"), "--dataset", "mnist",
         "--test-subset", "10", "--out", str(t / "out")], "takes (3, 32, 32)", absent=("out",)),
    Case("seed-negative-eval", "transfer", lambda m, t: [str(m / "cor"), "--seed", "-1", "--out", str(t / "out")],
         "--seed", absent=("out",)),
    Case("threads-negative", "transfer", lambda m, t: [str(m / "cor"), "--threads", "-1", "--out", str(t / "out")],
         "--threads", absent=("out",)),
    Case("alignment-out-is-a-folder", "gradient_alignment", lambda m, t: (t / "existing").mkdir() or
         [str(m / "r20"), "--gamma", "1", "--num-samples", "4", "--out", str(t / "existing"), "--overwrite"],
         "is a folder"),
    Case("eval-out-holds-other-files", "transfer", lambda m, t: ((t / "mine").mkdir(), (t / "mine" / "notes.txt")
         .write_text("mine"), [str(m / "cor"), "--out", str(t / "mine"), "--overwrite"])[2], "holds other files"),
    # 7. silent corruption
    Case("flipped-weight-bytes", "transfer", _eval_damaged(lambda r: _flip_tensor_bytes(r / "checkpoint" /
         "model0.safetensors")), "damaged", absent=("out",)),
    # 8. smaller ones
    Case("eval-missing-checkpoint", "transfer", lambda m, t: [str(t / "nothing"), "--out", str(t / "out")],
         "does not exist", absent=("out",)),
    # Issue 21 ------------------------------------------------------------------------------------
    # 1. outputs that would replace what the same command writes or reads
    Case("save-adversarial-inside-out", "transfer", lambda m, t: [str(m / "cor"), "--num-samples", "20", "--steps",
         "1", "--save-adversarial", str(t / "out" / "adv"), "--out", str(t / "out")], "lies inside --out",
         absent=("out",)),
    Case("save-adversarial-inside-out-overwrite", "transfer", lambda m, t: [str(m / "cor"), "--num-samples", "20",
         "--steps", "1", "--save-adversarial", str(_earlier_results(t) / "adv"), "--out", str(t / "out"),
         "--overwrite"], "lies inside --out", absent=("out/adv",)),
    Case("out-holds-an-input", "transfer", lambda m, t: [str(_copy(m, _earlier_results(t), "cor")), "--num-samples",
         "20", "--out", str(t / "out"), "--overwrite"], "holds the input"),
    # 2. writing onto an input, or over an existing file without --overwrite
    Case("compare-out-is-input", "compare", lambda m, t: [str(m / "resA" / "results.json"), str(m / "resB"),
         "--out", str(m / "resA" / "results.json"), "--overwrite"], "is the input"),
    Case("compare-csv-is-input-folder", "compare", lambda m, t: [str(m / "resA"), str(m / "resB"), "--csv",
         str(m / "resA" / "results.json"), "--overwrite"], "is the input"),
    Case("compare-out-exists", "compare", lambda m, t: [str(m / "resA"), str(m / "resB"), "--out",
         str(_file(t, "mine.json"))], "pass --overwrite"),
    Case("compare-out-and-csv-one-file", "compare", lambda m, t: [str(m / "resA"), str(m / "resB"), "--out",
         str(t / "c"), "--csv", str(t / "c")], "are both", absent=("c",)),
    Case("summarize-out-is-input", "summarize", lambda m, t: [f"a={m / 'resA'}", f"b={m / 'resB'}", "--out",
         str(m / "resA" / "results.json"), "--overwrite"], "is the input"),
    Case("summarize-out-exists", "summarize", lambda m, t: [f"a={m / 'resA'}", "--out", str(_file(t, "t.md"))],
         "pass --overwrite"),
    # 4. saved examples that do not fit the models, or a folder left half-written
    Case("adversarial-other-size", "transfer", _adversarial_damaged(_each_png(lambda im: im.resize((32, 32)))),
         "has (1, 32, 32)", absent=("out",)),
    Case("adversarial-rgb-for-gray-model", "transfer", _adversarial_damaged(_each_png(lambda im: im.convert("RGB"))),
         "has (3, 28, 28)", absent=("out",)),
    Case("adversarial-label-out-of-range", "transfer", _adversarial_damaged(_edit_index(_set_cell(3, "label", "57"))),
         "label 57 is out of range", absent=("out",)),
    Case("adversarial-incomplete", "transfer", _adversarial_damaged(lambda a: (a / "decorr-adversarial.json")
         .write_text('{"format": "decorr-adversarial/1", "complete": false}')), "is incomplete", absent=("out",)),
    Case("adversarial-rows-lost", "transfer", _adversarial_damaged(_edit_index(lambda rows: rows[:11])),
         "lists 10 images but", absent=("out",)),
    # 5. class folders mixing numbers and names
    Case("folder-mixed-class-names", "transfer", lambda m, t: [str(m / "cor"), "--dataset", str(m / "mixed"),
         "--out", str(t / "out")], "mixes class folders", absent=("out",)),
    # 6. counts larger than the split, unknown datasets, ill-typed checkpoint records
    Case("num-samples-more-than-split", "transfer", lambda m, t: [str(m / "cor"), "--num-samples", "99999999",
         "--out", str(t / "out")], "more than the 10000 test images", absent=("out",)),
    Case("dna-test-subset-more-than-split", "dna_robustness", lambda m, t: [str(m / "ae_cifar"), "--test-subset",
         "99999", "--out", str(t / "out")], "more than the 1017 test images", absent=("out",)),
    Case("alignment-num-samples-more-than-split", "gradient_alignment", lambda m, t: [str(m / "r20"),
         "--num-samples", "99999", "--out", str(t / "a.json")], "more than the 1017", absent=("a.json",)),
    Case("convert-unknown-dataset", "convert", lambda m, t: [str(m / "cor"), "--dataset", "nosuch", "--out",
         str(t / "conv")], "unknown dataset 'nosuch'", absent=("conv",)),
    Case("config-epoch-not-a-number", "transfer", _eval_damaged(lambda r: _rewrite_config(r, lambda c: {
         **c, "epoch": "xxxx"})), "'epoch' is 'xxxx'", absent=("out",)),
    Case("config-dataset-not-a-name", "transfer", _eval_damaged(lambda r: _rewrite_config(r, lambda c: {
         **c, "dataset": 5})), "'dataset' is 5", absent=("out",)),
    # 7. tracebacks that were
    Case("empty-pth", "transfer", lambda m, t: [f"mnist_cnn={m / 'empty.pth'}", "--dataset", "mnist", "--out",
         str(t / "out")], "is empty (0 bytes)", absent=("out",)),
    Case("diverged-before-first-checkpoint-no-debris", "pair_classifiers", lambda m, t: [
         "--run-dir", str(t / "new" / "run"), *TINY_PAIR[:-1], "--lr", "1e30"], "diverged", absent=("new",)),
    Case("config-in-channels-huge", "transfer", _eval_damaged(_model_kwargs({"in_channels": 1e9})),
         "in_channels 1000000000.0", absent=("out",)),
    Case("config-num-classes-negative", "transfer", _eval_damaged(_model_kwargs({"num_classes": -5})),
         "num_classes -5", absent=("out",)),
    Case("compare-out-under-a-file", "compare", lambda m, t: [str(m / "resA"), str(m / "resB"), "--out",
         str(_file(t) / "c.json")], "which is a file"),
    Case("summarize-plot-under-a-file", "summarize", lambda m, t: ["--across-seeds", f"a={m / 'resA'}", "--plot",
         str(_file(t) / "p.png")], "which is a file"),
    Case("convert-out-under-a-file", "convert", lambda m, t: [str(m / "cor"), "--out", str(_file(t) / "conv")],
         "which is a file"),
    # 8. messages that named the wrong thing
    Case("weights-path-is-a-folder", "transfer", lambda m, t: [f"mnist_cnn={m / 'cor'}", "--dataset", "mnist",
         "--out", str(t / "out")], "is a folder, not a file", absent=("out",)),
    Case("init-pair-num-models-3", "ensemble", lambda m, t: ["--init", str(m / "cor"), "--num-models", "3",
         "--run-dir", str(t / "new")], "--init gives 2 models", absent=("new",)),
    Case("adversarial-nan-eps", "transfer", _adversarial_damaged(_edit_index(_set_cell(2, "eps", "nan"))),
         "eps 'nan' is not a radius", absent=("out",)),
    Case("npz-plain-text", "transfer", lambda m, t: [str(m / "cor"), "--dataset", str(m / "text.npz"), "--out",
         str(t / "out")], "is not a .npz archive", absent=("out",)),
    Case("pickled-module-refused", "transfer", lambda m, t: [f"mnist_cnn={m / 'module.pth'}", "--dataset", "mnist",
         "--out", str(t / "out")], "needs torch.nn.modules.linear.Linear", absent=("out",)),
    # 9. batch-size refusals of the DNA, before anything is written (TensorBoard on)
    Case("dna-batch-too-small-for-latent", "dna_mnist", lambda m, t: ["--batch-size", "10", "--train-subset", "200",
         "--run-dir", str(t / "new")], "66 samples", absent=("new",)),
    Case("dna-classifier-batch-too-large", "dna_mnist", lambda m, t: ["--train-subset", "200", "--batch-size", "100",
         "--classifier-batch-size", "900", "--run-dir", str(t / "new")], "--classifier-batch-size 900",
         absent=("new",)),
]
if os.geteuid() != 0:  # root writes through any permission bits; then the row above stands for it
    CASES.append(Case("read-only-run-dir", "pair_classifiers", lambda m, t: ((t / "ro").mkdir(), os.chmod(t / "ro", 0o555),
                      ["--run-dir", str(t / "ro" / "run"), *TINY_PAIR])[2], "choose a writable --run-dir"))
if not torch.cuda.is_available():
    CASES += [
        Case("fp16-on-cpu", "pair_classifiers", _pair("--mixed-precision", "fp16"), "fp16", absent=("new",)),
        Case("device-cuda-without-gpu", "transfer", lambda m, t: [str(m / "cor"), "--device", "cuda", "--out",
             str(t / "out")], "no CUDA GPU", absent=("out",)),
    ]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_one_line_error_and_damages_nothing(case, made, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output folders (runs/...) land in the temporary folder
    argv = case.argv(made, tmp_path)
    before_made, before_tmp = tree_digest(made), tree_digest(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        _script(SCRIPTS[case.script])(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err and "\x1b" not in err  # no terminal escape codes either
    assert case.expect in errors[0], errors[0]
    assert tree_digest(made) == before_made
    assert tree_digest(tmp_path) == before_tmp, "a file was written, changed or left behind"
    for path in case.absent:
        assert not (tmp_path / path).exists()


# ------------------------------------------------------------------------------------------------
# Rows that must succeed: documented behaviour where there used to be a failure


def test_last_partial_batch_too_small_for_the_loss_is_dropped(tmp_path, mnist):
    """Batch 900 on 2000 images: the last batch (200) cannot feed the correlation loss, so it is dropped."""
    _script(SCRIPTS["pair_classifiers"])(
        ["--mode", "dec", "--run-dir", str(tmp_path / "run"), *TINY_PAIR, "--train-subset", "2000",
         "--batch-size", "900"])
    assert len(load_models(tmp_path / "run")) == 2


def test_batch_norm_model_with_a_last_batch_of_one(tmp_path, mnist):
    _script(SCRIPTS["pair_classifiers"])(
        ["--mode", "cor", "--arch", "mnist_fc", "--run-dir", str(tmp_path / "run"), *TINY_PAIR,
         "--train-subset", "1001", "--batch-size", "500"])
    assert len(load_models(tmp_path / "run")) == 2


def test_figure_samples_zero_writes_results_without_figures(made, tmp_path):
    out = tmp_path / "out"
    _script(SCRIPTS["dna_robustness"])([str(made / "ae_cifar"), "--test-subset", "8", "--attack", "fgsm",
                                        "--objective", "paper", "--figure-samples", "0", "--out", str(out)])
    assert (out / "results.json").exists() and not list(out.glob("reconstructions_*.png"))


def test_overwrite_replaces_the_whole_output_folder(made, tmp_path):
    out = tmp_path / "out"
    common = [str(made / "cor"), "--num-samples", "20", "--steps", "1", "--no-features", "--out", str(out)]
    transfer = _script(SCRIPTS["transfer"])
    transfer(common)
    assert list(out.glob("*.png"))
    transfer(common + ["--overwrite", "--no-plots"])
    assert (out / "results.json").exists() and not list(out.glob("*.png"))
    assert not [p for p in tmp_path.iterdir() if p.name != "out"], "staging folders left behind"


def test_numbered_class_folders_are_the_class_indices(tmp_path):
    """Folders 0, 1, 3 (2 missing): labels are 0, 1, 3, not the positions 0, 1, 2 (which shifted every label)."""
    from decorr.data import load_dataset

    for name in ("0", "1", "3"):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "data" / name / "a.png")
    dataset = load_dataset(str(tmp_path / "data"))
    assert dataset.test.labels.tolist() == [0, 1, 3] and dataset.num_classes == 4


def test_epoch_line_says_why_r2_is_missing_and_the_json_is_strict(tmp_path, capsys, mnist):
    _script(SCRIPTS["pair_classifiers"])(["--mode", "cor", "--run-dir", str(tmp_path / "run"), *TINY_PAIR])
    out = capsys.readouterr().out
    assert "feature R^2 n/a (needs more than 784+1 test images)" in out and "nan" not in out.lower()
    printed = json.loads(out[out.index("{"):], parse_constant=lambda c: pytest.fail(f"{c} in the printed JSON"))
    assert printed["test/r2_model0_model1"] is None


def test_default_eps_follow_the_images(made, tmp_path):
    """Without --eps a colour dataset gets 2/255 4/255 8/255, not MNIST's 0.05-0.15; the choice is recorded."""
    result = _script(SCRIPTS["transfer"])([str(made / "r20"), "--num-samples", "4", "--steps", "1", "--no-plots",
                                           "--no-features", "--out", str(tmp_path / "out")])
    assert result["settings"]["eps"] == [2 / 255, 4 / 255, 8 / 255]
    assert "CIFAR-like" in result["settings"]["eps_default"]
    given = _script(SCRIPTS["transfer"])([str(made / "r20"), "--num-samples", "4", "--steps", "1", "--eps", "1.6/255",
                                          "--no-plots", "--no-features", "--out", str(tmp_path / "given")])
    assert given["settings"]["eps"] == [1.6 / 255] and given["settings"]["eps_default"] is None


def test_pixel_values_take_decimal_fractions():
    import argparse

    from decorr.errors import pixel_value

    assert pixel_value("1.6/255") == 1.6 / 255 and pixel_value("8/255") == 8 / 255 and pixel_value("0.05") == 0.05
    for bad in ("1/0", "1/0.0", "nan", "inf/2", "a/255", "1/2/3"):
        with pytest.raises(argparse.ArgumentTypeError):
            pixel_value(bad)


def test_a_failed_or_killed_save_adversarial_leaves_no_folder_that_passes_for_complete(made, tmp_path):
    from decorr.evaluation.adversarial_files import AdversarialWriter, read_index

    def batch(writer: AdversarialWriter) -> None:
        writer("m", "pgd", 0.1, torch.arange(4), torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long),
               torch.zeros(4, dtype=torch.long))

    AdversarialWriter(tmp_path / "never")  # checked, but nothing is created before the first batch
    assert not (tmp_path / "never").exists()
    failed = AdversarialWriter(tmp_path / "failed")
    batch(failed)
    failed.discard()  # what eval/transfer.py does when the attack fails
    assert not (tmp_path / "failed").exists()
    killed = AdversarialWriter(tmp_path / "killed")
    batch(killed)  # ... and the process dies before close()
    with pytest.raises(DecorrError, match="is incomplete"):
        read_index(tmp_path / "killed")
    done = AdversarialWriter(tmp_path / "done")
    batch(done)
    done.close({})
    assert sum(len(g["files"]) for g in read_index(tmp_path / "done").values()) == 4


def test_a_folder_without_decorrs_marker_is_evaluated_with_a_note(made, tmp_path):
    adv = _copy(made, tmp_path, "adv")
    (adv / "decorr-adversarial.json").unlink()  # as another tool writes it
    result = _script(SCRIPTS["transfer"])([str(made / "cor"), "--adversarial", str(adv), "--no-plots", "--out",
                                           str(tmp_path / "out")])
    assert any("completeness" in note or "complete is unknown" in note for note in result["notes"]), result["notes"]


def test_demo_says_it_reuses_a_finished_run(made, tmp_path, capsys):
    import argparse

    from decorr import demo

    shutil.copytree(made / "cor", tmp_path / "cor")
    args = argparse.Namespace(epochs=1, dataset="mnist", seed=0, data_root=None)
    metrics = demo._train("cor", args, tmp_path)
    out = capsys.readouterr().out
    assert f"reusing the finished cor pair in {tmp_path / 'cor'}" in out and "resumed" not in out
    assert "test/acc_model0" in metrics


def test_demo_end_to_end_on_finished_runs(made, tmp_path, capsys):
    """make demo's evaluation and table on two finished pairs (training skipped: it is the tested loop)."""
    import json

    from decorr import demo

    out = tmp_path / "demo"
    for mode in ("cor", "dec"):
        shutil.copytree(made / mode, out / mode)
    demo.main(["--out", str(out), "--dataset", "mnist", "--epochs", "1", "--attack-samples", "40", "--eps", "0.1"])
    summary = json.loads((out / "results.json").read_text())
    for mode in ("cor", "dec"):
        rate = summary["pairs"][mode]["transfer_rate"]["0.1"]
        assert rate is None or 0.0 <= rate <= 1.0
        assert 0.0 <= summary["pairs"][mode]["acc_model0"] <= 1.0
    printed = capsys.readouterr().out
    assert "transfer eps=0.1" in printed and (out / "table.txt").read_text().strip() in printed


# ------------------------------------------------------------------------------------------------
# The library's own refusals (no script in between)


@pytest.mark.parametrize("z1, z2, kwargs, expect", [
    (torch.full((50, 3), float("nan")), torch.randn(50, 2), {}, "NaN"),
    (torch.randn(50, 3), torch.tensor([[float("inf")]] * 50), {}, "NaN"),
    (torch.randn(50, 0), torch.randn(50, 2), {}, "no features"),
    (torch.randn(50, 3), torch.randn(50, 2), {"eps": 0.0}, "eps"),
    (torch.randn(50, 3), torch.randn(50, 2), {"eps": -1e-3}, "eps"),
    (torch.randn(50, 3), torch.randn(50, 2), {"eta": 1.5}, "eta"),
    (torch.randn(50, 3), torch.randn(40, 2), {}, "same batch size"),
], ids=["nan-z1", "inf-z2", "zero-features", "eps-zero", "eps-negative", "eta-too-big", "batch-mismatch"])
def test_correlation_loss_refuses(z1, z2, kwargs, expect):
    with pytest.raises(DecorrError, match=expect):
        correlation_loss(z1, z2, **kwargs)
    if "eps" not in kwargs:
        with pytest.raises(DecorrError, match=expect):
            r_squared(z1, z2, **{k: v for k, v in kwargs.items() if k != "eps"})


def test_evaluation_refuses_nan_images(made):
    from transfer_helpers import evaluate_specs

    x = torch.rand(8, 1, 28, 28)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(DecorrError, match="NaN"):
        evaluate_specs([str(made / "cor")], (x, torch.zeros(8, dtype=torch.long)), steps=1, eps_list=[0.1])


# ------------------------------------------------------------------------------------------------
# Real processes


def _spawn(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / SCRIPTS["pair_classifiers"]), *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_runs_into_one_directory_exactly_one_proceeds(tmp_path, mnist):
    run = tmp_path / "run"
    argv = ["--mode", "cor", "--run-dir", str(run), *TINY_PAIR[:-1], "--epochs", "3"]
    first, second = _spawn(*argv), _spawn(*argv)  # they race for the lock
    outputs = [p.communicate(timeout=600) for p in (first, second)]
    codes = [first.returncode, second.returncode]
    assert sorted(codes) == [0, 2], (codes, outputs)
    loser = outputs[codes.index(2)][1]
    # A slow starter may find the winner's checkpoint (or lock) first: either refusal is one error line.
    refusals = ("in use by another run", "already holds a checkpoint")
    lines = [line for line in loser.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and any(r in lines[0] for r in refusals), loser
    assert len(load_models(run)) == 2
    # TensorBoard names event files events.out.tfevents.<time>.<host>.<pid>.<n>: one writer process only.
    writers = {p.name.split(".")[-2] for p in (run / "tensorboard").rglob("events.*")}
    assert writers == {str([first, second][codes.index(0)].pid)}, writers
    assert not (run / "run.lock").exists()


def test_a_dead_owners_lock_is_taken_over(tmp_path, mnist):
    from decorr.training.runlock import RunLock

    run = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run.mkdir()
    import socket

    (run / "run.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                              "started": "1", "time": "then"}))
    lock = RunLock(run)
    lock.acquire()
    assert json.loads((run / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / "run.lock").exists()
    # A live owner (this process) keeps it.
    held = RunLock(run)
    held.acquire()
    with pytest.raises(DecorrError, match="in use by another run"):
        RunLock(run).acquire()
    held.release()


def _race_for_the_lock(run_dir: str, start, holding, most, outcome) -> None:
    """One of two processes racing for one directory's lock: record whether it got it."""
    from decorr.training.runlock import RunLock

    lock = RunLock(run_dir)
    start.wait()
    try:
        lock.acquire()
    except DecorrError:
        outcome.put("refused")
        return
    with holding.get_lock():
        holding.value += 1
        most.value = max(most.value, holding.value)
    outcome.put("held")
    import time

    time.sleep(0.1)  # long enough that the other process tries while this one holds the lock
    with holding.get_lock():
        holding.value -= 1
    lock.release()


def test_runs_racing_for_one_directory_exactly_one_holds_it(tmp_path):
    """100 back-to-back pairs of processes race for RunLock.acquire on one fresh directory each time."""
    import multiprocessing

    context = multiprocessing.get_context("fork")  # fast: no interpreter start per process
    for attempt in range(100):
        run_dir = str(tmp_path / f"run{attempt}")
        start, outcome = context.Barrier(2), context.Queue()
        holding, most = context.Value("i", 0), context.Value("i", 0)
        racers = [context.Process(target=_race_for_the_lock, args=(run_dir, start, holding, most, outcome))
                  for _ in range(2)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(timeout=60)
        results = sorted(outcome.get(timeout=10) for _ in racers)
        assert results == ["held", "refused"] and most.value == 1, (attempt, results, most.value)
        assert not (Path(run_dir) / "run.lock").exists()


def test_an_empty_lock_is_held_unless_old(tmp_path):
    """An empty lock file (another writer between creating and filling it) is not taken as stale."""
    from decorr.training.runlock import STALE_UNREADABLE_S, RunLock

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.lock").write_text("")
    with pytest.raises(DecorrError, match="in use by another run"):
        RunLock(tmp_path / "run").acquire()
    old = time_now = __import__("time").time() - STALE_UNREADABLE_S - 5
    os.utime(tmp_path / "run" / "run.lock", (old, time_now))
    lock = RunLock(tmp_path / "run")
    lock.acquire()  # old junk: taken over
    assert json.loads((tmp_path / "run" / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_output_piped_into_head_ends_quietly(made):
    """``eval/compare.py A B | head``: the reader goes away; no BrokenPipeError traceback, exit 141."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the script prints
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / SCRIPTS["compare"]), str(made / "resA"), str(made / "resB")],
                          stdout=write, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    os.close(write)
    assert done.returncode == 141 and done.stderr == "", (done.returncode, done.stderr[-2000:])


def test_accelerate_launch_dna_cifar_offline_is_one_readable_error(tmp_path):
    """The README's line, where no CIFAR-10 is to be found: the one-line data error, and its exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DECORR_DATA_ROOT": str(tmp_path / "nodata"),
           "HF_HUB_OFFLINE": "1"}
    launcher = Path(sys.executable).with_name("accelerate")
    done = subprocess.run([str(launcher), "launch", "--quiet", "--num_processes", "1", "--cpu",
                           str(REPO / SCRIPTS["dna_cifar"])], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cifar10" in errors[0] and "--dataset" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("checkpoint"))
