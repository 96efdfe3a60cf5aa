"""Checkpoints as they exist in the wild (issue #25): a paper's own MNIST file, loaded through a spec with
architecture arguments, evaluated and converted.

Oracles: a hand-written forward (F.conv2d / F.max_pool2d / F.avg_pool2d / F.linear) with the file's own
tensors, read back with torch.load(map_location="cpu", weights_only=True); the file written with torch.save while torch's
location tag says "cuda:0" (so a load without map_location fails on this CPU machine: checked).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.serialization
from safetensors.torch import save_file

from decorr.checkpoint import load_checkpoint
from decorr.convert import main as convert_main
from decorr.data import to_float
from decorr.errors import DecorrError
from decorr.models.weights import file_format, read_state_dict
from decorr.specs import load_specs, parse_spec
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
N = 300  # MNIST test images evaluated


transfer_script = load_script("eval/transfer.py")


class PaperCNN(nn.Module):
    """A paper repository's MNIST CNN: decorr's mnist_cnn layers under its own names, on raw [0, 1] pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 32, 3, padding=1)
        self.l = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.l(F.avg_pool2d(F.relu(self.c3(x)), 7).flatten(1))


def by_hand(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The paper model's forward written out with the file's tensors (no module of ours or theirs)."""
    h = F.max_pool2d(F.relu(F.conv2d(x, w["c1.weight"], w["c1.bias"], padding=1)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, w["c2.weight"], w["c2.bias"], padding=1)), 2)
    h = F.avg_pool2d(F.relu(F.conv2d(h, w["c3.weight"], w["c3.bias"], padding=1)), 7).flatten(1)
    return F.linear(h, w["l.weight"], w["l.bias"])


def save_as_if_from_cuda(state: dict[str, torch.Tensor], path: Path) -> None:
    """torch.save with every storage tagged "cuda:0", as a file saved on a GPU machine is."""
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(state, path)
    finally:
        torch.serialization.location_tag = original


@pytest.fixture(scope="module")
def paper_file(mnist, tmp_path_factory):
    """The paper's file: trained briefly on raw pixels (so accuracy is far from chance), no suffix, CUDA tags."""
    torch.manual_seed(0)
    model = PaperCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = to_float(mnist.train.images[:6000]), mnist.train.labels[:6000]
    for epoch in range(2):
        for i in range(0, len(y), 64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            optimizer.step()
    path = tmp_path_factory.mktemp("paper") / "mnist_cnn_seed0"
    save_as_if_from_cuda({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
    return path


def test_the_file_really_carries_cuda_tags(paper_file):
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine a CUDA-tagged file loads without map_location")
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(paper_file, weights_only=True)
    assert file_format(paper_file) == "zip" and paper_file.suffix == ""


def test_paper_file_evaluates_as_its_hand_written_forward(paper_file, mnist, tmp_path, capsys):
    spec = f"mnist_cnn(mean=0,std=1)={paper_file}@match_by_order=1"
    out = tmp_path / "eval"
    result = transfer_script.main([spec, "--dataset", "mnist", "--num-samples", str(N), "--attack", "fgsm",
                                   "--eps", "0.1", "--no-plots", "--out", str(out)])
    weights = torch.load(paper_file, map_location="cpu", weights_only=True)
    split = mnist.test.subset(N)
    x, y = to_float(split.images), split.labels
    with torch.no_grad():
        expected = (by_hand(weights, x).argmax(1) == y).sum().item()
    assert expected / N > 0.5  # trained: the comparison below is not between two chance levels
    saved = json.loads((out / "results.json").read_text())
    record = saved["models"]["mnist_cnn_seed0"]
    assert record["natural_correct"] == expected
    assert result["models"]["mnist_cnn_seed0"]["natural_accuracy"] == pytest.approx(expected / N, abs=1e-12)
    assert record["kwargs"] == {"mean": [0.0], "std": [1.0], "num_classes": 10}
    assert record["format"] == "zip" and record["sha256"] == hashlib.sha256(paper_file.read_bytes()).hexdigest()
    err = capsys.readouterr().err
    assert "c1.weight -> features.conv1.weight" in err
    assert "(kept from the architecture) -> features.normalize.mean = [0]" in err
    assert "(kept from the architecture) -> features.normalize.std = [1]" in err
    # Without the arguments the architecture's MNIST normalisation stays in front: other predictions.
    default = load_specs([f"mnist_cnn={paper_file}@match_by_order=1"], log=lambda _m: None)["mnist_cnn_seed0"]
    with torch.no_grad():
        assert (default.module(x).argmax(1) == y).sum().item() != expected


def test_converted_paper_file_is_a_checkpoint_every_tool_takes(paper_file, mnist, tmp_path):
    spec = f"mnist_cnn(mean=0,std=1)={paper_file}@match_by_order=1"
    checkpoint = tmp_path / "paper_ckpt"
    convert_main([spec, "--dataset", "mnist", "--out", str(checkpoint)])
    config = load_checkpoint(checkpoint, load_weights=False).config
    assert config["models"]["model0"]["kwargs"] == {"mean": [0.0], "std": [1.0], "num_classes": 10}
    assert config["source"]["model0"]["spec"] == spec
    results = {}
    for name, models in (("spec", [spec]), ("checkpoint", [str(checkpoint)])):
        results[name] = transfer_script.main([*models, "--dataset", "mnist", "--num-samples", str(N), "--attack", "fgsm",
                                              "--eps", "0.1", "--no-plots", "--out", str(tmp_path / name)])
    (spec_record,), (ckpt_record,) = results["spec"]["models"].values(), results["checkpoint"]["models"].values()
    assert ckpt_record["natural_correct"] == spec_record["natural_correct"]
    weights = torch.load(paper_file, map_location="cpu", weights_only=True)
    x = to_float(mnist.test.subset(N).images)
    rebuilt = load_specs([str(checkpoint)])
    with torch.no_grad():
        torch.testing.assert_close(next(iter(rebuilt.values())).module(x), by_hand(weights, x), rtol=1e-5, atol=1e-5)


def test_format_is_read_from_the_content_whatever_the_suffix(paper_file, tmp_path):
    weights = torch.load(paper_file, map_location="cpu", weights_only=True)
    legacy = tmp_path / "legacy.safetensors"  # a legacy pickle under a misleading suffix
    torch.save(weights, legacy, _use_new_zipfile_serialization=False)
    real_safetensors = tmp_path / "weights.pt"
    save_file({k: v.contiguous() for k, v in weights.items()}, real_safetensors)
    assert (file_format(legacy), file_format(real_safetensors), file_format(paper_file)) == ("pickle", "safetensors", "zip")
    for path in (legacy, real_safetensors):
        read = read_state_dict(path)
        assert set(read) == set(weights) and all(torch.equal(read[k], weights[k]) for k in weights)
    model = load_specs([f"mnist_cnn(mean=0,std=1)={legacy}@match_by_order=1"], log=lambda _m: None)["legacy"]
    assert torch.equal(model.module.state_dict()["head.fc.weight"], weights["l.weight"])
    with pytest.raises(DecorrError, match="safetensors files do not keep the tensors' order"):
        load_specs([f"mnist_cnn(mean=0,std=1)={real_safetensors}@match_by_order=1"])
    evil = tmp_path / "evil"  # no suffix: still refused as a pickle that would run code
    evil.write_bytes(pickle.dumps({"x": Path("a")}, protocol=2))
    with pytest.raises(DecorrError, match="refused: unpickling it would run code"):
        read_state_dict(evil)
    text = tmp_path / "notes"
    text.write_text("not weights")
    with pytest.raises(DecorrError, match="neither safetensors nor a torch.save file"):
        read_state_dict(text)


def test_architecture_arguments_parse_into_values():
    parsed = parse_spec("mnist_cnn(mean=0.5/0.25,std=1,in_channels=2,name=x)=paper@match_by_order=1")
    assert parsed.arch == "mnist_cnn" and parsed.weights == "paper"
    assert parsed.arch_kwargs == {"mean": (0.5, 0.25), "std": (1.0,), "in_channels": 2, "name": "x"}
    assert parsed.options == {"match_by_order": True}
    assert parse_spec("mnist_cnn=paper").arch_kwargs == {}
