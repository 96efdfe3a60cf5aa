"""Pair training end to end on real MNIST subsets: objective, resume after SIGKILL, bad input."""

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
import torch.nn.functional as F
from safetensors.torch import load_file

from decorr.training.entry import RunOptions
from decorr.checkpoint import load_checkpoint, load_models
from decorr.errors import DecorrError
from decorr.loss import correlation_loss, parameter_distance
from decorr.models import create_model
from decorr.features import dead_features_warning
from decorr.training.recipes import PairConfig, pair_ensemble_config, train_pair
from decorr.training.methods.distance import distance_objective
from decorr.training.methods.independent import decorrelated_objective
from decorr.training.epoch_metrics import evaluate_models

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train" / "pair_classifiers.py"
SMALL = ["--train-subset", "3000", "--test-subset", "1000", "--batch-size", "1000", "--no-tensorboard"]


def run_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _pair_loss(logits, feats, y, config, models, lambda_corr=None):
    """The loss the pair recipe trains with: its mode's registered method's objective (2 members)."""
    ce = [F.cross_entropy(out, y) for out in logits]
    if config.mode == "param":
        return distance_objective(ce, models, config.target_distance, config.distance_weight)
    weight = (config.lambda_corr if config.mode == "dec" else 0.0) if lambda_corr is None else lambda_corr
    direction = "one-way" if config.corr_direction == "forward" else "both"
    return decorrelated_objective(ce, feats, weight, direction=direction)


def test_objective_matches_formula():
    torch.manual_seed(0)
    models = (create_model("mnist_cnn"), create_model("mnist_cnn"))
    x = torch.rand(800, 1, 28, 28)
    y = torch.randint(0, 10, (800,))
    logits = tuple(m(x) for m in models)
    feats = tuple(m.features(x) for m in models)
    config = PairConfig(mode="dec", lambda_corr=0.05)
    loss, terms = _pair_loss(logits, feats, y, config, models)
    ce = [F.cross_entropy(out, y) for out in logits]
    expected = torch.sqrt(ce[0] ** 2 + ce[1] ** 2) + 0.05 * correlation_loss(*feats)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    both, _ = _pair_loss(logits, feats, y, PairConfig(mode="dec", corr_direction="both"), models)
    symmetric = 0.5 * (correlation_loss(*feats) + correlation_loss(feats[1], feats[0]))
    assert float(both.detach()) == pytest.approx(float((torch.sqrt(ce[0] ** 2 + ce[1] ** 2) + 0.05 * symmetric).detach()), rel=1e-6)
    cor, _ = _pair_loss(logits, feats, y, PairConfig(mode="cor"), models)
    assert float(cor.detach()) == pytest.approx(float(torch.sqrt(ce[0] ** 2 + ce[1] ** 2).detach()), rel=1e-6)
    param_cfg = PairConfig(mode="param", target_distance=100.0, distance_weight=1e-5)
    param, terms = _pair_loss(logits, feats, y, param_cfg, models)
    distance = parameter_distance(*models)
    assert float(param.detach()) == pytest.approx(float((ce[0] + ce[1] + 1e-5 * (distance - 100.0) ** 2).detach()), rel=1e-6)
    assert pair_ensemble_config(PairConfig(mode="cor")).method == "ce"
    assert pair_ensemble_config(param_cfg).method == "param" and pair_ensemble_config(config).method == "dec"


def test_corr_warmup_switches_the_correlation_term_off():
    torch.manual_seed(0)
    models = (create_model("mnist_cnn"), create_model("mnist_cnn"))
    x, y = torch.rand(800, 1, 28, 28), torch.randint(0, 10, (800,))
    logits, feats = tuple(m(x) for m in models), tuple(m.features(x) for m in models)
    config = PairConfig(mode="dec", corr_warmup_epochs=2, epochs=5)
    assert [config.lambda_at(e) for e in range(4)] == [0.0, 0.0, 0.05, 0.05]
    assert PairConfig(mode="cor", corr_warmup_epochs=2).lambda_at(3) == 0.0
    off, terms = _pair_loss(logits, feats, y, config, models, lambda_corr=config.lambda_at(0))
    cor, _ = _pair_loss(logits, feats, y, PairConfig(mode="cor"), models)
    assert torch.equal(off, cor) and "corr" not in terms
    on, terms = _pair_loss(logits, feats, y, config, models, lambda_corr=config.lambda_at(2))
    assert float((on - cor).detach()) == pytest.approx(0.05 * float(terms["corr"]), rel=1e-5) and float(terms["corr"]) > 0
    with pytest.raises(DecorrError, match="leaves none of the 3"):
        PairConfig(mode="dec", corr_warmup_epochs=3, epochs=3)
    with pytest.raises(DecorrError, match="--corr-warmup-epochs must be at least 0"):
        PairConfig(mode="dec", corr_warmup_epochs=-1)


def test_dead_feature_layer_is_detected_and_explained(mnist):
    """A constant feature layer is the correlation loss's trivial minimum (L_corr = 0): report it."""
    torch.manual_seed(0)
    alive, dead = create_model("mnist_cnn"), create_model("mnist_cnn")
    with torch.no_grad():  # every conv2 unit below zero: the ReLU, hence pool2, outputs 0 for any input
        dead.features.conv2.weight.zero_()
        dead.features.conv2.bias.fill_(-1.0)
    layers = {"model0": "features.pool2", "model1": "features.pool2"}
    result = evaluate_models({"model0": alive, "model1": dead}, mnist.test.subset(900), layers, batch_size=300)
    assert result["active_features_model1"] == 0.0 and result["active_features_model0"] > 0.5
    assert result["effective_rank_model1"] == 0.0 and result["effective_rank_model0"] > 1.0
    z = torch.zeros(900, 784)
    assert float(correlation_loss(torch.randn(900, 784), z)) == pytest.approx(0.0, abs=1e-6)
    message = dead_features_warning("model1", "features.pool2", 0.0, correlation=True)
    assert message.startswith("warning: model1's features at features.pool2") and "--corr-warmup-epochs 1" in message
    assert "trivial minimum" in message and "\n" not in message
    assert "--corr-warmup-epochs" not in dead_features_warning("model1", "f", 0.0, correlation=True, warmup_epochs=1)
    without = dead_features_warning("model1", "f", 0.0)  # e.g. ce: dead ReLUs, not the correlation loss
    assert "--corr-warmup-epochs" not in without and "trivial minimum" not in without


