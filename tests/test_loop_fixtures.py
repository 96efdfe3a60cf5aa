"""Behaviour fixtures: a short fixed-seed CPU run of every trainer must give these exact final weights.

The constants were recorded from the trainers before they were ported onto :mod:`decorr.loop`
(commit "Behaviour fixtures ..."); a port that changes a single bit of any run's final weights fails
here. Each run takes a few seconds on one thread. To re-record after an *intended* change of numbers:
``DECORR_PRINT_FIXTURES=1 pytest -q -s tests/test_loop_fixtures.py`` prints the new hashes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from decorr.checkpoint import model_entry, save_checkpoint
from decorr.models import create_model

# name -> SHA-256 of the final weights (every model file of the final checkpoint, keys sorted)
EXPECTED = {
    "pair_cor": "47b33bd822a9af9800958c741c57c311ada9fc0fa548991884d1688b0ed4b67e",
    "pair_dec": "0d25585bf4b857e25e32fe1e59e07e1afe2202869b3f901cb88f64f3b278c95c",
    "pair_param": "ba7dffec283d70a532507e6ac778d0f6c08ca2415ed650944600b5ae34839ec1",
    "classifier_mnist": "d4d4c13bbe7c64fd5c6e83838c8227eeabd8c66eb00a09ed96cf16fdeec03693",
    "classifier_cifar": "4ad716c953d923b6a7396612413f823e43089855bf2ca04bfd8e442a0a9f0e11",
    "dverge": "4b8ef8a2a7b8c13bfe66f58e399fbb207ce9358825bdf1401ba58248b87c4058",
    "dna_stage1": "c3c234bb17b30780d2f9736a162fa745ff37b591aa2594fb7625f5e4608e3633",
    "dna_stage2": "62d3dad4cbb3145f115cee1883f8f6e88b19bd7f8f697d78208dd186aa9772eb",
}


def weights_sha256(checkpoint_dir: Path) -> str:
    """SHA-256 over the model tensors of a checkpoint: files and keys in sorted order, name, dtype,
    shape and raw bytes of each tensor (the optimizer's state is left out)."""
    digest = hashlib.sha256()
    for path in sorted(checkpoint_dir.glob("*.safetensors")):
        if path.name == "optimizer.safetensors":
            continue
        tensors = load_file(str(path))
        for key in sorted(tensors):
            t = tensors[key].contiguous().reshape(-1)
            digest.update(f"{path.stem}.{key}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def check(name: str, checkpoint_dir: Path) -> None:
    got = weights_sha256(checkpoint_dir)
    if os.environ.get("DECORR_PRINT_FIXTURES"):
        print(f'\n    "{name}": "{got}",')
    assert got == EXPECTED[name], f"{name}: final weights changed ({got})"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_mnist(mnist):
    return mnist.subset(train=512, test=128)


@pytest.mark.parametrize("mode, extra", [
    ("cor", {}),
    ("dec", {"corr_warmup_epochs": 1, "corr_direction": "both", "arch": "mnist_fc", "feature_layer": "blocks.4"}),
    ("param", {"target_distance": 10.0, "distance_weight": 1e-3}),
])
def test_pair(mode, extra, tmp_path):
    from decorr.pairs import PairConfig, train_pair

    config = PairConfig(mode=mode, epochs=2, batch_size=200, train_subset=500, test_subset=128, eval_batch_size=64,
                        seed=3, **extra)
    train_pair(config, tmp_path / "run", log=False, cpu=True)
    check(f"pair_{mode}", tmp_path / "run" / "checkpoint")


def test_classifier_mnist(tiny_mnist, tmp_path):
    from decorr.classifier import ClassifierConfig, train_classifier

    config = ClassifierConfig(arch="mnist_cnn", dataset="mnist", epochs=2, batch_size=100, lr=0.05, seed=1,
                              eval_batch_size=64)
    train_classifier(config, tmp_path / "run", dataset=tiny_mnist, log=False, cpu=True)
    check("classifier_mnist", tmp_path / "run" / "checkpoint")


def test_classifier_cifar(cifar_subset, tmp_path):
    from decorr.classifier import ClassifierConfig, train_classifier

    config = ClassifierConfig(arch="resnet20", dataset="cifar10_subset.npz", epochs=1, batch_size=32, lr=0.05,
                              optimizer="adam", schedule="none", train_subset=96, test_subset=32, seed=2)
    train_classifier(config, tmp_path / "run", dataset=cifar_subset, log=False, cpu=True)
    check("classifier_cifar", tmp_path / "run" / "checkpoint")


def test_dverge(mnist, tmp_path):
    from decorr.dverge import DvergeConfig
    from decorr.dverge_training import train_dverge

    torch.manual_seed(30)
    models = {"model0": create_model("mnist_cnn"), "model1": create_model("mnist_cnn")}
    entry = model_entry("mnist_cnn")
    save_checkpoint(tmp_path / "pair", models, {"kind": "pair", "models": {n: entry for n in models},
                                                "dataset": "mnist", "epoch": 0})
    config = DvergeConfig(epochs=2, batch_size=64, batches_per_epoch=2, steps=2, train_subset=256, eval_subset=32,
                          eval_eps=(0.1,), eval_steps=2, eval_features=False, accuracy_subset=32,
                          layers=("features.pool1", "features.pool2"), random_start=True, plus_adv=True,
                          adv_steps=2, seed=4)
    train_dverge(config, [str(tmp_path / "pair")], tmp_path / "run", log=False, cpu=True)
    check("dverge", tmp_path / "run" / "checkpoint")


def test_dna_both_stages_with_accumulation(tiny_mnist, tmp_path):
    from dna.config import DnaConfig
    from dna.training import train_autoencoder, train_classifier

    config = DnaConfig.paper("mnist", epochs=2, batch_size=200, classifier_epochs=1, classifier_batch_size=100,
                             gradient_accumulation_steps=2, eval_batch_size=64, image_samples=0, seed=5)
    train_autoencoder(config, tmp_path / "run" / "stage1", dataset=tiny_mnist, log=False, cpu=True)
    check("dna_stage1", tmp_path / "run" / "stage1" / "checkpoint")
    train_classifier(config, tmp_path / "run" / "stage2", tmp_path / "run" / "stage1", dataset=tiny_mnist,
                     log=False, cpu=True)
    check("dna_stage2", tmp_path / "run" / "stage2" / "checkpoint")
