"""Two processes (torchrun, gloo on CPU) take the DNA training step of one process on the whole batch.

The 2-process run executes ``tests/dist_dna_step.py`` under torchrun; the reference runs the same
cases in this process. Loss, gradients, weights and batch-norm buffers must agree (float64).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import dist_dna_step  # noqa: E402

TWO_PROCESS_CASES = ["mnist", "mnist_accumulate", "cifar_sync_bn", "batchnorm_global", "batchnorm_local"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_processes")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "dist_dna_step.py"), str(out), *TWO_PROCESS_CASES]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_process")
    for name in ("mnist", "mnist_accumulate", "cifar_sync_bn", "batchnorm_global"):
        dist_dna_step.run_case(name, out)
    return out


def _compare(reference: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert reference.keys() == got.keys()
    assert any(k.startswith("grad.") for k in reference) and any(k.startswith("state.") for k in reference)
    for key, want in reference.items():
        if want.is_floating_point():
            torch.testing.assert_close(got[key], want, rtol=1e-7, atol=1e-10, msg=lambda m: f"{key}: {m}")
        else:
            assert torch.equal(got[key], want), key


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mnist", "mnist_accumulate", "cifar_sync_bn", "batchnorm_global"])
def test_two_processes_equal_one_process_on_the_whole_batch(case, two_processes, one_process):
    reference = load_file(str(one_process / f"{case}_rank0.safetensors"))
    for rank in (0, 1):
        _compare(reference, load_file(str(two_processes / f"{case}_rank{rank}.safetensors")))
    if case == "cifar_sync_bn":  # the batch-norm statistics are those of the global batch
        assert any("running_var" in k for k in reference)


@pytest.mark.slow
def test_local_batch_norm_does_not_match(two_processes, one_process):
    # Without convert_sync_batchnorm each process normalises its own half: the comparison must fail.
    reference = load_file(str(one_process / "batchnorm_global_rank0.safetensors"))
    local = load_file(str(two_processes / "batchnorm_local_rank0.safetensors"))
    with pytest.raises(AssertionError):
        _compare(reference, local)
    assert not torch.allclose(local["loss"], reference["loss"], rtol=1e-4)


@pytest.mark.slow
def test_two_process_sync_bn_dna_step_reads_the_host_at_most_four_times(tmp_path):
    """Each host read is a device synchronisation on a GPU (tests/dist_host_reads.py counts them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "dist_host_reads.py"), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    import json

    for rank in (0, 1):
        counts = json.loads((tmp_path / f"reads_rank{rank}.json").read_text())
        assert sum(counts.values()) <= 4, counts
