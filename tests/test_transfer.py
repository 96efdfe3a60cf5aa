"""Transfer evaluation: matrix against a direct per-source computation, one pass against pair by pair,
feature statistics against decorr.loss, the script's files, overwrite refusal and error messages."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from decorr.attacks import ce_loss, fgsm, pgd, skip_gradient
from decorr.checkpoint import model_entry, save_checkpoint
from decorr.evaluation.compare import unpack_outcomes
from decorr.data import iterate_batches, to_float
from decorr.errors import DecorrError
from decorr.features import feature_diagnostics, get_features
from decorr.loss import parameter_distance, pca_pearson, pearson, r_squared
from decorr.models import create_model
from decorr.evaluation.report import PAIRS_CSV_HEADER, TRANSFER_CSV_HEADER
from decorr.evaluation.stats import wilson_interval
from decorr.evaluation.selection import pair_transfer
from decorr.evaluation.records import first_pc_scores
from transfer_helpers import attack_generator, craft, evaluate, evaluate_specs, load_named_models, options, record

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("eval_transfer_script", REPO / "eval" / "transfer.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def checkpoints(mnist, tmp_path_factory):
    """A briefly trained mnist_fc pair (feature layer 200 wide) and an untrained mnist_cnn."""
    root = tmp_path_factory.mktemp("transfer_ckpts")
    torch.manual_seed(0)
    models = {"model0": create_model("mnist_fc"), "model1": create_model("mnist_fc")}
    optimizer = torch.optim.Adam([p for m in models.values() for p in m.parameters()], lr=5e-3)
    for x, y in iterate_batches(mnist.train.subset(1000), 100, seed=0):
        loss = sum(F.cross_entropy(m(x), y) for m in models.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_checkpoint(root / "fc_pair" / "checkpoint", models,
                    {"kind": "pair", "models": {n: model_entry("mnist_fc") for n in models}, "dataset": "mnist", "epoch": 1})
    torch.manual_seed(3)
    save_checkpoint(root / "cnn" / "checkpoint", {"model0": create_model("mnist_cnn")},
                    {"kind": "single", "models": {"model0": model_entry("mnist_cnn")}, "dataset": "mnist", "epoch": 0})
    return {"pair": str(root / "fc_pair"), "cnn": str(root / "cnn"), "root": root}


def _xy(mnist, n):
    split = mnist.test.subset(n)
    return to_float(split.images), split.labels


def test_load_named_models_names_and_selection(checkpoints):
    models, entries = load_named_models([checkpoints["pair"], checkpoints["cnn"] + "/checkpoint"])
    assert list(models) == ["fc_pair/model0", "fc_pair/model1", "cnn/model0"]
    assert entries["cnn/model0"]["arch"] == "mnist_cnn" and entries["fc_pair/model1"]["feature_layer"] == "blocks.3"
    assert all(not m.training for m in models.values())
    only, _ = load_named_models([checkpoints["pair"] + ":model1"])
    assert list(only) == ["fc_pair/model1"]
    assert torch.equal(only["fc_pair/model1"].fc.weight, models["fc_pair/model1"].fc.weight)
    with pytest.raises(DecorrError, match="no model 'model7'"):
        load_named_models([checkpoints["pair"] + ":model7"])
    with pytest.raises(DecorrError, match="given twice"):
        load_named_models([checkpoints["pair"], checkpoints["pair"] + "/checkpoint"])


def test_matrix_matches_direct_per_source_computation(checkpoints, mnist):
    """Every number against crafting each source's examples with pgd() and counting by hand (numpy)."""
    models, entries = load_named_models([checkpoints["pair"], checkpoints["cnn"]])
    x, y = _xy(mnist, 90)
    eps_list, steps, step_size, batch = (0.1, 0.2), 3, 0.04, 40  # batches of 40, 40, 10
    result = evaluate(models, (x, y), attack="pgd", eps_list=eps_list, steps=steps, step_size=step_size,
                               seed=7, batch_size=batch, features=False)
    names = list(models)
    assert result["sources"] == names and result["targets"] == names
    y_np = y.numpy()
    for row, eps in zip(result["by_eps"], eps_list):
        for src in names:
            parts = []
            for index, start in enumerate(range(0, len(y), batch)):
                generator = attack_generator(7, src, eps, index)
                parts.append(pgd(ce_loss(models[src]), x[start:start + batch], y[start:start + batch], eps=eps,
                                 steps=steps, step_size=step_size, generator=generator))
            x_adv = torch.cat(parts)
            assert (x_adv - x).abs().max() <= eps + 1e-6
            with torch.no_grad():
                wrong = {name: (m(x_adv).argmax(1).numpy() != y_np) for name, m in models.items()}
            assert row["white_box_accuracy"][src] == pytest.approx(1 - wrong[src].mean(), abs=1e-12)
            assert row["source_fooled"][src] == wrong[src].sum()
            for tgt in names:
                assert row["accuracy"][src][tgt] == pytest.approx(1 - wrong[tgt].mean(), abs=1e-12)
                if tgt == src:
                    assert row["transfer"][src][tgt] is None
                    continue
                both = int((wrong[src] & wrong[tgt]).sum())
                assert row["transferred"][src][tgt] == both
                assert row["transfer"][src][tgt] == pytest.approx(both / wrong[src].sum(), abs=1e-12)
        for pair in row["pairs"]:
            a, b = pair["a"], pair["b"]
            assert pair["mean"] == pytest.approx(0.5 * (row["transfer"][a][b] + row["transfer"][b][a]), abs=1e-12)
    # The two epsilons differ, and the directions of a pair differ: nothing is copied across.
    first, second = result["by_eps"]
    assert first["source_fooled"] != second["source_fooled"]
    assert any(row["transfer"][a][b] != row["transfer"][b][a] for row in result["by_eps"]
               for a in names for b in names if a != b)
    assert set(pair_transfer(result)) == {(p["a"], p["b"]) for p in result["pairs"]}


