"""Ensembles in the transfer evaluation: attacks against hand-written losses, predictions against hand
computations from the members' softmax, detection records, the script's options and the paired comparison."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from decorr.attacks import ce_loss, pgd, skip_gradient
from decorr.checkpoint import model_entry, save_checkpoint
from decorr.evaluation.compare import compare_results, pack_outcomes, unpack_outcomes
from decorr.data import iterate_batches, to_float
from decorr.evaluation.ensembles import Ensemble, load_ensembles, parse_ensemble_spec
from decorr.errors import DecorrError
from decorr.models import create_model
from decorr.evaluation.report import DETECTION_CSV_HEADER
from decorr.evaluation.stats import wilson_interval
from transfer_helpers import attack_generator, craft, evaluate, evaluate_specs, options

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"eval_{name}_script", REPO / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="module")
def trained(mnist, tmp_path_factory):
    """Three briefly trained mnist_fc (different seeds), saved as one pair and one single checkpoint."""
    root = tmp_path_factory.mktemp("ensemble_ckpts")
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = create_model("mnist_fc")
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
        for x, y in iterate_batches(mnist.train.subset(600), 100, seed=seed):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        models.append(model.eval())
    save_checkpoint(root / "pair" / "checkpoint", {"model0": models[0], "model1": models[1]},
                    {"kind": "pair", "models": {n: model_entry("mnist_fc") for n in ("model0", "model1")},
                     "dataset": "mnist", "epoch": 1})
    save_checkpoint(root / "single" / "checkpoint", {"model0": models[2]},
                    {"kind": "single", "models": {"model0": model_entry("mnist_fc")}, "dataset": "mnist", "epoch": 1})
    return {"models": models, "pair": str(root / "pair"), "single": str(root / "single")}


def _xy(mnist, n):
    split = mnist.test.subset(n)
    return to_float(split.images), split.labels


SETTINGS = dict(eps=(0.1,), steps=4, step_size=0.03)


def test_surrogate_ensemble_of_one_model_is_the_plain_attack(trained, mnist):
    x, y = _xy(mnist, 30)
    model = trained["models"][0]
    for extra in ({}, {"momentum": 1.0, "diversity": 0.5}):
        settings = options(**SETTINGS, **extra)
        ours = craft(Ensemble({"m": model}, objective="mean_ce"), x, y, settings, 0.1, attack_generator(0, "s", 0.1, 0))
        plain = craft(model, x, y, settings, 0.1, attack_generator(0, "s", 0.1, 0))
        assert torch.equal(ours, plain)


def test_surrogate_ensemble_of_two_is_pgd_on_the_mean_loss(trained, mnist):
    x, y = _xy(mnist, 30)
    a, b = trained["models"][:2]
    settings = options(**SETTINGS, momentum=1.0, diversity=0.5, ti_kernel=3)
    ours = craft(Ensemble({"a": a, "b": b}, objective="mean_ce"), x, y, settings, 0.1,
                 attack_generator(0, "s", 0.1, 0))

    def mean_loss(x_in, y_in):
        return (F.cross_entropy(a(x_in), y_in) + F.cross_entropy(b(x_in), y_in)) / 2

    hand = pgd(mean_loss, x, y, eps=0.1, steps=4, step_size=0.03, momentum=1.0, input_diversity=0.5,
               translation_kernel=3, generator=attack_generator(0, "s", 0.1, 0))
    assert torch.equal(ours, hand)
    single = pgd(ce_loss(a), x, y, eps=0.1, steps=4, step_size=0.03, momentum=1.0, input_diversity=0.5,
                 translation_kernel=3, generator=attack_generator(0, "s", 0.1, 0))
    assert not torch.equal(ours, single)


def test_sgm_decays_every_residual_member(cifar_subset):
    torch.manual_seed(0)
    r1, r2 = create_model("resnet20").eval(), create_model("resnet20").eval()
    split = cifar_subset.test.subset(6)
    x, y = to_float(split.images), split.labels
    settings = options(attack="sgm", gamma=0.5, eps=(8 / 255,), steps=2, step_size=2 / 255)
    ours = craft(Ensemble({"r1": r1, "r2": r2}, objective="mean_ce"), x, y, settings, 8 / 255,
                 attack_generator(0, "s", 8 / 255, 0))
    with skip_gradient(r1, 0.5), skip_gradient(r2, 0.5):
        hand = pgd(lambda xi, yi: (F.cross_entropy(r1(xi), yi) + F.cross_entropy(r2(xi), yi)) / 2, x, y,
                   eps=8 / 255, steps=2, step_size=2 / 255, generator=attack_generator(0, "s", 8 / 255, 0))
    assert torch.equal(ours, hand)
    one = craft(Ensemble({"r1": r1}, objective="mean_ce"), x, y, settings, 8 / 255, attack_generator(0, "t", 8 / 255, 0))
    assert torch.equal(one, craft(r1, x, y, settings, 8 / 255, attack_generator(0, "t", 8 / 255, 0)))


def test_white_box_attack_is_pgd_on_log_mean_probability(trained, mnist):
    x, y = _xy(mnist, 30)
    a, b = trained["models"][:2]
    ensemble = Ensemble({"a": a, "b": b})
    with torch.no_grad():
        hand_output = torch.log((F.softmax(a(x), 1) + F.softmax(b(x), 1)) / 2)
        assert torch.allclose(ensemble(x), hand_output, atol=1e-5)
    settings = options(**SETTINGS)
    ours = craft(ensemble, x, y, settings, 0.1, attack_generator(0, "e", 0.1, 0))

    def hand_loss(x_in, y_in):
        return F.nll_loss(torch.log((F.softmax(a(x_in), 1) + F.softmax(b(x_in), 1)) / 2), y_in)

    hand = pgd(hand_loss, x, y, eps=0.1, steps=4, step_size=0.03, generator=attack_generator(0, "e", 0.1, 0))
    assert torch.equal(ours, hand)
    # A vote ensemble is attacked on the same (prob) loss; a logit ensemble on CE of its mean logits.
    vote = craft(Ensemble({"a": a, "b": b}, rule="vote"), x, y, settings, 0.1, attack_generator(0, "e", 0.1, 0))
    assert torch.equal(vote, hand)
    logit = craft(Ensemble({"a": a, "b": b}, rule="logit"), x, y, settings, 0.1, attack_generator(0, "e", 0.1, 0))
    mean_logits = pgd(lambda xi, yi: F.cross_entropy((a(xi) + b(xi)) / 2, yi), x, y, eps=0.1, steps=4,
                      step_size=0.03, generator=attack_generator(0, "e", 0.1, 0))
    assert torch.equal(logit, mean_logits)


class Fixed(nn.Module):
    """Returns given logits for inputs indexed by their first pixel."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("table", torch.tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.table[x.flatten(1)[:, 0].round().long()]


