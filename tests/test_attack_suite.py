"""The attack suite's acceptance checks, end to end through ``eval/transfer.py`` (run in-process):

(a) the whole suite on two CIFAR ResNet-20s writes one row per attack and epsilon, and the "any attack" worst
    case row is exactly the per-image OR of the attack rows' stored outcomes (recomputed here from the packed
    bits, counts and rates compared exactly);
(b) ``--attack mifgsm`` with ``--save-adversarial DIR --save-float`` writes the examples of a hand-written MI-FGSM
    loop on the same model (read back from the .npy files), to float rounding;
(c) layout: no function of ``decorr/`` or ``dna/`` is over 100 lines or takes over 12 parameters, and attack names
    are mapped to attacks in one place only (the registry);
(d) bad attack settings are one ``error:`` line on stderr, exit 2, before any attack runs and with no output
    folder written (table-driven).
"""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CIFAR_SUBSET
from decorr.attacks import list_attacks
from decorr.attacks.base import Attack
from decorr.checkpoint import model_entry, save_checkpoint
from decorr.data import iterate_batches, to_float
from decorr.evaluation.compare import unpack_outcomes
from decorr.models import create_model

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("eval_transfer_suite", REPO / "eval" / "transfer.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)  # type: ignore[union-attr]

#: The issue's battery, in the order given on the command line.
SUITE = ["mifgsm", "nifgsm", "vmifgsm", "vnifgsm", "dim", "tim", "sim", "admix", "ssm", "bsr", "ila", "fia", "naa",
         "sgm", "linbp", "ghost"]
#: Fewer random copies than the papers' (the attacks and their code paths are the same), so that the whole
#: battery runs in well under a minute on one CPU thread.
CHEAP = ["--variance-neighbors", "2", "--admix-mixes", "1", "--admix-scales", "2", "--sim-scales", "2",
         "--ssm-copies", "2", "--bsr-copies", "2", "--fia-copies", "2", "--naa-path-steps", "2", "--ti-kernel", "5"]
EPS = ["4/255", "16/255"]
#: Adam steps of batch 64 per model: about 25% test accuracy, enough for attacks to differ image by image.
TRAIN_STEPS = 30
N = 16


@pytest.fixture(scope="module")
def resnets(cifar_subset, tmp_path_factory):
    """Two briefly trained CIFAR ResNet-20 checkpoints (different seeds), so that attacks succeed on some images
    and not on others."""
    root = tmp_path_factory.mktemp("suite_ckpts")
    paths, models = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model("resnet20")
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for step, (x, y) in enumerate(iterate_batches(cifar_subset.train, 64, seed=seed)):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step + 1 == TRAIN_STEPS:
                break
        model.eval()
        path = root / f"r20_{seed}"
        save_checkpoint(path, {"model0": model}, {"kind": "classifier", "models": {"model0": model_entry("resnet20")},
                                                  "dataset": str(CIFAR_SUBSET), "epoch": 0})
        paths.append(str(path))
        models.append(model)
    return {"paths": paths, "models": models}


def _common(out: Path) -> list[str]:
    return ["--dataset", str(CIFAR_SUBSET), "--num-samples", str(N), "--batch-size", str(N), "--no-plots",
            "--no-features", "--quiet", "--threads", "1", "--out", str(out)]


# ------------------------------------------------------------------------------------------------
# (a) one row per attack and eps; the worst case is the OR of the attack rows


def _bits(row: dict, src: str, model: str) -> np.ndarray:
    return unpack_outcomes(row["fooled"][src][model], N)


def test_suite_rows_and_any_attack_is_the_or_of_the_rows(resnets, tmp_path, capsys):
    out = tmp_path / "suite"
    script.main([*resnets["paths"], "--attack", *SUITE, "--eps", *EPS, "--steps", "10", *CHEAP, *_common(out)])
    capsys.readouterr()
    result = json.loads((out / "results.json").read_text())
    sources, targets = result["sources"], result["targets"]
    assert len(sources) == 2 and targets == sources
    eps_values = result["settings"]["eps"]
    assert eps_values == pytest.approx([4 / 255, 16 / 255], abs=1e-12)
    assert [a["attack"] for a in result["settings"]["attacks"]] == SUITE
    # one row per attack and eps, in the command's order (attack-major)
    assert [(r["attack"], r["eps"]) for r in result["by_eps"]] == [(a, e) for a in SUITE for e in eps_values]
    assert result["settings"]["num_samples"] == N
    for row in result["by_eps"]:  # each row's counts are its own stored outcomes
        for src in sources:
            assert row["white_box_correct"][src] == int((~_bits(row, src, src)).sum())
            assert row["source_fooled"][src] == int(_bits(row, src, src).sum())
            for tgt in targets:
                assert row["correct"][src][tgt] == int((~_bits(row, src, tgt)).sum())
    # the attacks did something, and not all the same thing (else the OR below could not tell from any one row)
    assert any(r["source_fooled"][s] > 0 for r in result["by_eps"] for s in sources)
    assert len({r["fooled"][s][s] for r in result["by_eps"] for s in sources}) > 2

    assert [(w["attack"], w["eps"]) for w in result["worst_case"]] == [("any", e) for e in eps_values]
    strictly_worse = 0
    for worst in result["worst_case"]:
        rows = [r for r in result["by_eps"] if r["eps"] == worst["eps"]]
        assert len(rows) == len(SUITE)
        hit_by_target = {tgt: np.zeros(N, dtype=bool) for tgt in targets}
        for src in sources:
            own = np.logical_or.reduce([_bits(r, src, src) for r in rows])
            assert np.array_equal(_bits(worst, src, src), own)
            assert worst["white_box_correct"][src] == int((~own).sum())
            assert worst["white_box_accuracy"][src] == int((~own).sum()) / N
            assert worst["source_fooled"][src] == int(own.sum())
            for tgt in targets:
                any_attack = np.logical_or.reduce([_bits(r, src, tgt) for r in rows])
                hit_by_target[tgt] |= any_attack
                assert np.array_equal(_bits(worst, src, tgt), any_attack), (src, tgt)
                assert worst["correct"][src][tgt] == int((~any_attack).sum())
                assert worst["accuracy"][src][tgt] == int((~any_attack).sum()) / N
                strictly_worse += worst["correct"][src][tgt] < min(r["correct"][src][tgt] for r in rows)
                if tgt == src:
                    assert worst["transfer"][src][tgt] is None
                    continue
                transferred = int((any_attack & own).sum())
                assert worst["transferred"][src][tgt] == transferred
                assert worst["transfer"][src][tgt] == (transferred / own.sum() if own.sum() else None)
        everything = worst["all_sources"]
        assert everything["sources"] == sources
        for tgt in targets:
            assert np.array_equal(unpack_outcomes(everything["fooled"][tgt], N), hit_by_target[tgt])
            assert everything["correct"][tgt] == int((~hit_by_target[tgt]).sum())
            assert everything["accuracy"][tgt] == int((~hit_by_target[tgt]).sum()) / N
    # somewhere the worst case is strictly worse than every single attack: the OR is not just the best row
    assert strictly_worse > 0


# ------------------------------------------------------------------------------------------------
# (b) the saved float examples are a hand-written MI-FGSM's


def _mifgsm_by_hand(model, x, y, eps, steps, decay=1.0):
    step = eps / steps
    x_adv, g = x.clone(), torch.zeros_like(x)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        g = decay * g + grad / grad.abs().sum(dim=(1, 2, 3), keepdim=True)  # L1 per image
        x_adv = x_adv.detach() + step * g.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def test_saved_mifgsm_examples_equal_a_hand_written_loop(resnets, cifar_subset, tmp_path, capsys):
    out, adv = tmp_path / "mi", tmp_path / "adv"
    src = resnets["paths"][0]
    script.main([src, "--attack", "mifgsm", "--eps", "16/255", "--steps", "10", "--save-adversarial", str(adv),
                 "--save-float", *_common(out)])
    capsys.readouterr()
    with open(adv / "index.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == N and {r["attack"] for r in rows} == {"mifgsm"}
    saved = torch.zeros(N, 3, 32, 32)
    for row in rows:
        array = np.load(adv / row["float_file"])
        assert array.dtype == np.float32 and array.shape == (3, 32, 32)
        saved[int(row["index"])] = torch.from_numpy(array)
    split = cifar_subset.test.subset(N)
    x, y = to_float(split.images), split.labels
    assert [int(r["label"]) for r in sorted(rows, key=lambda r: int(r["index"]))] == y.tolist()
    expected = _mifgsm_by_hand(resnets["models"][0], x, y, 16 / 255, 10)
    diff = (saved - expected).abs().max().item()
    assert diff <= 1e-6, f"saved MI-FGSM examples differ from the hand-written loop by {diff:.3g}"
    assert (saved - x).abs().max() > 15 / 255  # the attack moved the images to the ball's edge
    # and the loop is discriminating: another decay gives other examples
    assert (_mifgsm_by_hand(resnets["models"][0], x, y, 16 / 255, 10, decay=0.5) - saved).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# (c) layout: small functions, one place mapping attack names to attacks

MAX_LINES, MAX_PARAMS = 100, 12
SCANNED = [REPO / "decorr", REPO / "dna"]
REGISTRY = REPO / "decorr" / "attacks" / "registry.py"


def _python_files() -> list[Path]:
    return sorted(p for folder in SCANNED for p in folder.rglob("*.py"))


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = node.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
    return [n for n in names if n not in ("self", "cls")]


def test_no_function_is_over_100_lines_or_12_parameters():
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            where = f"{path.relative_to(REPO)}:{node.lineno} {node.name}"
            lines = node.end_lineno - node.lineno + 1  # the def line to the last line of the body
            params = _parameters(node)
            if lines > MAX_LINES:
                offenders.append(f"{where}: {lines} lines (> {MAX_LINES})")
            if len(params) > MAX_PARAMS:
                offenders.append(f"{where}: {len(params)} parameters (> {MAX_PARAMS}): {', '.join(params)}")
    assert not offenders, "functions too long or with too many parameters:\n" + "\n".join(offenders)


def _attack_class_names() -> set[str]:
    from decorr.attacks.registry import ATTACKS

    list_attacks()  # every family registered
    return {cls.__name__ for cls in ATTACKS.values()}


def _name_of(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _compared_strings(test: ast.AST) -> set[str]:
    """String constants compared with == / != / in / not in anywhere in ``test``."""
    found = set()
    for node in ast.walk(test):
        if isinstance(node, ast.Compare) and all(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                 for op in node.ops):
            for side in (node.left, *node.comparators):
                for leaf in ast.walk(side):
                    if isinstance(leaf, ast.Constant) and isinstance(leaf.value, str):
                        found.add(leaf.value)
    return found


def test_attack_names_map_to_attacks_in_the_registry_only():
    """Only decorr/attacks/registry.py holds the name -> class table; elsewhere no dict literal of attack classes
    (or keyed by attack names with classes as values), no ``if name == "pgd" ... elif name == "mifgsm"`` chain on
    two or more attack names, no second registration function; every registered name is registered once, by the
    decorator on its class."""
    names, classes = set(list_attacks()), _attack_class_names()
    offenders, registrations = [], {}
    for path in _python_files():
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _name_of(node.func) == "register_attack" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                registrations.setdefault(node.args[0].value, []).append(f"{rel}:{node.lineno}")
            if path == REGISTRY:
                continue
            if isinstance(node, ast.Dict):
                valued = [v for v in node.values if _name_of(v) in classes]
                keyed = [k for k in node.keys if isinstance(k, ast.Constant) and k.value in names]
                if len(valued) >= 2 or (keyed and valued):
                    offenders.append(f"{rel}:{node.lineno}: a dict literal mapping to attack classes")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "register_attack":
                offenders.append(f"{rel}:{node.lineno}: a second register_attack")
            if isinstance(node, ast.If):
                chain, branch = set(), node
                while isinstance(branch, ast.If):  # if ... elif ... elif ...
                    chain |= _compared_strings(branch.test) & names
                    branch = branch.orelse[0] if len(branch.orelse) == 1 else None
                if len(chain) >= 2:
                    offenders.append(f"{rel}:{node.lineno}: an if-chain on attack names {sorted(chain)}")
            if isinstance(node, ast.Subscript) and _name_of(node.value) == "ATTACKS" \
                    and isinstance(getattr(node, "ctx", None), ast.Store):
                offenders.append(f"{rel}:{node.lineno}: writes the ATTACKS table")
    assert not offenders, "attack names mapped outside the registry:\n" + "\n".join(offenders)
    assert set(registrations) == names, sorted(set(registrations) ^ names)
    twice = {n: w for n, w in registrations.items() if len(w) > 1}
    assert not twice, twice


# ------------------------------------------------------------------------------------------------
# (d) bad settings: one line, exit 2, before any work

BAD_SETTINGS = [
    pytest.param(["--attack", "mifgsm", "--decay", "-1"], r"attack mifgsm: decay must be >= 0.*--decay", id="negative-decay"),
    pytest.param(["--attack", "dim", "--decay", "-1"], r"decay must be >= 0", id="negative-decay-of-the-base"),
    pytest.param(["--attack", "mifgsm+nosuch"], r"unknown attack 'nosuch'", id="unknown-component"),
    pytest.param(["--attack", "nosuch"], r"unknown attack 'nosuch'", id="unknown-attack"),
    pytest.param(["--attack", "mifgsm+pgd"], r"combines mifgsm and pgd, two components of kind optimizer",
                 id="two-optimizers"),
    pytest.param(["--attack", "fia+cw"], r"two components of kind objective", id="two-objectives"),
    pytest.param(["--attack", "mifgsm+mifgsm"], r"names mifgsm twice", id="component-twice"),
    pytest.param(["--attack", "mifgsm", "mifgsm(decay=1.0)"], r"are the same", id="same-attack-twice"),
    pytest.param(["--attack", "ila", "--attack-layer", "nosuch"], r"ila: .* has no layer 'nosuch' \(--attack-layer\)",
                 id="missing-feature-layer"),
    pytest.param(["--attack", "fia", "--attack-layer", "nosuch"], r"fia: .* has no layer 'nosuch'",
                 id="missing-feature-layer-fia"),
    # A targeted run is asked for with --targeted RULE, so a targeted attack without a rule cannot be written
    # (argparse requires the RULE); the real cases: a rule that names no file, and an attack that cannot be
    # targeted.
    pytest.param(["--attack", "mifgsm", "--targeted", "no_such_map.json"], r"neither 'random' nor a class map file",
                 id="targeted-without-a-rule"),
    pytest.param(["--attack", "naa", "--targeted", "random"], r"naa is untargeted; drop --targeted",
                 id="targeted-untargeted-attack"),
    pytest.param(["--attack", "mifgsm", "--gamma", "0.5"], r"--gamma sets .*sgm.* no attack of this run uses",
                 id="flag-of-no-attack"),
    pytest.param(["--attack", "ens"], r"ens combines an ensemble's members, but .* is a single model",
                 id="ensemble-strategy-on-one-model"),
    pytest.param(["--attack", "sgm", "--gamma", "0"], r"gamma must be in \(0, 1\]", id="sgm-gamma-zero"),
    pytest.param(["--attack", "vmifgsm", "--variance-neighbors", "0"], r"neighbors must be an integer >= 1",
                 id="no-neighbours"),
    pytest.param(["--attack", "mifgsm(decay=abc)"], r"bad value 'abc' for mifgsm\(decay=...\)", id="bad-inline-value"),
]


@pytest.mark.parametrize("flags, message", BAD_SETTINGS)
def test_bad_settings_are_one_line_errors_before_any_work(resnets, tmp_path, capsys, monkeypatch, flags, message):
    crafted = []
    monkeypatch.setattr(Attack, "craft", lambda self, *a, **k: crafted.append(self) or pytest.fail("attacked"))
    out, adv = tmp_path / "out", tmp_path / "adv"
    argv = [resnets["paths"][0], *flags, "--eps", "16/255", "--save-adversarial", str(adv), *_common(out)]
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert re.search(message, lines[0]), lines[0]
    assert not crafted
    assert not out.exists() and not adv.exists()  # nothing written
    assert captured.out == ""