def test_one_pass_equals_pair_by_pair(checkpoints, mnist):
    split = mnist.test.subset(60)
    kwargs = dict(attack="pgd", eps_list=[0.15], steps=2, step_size=0.05, seed=1, batch_size=25, features=False)
    paths = [checkpoints["pair"] + ":model0", checkpoints["pair"] + ":model1", checkpoints["cnn"]]
    full = evaluate_specs(paths, split, **kwargs)
    for i in range(3):
        for j in range(i + 1, 3):
            pair = evaluate_specs([paths[i], paths[j]], split, **kwargs)
            a, b = pair["targets"]
            for ours, theirs in zip(full["by_eps"], pair["by_eps"]):
                for src, tgt in ((a, b), (b, a)):
                    assert ours["transfer"][src][tgt] == theirs["transfer"][src][tgt]
                    assert ours["transferred"][src][tgt] == theirs["transferred"][src][tgt]
                    assert ours["white_box_accuracy"][src] == theirs["white_box_accuracy"][src]


def test_only_correct_equals_evaluating_the_selected_samples(checkpoints, mnist):
    """SGM paper's protocol: the same numbers as a run on the samples every model gets right, chosen by hand."""
    models, _ = load_named_models([checkpoints["pair"], checkpoints["cnn"]])
    split = mnist.test.subset(120)
    x, y = to_float(split.images), split.labels
    with torch.no_grad():
        right = torch.stack([m(x).argmax(1) == y for m in models.values()]).all(0)
    kept = right.nonzero().flatten()
    assert 0 < len(kept) < len(y)  # the untrained CNN gets some right, not all: a real selection
    kwargs = dict(attack="pgd", eps_list=[0.1], steps=2, step_size=0.05, seed=2, batch_size=50, features=False)
    ours = evaluate(models, split, only_correct=True, **kwargs)
    by_hand = evaluate(models, split.subset(kept), **kwargs)
    assert ours["settings"]["num_samples"] == len(kept) and ours["settings"]["num_candidates"] == len(y)
    assert ours["settings"]["only_correct"] is True and by_hand["settings"]["only_correct"] is False
    assert ours["by_eps"] == by_hand["by_eps"]
    for name, model in models.items():
        with torch.no_grad():
            every = (model(x).argmax(1) == y).double().mean().item()
        assert ours["models"][name]["natural_accuracy"] == pytest.approx(every, abs=1e-12)
        assert by_hand["models"][name]["natural_accuracy"] == 1.0
    wrong_labels = (models["cnn/model0"](x).argmax(1) + 1) % 10
    with pytest.raises(DecorrError, match="none of the 120 samples is classified correctly"):
        evaluate(models, (x, wrong_labels.detach()), only_correct=True, **kwargs)