def test_vote_rule_majority_and_tie_break():
    # Three members, two inputs, three classes. Input 0: 2 votes for class 1, 1 for class 0, whose mean
    # probability is larger (0.475 vs 0.379): the majority wins. Input 1: 2 votes for class 2, class 0 has the
    # larger mean probability. With two members every input is a tie: the larger mean probability wins.
    m1 = Fixed([[0.0, 2.0, 0.0], [4.0, 0.0, 0.0]])
    m2 = Fixed([[0.0, 0.1, 0.0], [0.0, 0.0, 1.0]])
    m3 = Fixed([[20.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    x = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
    assert Ensemble({"1": m1, "2": m2, "3": m3}, rule="vote")(x).argmax(1).tolist() == [1, 2]
    assert Ensemble({"1": m1, "2": m2, "3": m3}, rule="prob")(x).argmax(1).tolist() == [0, 0]
    assert Ensemble({"1": m1, "3": m3}, rule="vote")(x).argmax(1).tolist() == [0, 0]  # ties: mean prob
    with pytest.raises(DecorrError, match="unknown ensemble rule"):
        Ensemble({"1": m1}, rule="median")


def test_ensemble_target_accuracy_and_detection_by_hand(trained, mnist):
    x, y = _xy(mnist, 80)
    a, b, c = trained["models"]
    y_np = y.numpy()
    with torch.no_grad():
        probs = np.stack([F.softmax(m(x), 1).double().numpy() for m in (a, b, c)])
        labels = probs.argmax(2)
    for rule, expected_pred in (("prob", probs.mean(0).argmax(1)), ("logit", None), ("vote", None)):
        ensemble = Ensemble({"a": a, "b": b, "c": c}, rule=rule)
        result = evaluate({"a": a, "ens": ensemble}, (x, y), attack="pgd", eps_list=[0.1], steps=2,
                                   step_size=0.05, batch_size=30, features=False)
        if rule == "logit":
            with torch.no_grad():
                expected_pred = torch.stack([m(x) for m in (a, b, c)]).mean(0).argmax(1).numpy()
        if rule == "vote":
            votes = np.stack([(labels == k).sum(0) for k in range(10)], 1) + probs.mean(0) / 2
            expected_pred = votes.argmax(1)
        record = result["models"]["ens"]
        correct = int((expected_pred == y_np).sum())
        assert record["natural_correct"] == correct and record["natural_accuracy"] == pytest.approx(correct / 80)
        assert record["natural_accuracy_ci95"] == pytest.approx(list(wilson_interval(correct, 80)))
        assert record["members"] == ["a", "b", "c"] and record["rule"] == rule and record["role"] == "target+source"
        assert record["attack_loss"] == ("mean_logits" if rule == "logit" else "log_mean_prob")
        (row,) = result["by_eps"]
        assert set(row["detection"]) == {"a", "ens"} and set(row["detection"]["a"]) == {"ens"}
        d = row["detection"]["a"]["ens"]
        natural_flag = (labels != labels[:1]).any(0)
        assert d["natural_flagged"] == int(natural_flag.sum()) and d["num_natural"] == 80
        assert d["fooled"] == 80 - row["correct"]["a"]["ens"]
        assert (rule == "vote") == any("majority vote" in note for note in result["notes"])
    # The adversarial side by hand: craft on a, flags and scores of the members on the examples.
    x_adv = torch.cat([craft(a, x[s:s + 30], y[s:s + 30], options(eps=(0.1,), steps=2, step_size=0.05), 0.1,
                             attack_generator(0, "a", 0.1, i)) for i, s in enumerate(range(0, 80, 30))])
    with torch.no_grad():
        adv_probs = np.stack([F.softmax(m(x_adv), 1).double().numpy() for m in (a, b, c)])
    adv_labels = adv_probs.argmax(2)
    flag = (adv_labels != adv_labels[:1]).any(0)
    # d is the last rule's record (vote): fooled where the vote is wrong.
    votes = np.stack([(adv_labels == k).sum(0) for k in range(10)], 1) + adv_probs.mean(0) / 2
    fooled = votes.argmax(1) != y_np
    assert d["flagged"] == int(flag.sum()) and d["flagged_fooled"] == int((flag & fooled).sum())
    score_nat = 0.5 * np.abs(probs - probs.mean(0)).sum(2).mean(0)
    score_adv = 0.5 * np.abs(adv_probs - adv_probs.mean(0)).sum(2).mean(0)
    pairs = [(1.0 if p > q else 0.5 if p == q else 0.0) for q in score_nat for p in score_adv]
    assert d["auc"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)


def test_load_ensembles_and_the_script(trained, tmp_path, capsys):
    assert parse_ensemble_spec("e=arch=weights,b") == ("e", ["arch=weights", "b"])
    for bad in ("e", "=a,b", "e=", "e=a,,b", "a/b=c"):
        with pytest.raises(DecorrError, match="NAME=SPEC|'/'"):
            parse_ensemble_spec(bad)
    ensembles, info, _members = load_ensembles([f"ens={trained['pair']},{trained['single']}"])
    assert ensembles["ens"].member_names == ["pair/model0", "pair/model1", "single/model0"]
    assert info["ens"]["member_specs"] == [trained["pair"], trained["single"]]
    script = _script("transfer")
    out = tmp_path / "eval"
    argv = [f"{trained['single']}", "--ensemble", f"ens={trained['pair']}:model0,{trained['pair']}:model1",
            "--surrogate-ensemble", f"sur={trained['pair']}:model1,{trained['single']}", "--attack-targets",
            "--num-samples", "40", "--steps", "2", "--eps", "0.1", "--batch-size", "20", "--out", str(out),
            "--no-plots"]
    script.main(argv)
    printed = capsys.readouterr().out
    assert "disagreement detection" in printed and "95% CI" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["sources"] == ["sur", "single/model0", "ens"] and results["targets"] == ["single/model0", "ens"]
    ens, sur = results["models"]["ens"], results["models"]["sur"]
    assert ens["members"] == ["pair/model0", "pair/model1"] and ens["rule"] == "prob" and ens["arch"] == "ensemble"
    assert sur["role"] == "source" and sur["attack_loss"] == "mean_ce"
    assert set(results["by_eps"][0]["detection"]) == {"sur", "single/model0", "ens"}
    lines = (out / "detection.csv").read_text().splitlines()
    assert lines[0].split(",") == DETECTION_CSV_HEADER and len(lines) == 1 + 3
    with pytest.raises(SystemExit):
        script.main(argv[:1] + ["--ensemble", "single/model0=" + trained["pair"], "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ensemble name 'single/model0' contains '/'") and "\n" not in err
    with pytest.raises(DecorrError, match="taken by another model"):
        evaluate_specs([trained["single"]], (torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long)),
                             ensembles=[f"e={trained['pair']}"], surrogate_ensembles=[f"e={trained['single']}"])


def _fake_result(fooled_by_run: dict, n: int, fingerprint: str = "f" * 64) -> dict:
    """A minimal results dict: one source s, one target t, per-image outcomes given."""
    src_fooled, tgt_fooled = (np.array(v, dtype=bool) for v in fooled_by_run)
    rate = (src_fooled & tgt_fooled).sum() / src_fooled.sum()
    return {"format": "decorr-transfer/1", "settings": {"num_samples": n, "samples_sha256": fingerprint},
            "by_eps": [{"eps": 0.1, "transfer": {"s": {"s": None, "t": float(rate)}},
                        "fooled": {"s": {"s": pack_outcomes(src_fooled), "t": pack_outcomes(tgt_fooled)}}}]}


def test_compare_gives_hand_computed_mcnemar_and_refuses_other_images(tmp_path, capsys):
    bits = np.array([1, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0], dtype=bool)
    assert unpack_outcomes(pack_outcomes(bits), len(bits)).tolist() == bits.tolist()
    n = 12
    source = [1] * 12
    # Target fooled in A on images 0-3 and 8; in B on images 0-1 and 4-9: A only {2, 3}, B only {4, 5, 6, 7, 9}.
    a = _fake_result((source, [1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0]), n)
    b = _fake_result((source, [1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0]), n)
    comparison = compare_results(a, b)
    row = next(r for r in comparison["rows"] if r["target"] == "t")
    assert (row["only_a"], row["only_b"]) == (2, 5)
    # Exact two-sided: 2 * P(X <= 2), X ~ Bin(7, 1/2) = 2 * (1 + 7 + 21) / 128.
    assert row["p_value"] == pytest.approx(58 / 128, rel=1e-12)
    assert row["transfer_a"] == pytest.approx(5 / 12) and row["difference"] == pytest.approx(8 / 12 - 5 / 12)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(a))
    (tmp_path / "b" / "results.json").write_text(json.dumps(_fake_result((source, source), n, "0" * 64)))
    script = _script("compare")
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(tmp_path / "a"), str(tmp_path / "b" / "results.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "different images" in err and "\n" not in err
    (tmp_path / "b" / "results.json").write_text(json.dumps(b))
    script.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.json"),
                 "--csv", str(tmp_path / "c.csv")])
    assert "McNemar" in capsys.readouterr().out
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["format"] == "decorr-transfer-compare/1" and len(saved["rows"]) == 2
    assert len((tmp_path / "c.csv").read_text().splitlines()) == 3


def test_compare_real_runs_on_same_images(trained, mnist):
    split = mnist.test.subset(40)
    kwargs = dict(attack="pgd", eps_list=[0.1], steps=2, step_size=0.05, batch_size=20, features=False)
    a = evaluate_specs([trained["pair"]], split, **kwargs)
    b = evaluate_specs([trained["pair"]], split, momentum=1.0, **kwargs)
    comparison = compare_results(a, b)
    assert comparison["num_samples"] == 40 and len(comparison["rows"]) == 4
    row = next(r for r in comparison["rows"] if r["source"] == "pair/model0" and r["target"] == "pair/model1")
    assert row["transfer_a"] == a["by_eps"][0]["transfer"]["pair/model0"]["pair/model1"]
    assert row["error_b"] == pytest.approx(1 - b["by_eps"][0]["accuracy"]["pair/model0"]["pair/model1"])
    other = evaluate_specs([trained["pair"]], mnist.test.subset(41), **kwargs)
    with pytest.raises(DecorrError, match="different images"):
        compare_results(a, other)


def test_members_spread_over_devices_give_the_same_outputs_and_attacks():
    """Ensembles too large for one GPU: members on their own devices (here two CPU "devices"); the outputs,
    gradients and attacks are those of the ensemble in one place, and .to() leaves the members where they are."""
    from decorr.attacks import Source, parse_attack
    from decorr.models.ensemble import Placed, spread_members

    torch.manual_seed(0)
    members = {str(i): create_model("mnist_cnn").eval() for i in range(3)}
    whole = Ensemble(dict(members), objective="mean_ce")
    spread = spread_members(Ensemble(dict(members), objective="mean_ce"), [torch.device("cpu")] * 2, per_device=2)
    assert all(isinstance(m, Placed) for m in spread.members)
    spread.to("cpu")
    assert all(isinstance(m, Placed) for m in spread.members)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    assert torch.equal(spread(x), whole(x))
    for name in ("pgd", "mifgsm+dim", "ens"):
        attack = parse_attack(name)
        ours = attack.craft(Source.of(spread), x, y, eps=0.1, generator=torch.Generator().manual_seed(1))
        plain = attack.craft(Source.of(whole), x, y, eps=0.1, generator=torch.Generator().manual_seed(1))
        assert torch.equal(ours, plain), name
    with pytest.raises(DecorrError, match="need 2 devices"):
        spread_members(Ensemble(dict(members)), [torch.device("cpu")], per_device=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPUs")
def test_members_per_device_without_gpus_is_one_line_error(tmp_path):
    from decorr.evaluation.selection import ModelSelection

    selection = ModelSelection(targets=("x",), members_per_device="auto")
    with pytest.raises(DecorrError, match="has none"):
        selection.spread({"ens": Ensemble({"a": create_model("mnist_cnn")})})
    with pytest.raises(DecorrError, match="number >= 1 or auto"):
        ModelSelection(targets=("x",), members_per_device="many")
