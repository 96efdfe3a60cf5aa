"""The house: the folders are the parts, imports point down, model families plug in through an entry point.

Every import of every module (also the ones inside functions) is read with ``ast`` and checked against
the layers below: a part may import itself and the parts listed for it, nothing else.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "decorr"

FOUNDATION = {"decorr.errors", "decorr.io", "decorr.config", "decorr.distributed", "decorr.features", "decorr.loss"}
#: part -> the parts it may import (besides itself)
ALLOWED = {
    "foundation": {"foundation"},
    "models": {"foundation"},
    "data": {"foundation"},
    "checkpoint": {"foundation", "models"},
    "specs": {"foundation", "models", "checkpoint"},
    "attacks": {"foundation", "models"},
    "training": {"foundation", "models", "data", "checkpoint", "specs", "attacks"},
    "evaluation": {"foundation", "models", "data", "checkpoint", "specs", "attacks"},
    "apps": {"foundation", "models", "data", "checkpoint", "specs", "attacks", "training", "evaluation"},
    "package": {"foundation", "models"},
}


def part(module: str) -> str:
    if module in FOUNDATION:
        return "foundation"
    if module == "decorr":
        return "package"
    if module in ("decorr.convert", "decorr.demo"):
        return "apps"
    name = module.split(".")[1]
    if name in ("checkpoint", "specs"):
        return name
    return name


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def decorr_module(name: str, known: set[str]) -> str | None:
    """The decorr module an imported name belongs to (the longest known prefix)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def test_at_most_twelve_modules_at_the_top_and_training_and_evaluation_are_packages():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 12, top
    for package in ("training", "evaluation", "data", "models", "attacks"):
        assert (PACKAGE / package / "__init__.py").is_file(), package


def test_imports_point_down():
    found = modules()
    known = set(found)
    wrong = []
    for name, path in found.items():
        mine = part(name)
        for target in imported(path):
            other = decorr_module(target, known) if target.startswith("decorr") else None
            if other is None or part(other) == mine:
                continue
            if part(other) not in ALLOWED[mine]:
                wrong.append(f"{name} ({mine}) imports {other} ({part(other)})")
            if target.startswith("dna"):
                wrong.append(f"{name} imports {target}")
        if any(t == "dna" or t.startswith("dna.") for t in imported(path)):
            wrong.append(f"{name} imports the dna package")
    assert not wrong, "\n".join(wrong)


def test_models_and_data_name_no_package_above_them():
    for folder in ("models", "data"):
        for path in (PACKAGE / folder).rglob("*.py"):
            assert "dna" not in path.read_text(), f"{path} names dna"


def test_the_dna_family_is_found_through_the_projects_entry_point():
    """A fresh interpreter knows dna_* models without importing dna: the registry reads the entry point."""
    from importlib.metadata import entry_points

    assert {(e.name, e.value) for e in entry_points(group="decorr.models")} >= {("dna_", "dna.models"),
                                                                              ("ae_", "dna.models")}
    code = ("import sys; from decorr.models import create_model; m = create_model('dna_mnist'); "
            "print(type(m).__module__, 'dna' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["dna.models", "True"]


@pytest.mark.parametrize("script", sorted(str(p.relative_to(REPO)) for p in (REPO / "train").glob("*.py")))
def test_every_trainer_takes_the_shared_run_options(script):
    """Thin entry points: the shared flags come from RunOptions (one trainer entry), not written by hand."""
    text = (REPO / script).read_text()
    assert "add_run_arguments" in text or "dna.cli" in text
    assert 'add_argument("--run-dir"' not in text and 'add_argument("--resume"' not in text