def test_feature_statistics_match_decorr_loss(checkpoints, mnist):
    models, entries = load_named_models([checkpoints["pair"], checkpoints["cnn"]])
    x, y = _xy(mnist, 260)  # more samples than the 200 features of mnist_fc, fewer than the 784 of mnist_cnn
    layers = {k: e["feature_layer"] for k, e in entries.items()}
    archs = {k: e["arch"] for k, e in entries.items()}
    result = evaluate(models, (x, y), feature_layers=layers, archs=archs, attack="fgsm", eps_list=[0.1],
                               batch_size=100)
    a, b, c = "fc_pair/model0", "fc_pair/model1", "cnn/model0"
    pairs = {(p["a"], p["b"]): p for p in result["pairs"]}
    assert not pairs[(a, c)]["same_arch"] and pairs[(a, c)]["natural_features"] is None
    assert pairs[(a, c)]["parameter_distance"] is None
    record = pairs[(a, b)]
    with torch.no_grad():
        za, zb = get_features(models[a], x, layers[a]), get_features(models[b], x, layers[b])
        distance = float(parameter_distance(models[a], models[b]))
    natural = record["natural_features"]
    assert natural["r2"] == pytest.approx(r_squared(za, zb), rel=1e-5)
    assert natural["r2_reverse"] == pytest.approx(r_squared(zb, za), rel=1e-5)
    assert natural["pca_pearson"] == pytest.approx(pca_pearson(za, zb), rel=1e-6)
    assert natural["num_features"] == 200 and natural["num_samples"] == 260
    assert record["parameter_distance"] == pytest.approx(distance, rel=1e-6)
    for name, z in ((a, za), (b, zb)):  # per-model diagnostics of the natural features
        expected = feature_diagnostics(z)
        assert result["models"][name]["active_features"] == expected["active_features"]
        assert result["models"][name]["effective_rank"] == pytest.approx(expected["effective_rank"], rel=1e-6)
    assert "effective_rank" not in result["models"][c]  # its features are not evaluated (no partner)
    x_adv = fgsm(ce_loss(models[a]), x, y, eps=0.1)
    with torch.no_grad():
        za_adv, zb_adv = get_features(models[a], x_adv, layers[a]), get_features(models[b], x_adv, layers[b])
    (eps_row,) = result["by_eps"]
    on_a = next(p for p in eps_row["pairs"] if (p["a"], p["b"]) == (a, b))["on_adv_of_a"]
    assert on_a["r2"] == pytest.approx(r_squared(za_adv, zb_adv), rel=1e-5)
    assert on_a["pca_pearson"] == pytest.approx(pca_pearson(za_adv, zb_adv), rel=1e-6)
    assert on_a["r2"] != pytest.approx(natural["r2"], abs=1e-6)


def test_r2_is_null_with_too_few_samples(checkpoints, mnist):
    models, entries = load_named_models([checkpoints["pair"]])
    result = evaluate(models, _xy(mnist, 150), feature_layers={k: e["feature_layer"] for k, e in entries.items()},
                               attack="fgsm", eps_list=[0.1])
    natural = result["pairs"][0]["natural_features"]
    assert natural["r2"] is None and natural["pca_pearson"] is not None
    assert any("R^2 needs more than 201 samples" in note for note in result["notes"])


def test_first_pc_scores_give_pca_pearson():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(300, 20, generator=g) * torch.linspace(3, 0.1, 20)
    z2 = z1 @ torch.randn(20, 30, generator=g) + 2 * torch.randn(300, 30, generator=g)
    assert abs(pearson(first_pc_scores(z1), first_pc_scores(z2))) == pytest.approx(pca_pearson(z1, z2), rel=1e-9)


def test_l2_scaling_and_radius(checkpoints, mnist):
    shape = (1, 28, 28)
    side = record(options(norm="l2", eps=(0.1,)), shape)
    assert side["attack_eps"] == [pytest.approx(0.1 * math.sqrt(28))]
    # step sizes scale as the radius does: 3/255 * sqrt(28) for PGD's default step
    assert options(norm="l2", eps=(0.1,)).scale(shape) * 3 / 255 == pytest.approx(3 / 255 * math.sqrt(28))
    assert record(options(norm="l2", eps=(0.1,), l2_scale="sqrt-dim"), shape)["attack_eps"] == [pytest.approx(2.8)]
    assert record(options(norm="l2", eps=(0.1,), l2_scale="none"), shape)["attack_eps"] == [0.1]
    assert record(options(norm="linf", eps=(0.1,), l2_scale="sqrt-dim"), shape)["attack_eps"] == [0.1]
    models, _ = load_named_models([checkpoints["pair"] + ":model0"])
    model = models["fc_pair/model0"]
    x, y = _xy(mnist, 20)
    settings = options(norm="l2", eps=(0.1,), steps=5)
    x_adv = craft(model, x, y, settings, 0.1, attack_generator(0, "m", 0.1, 0))
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert norms.max() <= 0.1 * math.sqrt(28) + 1e-5 and norms.max() > 0.1 * math.sqrt(28) * 0.5


