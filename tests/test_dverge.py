"""DVERGE: feature distillation against hand-computed steps, the N-model step, a whole run and resume."""

from __future__ import annotations

import copy
import json
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from decorr.training.entry import RunOptions
from decorr.attacks import pgd
from decorr.checkpoint import load_checkpoint, model_entry, save_checkpoint
from decorr.data import to_float
from decorr.training.recipes import DvergeConfig
from decorr.training.methods.dverge import choose_layer, dverge_objective, dverge_step, feature_distillation, layer_output
from decorr.evaluation.monitor import TransferMonitor, format_history
from decorr.training.recipes import train_dverge
from decorr.errors import DecorrError
from decorr.models import create_model

REPO = Path(__file__).resolve().parents[1]
LAYER = "features.pool2"
_spec = importlib.util.spec_from_file_location("dverge_script", REPO / "train" / "dverge.py")
dverge_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dverge_script)


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("mnist_cnn").eval()


def batches(mnist, n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n training images as sources, the n after them as targets, and the sources' labels."""
    images = mnist.train.images
    xs = to_float(images[offset : offset + n])
    xt = to_float(images[offset + n : offset + 2 * n])
    return xs, xt, mnist.train.labels[offset : offset + n]


def distance(model: nn.Module, x: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (model.features(x) - model.features(xt)).flatten(1).pow(2).sum(1)


def test_layer_output_is_the_layer_and_skips_the_rest():
    model = cnn(0)
    x = torch.rand(4, 1, 28, 28)
    calls = []
    handle = model.head.conv3.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = layer_output(model, x, LAYER)
    finally:
        handle.remove()
    assert torch.equal(out, model.features(x))
    assert calls == [], "the layers above the distillation layer must not run"
    with pytest.raises(DecorrError, match="no module named"):
        layer_output(model, x, "features.nope")


def test_distillation_moves_features_toward_target_within_the_ball(mnist):
    model = cnn(1)
    xs, xt, _ = batches(mnist, 200)
    eps = 0.15
    x_d = feature_distillation(model, xs, xt, layer=LAYER, eps=eps, steps=20, step_size=3 / 255)
    before, after = distance(model, xs, xt), distance(model, x_d, xt)
    assert (after < before).float().mean() > 0.95
    assert after.mean() < 0.6 * before.mean()
    assert (x_d - xs).abs().max() <= eps + 1e-6
    assert x_d.min() >= 0 and x_d.max() <= 1
    # With random start and momentum the result stays in the ball and still gets closer.
    gen = torch.Generator().manual_seed(0)
    x_m = feature_distillation(model, xs, xt, layer=LAYER, eps=eps, steps=20, step_size=3 / 255,
                               random_start=True, momentum=1.0, generator=gen)
    assert (x_m - xs).abs().max() <= eps + 1e-6 and x_m.min() >= 0 and x_m.max() <= 1
    assert distance(model, x_m, xt).mean() < 0.6 * before.mean()


def project(xs: torch.Tensor, x_new: torch.Tensor, eps: float) -> torch.Tensor:
    """torchattacks' order: clip the perturbation to the ball, then the image to [0, 1]."""
    return torch.clamp(xs + torch.clamp(x_new - xs, min=-eps, max=eps), min=0, max=1)


def test_one_distillation_step_by_hand(mnist):
    model = cnn(2)
    xs, xt, _ = batches(mnist, 50)
    eps, alpha = 0.1, 0.05
    x = xs.clone().requires_grad_(True)
    # Oracle: the features straight from the model's own feature extractor (no hooks).
    loss = (model.features(x) - model.features(xt).detach()).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, x)
    expected = project(xs, xs - alpha * grad.sign(), eps)
    got = feature_distillation(model, xs, xt, layer=LAYER, eps=eps, steps=1, step_size=alpha)
    assert torch.equal(got, expected)
    # Two steps: the second step's projection clips to the ball around xs.
    x2 = expected.clone().requires_grad_(True)
    (grad2,) = torch.autograd.grad((model.features(x2) - model.features(xt).detach()).pow(2).sum(), x2)
    expected2 = project(xs, expected - alpha * grad2.sign(), eps)
    got2 = feature_distillation(model, xs, xt, layer=LAYER, eps=eps, steps=2, step_size=alpha)
    assert torch.equal(got2, expected2)


def test_sum_or_mean_of_the_feature_loss_gives_the_same_signed_steps(mnist):
    model = cnn(3)
    xs, xt, ys = batches(mnist, 100)
    target = model.features(xt).detach()
    mean_loss = lambda x, _y: -(model.features(x) - target).pow(2).mean()  # noqa: E731
    for momentum in (0.0, 1.0):
        ours = feature_distillation(model, xs, xt, layer=LAYER, eps=0.15, steps=10, step_size=3 / 255,
                                    momentum=momentum)
        by_mean = pgd(mean_loss, xs, ys, eps=0.15, steps=10, step_size=3 / 255, random_start=False,
                      momentum=momentum)
        # Without momentum the steps are identical; with it rounding in the L1 normalisation may flip
        # the sign of a vanishing accumulated gradient at a handful of pixels.
        same = (ours == by_mean).float().mean()
        assert same == 1.0 if momentum == 0 else same > 0.999


class Recorder(nn.Module):
    """Wraps a model and keeps the inputs of its train-mode forward passes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.append(x.detach().clone())
        return self.model(x)


def test_three_models_each_learn_only_from_the_two_others(mnist):
    xs, xt, ys = batches(mnist, 64)
    models = [Recorder(cnn(10 + i)) for i in range(3)]
    before = [copy.deepcopy(m.model) for m in models]
    layer = f"model.{LAYER}"
    config = DvergeConfig(eps=0.15, steps=3, step_size=3 / 255)
    # The oracle: each model's distilled examples computed on their own, before the step.
    distilled = [feature_distillation(b, xs, xt, layer=LAYER, eps=0.15, steps=3, step_size=3 / 255) for b in before]
    lr = 0.5
    optimizer = torch.optim.SGD([p for m in models for p in m.parameters()], lr=lr)
    terms = dverge_step(models, optimizer, xs, ys, xt, config, [layer] * 3)

    for j, m in enumerate(models):
        assert len(m.seen) == 1, "one training forward per model"
        others = torch.cat([distilled[i] for i in range(3) if i != j])
        assert torch.equal(m.seen[0], others), f"model {j} must see exactly the others' distilled examples"
        # Its update is the SGD step on mean_{i != j} CE(f_j(x_d^i), ys), computed by hand.
        reference = copy.deepcopy(before[j]).train()
        loss = sum(F.cross_entropy(reference(distilled[i]), ys) for i in range(3) if i != j) / 2
        assert float(terms[f"ce_distilled_model{j}"]) == pytest.approx(float(loss.detach()), rel=1e-5)
        loss.backward()
        for (name, p_new), p_ref in zip(m.model.named_parameters(), reference.parameters()):
            expected = p_ref.detach() - lr * p_ref.grad
            assert torch.allclose(p_new, expected, atol=1e-6), f"model {j} {name}"
    assert float(terms["loss"]) == pytest.approx(sum(float(terms[f"ce_distilled_model{j}"]) for j in range(3)), rel=1e-6)


def test_plus_adversarial_adds_each_models_own_examples_with_weight():
    torch.manual_seed(0)
    models = [cnn(20), cnn(21)]
    ys = torch.randint(0, 10, (8,))
    distilled = [torch.rand(8, 1, 28, 28) for _ in models]
    adversarial = [torch.rand(8, 1, 28, 28) for _ in models]
    loss, terms = dverge_objective(models, distilled, ys, adversarial=adversarial, adv_weight=0.3)
    expected = sum(F.cross_entropy(models[j](distilled[1 - j]), ys) + 0.3 * F.cross_entropy(models[j](adversarial[j]), ys)
                   for j in range(2))
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(terms["ce_adv_model1"]) == pytest.approx(float(F.cross_entropy(models[1](adversarial[1]), ys).detach()), rel=1e-5)
    with pytest.raises(DecorrError, match="at least 2 models"):
        dverge_objective(models[:1], distilled[:1], ys)


def test_plus_adversarial_step_trains_on_own_pgd_examples(mnist):
    xs, xt, ys = batches(mnist, 32)
    models = [Recorder(cnn(22)), Recorder(cnn(23))]
    before = [copy.deepcopy(m.model) for m in models]
    config = DvergeConfig(steps=1, plus_adv=True, adv_weight=0.5, adv_steps=2, adv_eps=0.1, adv_step_size=0.05)
    optimizer = torch.optim.SGD([p for m in models for p in m.parameters()], lr=0.0)
    gen = torch.Generator().manual_seed(3)
    terms = dverge_step(models, optimizer, xs, ys, xt, config, [f"model.{LAYER}"] * 2, generator=gen)
    for j, m in enumerate(models):
        seen = m.seen[0]
        assert seen.shape[0] == 2 * len(xs), "the other's distilled batch and the model's own PGD batch"
        own_adv = seen[len(xs):]
        assert (own_adv - xs).abs().max() <= 0.1 + 1e-6
        # Its own adversarial examples fool it more than the natural images do.
        with torch.no_grad():
            adv_ce = F.cross_entropy(before[j](own_adv), ys)
            assert adv_ce > F.cross_entropy(before[j](xs), ys)
        assert float(terms[f"ce_adv_model{j}"]) == pytest.approx(float(adv_ce), rel=1e-5)


def test_layer_choice_fixed_or_drawn_per_epoch():
    layers = ("features.pool1", "features.pool2", "head.relu3")
    draws = [choose_layer(layers, 0, epoch) for epoch in range(30)]
    assert draws == [choose_layer(layers, 0, epoch) for epoch in range(30)], "reproducible from (seed, epoch)"
    assert set(draws) == set(layers)
    assert draws != [choose_layer(layers, 1, epoch) for epoch in range(30)]
    assert choose_layer(("features.pool2",), 0, 5) == "features.pool2"
    assert choose_layer((), 0, 5) is None


@pytest.mark.parametrize("bad", [dict(batches_per_epoch=0), dict(eval_eps=()), dict(layers=("a", "a")),
                                 dict(steps=-1), dict(momentum=-1.0)])
def test_bad_settings_are_one_line_errors(bad):
    with pytest.raises(DecorrError):
        DvergeConfig(**bad)


def make_pair(path: Path) -> Path:
    models = {"model0": cnn(30), "model1": cnn(31)}
    entry = model_entry("mnist_cnn")
    save_checkpoint(path, models, {"kind": "pair", "models": {n: entry for n in models}, "dataset": "mnist",
                                   "epoch": 0})
    return path


TINY = dict(batch_size=500, batches_per_epoch=1, steps=2, train_subset=1000, eval_subset=100, eval_eps=(0.1, 0.15), eval_steps=2,
            eval_features=False, accuracy_subset=100)


def test_run_logs_every_epoch_and_resumes_exactly(mnist, tmp_path):
    pair = make_pair(tmp_path / "pair")
    config = DvergeConfig(epochs=2, **TINY)
    full = train_dverge(config, [str(pair)], RunOptions(run_dir=tmp_path / "full", no_tensorboard=True),
                        monitors=[TransferMonitor(config)])
    assert [e["epoch"] for e in full["epochs"]] == [0, 1, 2]
    on_disk = json.loads((tmp_path / "full" / "dverge.json").read_text())
    assert on_disk["epochs"][2]["metrics"]["transfer/eps0.1/model0-model1"] == full["epochs"][2]["metrics"]["transfer/eps0.1/model0-model1"]
    for e in on_disk["epochs"]:
        for eps in ("0.1", "0.15"):
            assert 0.0 <= e["metrics"][f"transfer/eps{eps}/mean"] <= 1.0
        assert 0.0 <= e["metrics"]["acc/model0"] <= 1.0
    table = format_history(full).splitlines()
    assert len(table) == 2 + 3 and table[0].startswith("| epoch | T eps 0.1 | T eps 0.15 | acc model0")
    checkpoint = load_checkpoint(tmp_path / "full")
    assert checkpoint.config["kind"] == "dverge" and checkpoint.config["epoch"] == 2
    assert [h["epoch"] for h in checkpoint.config["history"]] == [0, 1, 2]
    assert checkpoint.config["models"]["model1"]["feature_layer"] == LAYER

    first = DvergeConfig(epochs=1, **TINY)
    train_dverge(first, [str(pair)], RunOptions(run_dir=tmp_path / "split", no_tensorboard=True),
                 monitors=[TransferMonitor(first)])
    resumed = train_dverge(config, [str(pair)], RunOptions(run_dir=tmp_path / "split", resume=True, no_tensorboard=True),
                           monitors=[TransferMonitor(config)])
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1, 2]
    for name in ("model0", "model1"):
        want = load_file(str(tmp_path / "full" / "checkpoint" / f"{name}.safetensors"))
        got = load_file(str(tmp_path / "split" / "checkpoint" / f"{name}.safetensors"))
        for key in want:
            assert torch.equal(want[key], got[key]), f"{name}.{key} differs after resume"


def test_script_rejects_a_single_model_with_one_line(tmp_path, capsys):
    single = tmp_path / "single"
    save_checkpoint(single, {"model0": cnn(40)}, {"kind": "classifier", "models": {"model0": model_entry("mnist_cnn")},
                                                 "dataset": "mnist"})
    with pytest.raises(SystemExit) as exit_info:
        dverge_script.main(["--init", str(single), "--run-dir", str(tmp_path / "run"), "--no-tensorboard"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "at least 2 models" in lines[0]
    assert not (tmp_path / "run").exists()
