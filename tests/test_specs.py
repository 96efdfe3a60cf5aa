"""Model specs (decorr.specs): foreign weights in every tool, checked against plain torch forwards.

Oracles: the models built here by hand (torchvision / registry builders + load_state_dict) and their
plain forward passes; files written with torch.save / safetensors; hashlib for the checksum.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

from decorr.checkpoint import build_model, model_entry, save_checkpoint
from decorr.convert import main as convert_main
from decorr.data import to_float
from decorr.training.ensemble import load_init_models
from decorr.errors import DecorrError
from decorr.models import create_model
from decorr.specs import Preprocessed, SpecOptions, load_specs, parse_spec
from transfer_helpers import evaluate_specs, load_named_models

from conftest import CIFAR_SUBSET, load_script

REPO = Path(__file__).resolve().parents[1]


transfer_script = load_script("eval/transfer.py")
alignment_script = load_script("eval/gradient_alignment.py")


def _r18(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10).eval()


def _plain_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """r18.pth (plain state dict), r18_dp.pth (DataParallel under "state_dict"), r20.safetensors."""
    root = tmp_path_factory.mktemp("specs")
    r18 = _r18()
    torch.save(r18.state_dict(), root / "r18.pth")
    torch.save({"state_dict": nn.DataParallel(r18).state_dict(), "epoch": 3}, root / "r18_dp.pth")
    torch.manual_seed(1)
    r20 = create_model("resnet20").eval()
    save_file(_plain_tensors(r20), str(root / "r20.safetensors"))
    return {"root": root, "r18": root / "r18.pth", "r18_dp": root / "r18_dp.pth", "r20": root / "r20.safetensors",
            "r18_model": r18, "r20_model": r20}


def _error_line(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_issue_check_natural_accuracy_equals_plain_forward(files, cifar_subset, tmp_path):
    out = tmp_path / "eval"
    result = transfer_script.main([
        f"torchvision.resnet18={files['r18']}", f"torchvision.resnet18={files['r18_dp']}", f"resnet20={files['r20']}",
        "--num-classes", "10", "--dataset", str(CIFAR_SUBSET), "--num-samples", "40", "--steps", "2",
        "--eps", "8/255", "--step-size", "2/255", "--batch-size", "20", "--no-plots", "--out", str(out),
    ])
    split = cifar_subset.test.subset(40)
    x, y = to_float(split.images), split.labels
    by_hand = {}
    for name, weights, build in (("r18", files["r18"], lambda: torchvision.models.resnet18(num_classes=10)),
                                 ("r18_dp", files["r18"], lambda: torchvision.models.resnet18(num_classes=10)),
                                 ("r20", None, lambda: create_model("resnet20"))):
        model = build()
        if weights is not None:
            model.load_state_dict(torch.load(weights, weights_only=True))
        else:
            model.load_state_dict(files["r20_model"].state_dict())
        with torch.no_grad():
            by_hand[name] = (model.eval()(x).argmax(dim=1) == y).double().mean().item()
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["models"]) == {"r18", "r18_dp", "r20"}
    for name, expected in by_hand.items():
        assert result["models"][name]["natural_accuracy"] == pytest.approx(expected, abs=1e-12)
        assert saved["models"][name]["natural_accuracy"] == pytest.approx(expected, abs=1e-12)
    record = saved["models"]["r18_dp"]
    assert record["arch"] == "torchvision.resnet18" and record["num_classes"] == 10
    assert record["sha256"] == hashlib.sha256(files["r18_dp"].read_bytes()).hexdigest()
    assert record["weights"] == str(files["r18_dp"]) and record["spec"].endswith("r18_dp.pth")
    assert record["mean"] is None and record["input_size"] is None and record["feature_layer"] is None
    assert saved["models"]["r20"]["feature_layer"] == "avgpool"  # the registry default
    assert len(saved["by_eps"]) == 1 and set(saved["by_eps"][0]["transfer"]) == {"r18", "r18_dp", "r20"}


def test_outputs_equal_the_original_with_preprocessing(files):
    """mean/std/input_size put Normalize and a bilinear resize in front; weights load exactly."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    spec = f"torchvision.resnet18={files['r18']}@mean=0.485/0.456/0.406,std=0.229/0.224/0.225,input_size=48,name=big"
    loaded = load_specs([spec, f"torchvision.resnet18={files['r18_dp']}"], SpecOptions(feature_layer="layer4"))
    assert list(loaded) == ["big", "r18_dp"]
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = files["r18_model"]((F.interpolate(x, size=(48, 48), mode="bilinear") - torch.tensor(mean).view(1, 3, 1, 1))
                                      / torch.tensor(std).view(1, 3, 1, 1))
        assert torch.allclose(loaded["big"].module(x), expected, atol=1e-5)
        assert torch.equal(loaded["r18_dp"].module(x), files["r18_model"](x))
    assert loaded["big"].info["feature_layer"] == "net.layer4" and loaded["r18_dp"].info["feature_layer"] == "layer4"
    assert loaded["big"].info["input_size"] == [48, 48] and loaded["big"].info["std"] == list(std)
    assert not loaded["big"].module.training
    # Global --mean/--std skip registry archs (they normalise inside); the per-spec form does not.
    registry = load_specs([f"resnet20={files['r20']}"], SpecOptions(mean=(0.5,) * 3, std=(0.5,) * 3))
    assert registry["r20"].info["mean"] is None and not isinstance(registry["r20"].module, Preprocessed)
    with torch.no_grad():
        assert torch.equal(registry["r20"].module(x), files["r20_model"](x))