def test_sgm_with_residual_surrogate(cifar_subset):
    torch.manual_seed(0)
    surrogate = create_model("resnet20").eval()
    target = create_model("vgg_small").eval()
    split = cifar_subset.test.subset(12)
    x, y = to_float(split.images), split.labels
    settings = options(attack="sgm", gamma=0.5, eps=(8 / 255,), steps=2, step_size=2 / 255)
    ours = craft(surrogate, x, y, settings, 8 / 255, attack_generator(0, "s", 8 / 255, 0))
    with skip_gradient(surrogate, 0.5):
        direct = pgd(ce_loss(surrogate), x, y, eps=8 / 255, steps=2, step_size=2 / 255,
                     generator=attack_generator(0, "s", 8 / 255, 0))
    plain = pgd(ce_loss(surrogate), x, y, eps=8 / 255, steps=2, step_size=2 / 255,
                generator=attack_generator(0, "s", 8 / 255, 0))
    assert torch.equal(ours, direct) and not torch.equal(ours, plain)
    result = evaluate({"vgg": target}, (x, y), surrogates={"resnet": surrogate}, attack="sgm", gamma=0.5,
                               eps_list=[8 / 255], steps=2, step_size=2 / 255, batch_size=12)
    assert result["sources"] == ["resnet"] and result["targets"] == ["vgg"]
    assert result["models"]["resnet"]["role"] == "source" and result["models"]["vgg"]["role"] == "target"
    (row,) = result["by_eps"]
    assert set(row["transfer"]) == {"resnet"} and set(row["transfer"]["resnet"]) == {"vgg"}
    sgm = result["settings"]["attacks"][0]["components"]["sgm"]
    assert sgm["gamma"] == 0.5
    assert sgm["exclude"] == "first-of-stage"  # the SGM authors' rule by default
    # --sgm-exclude none decays every block, as skip_gradient(exclude="none") does; it is another attack.
    every = options(attack="sgm", gamma=0.5, eps=(8 / 255,), steps=2, step_size=2 / 255, sgm_exclude="none")
    ours_every = craft(surrogate, x, y, every, 8 / 255, attack_generator(0, "s", 8 / 255, 0))
    with skip_gradient(surrogate, 0.5, exclude="none"):
        direct_every = pgd(ce_loss(surrogate), x, y, eps=8 / 255, steps=2, step_size=2 / 255,
                           generator=attack_generator(0, "s", 8 / 255, 0))
    assert torch.equal(ours_every, direct_every) and not torch.equal(ours_every, ours)
    assert every.parsed_attacks()[0].describe()["components"]["sgm"]["exclude"] == "none"
    assert "sgm" not in options(attack="pgd").parsed_attacks()[0].describe()["components"]
    with pytest.raises(DecorrError, match="--sgm-exclude"):
        options(attack="sgm", sgm_exclude="first")