@pytest.mark.slow
def test_dec_pair_trains_and_checkpoint_loads(mnist, tmp_path):
    config = PairConfig(mode="dec", epochs=2, train_subset=4000, test_subset=1000, batch_size=1000)
    metrics = train_pair(config, RunOptions(run_dir=tmp_path / "run", no_tensorboard=True))
    history = load_checkpoint(tmp_path / "run").config["history"]
    # The paper's CNN starts slowly (avgpool over 7x7); after 8 steps the losses must have fallen.
    assert history[1]["train/ce0"] < history[0]["train/ce0"] and history[1]["train/ce1"] < history[0]["train/ce1"]
    assert history[1]["train/corr"] < history[0]["train/corr"]
    assert 0.0 <= metrics["test/r2_model0_model1"] <= 1.0
    models = load_models(tmp_path / "run")
    assert set(models) == {"model0", "model1"}
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint.config["epoch"] == 2 and len(checkpoint.config["history"]) == 2
    assert checkpoint.config["models"]["model0"]["feature_layer"] == "features.pool2"


def test_model_kwargs_reach_the_models_and_the_checkpoint(mnist, tmp_path):
    """--model-kwargs '{"mean": [0], "std": [1]}': the paper's raw-pixel CNN, saved and rebuilt as such."""
    run = tmp_path / "raw"
    done = run_script("--mode", "cor", "--epochs", "1", "--model-kwargs", '{"mean": [0], "std": [1]}',
                      "--run-dir", str(run), *SMALL)
    assert done.returncode == 0, done.stderr[-2000:]
    config = load_checkpoint(run).config
    assert config["models"]["model0"]["kwargs"] == {"mean": [0], "std": [1]}
    model = load_models(run)["model0"]
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model.features.normalize(x), x)
    assert not torch.equal(create_model("mnist_cnn").features.normalize(x), x)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(mnist, tmp_path):
    epochs = "4"
    reference = tmp_path / "reference"
    done = run_script("--mode", "dec", "--epochs", epochs, "--run-dir", str(reference), *SMALL)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--mode", "dec", "--epochs", epochs,
                             "--run-dir", str(killed), *SMALL], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config_file = killed / "checkpoint" / "config.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if config_file.exists():
            try:
                if json.loads(config_file.read_text())["epoch"] >= 1:
                    break
            except (json.JSONDecodeError, KeyError):
                pass
        if proc.poll() is not None:
            pytest.fail("training ended before it could be killed")
        time.sleep(0.05)
    time.sleep(0.4)  # into the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved_epoch = load_checkpoint(killed).config["epoch"]
    assert 1 <= saved_epoch < int(epochs), "the kill should land before the run finished"

    resumed = run_script("--mode", "dec", "--epochs", epochs, "--run-dir", str(killed), "--resume", *SMALL)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("model0", "model1"):
        want = load_file(str(reference / "checkpoint" / f"{name}.safetensors"))
        got = load_file(str(killed / "checkpoint" / f"{name}.safetensors"))
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), f"{name}.{key} differs after resume"


@pytest.mark.slow
def test_bad_input_is_one_line_error_and_leaves_checkpoint_untouched(mnist, tmp_path):
    run = tmp_path / "run"
    done = run_script("--mode", "cor", "--epochs", "1", "--run-dir", str(run), *SMALL)
    assert done.returncode == 0, done.stderr[-2000:]
    files = sorted((run / "checkpoint").iterdir())
    before = {f.name: f.read_bytes() for f in files}

    def check(result: subprocess.CompletedProcess, needle: str) -> None:
        assert result.returncode == 2, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
        assert {f.name: f.read_bytes() for f in sorted((run / "checkpoint").iterdir())} == before

    check(run_script("--dataset", str(tmp_path / "missing.npz"), "--run-dir", str(tmp_path / "other"), *SMALL),
          "missing.npz")
    # A run directory that already has a checkpoint is never overwritten without --resume.
    check(run_script("--mode", "cor", "--run-dir", str(run), *SMALL), "--resume")
    # Resuming with another architecture.
    check(run_script("--mode", "cor", "--arch", "mnist_fc", "--run-dir", str(run), "--resume", *SMALL), "models")
    # Model keyword arguments the registry model does not take.
    check(run_script("--mode", "cor", "--model-kwargs", '{"stdd": [1]}', "--run-dir", str(tmp_path / "kw"), *SMALL),
          "does not accept")
    # A batch smaller than the feature layer (784 wide) for the correlation loss.
    small_batch = [a if a != "1000" else "500" for a in SMALL]
    check(run_script("--mode", "dec", "--run-dir", str(run), "--resume", *small_batch), "batch size 500")
    # A checkpoint whose weights do not match its declared architecture.
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for f in files:
        (tampered / f.name).write_bytes(f.read_bytes())
    config["models"]["model0"]["arch"] = "mnist_fc"
    (tampered / "config.json").write_text(json.dumps(config))

    with pytest.raises(DecorrError, match="do not match architecture 'mnist_fc'"):
        load_models(tampered)
