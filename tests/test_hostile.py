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
           {"train": ("pair_classifiers", "classifier", "dverge", "dna_mnist", "dna_cifar"),
            "eval": ("transfer", "dna_robustness", "gradient_alignment")}.items() for name in names}


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
    assert "Traceback" not in err
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
    from decorr.evaluation.transfer import evaluate_checkpoints

    x = torch.rand(8, 1, 28, 28)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(DecorrError, match="NaN"):
        evaluate_checkpoints([str(made / "cor")], (x, torch.zeros(8, dtype=torch.long)), steps=1, eps_list=[0.1])


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
    assert [line for line in loser.splitlines() if line.strip()] == [
        line for line in loser.splitlines() if line.startswith("error: ") and "in use by another run" in line]
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
