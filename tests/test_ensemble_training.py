"""The ensemble trainer (train/ensemble.py, decorr.training.ensemble, decorr.training.methods) on real MNIST subsets.

N = 2 equals the pair trainer bit for bit; every method trains N = 3 members into a loadable
checkpoint; heterogeneous ensembles; one-line errors before any work; resume; the scripts end to end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from decorr.training.entry import RunOptions
from decorr.checkpoint import load_checkpoint, load_models, model_entry, save_checkpoint
from decorr.training.ensemble import EnsembleConfig, state_sha256, train_ensemble
from decorr.errors import DecorrError
from decorr.training.methods import METHODS
from decorr.models import create_model

REPO = Path(__file__).resolve().parents[1]
#: 300 images, batches of 150; the CNN's narrow head.pool3 (32 features) lets the correlation loss fit.
TINY = dict(epochs=1, batch_size=150, train_subset=300, test_subset=100, eval_batch_size=100)
NARROW = ("head.pool3",)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_{name}_script", REPO / ("train" if name == "ensemble" else "eval")
                                                  / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _weights(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint" / f"{name}.safetensors"))


@pytest.fixture(scope="module")
def surrogate(tmp_path_factory) -> Path:
    """An (untrained) classifier checkpoint: dec-frozen's surrogate."""
    path = tmp_path_factory.mktemp("surrogate") / "sur"
    torch.manual_seed(11)
    save_checkpoint(path, {"model": create_model("mnist_cnn")},
                    {"kind": "classifier", "models": {"model": model_entry("mnist_cnn", {}, "head.pool3")},
                     "dataset": "mnist", "epoch": 0})
    return path


@pytest.mark.parametrize("mode, method, extra", [
    ("cor", "ce", {}),
    # the last batch (320 % 150 = 20 < 34) is dropped by both; mnist_cnn in channels-last
    ("dec", "dec", {"feature_layer": "head.pool3", "train_subset": 320, "corr_warmup_epochs": 1}),
    ("dec", "dec", {"arch": "mnist_fc", "train_subset": 420, "batch_size": 210}),  # batch norm, 200 features
])
def test_two_members_equal_the_pair_trainer_bit_for_bit(mnist, tmp_path, mode, method, extra):
    from decorr.training.recipes import PairConfig, train_pair

    settings = {**TINY, "epochs": 2, "test_subset": 64, "seed": 3, **extra}
    train_pair(PairConfig(mode=mode, **settings), RunOptions(run_dir=tmp_path / "pair", no_tensorboard=True, cpu=True))
    ensemble = {k: ((v,) if k in ("arch", "feature_layer") else v) for k, v in settings.items()}
    metrics = train_ensemble(EnsembleConfig(method=method, num_models=2, **ensemble), RunOptions(run_dir=tmp_path / "ens", no_tensorboard=True, cpu=True))
    for name in ("model0", "model1"):
        pair, ens = _weights(tmp_path / "pair", name), _weights(tmp_path / "ens", name)
        assert pair.keys() == ens.keys()
        assert all(torch.equal(pair[k], ens[k]) for k in pair), f"{name} differs from the pair trainer's"
    pair_metrics = load_checkpoint(tmp_path / "pair", load_weights=False).config["metrics"]
    for key in ("test/acc_model0", "test/acc_model1", "test/effective_rank_model1"):
        assert metrics[key] == pair_metrics[key]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_three_loadable_members(mnist, tmp_path, surrogate, method):
    extra = {"dverge": {"dverge_steps": 2}, "trs": {"trs_plus_adv": True, "trs_steps": 1},
             "dec-frozen": {"surrogate": str(surrogate)}}.get(method, {})
    count = 1 if method == "dec-frozen" else 3
    config = EnsembleConfig(method=method, feature_layer=NARROW, seed=1, **TINY, **extra)
    assert config.num_models == count and config.arch == ("mnist_cnn",) * count
    metrics = train_ensemble(config, RunOptions(run_dir=tmp_path / "run", no_tensorboard=True, cpu=True))
    checkpoint = load_checkpoint(tmp_path / "run")
    names = [f"model{m}" for m in range(count)]
    assert checkpoint.config["kind"] == "ensemble" and checkpoint.model_names == names
    assert checkpoint.config["hyperparameters"]["method"] == method
    models = load_models(tmp_path / "run")
    assert list(models) == names
    for name in names:
        assert 0 <= metrics[f"test/acc_{name}"] <= 1
        assert 0 <= metrics[f"test/active_features_{name}"] <= 1 and metrics[f"test/effective_rank_{name}"] >= 0
    assert metrics["time/train_epoch_s"] > 0 and torch.isfinite(torch.tensor(metrics["train/loss"]))
    if count > 1:
        assert 0 <= metrics["test/acc_ensemble"] <= 1
        assert {"test/r2_model0_model1", "test/r2_model0_model2", "test/r2_model1_model2", "test/r2_mean"} <= set(metrics)
    else:  # dec-frozen: the surrogate stays as it was, and is recorded
        before = load_models(surrogate)["model"]
        hyper = checkpoint.config["hyperparameters"]
        assert hyper["surrogate"] == str(surrogate) and hyper["surrogate_sha256"] == state_sha256(before)
        assert "test/r2_surrogate_model0" in metrics and "train/corr" in metrics


