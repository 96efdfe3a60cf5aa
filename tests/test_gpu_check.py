"""benchmarks/gpu_check.sh, the prepared GPU run, checked on the CPU at tiny sizes (no GPU needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_script_runs_every_step_on_cpu(tmp_path):
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "RESULTS": str(tmp_path), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=900)
    log = (tmp_path / "gpu_check.log").read_text()
    assert done.returncode == 0, log + done.stderr[-3000:]
    assert "failed steps: 0" in log
    for name in ("dna_epoch_gpu", "correlation_loss_gpu", "transfer_eval_gpu"):
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["device"] == "cpu"
    dna = json.loads((tmp_path / "dna_epoch_gpu.json").read_text())
    assert dna["steps_per_epoch"] == 2 and dna["ratio_best"] > 0
    assert json.loads((tmp_path / "transfer_eval_gpu.json").read_text())["identical"]
