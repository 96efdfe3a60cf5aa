"""Published weights with their preprocessing (torchvision enums, timm pretrained configs) and RobustBench
models, offline: random-weight files placed where the real code looks for them (torch hub's cache under
TORCH_HOME, the Hugging Face cache under HF_HOME, a RobustBench model folder).

Oracles: torchvision's ``weights.transforms()`` and timm's ``create_transform(**resolve_data_config(...))``
applied to the same images; models built here by hand with the file's tensors (torch.load / safetensors);
hashlib for the checksums. RobustBench: ``robustbench`` is not installed here (PyPI's release pins other
packages' versions), so the test puts a small stand-in package on sys.path with RobustBench's layout
(``robustbench.model_zoo.model_dicts[BenchmarkDataset][ThreatModel][NAME]["model"]``, ``robustbench.utils``'s
state-dict helpers, ``model_info/<dataset>/<threat>/NAME.json``); the path through decorr is the real one.
"""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file, save_file

from decorr.errors import DecorrError
from decorr.specs import load_specs

REPO = Path(__file__).resolve().parents[1]
from conftest import CIFAR_SUBSET, load_script  # noqa: E402

timm = pytest.importorskip("timm")  # in the dev extra; CI installs it


transfer_script = load_script("eval/transfer.py")


def _error_line(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def _random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            value = torch.randn(value.shape, generator=generator) * 0.05
            value = value.abs() + 0.5 if key.endswith("running_var") else value
        state[key] = value.contiguous()
    return state


def _capture_input(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``module`` feeds its wrapped network (``module.net``), and its output."""
    seen = []
    handle = module.net.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        out = module(x)
    handle.remove()
    return seen[0], out


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """resnet18's IMAGENET1K_V1 file (random weights) in torch hub's cache under a fresh TORCH_HOME."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    path = tmp_path / "torch_home" / "hub" / "checkpoints" / Path(weights.url).name
    path.parent.mkdir(parents=True)
    torch.save(_random_state(torchvision.models.resnet18(), 1), path)
    return path


@pytest.fixture
def image_folder(tmp_path):
    """Four 70x90 RGB images with labels.csv (an ImageNet-compatible folder)."""
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = ["filename,label"]
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(root / f"im{i}.png")
        rows.append(f"im{i}.png,{i}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_torchvision_weights_come_with_their_own_transforms(torch_home, image_folder, tmp_path):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    model = load_specs(["torchvision.resnet18=IMAGENET1K_V1"])["resnet18"]
    x = torch.rand(3, 3, 300, 260, generator=torch.Generator().manual_seed(0))
    fed, out = _capture_input(model.module, x)
    torch.testing.assert_close(fed, weights.transforms()(x), rtol=0, atol=1e-6)
    by_hand = torchvision.models.resnet18().eval()
    by_hand.load_state_dict(torch.load(torch_home, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(out, by_hand(weights.transforms()(x)), rtol=1e-4, atol=1e-4)
    assert model.entry["preprocess"] == {"resize": [256], "crop": [224], "interpolation": "bilinear",
                                         "antialias": True, "mean": list(weights.transforms().mean),
                                         "std": list(weights.transforms().std)}
    result = transfer_script.main(["torchvision.resnet18=DEFAULT", "--dataset", str(image_folder), "--attack", "fgsm",
                                   "--eps", "1/255", "--no-plots", "--quiet", "--out", str(tmp_path / "eval")])
    record = json.loads((tmp_path / "eval" / "results.json").read_text())["models"]["resnet18"]
    assert record["weights"] == "torchvision:ResNet18_Weights.IMAGENET1K_V1" and record["weights_name"] == "IMAGENET1K_V1"
    assert record["weights_requested"] == "DEFAULT" and record["weights_file"] == str(torch_home)
    assert record["sha256"] == hashlib.sha256(torch_home.read_bytes()).hexdigest()
    assert record["preprocess"]["crop"] == [224] and result["models"]["resnet18"]["natural_correct"] >= 0
    only_normalize = load_specs(["torchvision.resnet18=IMAGENET1K_V1@transforms=normalize"])["resnet18"]
    assert only_normalize.entry["preprocess"] == {"mean": list(weights.transforms().mean),
                                                  "std": list(weights.transforms().std)}
    bare = load_specs(["torchvision.resnet18=IMAGENET1K_V1@transforms=none"])["resnet18"]
    assert "preprocess" not in bare.entry and not isinstance(bare.module, type(model.module))


def _timm_eval_transform(net):
    config = timm.data.resolve_data_config({}, model=net)
    return timm.data.create_transform(**config), config


def test_timm_file_and_pretrained_come_with_timm_preprocessing(tmp_path, monkeypatch):
    name = "test_resnet.r160_in1k"
    net = timm.create_model(name, pretrained=False)
    state = _random_state(net, 2)
    file = tmp_path / "test_resnet.safetensors"
    save_file(state, file)
    # the Hugging Face cache as timm's download leaves it (offline: the real loader reads it from there)
    repo = tmp_path / "hf" / "hub" / "models--timm--test_resnet.r160_in1k"
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file(state, repo / "snapshots" / commit / "model.safetensors")
    import huggingface_hub.constants

    # huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when imported; its constants are read at each call
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    x = torch.rand(2, 3, 190, 210, generator=torch.Generator().manual_seed(1))
    transform, config = _timm_eval_transform(net)
    expected_input = torch.stack([transform(image) for image in x])
    net.load_state_dict(load_file(file))
    with torch.no_grad():
        expected = net.eval()(expected_input)
    models = load_specs([f"timm.{name}={file}", f"timm.{name}=pretrained@name=hub"])
    for label, model in models.items():
        fed, out = _capture_input(model.module, x)
        torch.testing.assert_close(fed, expected_input, rtol=0, atol=1e-6)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        assert model.info["data_config"]["crop_pct"] == config["crop_pct"]
        assert model.info["data_config"]["input_size"] == list(config["input_size"])
        assert model.info["preprocess"]["interpolation"] == config["interpolation"]
    hub = models["hub"].info
    assert hub["weights"] == f"timm:{name}" and Path(hub["weights_file"]).name == "model.safetensors"
    assert hub["sha256"] == hashlib.sha256((repo / "snapshots" / commit / "model.safetensors").read_bytes()).hexdigest()


FAKE_ROBUSTBENCH = {
    "robustbench/__init__.py": "",
    "robustbench/model_zoo/__init__.py": "from .models import model_dicts\n",
    "robustbench/model_zoo/enums.py": """
        from enum import Enum

        class BenchmarkDataset(Enum):
            cifar_10 = 'cifar10'
            cifar_100 = 'cifar100'
            imagenet = 'imagenet'

        class ThreatModel(Enum):
            Linf = 'Linf'
            L2 = 'L2'
            corruptions = 'corruptions'
        """,
    "robustbench/model_zoo/models.py": """
        from collections import OrderedDict
        import torch.nn as nn
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

        class TinyNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 3, padding=1)
                self.bn = nn.BatchNorm2d(8)
                self.fc = nn.Linear(8, 10)

            def forward(self, x):
                return self.fc(self.bn(self.conv(x)).relu().mean(dim=(2, 3)))

        model_dicts = OrderedDict([
            (BenchmarkDataset.cifar_10, OrderedDict([
                (ThreatModel.Linf, OrderedDict([('Tiny2024Fake', {'model': TinyNet, 'gdrive_id': 'none'})])),
                (ThreatModel.L2, OrderedDict()),
            ])),
        ])
        """,
    "robustbench/utils.py": """
        from collections import OrderedDict

        def rm_substr_from_state_dict(state_dict, substr):
            new_state_dict = OrderedDict()
            for key in state_dict.keys():
                if substr in key:
                    new_state_dict[key[len(substr):]] = state_dict[key]
                else:
                    new_state_dict[key] = state_dict[key]
            return new_state_dict

        def add_substr_to_state_dict(state_dict, substr):
            return OrderedDict((substr + k, v) for k, v in state_dict.items())

        def download_gdrive_new(gdrive_id, fname_save):
            raise ConnectionError('offline')
        """,
    "model_info/cifar10/Linf/Tiny2024Fake.json": '{"clean_acc": "87.25", "autoattack_acc": "55.00"}',
}


@pytest.fixture
def fake_robustbench(tmp_path, monkeypatch):
    root = tmp_path / "rb"
    for name, text in FAKE_ROBUSTBENCH.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    for name in [m for m in sys.modules if m == "robustbench" or m.startswith("robustbench.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(root))
    from robustbench.model_zoo.models import TinyNet

    model = TinyNet()
    state = _random_state(model, 3)
    path = tmp_path / "models" / "cifar10" / "Linf" / "Tiny2024Fake.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"module.model.{k}": v for k, v in state.items()}}, path)  # RobustBench's nesting
    model.load_state_dict(state)
    return tmp_path / "models", path, model.eval()


def test_robustbench_model_from_its_folder_with_the_reported_accuracy(fake_robustbench, cifar_subset, tmp_path):
    model_dir, path, by_hand = fake_robustbench
    out = tmp_path / "eval"
    result = transfer_script.main([f"robustbench.Tiny2024Fake={model_dir}@dataset=cifar10,threat=Linf", "--dataset",
                                   str(CIFAR_SUBSET), "--num-samples", "40", "--attack", "fgsm", "--eps", "8/255",
                                   "--no-plots", "--quiet", "--out", str(out)])
    from decorr.data import to_float

    split = cifar_subset.test.subset(40)
    with torch.no_grad():
        expected = int((by_hand(to_float(split.images)).argmax(1) == split.labels).sum())
    record = json.loads((out / "results.json").read_text())["models"]["Tiny2024Fake"]
    assert record["natural_correct"] == expected == result["models"]["Tiny2024Fake"]["natural_correct"]
    assert record["reported_clean_accuracy"] == pytest.approx(0.8725)
    assert record["weights"] == "robustbench:cifar10/Linf/Tiny2024Fake" and record["weights_file"] == str(path)
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["kwargs"] == {"dataset": "cifar10", "threat": "Linf"}


BAD_SPECS = [
    # (spec, what the one error line must say)
    ("torchvision.resnet18=IMAGENET9K_V9", "torchvision has no weights 'IMAGENET9K_V9' for resnet18"),
    ("timm.NO_WEIGHTS=pretrained", "timm has no pretrained config with weights for"),
    ("timm.not_a_timm_model=pretrained", "timm has no model 'not_a_timm_model'"),
    ("robustbench.Nobody2099Missing@dataset=cifar10,threat=Linf", "RobustBench has no model 'Nobody2099Missing'"),
    ("robustbench.Tiny2024Fake@dataset=mnist,threat=Linf", "RobustBench has no dataset 'mnist'"),
    ("mnist_cnn(width=3)=PAPER@match_by_order=1", "architecture mnist_cnn takes no argument 'width'; it takes"),
    ("mnist_cnn(mean)=PAPER", "bad architecture argument 'mean'"),
    ("torchvision.resnet18(depth=3)=IMAGENET1K_V1", "does not accept"),
    ("mnist_cnn=PAPER@transforms=crop", "transforms=crop"),
]


@pytest.mark.parametrize("spec, message", BAD_SPECS)
def test_bad_specs_are_one_line_errors(spec, message, torch_home, fake_robustbench, tmp_path, capsys):
    if "NO_WEIGHTS" in spec:  # a timm architecture that has no pretrained weights at all
        spec = spec.replace("NO_WEIGHTS", next(
            m for m in timm.list_models() if not (lambda c: c is not None and (c.hf_hub_id or c.url or c.file))(
                timm.models.get_pretrained_cfg(m))))
    paper = tmp_path / "paper"
    torch.save({k: v for k, v in _random_state(__import__("decorr.models", fromlist=["x"]).create_model(
        "mnist_cnn"), 0).items() if "normalize" not in k}, paper)
    spec = spec.replace("PAPER", str(paper))
    err = _error_line(transfer_script.main, [spec, "--dataset", str(CIFAR_SUBSET), "--num-samples", "4",
                                             "--no-plots", "--out", str(tmp_path / "o")], capsys)
    assert message in err
    assert not (tmp_path / "o").exists()


def test_robustbench_without_the_package_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "robustbench", None)
    with pytest.raises(DecorrError, match=r"pip install 'decorr\[zoo\]'"):
        load_specs(["robustbench.Standard@dataset=cifar10,threat=Linf"])
    err = _error_line(transfer_script.main, ["robustbench.Standard@dataset=cifar10,threat=Linf", "--dataset",
                                             str(CIFAR_SUBSET), "--no-plots", "--out", str(tmp_path / "o")], capsys)
    assert "pip install 'decorr[zoo]'" in err
