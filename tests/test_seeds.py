"""Summaries across seeds (decorr.evaluation.seeds, eval/summarize.py --across-seeds) against hand computations."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats

from decorr.errors import DecorrError
from decorr.evaluation.seeds import defence_measures, defence_table, ensemble_measures, seed_table, transpose_tables
from decorr.evaluation.stats import t_interval
from eval import summarize


def fake_result(transfer: dict, *, acc=(0.9, 0.8, 0.7), r2=0.5, eps=(0.1, 0.2), sha="abc") -> dict:
    """A results.json of eval/transfer.py with three members m0..m2 and an ensemble target."""
    members = ["m0", "m1", "m2"]
    models = {m: {"arch": "mnist_cnn", "natural_accuracy": a, "active_features": 700 + 10 * i,
                  "effective_rank": 100.0 * (i + 1)} for i, (m, a) in enumerate(zip(members, acc))}
    models["ens"] = {"arch": "ensemble", "natural_accuracy": 0.99}
    pairs = [{"a": a, "b": b, "natural_features": {"r2": r2, "r2_reverse": r2 + 0.1, "num_features": 784}}
             for i, a in enumerate(members) for b in members[i + 1:]]
    pairs.append({"a": "m0", "b": "ens", "natural_features": None})
    by_eps = [{"eps": e, "transfer": {s: {t: None if s == t else transfer[e] * (1 + 0.1 * k) for t in members + ["ens"]}
                                      for k, s in enumerate(members)}} for e in eps]
    return {"format": "decorr-transfer/1", "settings": {"samples_sha256": sha, "num_samples": 100}, "models": models,
            "targets": members + ["ens"], "sources": members, "pairs": pairs, "by_eps": by_eps}


def test_t_interval_is_students():
    values = [0.31, 0.42, 0.27, 0.55]
    centre, (low, high) = t_interval(values)
    expect = stats.t.interval(0.95, 3, loc=sum(values) / 4, scale=stats.sem(values))
    assert centre == pytest.approx(sum(values) / 4)
    assert (low, high) == pytest.approx(expect, rel=1e-12)
    # two values by hand: mean 0.2, sd 0.1 * sqrt(2), t(0.975, 1) = 12.7062...
    centre, (low, high) = t_interval([0.1, 0.3])
    assert high - centre == pytest.approx(12.706204736 * 0.1, rel=1e-8)
    assert t_interval([0.4]) == (0.4, None)
    with pytest.raises(DecorrError):
        t_interval([0.1, math.nan])


def test_ensemble_measures_by_hand():
    m = ensemble_measures(fake_result({0.1: 0.5, 0.2: 0.6}))
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["active_features"] == pytest.approx(710)
    assert m["effective_rank"] == pytest.approx(200)
    assert m["r2"] == pytest.approx(0.55)  # both directions of the three member pairs
    assert m["num_features"] == 784
    # sources m0, m1, m2 scale the rate by 1.0, 1.1, 1.2; the ensemble target is not a member
    assert m["transfer@0.1"] == pytest.approx(0.5 * (1.0 + 1.1 + 1.2) / 3)
    assert m["transfer@0.2"] == pytest.approx(0.6 * 1.1)
    # a collapsed member: R^2 with it as the regressor is null (as eval/transfer.py writes it), the other kept
    dead = fake_result({0.1: 0.5, 0.2: 0.6})
    dead["pairs"][0]["natural_features"]["r2_reverse"] = None
    assert ensemble_measures(dead)["r2"] == pytest.approx((0.5 * 3 + 0.6 * 2) / 5)


def test_seed_table_means_and_paired_differences():
    base = [fake_result({0.1: t, 0.2: t}) for t in (0.4, 0.5, 0.6)]
    other = [fake_result({0.1: t, 0.2: t}) for t in (0.3, 0.3, 0.5)]
    table = seed_table({"ce": base, "dec": other}, baseline="ce")
    # ce at eps 0.1: seeds 0.44, 0.55, 0.66 (x1.1 mean scale) -> 55.0 [27.7, 82.3]
    centre, (low, high) = t_interval([44.0, 55.0, 66.0])
    assert f"{centre:.1f} [{low:.1f}, {high:.1f}]" in table.splitlines()[2]
    # dec - ce by seed: -11, -22, -11 points
    centre, (low, high) = t_interval([-11.0, -22.0, -11.0])
    assert f"| dec | {centre:.1f} [{low:.1f}, {high:.1f}]" in table
    assert "| 80.0 [80.0, 80.0] | 0.550 [0.550, 0.550] | 710 [710, 710] | 200 [200, 200] |" in table


@pytest.mark.parametrize("groups, baseline, message", [
    ({"a": [fake_result({0.1: 0.5, 0.2: 0.5}, sha="x")], "b": [fake_result({0.1: 0.5, 0.2: 0.5}, sha="y")]},
     None, "different images"),
    ({"a": [fake_result({0.1: 0.5, 0.2: 0.5})], "b": [fake_result({0.1: 0.5}, eps=(0.1,))]}, None,
     "different epsilons"),
    ({"a": [fake_result({0.1: 0.5, 0.2: 0.5})]}, "ce", "baseline"),
    ({"a": [fake_result({0.1: 0.5, 0.2: 0.5})] * 2, "b": [fake_result({0.1: 0.5, 0.2: 0.5})]}, "a", "seeds"),
    ({"a": []}, None, "no evaluations"),
])
def test_seed_table_refuses(groups, baseline, message):
    with pytest.raises(DecorrError, match=message):
        seed_table(groups, baseline=baseline)


def test_cli_across_seeds(tmp_path, capsys):
    paths = []
    for i, t in enumerate((0.4, 0.5)):
        folder = tmp_path / f"ce_s{i}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(fake_result({0.1: t, 0.2: t})))
        paths.append(str(folder))
    table = summarize.main(["--across-seeds", "ce=" + ",".join(paths), "--out", str(tmp_path / "t.md")])
    assert "| ce | 2 |" in table and (tmp_path / "t.md").read_text().strip() == table
    (tmp_path / "other.json").write_text(json.dumps({"sources": []}))
    (tmp_path / "list.json").write_text("[1]")
    for argv, message in ((["--across-seeds", "ce=" + paths[0], "ce=" + paths[1]], "given twice"),
                          (["--across-seeds", f"ce={paths[0]},{tmp_path / 'other.json'}"], "not a results.json"),
                          ([f"ce={tmp_path / 'list.json'}"], "not a results.json"),
                          ([f"ce={tmp_path / 'missing.json'}"], "cannot read"),
                          (["--across-seeds", "ce"], "not LABEL"),
                          (["--baseline", "ce", "ce=" + paths[0]], "--across-seeds")):
        with pytest.raises(SystemExit) as exit_info:
            summarize.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and "Traceback" not in err


def defence_result(acc: float, *, wb: float = 0.1, auc: float = 0.7, sha: str = "abc") -> dict:
    """A results.json with members m0, m1, their ensemble 'ens' (attacked white box) and a surrogate 's'."""
    models = {"m0": {"arch": "mnist_cnn", "natural_accuracy": 0.8}, "m1": {"arch": "mnist_cnn", "natural_accuracy": 0.7},
              "ens": {"arch": "ensemble", "members": ["m0", "m1"], "natural_accuracy": 0.9},
              "s": {"arch": "mnist_cnn", "natural_accuracy": 0.85}}
    by_eps = [{"eps": e, "white_box_accuracy": {"ens": wb * k, "m0": 0.0, "s": 0.0},
               "accuracy": {"m0": {"m1": 0.5, "ens": 0.4}, "ens": {"m0": 0.3, "m1": 0.3, "ens": wb * k},
                            "s": {"m0": 0.6, "m1": 0.6, "ens": acc * k}},
               "detection": {"s": {"ens": {"auc": auc * k}}, "m0": {"ens": {"auc": 0.9}}}}
              for k, e in ((1, 0.1), (0.5, 0.2))]
    return {"format": "decorr-transfer/1", "settings": {"samples_sha256": sha, "num_samples": 100}, "models": models,
            "targets": ["m0", "m1", "ens"], "sources": ["m0", "ens", "s"], "pairs": [], "by_eps": by_eps}


def test_defence_measures_by_hand():
    m = defence_measures(defence_result(0.6))
    # the members' own examples are not an outside attack; the surrogate's are
    assert m == pytest.approx({"natural": 0.9, "white_box@0.1": 0.1, "white_box@0.2": 0.05, "accuracy[s]@0.1": 0.6,
                               "auc[s]@0.1": 0.7, "accuracy[s]@0.2": 0.3, "auc[s]@0.2": 0.35})
    assert defence_measures(defence_result(0.6), "m1") == pytest.approx(
        {"natural": 0.7, "accuracy[m0]@0.1": 0.5, "accuracy[ens]@0.1": 0.3, "accuracy[s]@0.1": 0.6,
         "accuracy[m0]@0.2": 0.5, "accuracy[ens]@0.2": 0.3, "accuracy[s]@0.2": 0.6})
    with pytest.raises(DecorrError, match="not a target"):
        defence_measures(defence_result(0.6), "s")


def test_defence_table_means_and_differences():
    base = [defence_result(a) for a in (0.5, 0.6, 0.7)]
    other = [defence_result(a, auc=0.8) for a in (0.6, 0.8, 0.7)]
    table = defence_table({"ce": [(r, None) for r in base], "dec": [(r, "ens") for r in other]},
                          baseline="ce", eps=[0.1])
    header, _, ce_row, dec_row = table.splitlines()[:4]
    assert header == ("| method | seeds | clean accuracy % | white box eps 0.1 % | from s eps 0.1 % | AUC s eps 0.1 |")
    centre, (low, high) = t_interval([50.0, 60.0, 70.0])
    assert ce_row.startswith("| ce | 3 | 90.0 [90.0, 90.0] | 10.0 [10.0, 10.0] | "
                             f"{centre:.1f} [{low:.1f}, {high:.1f}] | 0.700 [0.700, 0.700] |")
    centre, (low, high) = t_interval([10.0, 20.0, 0.0])  # dec - ce, seed by seed
    assert f"| dec | 0.0 [0.0, 0.0] | 0.0 [0.0, 0.0] | {centre:.1f} [{low:.1f}, {high:.1f}] | 0.100 [0.100, 0.100] |" \
        in table
    assert "0.2" not in header
    with pytest.raises(DecorrError, match="different images"):
        defence_table({"a": [(defence_result(0.5), None)], "b": [(defence_result(0.5, sha="x"), None)]})
    with pytest.raises(DecorrError, match="no measure at eps"):
        defence_table({"a": [(defence_result(0.5), None)]}, eps=[0.3])


def test_cli_defence(tmp_path, capsys):
    (tmp_path / "r.json").write_text(json.dumps(defence_result(0.5)))
    table = summarize.main(["--defence", f"ce={tmp_path / 'r.json'}:ens,{tmp_path / 'r.json'}"])
    assert "| ce | 2 | 90.0 [90.0, 90.0] |" in table
    for argv, message in ((["--defence", f"ce={tmp_path / 'r.json'}:nope"], "not a target"),
                          ([f"ce={tmp_path / 'r.json'}", "--eps", "0.1"], "--defence"),
                          (["--defence", "--across-seeds", f"ce={tmp_path / 'r.json'}"], "its own table"),
                          (["--defence", "ce"], "not LABEL")):
        with pytest.raises(SystemExit) as exit_info:
            summarize.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and "Traceback" not in err


def test_cli_plot(tmp_path, capsys):
    paths = []
    for i, t in enumerate((0.4, 0.5)):
        (tmp_path / f"r{i}.json").write_text(json.dumps(fake_result({0.1: t, 0.2: t})))
        paths.append(str(tmp_path / f"r{i}.json"))
    summarize.main(["--across-seeds", "ce=" + ",".join(paths), "--plot", str(tmp_path / "p.png"), "--plot-eps", "0.1"])
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for argv, message in ((["--across-seeds", "ce=" + paths[0], "--plot", str(tmp_path / "q.png"), "--plot-eps", "0.3"],
                           "no members' transfer rate at eps 0.3"),
                          ([f"ce={paths[0]}", "--plot", str(tmp_path / "q.png")], "add --across-seeds")):
        with pytest.raises(SystemExit):
            summarize.main(argv)
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err
    assert not (tmp_path / "q.png").exists()


def test_transposed_defence_table_swaps_rows_and_columns_of_both_tables():
    base = [defence_result(a) for a in (0.5, 0.6, 0.7)]
    other = [defence_result(a, auc=0.8) for a in (0.6, 0.8, 0.7)]
    groups = {"ce": [(r, None) for r in base], "dec": [(r, "ens") for r in other]}
    plain, flipped = (defence_table(groups, baseline="ce", eps=[0.1], transpose=t) for t in (False, True))

    def tables(text):
        blocks, block = [], []
        for line in text.splitlines() + [""]:
            if line.startswith("|") and not set(line) <= set("|-"):
                block.append([c.strip() for c in line.strip("|").split("|")])
            elif not line.startswith("|") and block:
                blocks.append(block)
                block = []
        return blocks

    assert len(tables(plain)) == len(tables(flipped)) == 2
    for rows, columns in zip(tables(plain), tables(flipped)):
        assert columns == [list(c) for c in zip(*rows)]
    assert flipped.splitlines()[0] == "| method | ce | dec |"
    assert transpose_tables(transpose_tables(plain.splitlines())) == plain.splitlines()
    assert [l for l in plain.splitlines() if not l.startswith("|")] == \
        [l for l in flipped.splitlines() if not l.startswith("|")]
