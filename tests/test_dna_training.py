"""DNA training (stage 1 + stage 2), global batch norm, and the robustness evaluation."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from decorr.training.entry import RunOptions
from decorr.training.batchnorm import GlobalBatchNorm, convert_sync_batchnorm
from decorr.checkpoint import load_checkpoint
from decorr.errors import DecorrError
from decorr.loss import correlation_loss
from decorr.models import create_model
from decorr.training.run import TrainingRun
from dna.evaluation import (
    RobustnessOptions,
    DefendedModel,
    craft,
    evaluate_robustness,
    format_table,
    load_defended_model,
    worst_case_accuracy,
)
from dna.models import forward_with_latents
from dna.objectives import dna_accuracy, path_predictions
from dna.config import DnaConfig
from dna.steps import accumulated_step, autoencoder_objective, classifier_objective
from dna.training import resolve_dna_checkpoint, train_autoencoder, train_classifier, train_dna

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny_mnist(mnist):
    return mnist.subset(train=600, test=200)


def _tiny_config(**overrides) -> DnaConfig:
    settings = dict(epochs=2, batch_size=100, classifier_epochs=1, classifier_batch_size=100, eval_batch_size=100,
                    image_samples=0)
    return DnaConfig.paper("mnist", **{**settings, **overrides})


# --- GlobalBatchNorm in one process ----------------------------------------------------------------

def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5),
                         nn.BatchNorm1d(5, momentum=None))


def test_convert_sync_batchnorm_replaces_every_batch_norm_and_keeps_its_state():
    net = _bn_net()
    with torch.no_grad():
        net[1].weight.uniform_()
        net[1].running_mean.fill_(0.3)
    converted = convert_sync_batchnorm(copy.deepcopy(net))
    kinds = [type(m) for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [GlobalBatchNorm, GlobalBatchNorm]
    assert converted[5].momentum is None and converted[1].eps == net[1].eps
    assert net.state_dict().keys() == converted.state_dict().keys()
    for key, value in net.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    assert convert_sync_batchnorm(converted) is converted  # already global: nothing to do


@pytest.mark.parametrize("training", [True, False])
def test_global_batch_norm_is_plain_batch_norm_in_one_process(training):
    net = _bn_net()
    converted = convert_sync_batchnorm(copy.deepcopy(net))
    net.train(training)
    converted.train(training)
    x = torch.randn(8, 3, 6, 6)
    for _ in range(2):  # two steps: the running statistics follow too
        torch.testing.assert_close(converted(x), net(x))
    torch.testing.assert_close(converted.state_dict(), net.state_dict())


# --- objectives ---------------------------------------------------------------------------------

def test_autoencoder_objective_is_the_spec_loss():
    model = create_model("dna_mnist")
    x = torch.rand(100, 1, 28, 28)
    loss, terms = autoencoder_objective(model, x, 0.05)
    recons, latents = forward_with_latents(model, x)
    mse = [F.mse_loss(r, x).item() for r in recons]
    corr = correlation_loss(latents[0], latents[1]).item()
    assert loss.item() == pytest.approx(math.sqrt(mse[0] ** 2 + mse[1] ** 2) + 0.05 * corr, rel=1e-5)
    assert terms["mse0"].item() == pytest.approx(mse[0], rel=1e-5)
    assert terms["corr"].item() == pytest.approx(corr, rel=1e-5)
    ae = create_model("ae_mnist")
    ae_loss, ae_terms = autoencoder_objective(ae, x, 0.05)
    assert ae_loss.item() == pytest.approx(F.mse_loss(ae(x)[0], x).item(), rel=1e-5)
    assert "corr" not in ae_terms


def test_correlation_term_under_bf16_autocast_is_the_float32_value_of_the_bf16_latents():
    model = create_model("dna_mnist")
    x = torch.rand(100, 1, 28, 28)
    seen = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, latents = forward_with_latents(model, x)
        seen["latents"] = latents
        loss, terms = autoencoder_objective(model, x, 0.05)
    assert seen["latents"][0].dtype == torch.bfloat16  # the model really ran in bf16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with torch.no_grad():
        expected = correlation_loss(*(z.float() for z in seen["latents"]))
    assert terms["corr"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_classifier_objective_trains_the_classifier_on_both_reconstructions_only():
    ae, clf = create_model("dna_mnist"), create_model("dna_classifier_mnist")
    x, y = torch.rand(10, 1, 28, 28), torch.randint(0, 10, (10,))
    loss, _ = classifier_objective(ae, clf, x, y)
    r1, r2 = ae(x)
    expected = (F.cross_entropy(clf(r1), y) + F.cross_entropy(clf(r2), y)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in ae.parameters())
    assert all(p.grad is not None for p in clf.parameters())


def test_accumulated_step_averages_the_micro_batch_gradients(tmp_path):
    model = create_model("dna_mnist")
    reference = copy.deepcopy(model)
    x, y = torch.rand(200, 1, 28, 28), torch.zeros(200, dtype=torch.long)
    run = TrainingRun(tmp_path, {"kind": "dna"}, cpu=True, log=False, gradient_accumulation_steps=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    prepared, optimizer = run.prepare(model, optimizer)
    accumulated_step(run, prepared, optimizer, [(x[:100], y[:100]), (x[100:], y[100:])],
                     lambda a, b: autoencoder_objective(prepared, a, 0.05))
    params = list(reference.parameters())
    grads = [torch.autograd.grad(autoencoder_objective(reference, half, 0.05)[0], params) for half in (x[:100], x[100:])]
    for p, g1, g2, new in zip(params, *grads, model.parameters()):
        torch.testing.assert_close(new, p - 0.5 * (g1 + g2) / 2, rtol=1e-5, atol=1e-7)


# --- configuration errors ----------------------------------------------------------------------

@pytest.mark.parametrize("overrides, needle", [
    (dict(model="ae", unshared=4), "--unshared"),
    (dict(unshared=3), "--unshared 3"),
    (dict(batch_size=500, gradient_accumulation_steps=3), "not divisible"),
    (dict(model="vae"), "--model"),
])
def test_bad_settings_are_one_line_errors(overrides, needle):
    with pytest.raises(DecorrError, match=needle):
        DnaConfig.paper("mnist", **overrides)


def test_micro_batch_smaller_than_the_latent_is_a_clear_error(tiny_mnist, tmp_path):
    config = _tiny_config(batch_size=128, gradient_accumulation_steps=2)  # 64 per micro-batch, latent 64
    with pytest.raises(DecorrError, match=r"at least 66 samples.*--batch-size 132"):
        train_autoencoder(config, RunOptions(run_dir=tmp_path / "run", dataset=tiny_mnist, no_tensorboard=True))


# --- training, checkpoints, resume ---------------------------------------------------------------

def test_two_stages_resume_and_checkpoint_layout(tiny_mnist, tmp_path):
    config = _tiny_config()
    straight = train_autoencoder(config, RunOptions(run_dir=tmp_path / "straight" / "stage1", dataset=tiny_mnist, no_tensorboard=True))
    assert straight["train/corr"] > 0 and 0 <= straight["test/bottleneck_r2"] <= 1

    # One epoch, then resume to two: the weights equal the uninterrupted run's bit for bit.
    train_autoencoder(_tiny_config(epochs=1), RunOptions(run_dir=tmp_path / "resumed" / "stage1", dataset=tiny_mnist, no_tensorboard=True))
    train_autoencoder(config, RunOptions(run_dir=tmp_path / "resumed" / "stage1", dataset=tiny_mnist, resume=True, no_tensorboard=True))
    for name in ("autoencoder.safetensors", "optimizer.safetensors"):
        want = load_file(str(tmp_path / "straight" / "stage1" / "checkpoint" / name))
        got = load_file(str(tmp_path / "resumed" / "stage1" / "checkpoint" / name))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    assert load_checkpoint(tmp_path / "resumed" / "stage1").config["epoch"] == 2

    # Stage 2 from the stage-1 checkpoint: the autoencoder is frozen, the classifier learns.
    stage1 = tmp_path / "straight" / "stage1"
    metrics = train_classifier(config, stage1, RunOptions(run_dir=tmp_path / "straight" / "stage2", dataset=tiny_mnist, no_tensorboard=True))
    assert 0 <= metrics["test/acc_path0"] <= metrics["test/acc_either"] <= 1
    saved = load_checkpoint(resolve_dna_checkpoint(tmp_path / "straight"))
    assert saved.config["kind"] == "dna" and saved.config["stage"] == 2
    assert set(saved.config["models"]) == {"autoencoder", "classifier"}
    assert saved.config["autoencoder_from"]["epoch"] == 2
    frozen = load_file(str(stage1 / "checkpoint" / "autoencoder.safetensors"))
    assert all(torch.equal(frozen[k], saved.state_dicts["autoencoder"][k]) for k in frozen)

    # Stage 1 trained further: the classifier of the old autoencoder cannot be continued on the new one.
    train_autoencoder(_tiny_config(epochs=3), RunOptions(run_dir=stage1, dataset=tiny_mnist, resume=True, no_tensorboard=True))
    with pytest.raises(DecorrError, match="another autoencoder"):
        train_classifier(_tiny_config(classifier_epochs=2), stage1, RunOptions(run_dir=tmp_path / "straight" / "stage2", dataset=tiny_mnist, resume=True, no_tensorboard=True))

    with pytest.raises(DecorrError, match="stage-1"):
        resolve_dna_checkpoint(stage1)
    with pytest.raises(DecorrError, match="--resume"):  # never overwrite a run silently
        train_autoencoder(config, RunOptions(run_dir=stage1, dataset=tiny_mnist, no_tensorboard=True))
    with pytest.raises(DecorrError, match="--model"):  # an autoencoder of another kind
        train_classifier(_tiny_config(model="ae"), stage1, RunOptions(run_dir=tmp_path / "other", dataset=tiny_mnist, no_tensorboard=True))


def test_train_dna_needs_stage_one_before_stage_two(tmp_path, mnist):
    with pytest.raises(DecorrError, match="--stage 1 first"):
        train_dna(_tiny_config(train_subset=600, test_subset=200), RunOptions(run_dir=tmp_path / "run", no_tensorboard=True), stage="2")
    with pytest.raises(DecorrError, match="drop --resume"):
        train_dna(_tiny_config(train_subset=600, test_subset=200), RunOptions(run_dir=tmp_path / "run", resume=True, no_tensorboard=True))


def run_script(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_bf16_training_script_then_evaluation_script(mnist, tmp_path):
    run = tmp_path / "dna"
    done = run_script("train/dna_mnist.py", "--run-dir", str(run), "--mixed-precision", "bf16", "--epochs", "2",
                      "--batch-size", "100", "--classifier-epochs", "1", "--train-subset", "600",
                      "--test-subset", "200")
    assert done.returncode == 0, done.stderr[-3000:]
    for stage, names in (("stage1", ["autoencoder"]), ("stage2", ["autoencoder", "classifier"])):
        checkpoint = load_checkpoint(run / stage)
        assert all(v is None or math.isfinite(v) for v in checkpoint.config["metrics"].values())
        for name in names:
            assert all(torch.isfinite(t).all() for t in checkpoint.state_dicts[name].values()), (stage, name)
        assert list((run / stage / "tensorboard").rglob("events.out.tfevents.*"))
    assert load_checkpoint(run / "stage1").config["metrics"]["train/loss"] > 0

    out = tmp_path / "robustness"
    done = run_script("eval/dna_robustness.py", str(run), "--baseline", str(run), "--test-subset", "20",
                      "--steps", "2", "--eps", "0.1", "--batch-size", "10", "--figure-samples", "3",
                      "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert len(report["results"]) == 1 + 2 * (2 + 1) * 1  # clean + attacks x (objectives + worst case) x eps
    assert "either" in done.stdout and (out / "table.txt").exists()
    for figure in ("accuracy.png", "reconstructions_fgsm.png", "reconstructions_pgd.png"):
        assert (out / figure).stat().st_size > 1000, figure


# --- robustness evaluation ---------------------------------------------------------------------

def _defended(paths: int = 2) -> DefendedModel:
    ae = create_model("dna_mnist") if paths == 2 else create_model("ae_mnist")
    return DefendedModel(ae, create_model("dna_classifier_mnist"), name=f"p{paths}")


def test_evaluation_rows_and_the_oracle_of_one_setting():
    dna, baseline = _defended(2), _defended(1)
    x, y = torch.rand(12, 1, 28, 28), torch.randint(0, 10, (12,))
    from decorr.data import ImageSplit

    split = ImageSplit((x * 255).round().to(torch.uint8), y)
    options = RobustnessOptions(attacks=("fgsm", "pgd"), objectives=("paper", "adaptive-min"), eps=(0.1,),
                                batch_size=5, attack_settings={"--steps": 2})
    report = evaluate_robustness(dna, split, options, baseline=baseline)
    assert [(r["attack"], r["objective"]) for r in report["results"]] == [
        ("none", "none"), ("fgsm", "paper"), ("fgsm", "adaptive-min"), ("fgsm", "worst"),
        ("pgd", "paper"), ("pgd", "adaptive-min"), ("pgd", "worst")]
    x_eval = split.images.float() / 255
    clean = dna_accuracy(path_predictions(dna.autoencoder, dna.classifier, x_eval), y)
    assert report["results"][0]["dna"] == clean
    # FGSM is deterministic and per sample in eval mode: batches of 5 give the whole batch's attack.
    adv = craft(dna, x_eval, y, attack=options.attack("fgsm", 0.1), objective="paper", eps=0.1)
    assert report["results"][1]["dna"] == pytest.approx(
        dna_accuracy(path_predictions(dna.autoencoder, dna.classifier, adv), y))
    # One path: the adaptive "min" objective is the paper's CE, so the numbers are the same.
    rows = {(r["attack"], r["objective"]): r for r in report["results"]}
    assert rows["pgd", "paper"]["baseline"] == rows["pgd", "adaptive-min"]["baseline"]
    assert set(rows["pgd", "paper"]["baseline"]) == {"either", "path0", "mean"}
    assert "either" in format_table(report) and "p1" in format_table(report)
    json.dumps(report)  # plain data


def test_worst_case_over_objectives_by_hand():
    y = torch.tensor([0, 0, 2, 3])
    under_a = torch.tensor([[0, 1, 2, 3], [0, 0, 0, 3]])
    under_b = torch.tensor([[0, 1, 1, 3], [1, 0, 2, 0]])
    # Every sample has a correct path under each attack, but no path survives both on samples 1-3.
    assert worst_case_accuracy([under_a, under_b], y) == {"either": 1.0, "path0": 0.5, "path1": 0.25, "mean": 0.375}
    assert worst_case_accuracy([under_a], y) == dna_accuracy(under_a, y)


def test_identical_paths_make_either_equal_each_path():
    dna = _defended(2)
    dna.autoencoder.bottlenecks[1].load_state_dict(dna.autoencoder.bottlenecks[0].state_dict())
    from decorr.data import ImageSplit

    split = ImageSplit(torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (8,)))
    report = evaluate_robustness(dna, split, RobustnessOptions(attacks=("fgsm",), objectives=("paper",), eps=(0.2,),
                                                               batch_size=8))
    for row in report["results"]:
        assert row["dna"]["either"] == row["dna"]["path0"] == row["dna"]["path1"] == row["dna"]["mean"]


def test_load_defended_model_rejects_other_checkpoints(tmp_path):
    with pytest.raises(DecorrError):
        load_defended_model(tmp_path / "nothing")