def test_heterogeneous_ensemble_and_dverge_from_its_checkpoint(mnist, tmp_path):
    archs = ("mnist_fc", "mnist_cnn", "mnist_fc")
    config = EnsembleConfig(method="dec", arch=archs, feature_layer=("blocks.3", "head.pool3", "blocks.3"),
                            **{**TINY, "batch_size": 250})
    assert config.num_models == 3
    train_ensemble(config, RunOptions(run_dir=tmp_path / "dec", no_tensorboard=True, cpu=True))
    entries = load_checkpoint(tmp_path / "dec", load_weights=False).config["models"]
    assert [entries[f"model{m}"]["arch"] for m in range(3)] == list(archs)
    assert [type(m).__name__ for m in load_models(tmp_path / "dec").values()] == ["MnistFC", "MnistCNN", "MnistFC"]
    # dec + dverge: DVERGE from the decorrelated members
    start = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in load_models(tmp_path / "dec").items()}
    train_ensemble(EnsembleConfig(method="dverge", init=(str(tmp_path / "dec"),), dverge_steps=1,
                                  **{**TINY, "batch_size": 250}), RunOptions(run_dir=tmp_path / "dverge", no_tensorboard=True, cpu=True))
    checkpoint = load_checkpoint(tmp_path / "dverge")
    assert checkpoint.config["hyperparameters"]["arch"] == list(archs)
    assert checkpoint.config["models"] == entries
    moved = [not torch.equal(checkpoint.state_dicts[n]["fc.weight"], start[n]["fc.weight"]) for n in ("model0", "model2")]
    assert all(moved)


