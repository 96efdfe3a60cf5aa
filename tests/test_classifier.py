"""Single-classifier training (decorr.training.classifier, train/classifier.py) on small real subsets."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from decorr.training.entry import RunOptions
from decorr.checkpoint import load_checkpoint, load_models
from decorr.training.classifier import (
    ClassifierConfig,
    check_model_fits,
    classifier_objective,
    dataset_model_kwargs,
    learning_rate,
    train_classifier,
)
from decorr.data import ImageDataset, ImageSplit, to_float
from decorr.errors import DecorrError
from decorr.models import create_model
from decorr.training.run import TrainingRun

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train" / "classifier.py"
#: Small enough for a few seconds per epoch on one thread: 8 steps of 64 images.
SMALL = dict(arch="resnet20", epochs=2, batch_size=64, lr=0.05, train_subset=512, test_subset=256)


def _fake_dataset(shape: tuple[int, int, int], num_classes: int = 10) -> ImageDataset:
    split = ImageSplit(torch.zeros(4, *shape, dtype=torch.uint8), torch.arange(4) % num_classes)
    return ImageDataset("fake", split, split, num_classes)


# ------------------------------------------------------------------------------------------------
# Pieces


def test_bad_settings_are_one_line_errors():
    with pytest.raises(DecorrError, match=r"unknown model 'resnet21'.*resnet20") as info:
        ClassifierConfig(arch="resnet21")
    assert "\n" not in str(info.value)
    with pytest.raises(DecorrError, match="unknown optimizer 'rmsprop'"):
        ClassifierConfig(optimizer="rmsprop")
    with pytest.raises(DecorrError, match="unknown learning-rate schedule 'step'"):
        ClassifierConfig(schedule="step")
    with pytest.raises(DecorrError, match="--epochs must be at least 1"):
        ClassifierConfig(epochs=0)
    with pytest.raises(DecorrError, match="--lr must be positive"):
        ClassifierConfig(lr=0.0)
    with pytest.raises(DecorrError, match="--momentum"):
        ClassifierConfig(momentum=1.0)
    assert ClassifierConfig(arch="vgg_small").feature_layer == "avgpool"


def test_cosine_schedule_hand_values():
    config = ClassifierConfig(lr=0.1, schedule="cosine")
    assert learning_rate(config, 0, 100) == pytest.approx(0.1)
    assert learning_rate(config, 50, 100) == pytest.approx(0.05)
    assert learning_rate(config, 25, 100) == pytest.approx(0.05 * (1 + math.sqrt(0.5)))
    assert learning_rate(config, 100, 100) == pytest.approx(0.0, abs=1e-12)
    flat = ClassifierConfig(lr=0.1, schedule="none")
    assert {learning_rate(flat, s, 100) for s in (0, 37, 99)} == {0.1}


def test_model_kwargs_follow_the_dataset():
    cifar, gray, five = _fake_dataset((3, 32, 32)), _fake_dataset((1, 28, 28)), _fake_dataset((3, 32, 32), 5)
    assert dataset_model_kwargs("resnet20", cifar) == {}
    assert dataset_model_kwargs("resnet20", gray) == {"in_channels": 1}
    assert dataset_model_kwargs("vgg_small", five) == {"num_classes": 5}
    assert dataset_model_kwargs("mnist_cnn", gray) == {}
    assert dataset_model_kwargs("mnist_fc", cifar) == {"in_features": 3 * 32 * 32}
    # What the user gives wins.
    assert dataset_model_kwargs("resnet20", gray, {"in_channels": 3, "shortcut": "projection"}) == {
        "in_channels": 3, "shortcut": "projection"}
    for arch, data in (("resnet20", gray), ("densenet_small", five), ("mnist_fc", cifar)):
        check_model_fits(create_model(arch, **dataset_model_kwargs(arch, data)), arch, data)


def test_model_that_cannot_take_the_data_is_an_error():
    with pytest.raises(DecorrError, match=r"model 'mnist_fc' cannot take the \(3, 32, 32\) images"):
        check_model_fits(create_model("mnist_fc"), "mnist_fc", _fake_dataset((3, 32, 32)))
    with pytest.raises(DecorrError, match="outputs \\(2, 10\\) .* has 5 classes"):
        check_model_fits(create_model("resnet20"), "resnet20", _fake_dataset((3, 32, 32), 5))


def test_objective_is_mean_cross_entropy_and_accuracy():
    torch.manual_seed(0)
    logits = torch.randn(37, 10, requires_grad=True)
    y = torch.randint(0, 10, (37,))
    loss, terms = classifier_objective(logits, y)
    expected = -torch.log_softmax(logits, 1).gather(1, y[:, None]).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert float(terms["acc"]) == pytest.approx(float((logits.argmax(1) == y).double().mean()))
    loss.backward()
    want = (torch.softmax(logits, 1) - F.one_hot(y, 10)) / 37
    assert torch.allclose(logits.grad, want.detach(), atol=1e-7)


# ------------------------------------------------------------------------------------------------
# End to end on the CIFAR-10 subset


@pytest.fixture(scope="module")
def trained_run(cifar_subset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("classifier") / "run"
    config = ClassifierConfig(dataset="cifar10_subset.npz", **SMALL)
    metrics = train_classifier(config, RunOptions(run_dir=run_dir, dataset=cifar_subset, no_tensorboard=True))
    return run_dir, metrics


@pytest.mark.slow
def test_trains_and_checkpoint_loads(trained_run, cifar_subset):
    run_dir, metrics = trained_run
    checkpoint = load_checkpoint(run_dir)
    config = checkpoint.config
    assert config["kind"] == "classifier" and config["epoch"] == 2 and config["dataset"] == "cifar10_subset.npz"
    assert config["models"] == {"model": {"arch": "resnet20", "kwargs": {}, "feature_layer": "avgpool"}}
    history = config["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["train/loss"] < history[0]["train/loss"] < 2.6
    models = load_models(run_dir)
    assert set(models) == {"model"}
    # The recorded test accuracy, recomputed from the saved weights.
    test = cifar_subset.test.subset(SMALL["test_subset"])
    with torch.no_grad():
        predictions = models["model"](to_float(test.images)).argmax(1)
    assert metrics["test/acc"] == pytest.approx(float((predictions == test.labels).double().mean()))
    assert metrics["test/acc"] > 0.12  # above chance (0.1) after 16 steps


@pytest.mark.slow
def test_resume_after_crash_equals_uninterrupted(trained_run, cifar_subset, tmp_path, monkeypatch):
    reference, _ = trained_run
    run_dir = tmp_path / "crashed"
    config = ClassifierConfig(dataset="cifar10_subset.npz", **SMALL)

    class Crash(Exception):
        pass

    original_save = TrainingRun.save

    def save_then_crash(self, epoch, *args, **kwargs):
        original_save(self, epoch, *args, **kwargs)
        if epoch == 1:
            raise Crash

    monkeypatch.setattr(TrainingRun, "save", save_then_crash)
    with pytest.raises(Crash):
        train_classifier(config, RunOptions(run_dir=run_dir, dataset=cifar_subset, no_tensorboard=True))
    monkeypatch.undo()
    assert load_checkpoint(run_dir).config["epoch"] == 1

    with pytest.raises(DecorrError, match="already holds a checkpoint; pass --resume"):
        train_classifier(config, RunOptions(run_dir=run_dir, dataset=cifar_subset, no_tensorboard=True))
    train_classifier(config, RunOptions(run_dir=run_dir, dataset=cifar_subset, resume=True, no_tensorboard=True))

    want = load_checkpoint(reference)
    got = load_checkpoint(run_dir)
    assert got.config["epoch"] == 2 and len(got.config["history"]) == 2
    assert want.state_dicts["model"].keys() == got.state_dicts["model"].keys()
    for key, value in want.state_dicts["model"].items():
        assert torch.equal(value, got.state_dicts["model"][key]), f"{key} differs after resume"


@pytest.mark.slow
def test_grayscale_dataset_builds_one_channel_model(mnist, tmp_path):
    config = ClassifierConfig(arch="vgg_small", dataset="mnist", epochs=1, batch_size=64, train_subset=256,
                              test_subset=128)
    metrics = train_classifier(config, RunOptions(run_dir=tmp_path / "run", dataset=mnist, no_tensorboard=True))
    entry = load_checkpoint(tmp_path / "run").config["models"]["model"]
    assert entry["kwargs"] == {"in_channels": 1}
    model = load_models(tmp_path / "run")["model"]
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert math.isfinite(metrics["train/loss"])


@pytest.mark.slow
def test_script_unknown_arch_is_one_line_error(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "resnet21", "--run-dir", str(tmp_path / "run")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown model 'resnet21'"), result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_processes_train_like_one(mnist, tmp_path):
    """torchrun with 2 processes (gloo, each half of every batch) against one process on whole batches."""
    settings = dict(arch="mnist_cnn", dataset="mnist", epochs=1, batch_size=201, train_subset=402, test_subset=200)
    one = tmp_path / "one"
    train_classifier(ClassifierConfig(**settings), RunOptions(run_dir=one, dataset=mnist, no_tensorboard=True))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = ["--arch", "mnist_cnn", "--dataset", "mnist", "--epochs", "1", "--batch-size", "201",
            "--train-subset", "402", "--test-subset", "200", "--no-tensorboard", "--run-dir", str(tmp_path / "two")]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    want, got = load_checkpoint(one), load_checkpoint(tmp_path / "two")
    assert got.config["metrics"]["train/loss"] == pytest.approx(want.config["metrics"]["train/loss"], rel=1e-5)
    assert got.config["metrics"]["test/acc"] == want.config["metrics"]["test/acc"]
    set_seed(0)  # what TrainingRun does right before the model is built
    initial = create_model("mnist_cnn").state_dict()
    moved = 0.0
    for key, value in want.state_dicts["model"].items():
        # SGD steps are linear in the gradient: a wrongly scaled (e.g. per-shard mean) loss would show.
        torch.testing.assert_close(got.state_dicts["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        moved = max(moved, float((value - initial[key]).abs().max()) if value.is_floating_point() else 0.0)
    assert moved > 1e-3  # the two steps did change the weights
