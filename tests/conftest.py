"""Shared test setup: where the development data lies, and fixtures that fail (never skip) without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: CI clones the repository with ``shared/`` beside it; the datasets live in ``shared/data``.
SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR_SUBSET = SHARED_DATA / "cifar10-subset" / "cifar10_subset.npz"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

os.environ.setdefault("DECORR_DATA_ROOT", str(SHARED_DATA))
# Two cores are shared by everything on this machine; one intra-op thread per test process is fastest.
torch.set_num_threads(1)


def load_script(path: str):
    """A script of the repository (``eval/transfer.py``) imported as a module, to call its ``main`` in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{path.replace('/', '_')}", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _load(name: str):
    from decorr.data import load_dataset
    from decorr.errors import DecorrError

    try:
        return load_dataset(name, download=False)
    except DecorrError as err:
        pytest.fail(f"dataset {name!r} needed by this test is missing: {err}", pytrace=False)


@pytest.fixture(scope="session")
def mnist():
    return _load("mnist")


@pytest.fixture(scope="session")
def fashion_mnist():
    return _load("fashion-mnist")


@pytest.fixture(scope="session")
def cifar_subset():
    if not CIFAR_SUBSET.exists():
        pytest.fail(f"CIFAR-10 subset missing at {CIFAR_SUBSET}; the tests need the shared data folder", pytrace=False)
    return _load(str(CIFAR_SUBSET))