def test_bad_settings_are_one_line_errors_before_any_work(mnist, tmp_path, capsys, surrogate):
    cases = [
        (dict(method="nope"), "unknown method 'nope'; choose one of ce, dec"),
        (dict(method="dec", num_models=1), "--num-models 1: --method dec trains at least 2 models"),
        (dict(method="dec-frozen", num_models=2, surrogate=str(surrogate)), "trains exactly 1 models"),
        (dict(method="dec-frozen"), "needs --surrogate SPEC"),
        (dict(method="ce", arch=("mnist_cnn", "mnist_fc"), num_models=3), "--arch lists 2 values for 3 members"),
        (dict(method="dec", lambda_corr=0.0), "has no correlation term"),
        (dict(method="ce", arch=("resnet_nope",)), "unknown model"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DecorrError, match=message.replace("(", r"\(")):
            EnsembleConfig(**kwargs)
    with pytest.raises(DecorrError, match="batch size 150 is too small for the correlation loss on 784 features"):
        train_ensemble(EnsembleConfig(method="dec", **TINY), RunOptions(run_dir=tmp_path / "small", no_tensorboard=True, cpu=True))
    with pytest.raises(DecorrError, match="too small for the correlation loss on 32 features .*surrogate"):
        train_ensemble(EnsembleConfig(method="dec-frozen", surrogate=str(surrogate), **{**TINY, "batch_size": 20}), RunOptions(run_dir=tmp_path / "small", no_tensorboard=True, cpu=True))
    assert not (tmp_path / "small").exists()
    script = _script("ensemble")
    for argv, message in [(["--method", "dec", "--num-models", "1"], "error: --num-models 1"),
                          (["--method", "dec", "--batch-size", "150"], "error: batch size 150 is too small")]:
        with pytest.raises(SystemExit) as exit_info:
            script.main([*argv, "--train-subset", "300", "--run-dir", str(tmp_path / "s"), "--no-tensorboard", "--cpu"])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith(message) and "\n" not in err, err
    assert not (tmp_path / "s").exists()
    with pytest.raises(SystemExit):
        script.parse_args(["--method", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_resume_continues_and_refuses_changed_settings(mnist, tmp_path):
    settings = dict(method="dec", num_models=3, feature_layer=NARROW, **TINY)
    train_ensemble(EnsembleConfig(**settings), RunOptions(run_dir=tmp_path / "run", no_tensorboard=True, cpu=True))
    with pytest.raises(DecorrError, match="cannot resume .*lambda_corr: 0.05 -> 0.1"):
        train_ensemble(EnsembleConfig(**{**settings, "epochs": 2, "lambda_corr": 0.1}), RunOptions(run_dir=tmp_path / "run", resume=True, no_tensorboard=True, cpu=True))
    with pytest.raises(DecorrError, match="cannot resume .*num_models: 3 -> 4"):
        train_ensemble(EnsembleConfig(**{**settings, "epochs": 2, "num_models": 4}), RunOptions(run_dir=tmp_path / "run", resume=True, no_tensorboard=True, cpu=True))
    train_ensemble(EnsembleConfig(**{**settings, "epochs": 2}), RunOptions(run_dir=tmp_path / "run", resume=True, no_tensorboard=True, cpu=True))
    # equals an uninterrupted 2-epoch run
    train_ensemble(EnsembleConfig(**{**settings, "epochs": 2}), RunOptions(run_dir=tmp_path / "once", no_tensorboard=True, cpu=True))
    config = load_checkpoint(tmp_path / "run", load_weights=False).config
    assert config["epoch"] == 2 and len(config["resumes"]) == 1
    for name in ("model0", "model1", "model2"):
        a, b = _weights(tmp_path / "run", name), _weights(tmp_path / "once", name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_script_bf16_double_backprop_then_transfer_evaluation(mnist, tmp_path):
    """TRS (double backprop, PGD smoothness batch) under bf16 autocast through the script, then the
    checkpoint as targets and as an ensemble of all its members in eval/transfer.py."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    run = tmp_path / "trs"
    train = [sys.executable, str(REPO / "train" / "ensemble.py"), "--method", "trs", "--trs-plus-adv", "--trs-steps",
             "1", "--num-models", "3", "--feature-layer", "head.pool3", "--epochs", "1", "--batch-size", "150",
             "--train-subset", "300", "--test-subset", "100", "--eval-batch-size", "100", "--mixed-precision", "bf16",
             "--cpu", "--no-tensorboard", "--threads", "1", "--run-dir", str(run)]
    done = subprocess.run(train, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    config = load_checkpoint(run, load_weights=False).config
    assert config["precision"] == "bf16" and config["kind"] == "ensemble"
    out = tmp_path / "eval"
    evaluate = [sys.executable, str(REPO / "eval" / "transfer.py"), str(run), "--ensemble", f"ens={run}",
                "--num-samples", "20", "--steps", "1", "--eps", "0.1", "--batch-size", "20", "--device", "cpu",
                "--threads", "1", "--no-plots", "--out", str(out)]
    done = subprocess.run(evaluate, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["models"]["ens"]["members"] == ["trs/model0", "trs/model1", "trs/model2"]
    assert {"trs/model0", "trs/model1", "trs/model2", "ens"} <= set(results["targets"])
    # the seed summary reads accuracy, R^2 and the diagnostics from the run's last logged evaluation
    from decorr.evaluation.seeds import training_measures

    last = config["history"][-1]
    logged = training_measures(results)
    assert logged["ensemble_accuracy"] == last["test/acc_ensemble"] and logged["r2"] == last["test/r2_mean"]
    assert logged["accuracy"] == pytest.approx(sum(last[f"test/acc_model{i}"] for i in range(3)) / 3)
    assert logged["effective_rank"] == pytest.approx(sum(last[f"test/effective_rank_model{i}"] for i in range(3)) / 3)
    assert logged["epoch_seconds"] == pytest.approx(last["time/train_epoch_s"])  # one epoch: its own time
    from decorr.evaluation.seeds import defence_measures

    defended = defence_measures(results)  # the only ensemble target; its members' examples are not outside attacks
    assert defended == {"natural": results["models"]["ens"]["natural_accuracy"],
                        "white_box@0.1": results["by_eps"][0]["white_box_accuracy"]["ens"]}