class _WritesAFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_that_runs_code_is_refused(files, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": _WritesAFile(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(DecorrError, match="refused: unpickling it would run code"):
        load_specs([f"torchvision.resnet18={evil}"])
    err = _error_line(transfer_script.main, [f"resnet20={evil}", "--dataset", str(CIFAR_SUBSET), "--num-samples", "4",
                                             "--out", str(tmp_path / "o"), "--no-plots"], capsys)
    assert "evil.pth is refused" in err and "state_dict()" in err
    assert not marker.exists()


def _renamed(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors in order under a paper repository's own names (num_batches_tracked dropped)."""
    tensors = [(k, v) for k, v in _plain_tensors(model).items() if not k.endswith("num_batches_tracked")]
    return {f"paper_{i:03d}.{k.rsplit('.', 1)[1]}": v for i, (k, v) in enumerate(tensors)}


def test_match_by_order_loads_renamed_weights_and_refuses_misfits(files, tmp_path):
    renamed = _renamed(files["r20_model"])
    path = tmp_path / "paper.pth"
    torch.save({"net": renamed}, path)
    lines: list[str] = []
    loaded = load_specs([f"resnet20={path}"], SpecOptions(match_by_order=True), log=lines.append)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded["paper"].module(x), files["r20_model"](x))
    first_file_key, first_arch_key = next(iter(renamed)), next(iter(files["r20_model"].state_dict()))
    assert f"{len(renamed)} tensors by order" in lines[0] and f"{first_file_key} -> {first_arch_key}" in lines[1]
    assert len(lines) <= 7
    # The per-spec switch is the same as the flag.
    assert torch.equal(load_specs([f"resnet20={path}@match_by_order=1"], log=lines.append)["paper"].module(x),
                       loaded["paper"].module(x))
    # Without it: the first key that does not fit, and the hint.
    with pytest.raises(DecorrError, match=r"missing key 'normalize.mean'.*--match-by-order"):
        load_specs([f"resnet20={path}"])
    # A shape mismatch in the order: two tensors of different shapes swapped.
    items = list(renamed.items())
    i = next(k for k in range(len(items) - 1) if items[k][1].shape != items[k + 1][1].shape)
    items[i], items[i + 1] = items[i + 1], items[i]
    torch.save(dict(items), tmp_path / "swapped.pth")
    with pytest.raises(DecorrError, match=rf"by order: tensor {i} '{items[i][0]}'"):
        load_specs([f"resnet20={tmp_path / 'swapped.pth'}"], SpecOptions(match_by_order=True))
    torch.save(dict(list(renamed.items())[:-1]), tmp_path / "short.pth")
    with pytest.raises(DecorrError, match=rf"hold {len(renamed) - 1} tensors but resnet20 has {len(renamed)}"):
        load_specs([f"resnet20={tmp_path / 'short.pth'}"], SpecOptions(match_by_order=True))


def test_bad_inputs_are_one_line_errors(files, tmp_path, monkeypatch, capsys):
    with pytest.raises(DecorrError, match=r"'fc.weight' has shape \[10, 512\] in the file but \[7, 512\]"):
        load_specs([f"torchvision.resnet18={files['r18']}"], SpecOptions(num_classes=7))
    with pytest.raises(DecorrError, match="do not fit resnet20: missing key 'normalize.mean' .*unexpected key"):
        load_specs([f"resnet20={files['r18']}"])
    with pytest.raises(DecorrError, match="safetensors files do not keep the tensors' order"):
        load_specs([f"resnet20={files['r20']}"], SpecOptions(match_by_order=True))
    with pytest.raises(DecorrError, match="unknown option 'colour=red'"):
        parse_spec(f"resnet20={files['r20']}@colour=red")
    with pytest.raises(DecorrError, match="without its architecture"):
        parse_spec(str(files["r20"]))
    with pytest.raises(DecorrError, match="unknown architecture 'resnet21'"):
        load_specs([f"resnet21={files['r20']}"])
    with pytest.raises(DecorrError, match="torchvision has no classification model 'resnet19'"):
        load_specs([f"torchvision.resnet19={files['r18']}"])
    with pytest.raises(DecorrError, match="both named 'r18'"):
        load_specs([f"torchvision.resnet18={files['r18']}"] * 2)
    monkeypatch.setitem(sys.modules, "timm", None)  # timm absent, whether or not it is installed
    with pytest.raises(DecorrError, match="pip install timm"):
        load_specs([f"timm.resnet18={files['r18']}"])
    err = _error_line(transfer_script.main, [f"timm.resnet18={files['r18']}", "--dataset", str(CIFAR_SUBSET),
                                             "--out", str(tmp_path / "o"), "--no-plots"], capsys)
    assert "pip install timm" in err


def test_checkpoint_on_data_of_another_shape_is_one_line(cifar_subset, tmp_path, capsys):
    save_checkpoint(tmp_path / "cnn", {"model0": create_model("mnist_cnn")},
                    {"kind": "single", "models": {"model0": model_entry("mnist_cnn")}, "dataset": "mnist"})
    err = _error_line(transfer_script.main, [str(tmp_path / "cnn"), "--dataset", str(CIFAR_SUBSET), "--num-samples",
                                             "4", "--out", str(tmp_path / "o"), "--no-plots"], capsys)
    assert "takes inputs (1, 28, 28) but the data has (3, 32, 32)" in err
    save_checkpoint(tmp_path / "gray", {"model0": create_model("resnet20", in_channels=1)},
                    {"models": {"model0": model_entry("resnet20", {"in_channels": 1})}, "dataset": "x"})
    with pytest.raises(DecorrError, match=r"takes inputs \(1, 32, 32\) but the data has \(3, 32, 32\)"):
        evaluate_specs([str(tmp_path / "gray")], cifar_subset.test.subset(4), steps=1)


def test_converter_round_trip_and_refusal(files, tmp_path, capsys):
    spec = f"torchvision.resnet18={files['r18']}@mean=0.4/0.5/0.6,std=0.2/0.3/0.25,input_size=40"
    out = tmp_path / "r18_ckpt"
    convert_main([spec, "--feature-layer", "layer3", "--dataset", "cifar10", "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "converted" and config["dataset"] == "cifar10"
    assert config["models"]["model0"]["arch"] == "torchvision.resnet18"
    assert config["source"]["model0"]["sha256"] == hashlib.sha256(files["r18"].read_bytes()).hexdigest()
    original = load_specs([spec], SpecOptions(feature_layer="layer3"))["r18"]
    models, info = load_named_models([str(out)])
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(models["r18_ckpt/model0"](x), original.module(x))
    assert info["r18_ckpt/model0"]["feature_layer"] == "net.layer3"
    # Registry archs rebuild from the registry.
    convert_main([f"resnet20={files['r20']}", "--out", str(tmp_path / "r20_ckpt")])
    assert json.loads((tmp_path / "r20_ckpt" / "config.json").read_text())["models"]["model0"] == {
        "arch": "resnet20", "kwargs": {"num_classes": 10}, "feature_layer": "avgpool"}
    before = (out / "config.json").read_bytes()
    err = _error_line(convert_main, [spec, "--out", str(out)], capsys)
    assert "already exists" in err and (out / "config.json").read_bytes() == before


def test_dverge_init_takes_specs_and_rebuilds_them(files, tmp_path):
    convert_main([f"resnet20={files['r20']}", "--out", str(tmp_path / "conv")])
    spec = f"resnet20={files['r20']}@input_size=36"
    models, entries, origins, dataset = load_init_models([spec, str(tmp_path / "conv")])
    assert list(models) == ["model0", "model1"] and dataset is None
    assert origins[0]["spec"] == spec and origins[1]["model"] == "model0"
    assert entries["model0"]["preprocess"] == {"input_size": [36, 36]}
    x = torch.rand(2, 3, 32, 32)
    for name, model in models.items():
        rebuilt = build_model(entries[name], model.state_dict()).eval()
        with torch.no_grad():
            assert torch.equal(rebuilt(x), model.eval()(x))
    assert entries["model0"]["feature_layer"] == "net.avgpool"


def test_gradient_alignment_takes_specs(files, tmp_path):
    result = alignment_script.main([f"torchvision.resnet18={files['r18']}", f"resnet20={files['r20']}",
                                    "--dataset", str(CIFAR_SUBSET), "--num-samples", "6", "--batch-size", "6"])
    assert result["sources"] == ["r18", "r20"] and result["targets"] == ["r18", "r20"]


def test_issue_command_with_an_ensemble_of_foreign_specs(files, cifar_subset, tmp_path):
    """The any-model issue's command as written: two specs and an ensemble of foreign specs as targets."""
    out = tmp_path / "eval"
    result = transfer_script.main([
        f"torchvision.resnet18={files['r18']}", f"resnet20={files['r20']}",
        "--ensemble", f"ens=torchvision.resnet18={files['r18_dp']},resnet20={files['r20']}",
        "--num-classes", "10", "--dataset", str(CIFAR_SUBSET), "--num-samples", "40", "--steps", "1",
        "--eps", "8/255", "--step-size", "2/255", "--batch-size", "20", "--no-plots", "--out", str(out),
    ])
    split = cifar_subset.test.subset(40)
    x, y = to_float(split.images), split.labels
    r18 = torchvision.models.resnet18(num_classes=10)
    r18.load_state_dict(torch.load(files["r18"], weights_only=True))
    r20 = create_model("resnet20")
    r20.load_state_dict(files["r20_model"].state_dict())
    with torch.no_grad():
        logits = {"r18": r18.eval()(x), "r20": r20.eval()(x)}
        mean_prob = (logits["r18"].softmax(1) + logits["r20"].softmax(1)) / 2
    expected = {name: (out_.argmax(1) == y).double().mean().item() for name, out_ in logits.items()}
    expected["ens"] = (mean_prob.argmax(1) == y).double().mean().item()
    for name, value in expected.items():
        assert result["models"][name]["natural_accuracy"] == pytest.approx(value, abs=1e-12), name
    assert result["models"]["ens"]["members"] and result["models"]["ens"]["arch"] == "ensemble"
    assert json.loads((out / "results.json").read_text())["models"]["ens"]["natural_accuracy_ci95"]


def test_a_model_trained_on_another_image_size_is_evaluated_on_it(tmp_path, fashion_mnist):
    """resnet20 built for 1-channel 28x28 images (as train/classifier.py does on Fashion-MNIST) evaluates there."""
    from decorr.checkpoint import model_entry, save_checkpoint

    model = create_model("resnet20", in_channels=1)
    save_checkpoint(tmp_path / "r20fm", {"model": model},
                    {"kind": "classifier", "dataset": "fashion-mnist",
                     "models": {"model": model_entry("resnet20", {"in_channels": 1})}})
    result = transfer_script.main([str(tmp_path / "r20fm"), "--dataset", "fashion-mnist", "--num-samples", "8",
                                   "--steps", "1", "--eps", "0.1", "--no-plots", "--no-features",
                                   "--out", str(tmp_path / "out")])
    assert result["models"]["r20fm/model"]["natural_accuracy"] is not None
