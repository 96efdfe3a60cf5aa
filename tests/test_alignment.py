"""Gradient alignment: the per-sample metric against numpy, the SGM-decayed gradient against a hand-built
one on a single residual unit, and the script's JSON and refusals."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from decorr.evaluation.alignment import evaluate_gradient_alignment, format_gradient_alignment, input_gradient
from decorr.checkpoint import model_entry, save_checkpoint
from decorr.data import to_float
from decorr.errors import DecorrError
from decorr.evaluation.metrics import gradient_alignment
from decorr.models import create_model
from decorr.models.blocks import ResidualUnit

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("eval_alignment_script", REPO / "eval" / "gradient_alignment.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)  # type: ignore[union-attr]


def test_gradient_alignment_matches_numpy():
    torch.manual_seed(0)
    a, b = torch.randn(6, 2, 3, 3), torch.randn(6, 2, 3, 3)
    b[1] = -3 * a[1]  # exactly opposite: cosine -1, no sign agreement
    b[2] = 0.5 * a[2]
    a[3] = 0.0  # a zero gradient has no direction: cosine 0 by convention
    out = gradient_alignment(a, b)
    na, nb = a.flatten(1).double().numpy(), b.flatten(1).double().numpy()
    for i in range(6):
        denom = np.linalg.norm(na[i]) * np.linalg.norm(nb[i])
        want = float(na[i] @ nb[i] / denom) if denom > 0 else 0.0
        assert out.cosine[i].item() == pytest.approx(want, abs=1e-12)
        assert out.sign_agreement[i].item() == pytest.approx(float(np.mean(np.sign(na[i]) == np.sign(nb[i]))), abs=1e-12)
    assert out.cosine[1].item() == pytest.approx(-1.0) and out.sign_agreement[1].item() == 0.0
    assert out.cosine[2].item() == pytest.approx(1.0) and out.sign_agreement[2].item() == 1.0
    with pytest.raises(DecorrError, match="same shape"):
        gradient_alignment(a, b[:5])


class _OneUnit(nn.Module):
    """logits = W (x + f(x)): one of decorr's residual units and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.unit = ResidualUnit(2, 2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.unit(x))


def test_decayed_gradient_and_self_cosine_by_hand():
    torch.manual_seed(1)
    model = _OneUnit().double().eval()
    x, y = torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    # By hand: g_out = dL/d(unit output); input gradient = g_out + gamma * J_f^T g_out.
    xr = x.clone().requires_grad_(True)
    z = model.unit(xr)
    (g_out,) = torch.autograd.grad(F.cross_entropy(model.head(z), y, reduction="sum"), z)
    xb = x.clone().requires_grad_(True)
    branch = model.unit.branch(xb)
    (jt_g,) = torch.autograd.grad(branch, xb, grad_outputs=g_out)
    for gamma in (1.0, 0.5, 0.2):
        want = g_out + gamma * jt_g
        # exclude="none": the one unit is the first of its parent, which the default leaves alone.
        assert torch.allclose(input_gradient(model, x, y, gamma, exclude="none"), want, atol=1e-12)
    with pytest.raises(DecorrError, match="exclude='none'"):
        input_gradient(model, x, y, 0.5)
    with pytest.raises(DecorrError, match="no residual units to decay"):
        evaluate_gradient_alignment({"res": model}, {"res_target": model}, (x, y), gammas=[0.2])
    result = evaluate_gradient_alignment({"res": model}, {"res_target": model}, (x, y), gammas=[1.0, 0.2], batch_size=3,
                                         sgm_exclude="none")
    assert result["sgm_exclude"] == "none"
    row1, row02 = result["by_gamma"]["1.0"], result["by_gamma"]["0.2"]
    assert row1["self_cosine"]["res"] == pytest.approx(1.0) and row1["cosine"]["res"]["res_target"] == pytest.approx(1.0)
    true, decayed = (g_out + jt_g).flatten(1), (g_out + 0.2 * jt_g).flatten(1)
    want = F.cosine_similarity(decayed, true).mean().item()
    assert want < 0.999  # the decay really changes the direction here
    assert row02["self_cosine"]["res"] == pytest.approx(want, abs=1e-12)
    assert row02["cosine"]["res"]["res_target"] == pytest.approx(want, abs=1e-12)
    assert result["num_samples"] == 4 and "res (0.2)" in format_gradient_alignment(result)


def test_refuses_sgm_on_a_model_without_residual_units():
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([0, 1])
    cnn = create_model("mnist_cnn")
    with pytest.raises(DecorrError, match="no residual units"):
        evaluate_gradient_alignment({"cnn": cnn}, {"cnn2": cnn}, (x, y), gammas=[0.5])
    with pytest.raises(DecorrError, match=r"gamma must be in \(0, 1\]"):
        evaluate_gradient_alignment({"cnn": cnn}, {"cnn2": cnn}, (x, y), gammas=[0.0])
    assert evaluate_gradient_alignment({"cnn": cnn}, {"cnn2": cnn}, (x, y))["by_gamma"]["1.0"]["cosine"]["cnn"]["cnn2"] \
        == pytest.approx(1.0)


def test_script_writes_json_and_refuses_overwrite(mnist, tmp_path, capsys):
    torch.manual_seed(0)
    models = {"model0": create_model("mnist_cnn"), "model1": create_model("mnist_cnn")}
    save_checkpoint(tmp_path / "pair" / "checkpoint", models,
                    {"kind": "pair", "models": {n: model_entry("mnist_cnn") for n in models}, "dataset": "mnist", "epoch": 0})
    out = tmp_path / "alignment.json"
    argv = [str(tmp_path / "pair"), "--num-samples", "40", "--batch-size", "16", "--out", str(out)]
    result = script.main(argv)
    assert "input-gradient alignment on 40 samples" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["format"] == "decorr-gradient-alignment/1" and saved["dataset"] == "mnist"
    assert saved["sgm_exclude"] == "first-of-stage"  # the SGM authors' rule unless --sgm-exclude none
    assert script.parse_args([str(tmp_path / "pair"), "--sgm-exclude", "none"]).sgm_exclude == "none"
    row = saved["by_gamma"]["1.0"]["cosine"]
    assert row["pair/model0"]["pair/model0"] == pytest.approx(1.0)
    assert row["pair/model0"]["pair/model1"] == pytest.approx(result["by_gamma"]["1.0"]["cosine"]["pair/model0"]["pair/model1"])
    # Against a direct computation on the same 40 images.
    split = mnist.test.subset(40)
    x, y = to_float(split.images), split.labels
    loaded = [m.eval() for m in models.values()]
    want = F.cosine_similarity(input_gradient(loaded[0], x, y).flatten(1), input_gradient(loaded[1], x, y).flatten(1))
    assert row["pair/model0"]["pair/model1"] == pytest.approx(want.double().mean().item(), abs=1e-6)
    before = out.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "already exists" in err and "\n" not in err
    assert out.read_bytes() == before
