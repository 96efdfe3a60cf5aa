"""Two processes (torchrun, gloo on CPU) give the one-process values on the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from decorr.loss import correlation_loss

HERE = Path(__file__).resolve().parent


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 240) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_correlation_loss_on_split_batch_equals_whole_batch(tmp_path):
    sys.path.insert(0, str(HERE))
    from dist_correlation_loss import batch

    out = tmp_path / "dist.safetensors"
    torchrun(HERE / "dist_correlation_loss.py", str(out))
    got = load_file(str(out))
    z1, z2 = batch()
    a = z1.clone().requires_grad_()
    b = z2.clone().requires_grad_()
    loss = correlation_loss(a, b)
    loss.backward()
    assert float(got["loss"]) == pytest.approx(float(loss.detach()), rel=1e-6)
    torch.testing.assert_close(got["grad_z1"], a.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["grad_z2"], b.grad, rtol=1e-5, atol=1e-7)
