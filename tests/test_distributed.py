"""Two processes (torchrun) give the one-process values on the whole batch: gloo on CPU always, NCCL on
two CUDA GPUs when the machine has them (skipped with the reason otherwise)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from decorr.loss import correlation_loss

HERE = Path(__file__).resolve().parent


BACKENDS = [
    "gloo",
    pytest.param("nccl", marks=[pytest.mark.cuda, pytest.mark.skipif(
        torch.cuda.device_count() < 2, reason=f"NCCL needs 2 CUDA GPUs; this machine has {torch.cuda.device_count()}")]),
]


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 240, backend: str = "gloo") -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent), "DECORR_TEST_BACKEND": backend}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_correlation_loss_on_split_batch_equals_whole_batch(tmp_path, backend):
    sys.path.insert(0, str(HERE))
    from dist_correlation_loss import batch

    out = tmp_path / "dist.safetensors"
    torchrun(HERE / "dist_correlation_loss.py", str(out), backend=backend)
    got = load_file(str(out))
    z1, z2 = batch()
    a = z1.clone().requires_grad_()
    b = z2.clone().requires_grad_()
    loss = correlation_loss(a, b)
    loss.backward()
    assert float(got["loss"]) == pytest.approx(float(loss.detach()), rel=1e-6)
    torch.testing.assert_close(got["grad_z1"], a.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["grad_z2"], b.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_training_step_two_processes_equals_one(mnist, tmp_path, backend):
    """One optimisation step of a dec pair: torchrun with 2 processes against 1 process, whole batch."""
    script = HERE.parent / "train" / "pair_classifiers.py"
    args = ["--mode", "dec", "--epochs", "1", "--train-subset", "1000", "--test-subset", "1000",
            "--batch-size", "1000", "--no-tensorboard", *(["--cpu"] if backend == "gloo" else [])]
    torchrun(script, *args, "--run-dir", str(tmp_path / "two"), nproc=2, backend=backend)
    torchrun(script, *args, "--run-dir", str(tmp_path / "one"), nproc=1, backend=backend)
    one = json.loads((tmp_path / "one" / "checkpoint" / "config.json").read_text())
    two = json.loads((tmp_path / "two" / "checkpoint" / "config.json").read_text())
    assert two["metrics"]["train/loss"] == pytest.approx(one["metrics"]["train/loss"], rel=1e-6)
    for name in ("model0", "model1"):
        a = load_file(str(tmp_path / "one" / "checkpoint" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "two" / "checkpoint" / f"{name}.safetensors"))
        for key in a:
            # Adam's first step is lr * g / |g|: gradients equal to float rounding give steps equal
            # to ~1e-5 (a component near zero may round either way), not bit for bit.
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4, msg=f"{name}.{key}")
