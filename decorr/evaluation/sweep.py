"""Sweeps: many transfer evaluations from one YAML file, each kept under a key of what it computes, so that a
sweep killed at any moment and started again computes only what is missing.

A sweep file (YAML or JSON)::

    datasets: [mnist]                     # optional: the models' own dataset when left out
    models:                               # named groups of models, each group one evaluation's models
      pairs: {targets: [runs/cor, runs/dec]}
      outside: {targets: [runs/dec], surrogates: [runs/s1], ensembles: ["ens=runs/a,runs/b"]}
    attacks: [pgd, mifgsm+dim, bsr]       # the suite's attacks (decorr.attacks), one cell each
    eps: [0.05, 0.1]
    settings: {num_samples: 1000, steps: 10}   # any eval/transfer.py setting, shared by every cell

expands into cells, datasets x model groups x attacks. A cell is one evaluation (every epsilon of it in one
pass); its folder ``DIR/cells/<dataset>_<group>_<attack>_<key>`` holds what ``eval/transfer.py`` writes
(no plots), with ``timing.json`` apart from ``results.json`` so that the results do not depend on how the
work went. ``key`` is a hash of the cell's resolved settings and of the models' files (the SHA-256 of each
weights file, the checksums of each checkpoint): a changed setting or retrained model makes a new cell and
never reuses a stale one. A cell is done when its ``results.json`` exists (written last, atomically).
``DIR/summary.md`` and ``summary.json`` tabulate every target's accuracy under every attack and, per image,
under any attack of the sweep (the worst case across cells), with 95% Wilson intervals.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from decorr.checkpoint import resolve_checkpoint
from decorr.config import apply_settings, read_settings_file
from decorr.distributed import barrier, rank
from decorr.errors import DecorrError
from decorr.evaluation.command import TransferJob, evaluate_job, jsonable_job, job_from_args, transfer_parser
from decorr.evaluation.compare import pack_outcomes, unpack_outcomes
from decorr.evaluation.report import save_transfer_report
from decorr.evaluation.stats import wilson_interval
from decorr.evaluation.options import Reporter
from decorr.io import staged_output_dir, write_json, write_results_json
from decorr.models.weights import sha256_of
from decorr.specs import spec_paths

__all__ = ["Cell", "SWEEP_KEYS", "load_sweep", "pending_gradients", "run_sweep", "summarise_sweep"]

SWEEP_KEYS = ("datasets", "models", "attacks", "eps", "settings")
GROUP_KEYS = ("targets", "surrogates", "ensembles", "surrogate_ensembles")
#: the cell's fields that are how a run went, kept out of results.json
RUN_FIELDS = ("timing",)


@dataclass(frozen=True)
class Cell:
    """One evaluation of a sweep: its name, its job and the key of what it computes."""

    name: str
    dataset: str | None
    group: str
    attack: str
    job: TransferJob
    key: str

    def folder(self, root: Path) -> Path:
        return root / "cells" / f"{self.name}_{self.key[:12]}"

    def done(self, root: Path) -> bool:
        return (self.folder(root) / "results.json").is_file()


def load_sweep(path: str | os.PathLike) -> list[Cell]:
    """The cells of a sweep file; every setting checked (unknown keys, bad values) before any work."""
    spec = read_settings_file(path)
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise DecorrError(f"{path}: unknown key {unknown[0]!r}; a sweep file has {', '.join(SWEEP_KEYS)}")
    groups = spec.get("models")
    if not isinstance(groups, dict) or not groups:
        raise DecorrError(f"{path}: 'models' must name at least one group, e.g. models: {{pairs: {{targets: [runs/a]}}}}")
    attacks = _strings(spec.get("attacks", ["pgd"]), "attacks", path)
    datasets = _strings(spec["datasets"], "datasets", path) if "datasets" in spec else [None]
    cells = []
    for dataset in datasets:
        for group, members in groups.items():
            members = _group(members, group, path)
            for attack in attacks:
                job = _job(spec, members, dataset, attack, path)
                name = _slug("_".join(p for p in (dataset and Path(dataset).name, group, attack) if p))
                cells.append(Cell(name, dataset, str(group), attack, job, _key(job)))
    return cells


def _strings(value: Any, key: str, path: Any) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise DecorrError(f"{path}: {key} must be a name or a list of names, got {value!r}")
    return values


def _group(members: Any, group: Any, path: Any) -> dict[str, list[str]]:
    if not isinstance(members, dict):
        raise DecorrError(f"{path}: model group {group!r} must map {', '.join(GROUP_KEYS)} to model specs")
    unknown = sorted(set(members) - set(GROUP_KEYS))
    if unknown:
        raise DecorrError(f"{path}: model group {group!r} has an unknown key {unknown[0]!r}; use {', '.join(GROUP_KEYS)}")
    return {k: _strings(v, f"{group}.{k}", path) for k, v in members.items()}


def _job(spec: Mapping[str, Any], members: Mapping[str, list[str]], dataset: str | None, attack: str,
         path: Any) -> TransferJob:
    parser = transfer_parser()
    settings = dict(spec.get("settings") or {})
    apply_settings(parser, settings, source=f"{path} settings")  # every setting checked against every flag
    parser = transfer_parser()  # again, with the attack settings this cell's attack has
    apply_settings(parser, _settings_for(settings, attack, parser), source=f"{path} settings")
    cell = {"checkpoints": members.get("targets", []), "surrogate": members.get("surrogates", []),
            "ensemble": members.get("ensembles", []), "surrogate_ensemble": members.get("surrogate_ensembles", []),
            "attack": [attack], "no_plots": True}
    if "eps" in spec:
        cell["eps"] = spec["eps"] if isinstance(spec["eps"], list) else [spec["eps"]]
    if dataset is not None:
        cell["dataset"] = dataset
    apply_settings(parser, cell, source=str(path))
    args = parser.parse_args([])
    if args.out or args.save_adversarial or args.adversarial:
        raise DecorrError(f"{path}: settings may not name --out, --save-adversarial or --adversarial; the sweep "
                          "keeps every cell under its --out DIR")
    return job_from_args(args, [])


def _settings_for(settings: Mapping[str, Any], attack: str, parser: Any) -> dict[str, Any]:
    """The shared settings without the attack flags of components this cell's attack does not have (they
    are meant for the sweep's other attacks)."""
    from decorr.attacks import parse_attack
    from decorr.attacks.registry import field_flag
    import dataclasses as _dataclasses

    mine = {field_flag(type(c), f) for c in parse_attack(attack).components for f in _dataclasses.fields(c)}
    flags = {}
    for action in parser._actions:
        for option in action.option_strings:
            flags[option.lstrip("-").replace("-", "_")] = (action, option)
        flags.setdefault(action.dest, (action, action.option_strings[0] if action.option_strings else ""))
    kept = {}
    for key, value in settings.items():
        action, option = flags[str(key).lstrip("-").replace("-", "_")]
        if action.dest.startswith("attack__") and not ({option, *action.option_strings} & mine):
            continue
        kept[key] = value
    return kept


