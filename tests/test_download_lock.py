"""Several processes that all miss a dataset: exactly one downloads, the others wait and read its files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# Run in each process: a registered dataset whose loader "downloads" (slowly) through decorr's own
# _download when its file is missing, like the torchvision-backed loaders; every real download is
# counted in a file.
CHILD = r"""
import sys, time
from pathlib import Path
import numpy as np
from decorr import data
from decorr.data import locate

root = Path(sys.argv[1])

def fetch(download_root):
    target = download_root / "fake.npz"
    if target.exists():  # torchvision's downloaders verify and skip what is there
        return
    download_root.mkdir(parents=True, exist_ok=True)
    with open(download_root.parent / "downloads.txt", "a") as log:
        log.write("x")
    time.sleep(1.5)
    x = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    np.savez(download_root / "fake.tmp.npz", x_train=x, y_train=np.array([0, 1]), x_test=x, y_test=np.array([1, 0]))
    (download_root / "fake.tmp.npz").rename(target)

def loader(root_arg, download=True):
    target = root / "fake.npz"
    if not target.exists():
        error = locate._download("fake", root, fetch, [])
        if error:
            raise SystemExit(error)
    return data.load_npz_dataset(target, name="fake")

data.register_dataset("fake-download")(loader)
dataset = data.load_dataset("fake-download")
print(int(dataset.test.images.sum()), dataset.test.labels.tolist())
"""


def test_two_processes_download_once_and_read_the_same_data(tmp_path):
    root = tmp_path / "data"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(root)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert (tmp_path / "downloads.txt").read_text() == "x"  # one download
    assert outputs[0][0] == outputs[1][0]
    expected = np.arange(2 * 28 * 28, dtype=np.uint8).sum()
    assert outputs[0][0].split()[0] == str(int(expected))
