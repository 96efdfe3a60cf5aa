"""eval/transfer.py --preset: the field's protocols filled in, every setting overridable, recorded in results.

Offline, each preset runs with its models replaced (explicit specs of small random-weight models, which is
itself the override path) on generated or subset data, with fewer steps. Oracles: the protocols' published
numbers written out here (SPEC section 9); for TransferAttack's source-correct view, the source's own
predictions (a plain forward of the same weights) and the per-image outcomes packed in results.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from decorr.data import load_dataset, to_float
from decorr.evaluation.compare import unpack_outcomes
from decorr.models import create_model

from conftest import CIFAR_SUBSET, load_script

REPO = Path(__file__).resolve().parents[1]


transfer_script = load_script("eval/transfer.py")


def _weights(tmp_path: Path, arch: str, seed: int, **kwargs) -> str:
    torch.manual_seed(seed)
    path = tmp_path / f"{arch}_{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in create_model(arch, **kwargs).state_dict().items()}, path)
    return f"{arch}={path}"


def _components(result, attack_text):
    return next(a for a in result["settings"]["attacks"] if a["attack"] == attack_text)["components"]


def test_transferattack_dry_run_prints_the_whole_protocol(capsys, tmp_path):
    transfer_script.main(["--preset", "transferattack", "--dataset", str(tmp_path / "imagenet_val"), "--dry-run"])
    job = json.loads(capsys.readouterr().out)
    archs = [spec.split("=")[0] for spec in job["selection"]["targets"]]
    assert archs == ["torchvision.vgg16", "torchvision.mobilenet_v2", "torchvision.inception_v3", "torchvision.vit_b_16",
                     "timm.pit_b_224", "timm.visformer_small", "torchvision.swin_t"]
    assert job["selection"]["surrogates"] == ["torchvision.resnet50=DEFAULT@transforms=normalize,input_size=224"]
    assert "input_size=299" in job["selection"]["targets"][2]  # Inception-v3 at 299, as TransferAttack wraps it
    assert job["options"]["eps"] == [pytest.approx(16 / 255)]
    assert [a["attack"] for a in job["options"]["attacks"]] == ["mifgsm", "vmifgsm", "dim", "tim", "sim", "admix",
                                                                 "ssm", "bsr", "sgm"]
    for attack in job["options"]["attacks"]:
        base = attack["components"][attack["resolved"].split("+")[0]]
        assert base["steps"] == 10 and base["step_size"] == pytest.approx(1.6 / 255) and base["decay"] == 1.0
        assert base["random_start"] is False
    assert job["data"]["image_size"] == 224 and job["options"]["norm"] == "linf" and job["options"]["targeted"] is None
    assert job["preset"]["name"] == "transferattack" and job["preset"]["overridden"] == {}
    assert not (tmp_path / "imagenet_val").exists()


def test_flags_and_config_files_override_a_preset(capsys, tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"eps": ["0.2"], "steps": 7}))
    transfer_script.main(["--preset", "p1", "--config", str(config), "--steps", "3", "--dry-run", "x=y"])
    job = json.loads(capsys.readouterr().out)
    (pgd,) = job["options"]["attacks"]
    assert job["options"]["eps"] == [0.2] and pgd["components"]["pgd"]["steps"] == 3
    assert pgd["components"]["pgd"]["step_size"] == pytest.approx(3 / 255)  # still the preset's
    assert job["preset"]["overridden"] == {"eps": [0.2], "attack__steps": 3}


@pytest.fixture
def small_imagenet_folder(tmp_path):
    root = tmp_path / "val"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = ["filename,label"]
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
        rows.append(f"{i:03d}.png,{i % 10}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_transferattack_preset_runs_with_small_models(small_imagenet_folder, tmp_path):
    source = _weights(tmp_path, "resnet20", 1) + "@name=src"
    targets = [_weights(tmp_path, "resnet20", 2), _weights(tmp_path, "vgg_small", 3)]
    out = tmp_path / "eval"
    result = transfer_script.main(["--preset", "transferattack", *targets, "--surrogate", source, "--dataset",
                                   str(small_imagenet_folder), "--image-size", "32", "--steps", "2", "--no-plots",
                                   "--quiet", "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["eps"] == [pytest.approx(16 / 255)] and saved["settings"]["num_samples"] == 6
    assert [row["attack"] for row in saved["by_eps"]] == ["mifgsm", "vmifgsm", "dim", "tim", "sim", "admix", "ssm",
                                                          "bsr", "sgm"]
    assert _components(saved, "mifgsm")["mifgsm"] == {"steps": 2, "step_size": pytest.approx(1.6 / 255),
                                                      "random_start": False, "decay": 1.0}
    preset = saved["config"]["preset"]
    assert preset["name"] == "transferattack"
    assert set(preset["overridden"]) == {"checkpoints", "surrogate", "image_size", "attack__steps"}
    # the source-correct view against the source's own predictions and the packed per-image outcomes
    from decorr.specs import load_specs

    split = load_dataset(str(small_imagenet_folder), image_size=32).test
    x, y = to_float(split.images), split.labels
    with torch.no_grad():
        correct = (load_specs([source])["src"].module(x).argmax(1) == y).numpy()
    for row in saved["by_eps"]:
        view = row["source_correct"]["src"]
        assert view["images"] == int(correct.sum())
        for model in ("src", *result["targets"]):
            fooled = unpack_outcomes(row["fooled"]["src"][model], len(y))
            assert view["fooled"][model] == int((fooled & correct).sum())
            share = view["fooled"][model] / view["images"] if view["images"] else None
            assert view["success"][model] == (pytest.approx(share) if share is not None else None)


def test_dverge_preset_runs_with_small_models(tmp_path):
    targets = [_weights(tmp_path, "resnet20", 1), _weights(tmp_path, "resnet20", 2)]
    members = ",".join([_weights(tmp_path, "resnet20", 3), _weights(tmp_path, "resnet20", 4)])
    out = tmp_path / "eval"
    transfer_script.main(["--preset", "dverge", *targets, "--surrogate-ensemble", f"base2={members}", "--dataset",
                          str(CIFAR_SUBSET), "--num-samples", "8", "--steps", "2", "--no-features", "--no-plots",
                          "--quiet", "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["eps"] == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07])
    attacks = ["mifgsm(random_start=true)", "mifgsm(random_start=true)+cw", "dim", "dim+cw", "sgm", "sgm+cw"]
    assert [a["attack"] for a in saved["settings"]["attacks"]] == attacks
    assert _components(saved, "dim+cw")["dim"]["prob"] == 0.5 and _components(saved, "dim+cw")["cw"]["kappa"] == 0.1
    assert _components(saved, "sgm")["sgm"]["gamma"] == 0.2
    assert _components(saved, "mifgsm(random_start=true)")["mifgsm"]["random_start"] is True
    assert saved["sources"] == ["base2"] and len(saved["by_eps"]) == 6 * 7
    assert [row["eps"] for row in saved["worst_case"]] == pytest.approx(saved["settings"]["eps"])
    for row in saved["worst_case"]:  # the per-image worst case over every attack, DVERGE's "all"
        worst = row["all_sources"]["correct"]
        for target in saved["targets"]:
            per_attack = [r["correct"]["base2"][target] for r in saved["by_eps"] if r["eps"] == row["eps"]]
            assert worst[target] <= min(per_attack)
    assert saved["config"]["preset"]["name"] == "dverge"


def test_p1_preset_attacks_both_directions_of_every_pair(tmp_path):
    targets = [_weights(tmp_path, "mnist_cnn", 1), _weights(tmp_path, "mnist_cnn", 2)]
    out = tmp_path / "eval"
    transfer_script.main(["--preset", "p1", *targets, "--num-samples", "16", "--steps", "2", "--no-plots", "--quiet",
                          "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["dataset"] == "mnist" and saved["settings"]["eps"] == pytest.approx([0.05, 0.1, 0.15])
    (attack,) = saved["settings"]["attacks"]
    assert attack["components"]["pgd"] == {"steps": 2, "step_size": pytest.approx(3 / 255), "random_start": True,
                                           "momentum": 0.0}
    assert sorted(saved["sources"]) == sorted(saved["targets"]) and len(saved["targets"]) == 2
    for row in saved["by_eps"]:
        (pair,) = row["pairs"]
        a, b = pair["a"], pair["b"]
        assert pair["a_to_b"] == row["transfer"][a][b] and pair["b_to_a"] == row["transfer"][b][a]
    assert saved["config"]["preset"]["overridden"] == {"attack__steps": 2}  # models and samples are no p1 settings
