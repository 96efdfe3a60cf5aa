"""Flags generated from the config dataclasses, eval_mode, and the registry's import direction."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn as nn

from decorr.training.classifier import ClassifierConfig
from decorr.config import config_from_args
from decorr.training.recipes import DvergeConfig
from decorr.features import eval_mode
from decorr.training.recipes import PairConfig

REPO = Path(__file__).resolve().parents[1]


def script(path: str):
    spec = importlib.util.spec_from_file_location(f"script_{Path(path).stem}", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pair_flags_keep_their_names_and_defaults():
    parse = script("train/pair_classifiers.py").parse_args
    args = parse(["--mode", "cor", "--corr-direction", "both", "--corr-warmup-epochs", "1", "--model-kwargs",
                  '{"mean": [0], "std": [1]}', "--train-subset", "10", "--eval-batch-size", "7", "--resume", "--cpu",
                  "--no-tensorboard", "--data-root", "d", "--run-dir", "r", "--mixed-precision", "bf16"])
    config = config_from_args(PairConfig, args)
    assert (config.mode, config.corr_direction, config.corr_warmup_epochs, config.eval_batch_size) == ("cor", "both", 1, 7)
    assert config.model_kwargs == {"mean": [0], "std": [1]} and config.train_subset == 10
    assert (args.resume, args.cpu, args.no_tensorboard, args.data_root, args.run_dir, args.mixed_precision) == (
        True, True, True, "d", "r", "bf16")
    assert config_from_args(PairConfig, parse([])) == PairConfig()


def test_classifier_flags_keep_their_names_and_defaults():
    parse = script("train/classifier.py").parse_args
    config = config_from_args(ClassifierConfig, parse(["--no-augment", "--no-sync-bn", "--optimizer", "adam"]))
    assert (config.augment, config.sync_bn, config.optimizer) == (False, False, "adam")
    assert config_from_args(ClassifierConfig, parse([])).sync_bn  # batch norm over the global batch by default
    assert config_from_args(ClassifierConfig, parse([])) == ClassifierConfig()
    with pytest.raises(SystemExit):
        parse(["--schedule", "linear"])


def test_dverge_flags_keep_their_names_and_defaults():
    parse = script("train/dverge.py").parse_args
    args = parse(["--init", "a", "b", "--layer", "x", "y", "--eps", "8/255", "--eval-eps", "0.1", "1/10",
                  "--no-features", "--plus-adv", "--random-start", "--eval-seed", "3"])
    config = config_from_args(DvergeConfig, args)
    assert config.layers == ("x", "y") and config.eps == pytest.approx(8 / 255) and config.eval_eps == (0.1, 0.1)
    assert (config.eval_features, config.plus_adv, config.random_start, config.eval_seed) == (False, True, True, 3)
    assert config.adv_eps == config.eps  # resolved in __post_init__
    assert config_from_args(DvergeConfig, parse(["--init-from", "p"])) == DvergeConfig()


def test_dna_flags_default_to_the_family_and_take_image_samples():
    from dna.cli import parse_args
    from dna.config import DnaConfig
    from decorr.config import config_kwargs

    args = parse_args("cifar", ["--image-samples", "3", "--no-augment", "--unshared", "4", "--from", "s1"])
    config = DnaConfig.paper("cifar", **config_kwargs(DnaConfig, args, exclude=("family",)))
    assert (config.image_samples, config.augment, config.unshared, args.init_from) == (3, False, 4, "s1")
    assert DnaConfig.paper("mnist", **config_kwargs(DnaConfig, parse_args("mnist", []), exclude=("family",))) == \
        DnaConfig.paper("mnist")


def test_eval_mode_restores_every_module_also_on_error():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.BatchNorm1d(2))
    net.train()
    net[2].eval()  # a frozen part keeps its mode
    with pytest.raises(RuntimeError):
        with eval_mode(net, None):
            assert not any(m.training for m in net.modules())
            raise RuntimeError("boom")
    assert net.training and net[1].training and not net[2].training


def test_registry_imports_no_model_module_and_still_finds_dna_models():
    tree = ast.parse((REPO / "decorr" / "models" / "registry.py").read_text())
    imported = [node.module if isinstance(node, ast.ImportFrom) else alias.name
                for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names]
    assert not [m for m in imported if m and (m.startswith("dna") or m.startswith("decorr.models."))], imported
    code = ("import sys\nfrom decorr.models import create_model, list_models, model_spec\n"
            "model_spec('mnist_cnn'); assert 'dna' not in sys.modules\n"
            "assert type(create_model('dna_mnist')).__name__ == 'DualNeckAutoencoder'\n"
            "assert {'ae_cifar', 'dna_classifier_mnist', 'resnet20'} <= set(list_models())\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
