"""Adversarial examples as files: --save-adversarial then --adversarial reproduces the in-process evaluation
(float copies exactly; the 8-bit PNGs beside them), PNG pixels are round(255 x_adv), and the documented
SGM command runs offline on a generated folder with small random torchvision models."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from decorr.errors import DecorrError

REPO = Path(__file__).resolve().parents[1]


def _main():
    spec = importlib.util.spec_from_file_location("eval_transfer_files", REPO / "eval" / "transfer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _folder(root: Path, n: int = 6, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for k in range(n):
        path = root / f"c{k % 3}" / f"{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size + k, size, 3), dtype=np.uint8)).save(path)
    return root


def _weights(tmp: Path) -> tuple[str, str]:
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp / "r18.pth")
    torch.save(torchvision.models.squeezenet1_1(num_classes=3).state_dict(), tmp / "sq.pth")
    return f"torchvision.resnet18={tmp / 'r18.pth'}", f"torchvision.squeezenet1_1={tmp / 'sq.pth'}"


def test_saved_examples_reproduce_the_in_process_rates(tmp_path):
    main = _main()
    data = _folder(tmp_path / "images")
    r18, sq = _weights(tmp_path)
    common = ["--eps", "8/255", "16/255", "--steps", "3", "--step-size", "4/255", "--batch-size", "4",
              "--no-plots", "--no-features"]
    live = main([r18, sq, "--dataset", str(data), "--image-size", "32", "--save-adversarial",
                 str(tmp_path / "adv"), "--save-float", "--out", str(tmp_path / "live"), *common])
    rows = list(csv.DictReader(open(tmp_path / "adv" / "index.csv")))
    assert len(rows) == 2 * 2 * 6 and set(rows[0]) == {"file", "source", "attack", "eps", "index", "label",
                                                        "source_pred", "float_file"}
    for row in rows[:3] + rows[-3:]:
        x_adv = np.load(tmp_path / "adv" / row["float_file"])
        png = np.asarray(Image.open(tmp_path / "adv" / row["file"])).transpose(2, 0, 1)
        assert np.array_equal(png, np.round(255 * x_adv.astype(np.float64)).astype(np.uint8))
    unrounded = main([r18, sq, "--adversarial", str(tmp_path / "adv"), "--adversarial-float",
                      "--out", str(tmp_path / "float"), *common])
    delivered = main([r18, sq, "--adversarial", str(tmp_path / "adv"), "--out", str(tmp_path / "png"), *common])
    for a, b, c in zip(live["by_eps"], unrounded["by_eps"], delivered["by_eps"]):
        for key in ("white_box_accuracy", "accuracy", "transfer", "source_fooled", "transferred"):
            assert a[key] == b[key], key
            assert b["quantised"][key] == c[key], key
        assert [p["mean"] for p in a["pairs"]] == [p["mean"] for p in b["pairs"]]
        assert all(isinstance(v, int) for v in c["quantisation_lost"].values())
        assert c["quantisation_lost"] == b["quantisation_lost"]
    saved = json.loads((tmp_path / "png" / "results.json").read_text())
    assert saved["settings"]["images"] == "8-bit PNG" and saved["settings"]["attacks"][0]["components"]["pgd"]["steps"] == 3
    # An external tool's folder: only file, source, eps, label; the source model is not loaded.
    (tmp_path / "ext").mkdir()
    for k in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * k, np.uint8)).save(tmp_path / "ext" / f"{k}.png")
    (tmp_path / "ext" / "index.csv").write_text("file,source,eps,label\n0.png,theirs,0.03,1\n1.png,theirs,0.03,2\n")
    external = main([r18, "--adversarial", str(tmp_path / "ext"), "--out", str(tmp_path / "extout"), "--no-plots"])
    assert external["by_eps"][0]["accuracy"]["theirs"]["r18"] is not None
    assert external["by_eps"][0]["transfer"]["theirs"]["r18"] is None


def test_bad_adversarial_folders_are_one_line_errors(tmp_path, capsys):
    main = _main()
    r18, _ = _weights(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "index.csv").write_text("file,source,eps,label\nmissing.png,s,0.1,0\n")
    with pytest.raises(SystemExit):
        main([r18, "--adversarial", str(tmp_path / "a"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.png not found" in err
    (tmp_path / "a" / "index.csv").write_text("file,eps,label\n")
    with pytest.raises(SystemExit):
        main([r18, "--adversarial", str(tmp_path / "a"), "--out", str(tmp_path / "o2")])
    assert "lacks the column(s) source" in capsys.readouterr().err


def _documented_sgm_command() -> list[str]:
    text = (REPO / "docs" / "transfer.md").read_text()
    block = re.search(r"<!-- sgm-command -->\s*```bash\n(.*?)```", text, re.S).group(1)
    command = block.strip().split("\n\n")[0].replace("\\\n", " ")
    return shlex.split(command)


def test_documented_sgm_command_runs_on_a_generated_folder(tmp_path, monkeypatch):
    argv = _documented_sgm_command()
    assert argv[:2] == ["python", "eval/transfer.py"]
    joined = " ".join(argv)
    for expected in ("--attack pgd+sgm", "--gamma 0.2", "--eps 16/255", "--steps 10", "--step-size 2/255",
                     "torchvision.vgg19=DEFAULT", "torchvision.resnet152=DEFAULT", "--surrogate"):
        assert expected in joined, expected
    small = {"vgg19": "vgg11", "inception_v3": "resnet18", "resnet152": "resnet34", "input_size=299": "input_size=64"}
    # Offline: torchvision's "pretrained" weights are random weights of the architecture, in torch hub's cache.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for name in ("vgg11", "resnet18", "resnet34"):
        weights = torchvision.models.get_model_weights(name).DEFAULT
        cached = tmp_path / "torch_home" / "hub" / "checkpoints" / Path(weights.url).name
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(torchvision.models.get_model(name, weights=None).state_dict(), cached)
    data = _folder(tmp_path / "imagenet_val", n=3, size=70)
    args = []
    for arg in argv[2:]:
        for big, little in small.items():
            arg = arg.replace(big, little)
        args.append({"IMAGENET_FOLDER": str(data), "224": "64", "256": "72", "50": "3"}.get(arg, arg))
    args = [a for a in args if a != "--only-correct"]  # random models agree on no label
    args = [str(tmp_path / a) if a.startswith("runs/") else a for a in args] + ["--no-plots", "--no-features"]
    result = _main()(args)
    (attack,) = result["settings"]["attacks"]
    assert attack["resolved"] == "pgd+sgm" and attack["components"]["sgm"]["gamma"] == 0.2
    assert result["sources"] == ["resnet34"] and result["targets"] == ["vgg11", "resnet18"]
    assert result["models"]["vgg11"]["mean"] == [0.485, 0.456, 0.406]
    assert result["models"]["resnet18"]["input_size"] == [64, 64]
    assert len(list((tmp_path / "runs" / "adv" / "sgm_resnet34").rglob("*.png"))) == 3


def test_torchvision_weights_by_name_offline_is_one_line_error(monkeypatch, tmp_path):
    from decorr.specs import load_specs

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # nothing cached
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(DecorrError, match="needs internet"):
        load_specs(["torchvision.resnet18=DEFAULT"])
    with pytest.raises(DecorrError, match="has no weights 'IMAGENET9K'"):
        load_specs(["torchvision.resnet18=IMAGENET9K"])