def test_script_writes_results_and_refuses_overwrite(checkpoints, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = [checkpoints["pair"], "--num-samples", "50", "--steps", "2", "--eps", "0.05", "3/30",
            "--batch-size", "25", "--out", str(out), "--tensorboard"]
    script.main(argv)
    printed = capsys.readouterr().out
    assert "transfer rate" in printed and "fc_pair/model0" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"format", "settings", "models", "sources", "targets", "pairs", "by_eps", "worst_case",
                            "notes", "timing", "config"}
    assert results["format"] == "decorr-transfer/2"
    assert results["settings"]["eps"] == [0.05, 0.1] and results["settings"]["dataset"] == "mnist"
    assert set(results["by_eps"][0]) == {"attack", "eps", "attack_eps", "white_box_accuracy", "accuracy", "transfer",
                                         "source_fooled", "transferred", "pairs", "white_box_accuracy_ci95",
                                         "white_box_correct", "accuracy_ci95", "correct", "transfer_ci95", "fooled",
                                         "detection", "source_correct"}
    assert len(results["settings"]["samples_sha256"]) == 64
    row, model = results["by_eps"][0], results["models"]["fc_pair/model0"]
    assert model["natural_accuracy"] == model["natural_correct"] / 50
    assert model["natural_accuracy_ci95"] == pytest.approx(list(wilson_interval(model["natural_correct"], 50)))
    src, tgt = "fc_pair/model0", "fc_pair/model1"
    assert row["transfer_ci95"][src][src] is None and row["detection"] == {}
    assert row["transfer_ci95"][src][tgt] == pytest.approx(
        list(wilson_interval(row["transferred"][src][tgt], row["source_fooled"][src])))
    assert row["accuracy_ci95"][src][tgt] == pytest.approx(list(wilson_interval(row["correct"][src][tgt], 50)))
    assert row["white_box_accuracy_ci95"][src] == pytest.approx(list(wilson_interval(row["white_box_correct"][src], 50)))
    assert unpack_outcomes(row["fooled"][src][src], 50).sum() == row["source_fooled"][src]
    assert set(results["pairs"][0]) == {"a", "b", "same_arch", "parameter_distance", "natural_features"}
    lines = (out / "transfer.csv").read_text().splitlines()
    assert lines[0].split(",") == TRANSFER_CSV_HEADER and len(lines) == 1 + 2 * 2 * 2
    lines = (out / "pairs.csv").read_text().splitlines()
    assert lines[0].split(",") == PAIRS_CSV_HEADER and len(lines) == 1 + 2
    for name in ("heatmap_pgd_linf_eps0.05.png", "heatmap_pgd_linf_eps0.1.png", "transfer_vs_eps_pgd_linf.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "table.txt").read_text().startswith("50 samples")

    before = (out / "results.json").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "already exists" in err and "--overwrite" in err and "\n" not in err
    assert (out / "results.json").read_bytes() == before
    script.main(argv[:-1] + ["--overwrite", "--no-plots", "--eps", "0.2"])
    assert json.loads((out / "results.json").read_text())["settings"]["eps"] == [0.2]
    script.main(argv[:-1] + ["--overwrite", "--no-plots", "--only-correct"])
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["only_correct"] is True and settings["num_candidates"] == 50
    assert 0 < settings["num_samples"] < 50
    assert (out / "table.txt").read_text().startswith(f"{settings['num_samples']} of 50 samples (those every model")


def _script_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_errors_are_one_line(checkpoints, tmp_path, capsys):
    common = ["--num-samples", "20", "--steps", "1", "--no-plots"]
    assert "does not exist" in _script_error([str(tmp_path / "missing"), "--out", str(tmp_path / "o1"), *common], capsys)
    err = _script_error([checkpoints["pair"], "--eps", "-0.1", "--out", str(tmp_path / "o2"), *common], capsys)
    assert "epsilon must be >= 0" in err and not (tmp_path / "o2").exists()  # refused before any work
    err = _script_error([checkpoints["cnn"], "--attack", "sgm", "--out", str(tmp_path / "o3"), *common], capsys)
    assert "cnn/model0" in err and "no residual units" in err
    err = _script_error([checkpoints["pair"], "--gamma", "0.5", "--out", str(tmp_path / "o4"), *common], capsys)
    assert "--attack sgm" in err
    job = script.job_from_args(script.parse_args([checkpoints["pair"], "--attack", "sgm"]))
    assert job.options.parsed_attacks()[0].modifiers[0].exclude == "first-of-stage"  # the SGM authors' rule
    job = script.job_from_args(script.parse_args([checkpoints["pair"], "--attack", "sgm", "--sgm-exclude", "none"]))
    assert job.options.parsed_attacks()[0].modifiers[0].exclude == "none"
    # Weights that do not fit the declared architecture: mnist_cnn weights declared as mnist_fc.
    bad = tmp_path / "bad" / "checkpoint"
    save_checkpoint(bad, {"model0": create_model("mnist_cnn")},
                    {"models": {"model0": model_entry("mnist_fc")}, "dataset": "mnist"})
    err = _script_error([str(bad.parent), "--out", str(tmp_path / "o5"), *common], capsys)
    assert "do not match architecture 'mnist_fc'" in err
    with pytest.raises(DecorrError, match="--momentum sets pgd, but no attack of this run uses it"):
        options(attack="fgsm", momentum=1.0)  # FGSM is one plain step: no momentum


def test_script_runs_standalone(tmp_path):
    """The file itself (python eval/transfer.py): a missing checkpoint is one line and exit status 2."""
    import os
    import subprocess
    import sys

    # This checkout's decorr, not whichever one the environment has installed (a worktree shares the venv).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(REPO / "eval" / "transfer.py"), str(tmp_path / "missing"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: checkpoint") and "does not exist" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