def _key(job: TransferJob) -> str:
    """A hash of what the cell computes: its resolved settings and the contents of its models' files."""
    record = jsonable_job(job)
    for name in ("output", "command", "device"):
        record.pop(name, None)
    record["options"]["attacks"] = [a.describe() for a in job.options.parsed_attacks()]
    selection = job.selection
    files = spec_paths(list(selection.targets + selection.surrogates) + selection.member_specs)
    record["model_files"] = {text: _file_identity(Path(found)) for text, found in sorted(files.items())}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _file_identity(path: Path) -> str:
    if path.is_dir():  # a checkpoint: its config.json records the SHA-256 of every weights file
        return sha256_of(resolve_checkpoint(path) / "config.json")
    return sha256_of(path)


def _slug(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", text).strip("_")[:80] or "cell"


# ------------------------------------------------------------------------------------------------
# Running


def run_sweep(cells: Sequence[Cell], out: str | os.PathLike, *, reporters: Callable[[int], Reporter] | None = None,
              on_cell: Callable[[Cell, str], None] | None = None) -> dict[str, int]:
    """Evaluate every cell not done yet, write the summary; ``{"cells", "computed", "reused"}``.
    ``reporters(per_image)`` gives a cell's progress reporter (its attack's gradients per image)."""
    root = Path(out)
    _check_names(cells)
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        _remove_dead_staging(root / "cells")
    barrier()
    computed = 0
    for index, cell in enumerate(cells):
        if cell.done(root):
            if on_cell:
                on_cell(cell, "reused")
            continue
        if on_cell:
            on_cell(cell, f"computing ({index + 1}/{len(cells)})")
        per_image = _attack_gradients(cell.job.options.parsed_attacks()[0])
        _run_cell(cell, root, reporters(per_image) if reporters else Reporter())
        computed += 1
    if rank() == 0:
        summarise_sweep(cells, root)
    barrier()
    return {"cells": len(cells), "computed": computed, "reused": len(cells) - computed}


def _check_names(cells: Sequence[Cell]) -> None:
    seen: dict[str, Cell] = {}
    for cell in cells:
        other = seen.setdefault(cell.name, cell)
        if other is not cell:
            raise DecorrError(f"two cells are both named {cell.name!r}; give the model groups or datasets other names")


def _run_cell(cell: Cell, root: Path, report: Reporter) -> None:
    from decorr.config import resolve_device
    from decorr.distributed import start_processes

    device = start_processes(resolve_device(cell.job.device))
    started = time.perf_counter()
    result = evaluate_job(cell.job, device, report)
    timing = {key: result.pop(key) for key in RUN_FIELDS}
    timing["cell_s"] = time.perf_counter() - started
    result["settings"].pop("command", None)
    result["sweep_cell"] = {"name": cell.name, "dataset": cell.dataset, "group": cell.group, "attack": cell.attack,
                            "key": cell.key}
    if rank() == 0:
        with staged_output_dir(cell.folder(root)) as staging:
            write_json(staging / "timing.json", timing)
            save_transfer_report(result, staging, plots=False)  # results.json last: the cell is done
    barrier()


def _remove_dead_staging(cells: Path) -> None:
    """Staging folders of a sweep that was killed: ``.<cell>.staging-<pid>`` whose process is gone."""
    import shutil

    if not cells.is_dir():
        return
    for path in cells.glob(".*.staging-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------------
# Summary


def summarise_sweep(cells: Sequence[Cell], out: str | os.PathLike) -> Path:
    """``summary.md`` and ``summary.json`` of the done cells: per dataset, model group, epsilon and target,
    the accuracy under each attack from every source of the group (an image counts as correct when no
    source's example fooled the target) and under any attack of the sweep (per image, across cells)."""
    root = Path(out)
    tables, lines = [], ["# Sweep summary", ""]
    groups: dict[tuple[str | None, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.dataset, cell.group), []).append(cell)
    for (dataset, group), members in groups.items():
        done = [(c, json.loads((c.folder(root) / "results.json").read_text())) for c in members if c.done(root)]
        if not done:
            continue
        table = _group_table(dataset, group, done)
        tables.append(table)
        lines += _markdown(table)
    missing = [c.name for c in cells if not c.done(root)]
    if missing:
        lines += [f"Not done yet: {', '.join(missing)}.", ""]
    write_results_json(root / "summary.json", {"format": "decorr-sweep-summary/1", "tables": tables,
                                               "missing": missing})
    path = root / "summary.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def _group_table(dataset: str | None, group: str, done: list[tuple[Cell, dict]]) -> dict[str, Any]:
    fingerprints = {r["settings"].get("samples_sha256") for _, r in done}
    if len(fingerprints) > 1:
        raise DecorrError(f"the cells of model group {group!r} evaluated different images; give them the same "
                          "dataset and --num-samples")
    first = done[0][1]
    n = int(first["settings"]["num_samples"])
    rows, worst = [], {}
    for cell, result in done:
        for row in result["by_eps"]:
            for target in result["targets"]:
                fooled = np.zeros(n, dtype=bool)
                for source in result["sources"]:
                    fooled |= unpack_outcomes(row["fooled"][source][target], n)
                key = (row["eps"], target)
                worst[key] = worst.get(key, np.zeros(n, dtype=bool)) | fooled
                rows.append(_accuracy_row(cell.attack, row["eps"], target, fooled))
    rows += [_accuracy_row("any attack", eps, target, fooled) for (eps, target), fooled in worst.items()]
    return {"dataset": dataset or first["settings"].get("dataset"), "group": group, "num_samples": n,
            "targets": first["targets"], "sources": first["sources"], "rows": rows}


def _accuracy_row(attack: str, eps: float, target: str, fooled: np.ndarray) -> dict[str, Any]:
    correct, n = int((~fooled).sum()), len(fooled)
    low, high = wilson_interval(correct, n) or (None, None)
    return {"attack": attack, "eps": eps, "target": target, "correct": correct, "accuracy": correct / n if n else None,
            "accuracy_ci95": [low, high], "fooled": pack_outcomes(fooled)}


def _markdown(table: Mapping[str, Any]) -> list[str]:
    targets = table["targets"]
    lines = [f"## {table['dataset']}, {table['group']} ({table['num_samples']} images; sources: "
             f"{', '.join(table['sources'])})", "", "| attack | eps | " + " | ".join(targets) + " |",
             "|---|---|" + "---|" * len(targets)]
    cells: dict[tuple[str, float], dict[str, str]] = {}
    for row in table["rows"]:
        low, high = row["accuracy_ci95"]
        text = f"{100 * row['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}]" if low is not None else "-"
        cells.setdefault((row["attack"], row["eps"]), {})[row["target"]] = text
    for (attack, eps), by_target in cells.items():
        lines.append(f"| {attack} | {eps:g} | " + " | ".join(by_target.get(t, "-") for t in targets) + " |")
    lines += ["", "Accuracy in % of each target on the examples of every source of the group (an image counts as "
              "correct only if no source's example fooled it), 95% Wilson interval; 'any attack': no attack of the "
              "sweep fooled it.", ""]
    return lines


# ------------------------------------------------------------------------------------------------
# Plans


def plan_sweep(cells: Sequence[Cell], out: str | os.PathLike) -> list[dict[str, Any]]:
    """What ``--dry-run`` lists: per cell, done or not, and the gradient evaluations it costs (images x
    epsilons x sources x gradients per image), with seconds estimated from the done cells' timing."""
    root = Path(out)
    plans = []
    rate = _seconds_per_gradient(cells, root)
    for cell in cells:
        work = _gradients(cell)
        plans.append({"cell": cell.name, "key": cell.key[:12], "done": cell.done(root), "gradients": work,
                      "estimated_s": None if rate is None or work is None else round(rate * work, 1)})
    return plans


def _gradients(cell: Cell) -> int | None:
    from decorr.data import load_dataset
    from decorr.evaluation.selection import checkpoint_dataset

    job, selection = cell.job, cell.job.selection
    try:
        name = job.data.dataset or checkpoint_dataset(list(selection.targets + selection.surrogates))
        images = job.data.num_samples or len(load_dataset(name, job.data.data_root, **job.data.folder_options()).test)
    except DecorrError:
        return None
    sources = len(selection.surrogates) + len(selection.surrogate_ensembles)
    if not sources or job.options.attack_targets:
        sources += _model_count(selection.targets) + len(selection.ensembles)
    per_image = sum(_attack_gradients(a) for a in job.options.parsed_attacks())
    return images * len(job.options.eps or (0.05, 0.1, 0.15)) * sources * per_image


def _model_count(specs: Sequence[str]) -> int:
    from decorr.checkpoint import load_checkpoint
    from decorr.specs import parse_spec

    count = 0
    for spec in specs:
        parsed = parse_spec(spec)
        if parsed.checkpoint is None or parsed.model is not None:
            count += 1
        else:
            count += len(load_checkpoint(parsed.checkpoint, load_weights=False).model_names)
    return count


def _attack_gradients(attack: Any) -> int:
    return _gradients_of(attack.describe()["components"])


def _gradients_of(components: Mapping[str, Mapping[str, Any]]) -> int:
    """Forward-backward passes per image of an attack (its components' settings, the optimizer first): the
    optimizer's gradient queries times the input transformations' copies."""
    from decorr.attacks import attack_class

    optimizer = next(iter(components.values()))
    queries = int(optimizer.get("steps", 1) or 1) * (1 + int(optimizer.get("neighbors", 0) or 0))
    copies = 1
    for name, fields in components.items():
        if attack_class(name).kind == "input":
            copies *= max(int(fields.get("copies", fields.get("scales", 1)) or 1), 1) * int(fields.get("mixes", 1) or 1)
    return queries * copies


def _seconds_per_gradient(cells: Sequence[Cell], root: Path) -> float | None:
    """Seconds per gradient evaluation of every done cell in the folder (this sweep's or an earlier one's)."""
    rates = []
    for folder in sorted((root / "cells").glob("*")):
        timing, results = folder / "timing.json", folder / "results.json"
        if not (timing.is_file() and results.is_file()):
            continue
        result = json.loads(results.read_text())
        settings = result["settings"]
        work = settings["num_samples"] * len(settings["eps"]) * len(result["sources"]) * sum(
            _gradients_of(a["components"]) for a in settings["attacks"])
        seconds = json.loads(timing.read_text()).get("cell_s")
        if work and seconds:
            rates.append(seconds / work)
    return float(np.median(rates)) if rates else None


def pending_gradients(cells: Sequence[Cell], out: str | os.PathLike) -> int | None:
    """The gradient evaluations of the cells not done yet (None when some cannot be counted)."""
    root = Path(out)
    counts = [_gradients(c) for c in cells if not c.done(root)]
    return None if any(c is None for c in counts) else sum(counts)  # type: ignore[arg-type]


__all__ += ["plan_sweep"]
