"""Adversarial examples as image files: written during the attack pass, evaluated later (by any target).

Folder format (``eval/transfer.py --save-adversarial DIR`` writes it; another tool can too)::

    DIR/index.csv      header file,source,attack,eps,index,label[,source_pred][,float_file]; one row per image
    DIR/<source>/<attack>/eps_<eps>/<index>.png   lossless 8-bit PNG, round(255 * x_adv), RGB or grayscale
    DIR/<source>/<attack>/eps_<eps>/<index>.npy   with --save-float: x_adv itself, float32 (C, H, W) in [0, 1]
    DIR/settings.json  the attack's settings (optional; decorr writes its results' "settings")
    DIR/decorr-adversarial.json  decorr's completeness marker (optional): {"format", "complete", "images"}

``file`` (and ``float_file``) are paths relative to DIR; ``source`` names the model the image was crafted
on, ``attack`` the attack of the suite that made it (optional: a folder without the column holds one attack,
named by its settings.json or ``external``), ``eps`` the radius in pixel units, ``index`` the image's position in the evaluated split, ``label`` its
true class, ``source_pred`` the source's label on the unrounded example (what tells which successes the
rounding to 8 bits lost). Only file, source, eps and label are required.

Completeness: :class:`AdversarialWriter` writes the marker with ``"complete": false`` before its first
image and rewrites it with ``"complete": true`` and the number of images in :meth:`AdversarialWriter.close`,
after the last one (a failed run removes the folder it made). A folder whose marker says incomplete (a
``--save-adversarial`` run that was killed) or whose image count disagrees with ``index.csv`` is refused; a
folder without the marker (written by another tool) is evaluated as listed, with a note that its
completeness is unknown. Before evaluating, every group's images must have every model's input shape and
every label must be below the models' number of outputs.

:func:`evaluate_adversarial_folder` evaluates every target on every (source, attack, eps) group of images, by
default on the 8-bit images as an attacker delivers them (``use_float=True``: the float copies, which
reproduce the in-process evaluation exactly; the 8-bit results are then given beside them, under
``quantised``). A source model given by its name (as a target or surrogate) is run on the images too, so its
white-box accuracy and the transfer rates are those of the evaluated images; otherwise the ``source_pred``
column stands in for it (the rates are then conditioned on the unrounded examples, and a note says so).
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from decorr.data.base import to_float
from decorr.data.decode import probe_images
from decorr.data.stream import file_split
from decorr.distributed import barrier, rank, world_size
from decorr.errors import DecorrError
from decorr.io import blocking_file, write_json
from decorr.evaluation.metrics import accuracy, transfer_rate
from decorr.evaluation.stats import wilson_interval

__all__ = ["INDEX_FILE", "INDEX_HEADER", "MARKER_FILE", "AdversarialWriter", "check_complete", "evaluate_adversarial_folder",
           "evaluate_adversarial_specs", "read_index"]

INDEX_FILE = "index.csv"
INDEX_HEADER = ["file", "source", "attack", "eps", "index", "label", "source_pred", "float_file"]
REQUIRED = ("file", "source", "eps", "label")
SETTINGS_FILE = "settings.json"
MARKER_FILE = "decorr-adversarial.json"
MARKER_FORMAT = "decorr-adversarial/1"
#: The note of a folder without decorr's completeness marker.
FOREIGN_NOTE = ("{folder} has no {marker} (not written by decorr's --save-adversarial, or by an older version): "
                "its images were evaluated as index.csv lists them; whether the folder is complete is unknown")


def quantise(x: Tensor) -> Tensor:
    """Pixels in [0, 1] as 8-bit values, rounded (half to even) rather than truncated: ``round(255 * x)``."""
    return torch.round(x.detach().float().cpu() * 255).clamp_(0, 255).to(torch.uint8)


def _slug(name: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", name).strip("._") or "model"


class AdversarialWriter:
    """``on_adversarial`` hook of ``evaluate_transfer``: writes each batch's examples as PNG (and .npy).

    Nothing is created until the first batch arrives, so a refusal before the attack leaves no folder; call
    :meth:`close` after the last batch (it marks the folder complete) or :meth:`discard` when the run failed.
    Under several processes each writes its own images and index part (``index.part-<rank>.csv``); in
    :meth:`close` the main process merges the parts into ``index.csv`` in the order one process writes it
    (attack, eps, source as the evaluation loops over them, then image index), so the folder is the same.
    """

    def __init__(self, folder: str | Path, *, save_float: bool = False) -> None:
        self.folder = Path(folder)
        blocker = blocking_file(self.folder)
        if blocker is not None:
            raise DecorrError(f"--save-adversarial {self.folder} lies below {blocker}, which is a file; choose another")
        if self.folder.exists() and (not self.folder.is_dir() or any(self.folder.iterdir())):
            raise DecorrError(f"--save-adversarial {self.folder} exists and is not an empty folder; choose a new one")
        self._existed = self.folder.exists()
        self.save_float = save_float
        self._handle: Any = None
        self.count = 0
        self.rank, self.world = rank(), world_size()

    @property
    def _index_path(self) -> Path:
        return self.folder / (INDEX_FILE if self.world == 1 else f"index.part-{self.rank}.csv")

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:  # before the first image: a folder left by a killed run says it is incomplete
            write_json(self.folder / MARKER_FILE, {"format": MARKER_FORMAT, "complete": False})
        self._handle = open(self._index_path, "w", newline="")
        self._csv = csv.writer(self._handle)
        self._csv.writerow(INDEX_HEADER if self.save_float else INDEX_HEADER[:-1])

    def __call__(self, source: str, attack: str, eps: float, indices: Tensor, x_adv: Tensor, y: Tensor,
                 source_pred: Tensor) -> None:
        from PIL import Image

        if self._handle is None:
            self._open()
        sub = Path(_slug(source)) / _slug(attack) / f"eps_{eps:.6g}"
        (self.folder / sub).mkdir(parents=True, exist_ok=True)
        pixels = quantise(x_adv).numpy()
        x_float = x_adv.detach().float().cpu().numpy() if self.save_float else None
        for k, (index, label, pred) in enumerate(zip(indices.tolist(), y.tolist(), source_pred.tolist())):
            name = sub / f"{index:06d}.png"
            image = pixels[k, 0] if pixels.shape[1] == 1 else pixels[k].transpose(1, 2, 0)
            Image.fromarray(np.ascontiguousarray(image)).save(self.folder / name, format="PNG", compress_level=1)
            row = [name.as_posix(), source, attack, repr(float(eps)), index, label, pred]
            if x_float is not None:
                np.save(self.folder / name.with_suffix(".npy"), x_float[k])
                row.append(name.with_suffix(".npy").as_posix())
            self._csv.writerow(row)
        self._handle.flush()
        self.count += len(indices)

    def close(self, settings: Mapping[str, Any] | None = None) -> None:
        """Finish the folder: (several processes) the index parts merged, settings.json, then (last) the
        marker saying it is complete."""
        if self._handle is None:
            self._open()
        self._handle.close()
        barrier()
        if self.rank != 0:
            barrier()
            return
        count = self.count if self.world == 1 else self._merge_parts()
        if settings is not None:
            from decorr.io import write_results_json

            write_results_json(self.folder / SETTINGS_FILE, dict(settings))
        write_json(self.folder / MARKER_FILE, {"format": MARKER_FORMAT, "complete": True, "images": count})
        barrier()

    def _merge_parts(self) -> int:
        parts = [self.folder / f"index.part-{r}.csv" for r in range(self.world)]
        header, rows = None, []
        for part in parts:
            with open(part, newline="") as handle:
                reader = csv.reader(handle)
                header = next(reader)
                rows += list(reader)
        groups: dict[tuple[str, str, str], int] = {}
        for row in rows:  # every process loops over the groups in the same order
            groups.setdefault((row[2], row[3], row[1]), len(groups))
        rows.sort(key=lambda row: (groups[(row[2], row[3], row[1])], int(row[4])))
        with open(self.folder / INDEX_FILE, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
        for part in parts:
            part.unlink()
        return len(rows)

    def discard(self) -> None:
        """Remove what this writer wrote (the run failed): the folder is as it was before, absent or empty."""
        import shutil

        if self._handle is not None:
            self._handle.close()
        if not self.folder.exists():
            return
        if self._existed:
            for child in self.folder.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        else:
            shutil.rmtree(self.folder, ignore_errors=True)


def check_complete(folder: str | Path, rows: int) -> bool:
    """Refuse a folder that decorr's marker says is incomplete, or whose count disagrees with ``rows`` (the
    images index.csv lists); return whether the marker is there (False: a folder from another tool)."""
    folder = Path(folder)
    path = folder / MARKER_FILE
    if not path.is_file():
        return False
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        marker = None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        raise DecorrError(f"{path} is not a {MARKER_FORMAT} marker; the folder is damaged (write it again with "
                          "--save-adversarial)")
    if marker.get("complete") is not True:
        raise DecorrError(f"{folder} is incomplete: the --save-adversarial run writing it did not finish (killed?; "
                          f"index.csv lists {rows} images so far); write it again into a new folder")
    if marker.get("images") != rows:
        raise DecorrError(f"{folder}: index.csv lists {rows} images but the run that wrote it saved "
                          f"{marker.get('images')}; the folder was changed since; write it again with --save-adversarial")
    return True


def read_index(folder: str | Path) -> dict[tuple[str, str, float], dict[str, list]]:
    """``{(source, attack, eps): {files, float_files, labels, indices, source_pred}}`` from ``DIR/index.csv``."""
    folder = Path(folder)
    path = folder / INDEX_FILE
    if not path.is_file():
        raise DecorrError(f"{folder} has no {INDEX_FILE}; an adversarial folder needs one (columns "
                          f"{','.join(REQUIRED)}; see docs/transfer.md)")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise DecorrError(f"{path} lacks the column(s) {', '.join(missing)}; its header must name "
                              f"{','.join(REQUIRED)} (and optionally attack,index,source_pred,float_file)")
        default_attack = _folder_attack(folder)
        groups: dict[tuple[str, str, float], dict[str, list]] = {}
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            where = f"{path.name} line {line}"
            values = {}
            for key, kind in (("eps", float), ("label", int), ("index", int), ("source_pred", int)):
                try:
                    values[key] = kind(row[key]) if row.get(key) else None
                except ValueError:
                    raise DecorrError(f"{where}: {key} must be {'a number' if kind is float else 'an integer'}, "
                                      f"got {row[key]!r}; fix the row") from None
            eps, label, pred = values["eps"], values["label"], values["source_pred"]
            index = values["index"] if values["index"] is not None else line - 2
            if not row["file"] or not row["source"] or eps is None or label is None:
                raise DecorrError(f"{where} lacks its file, source, eps or label; give every required column")
            if not (math.isfinite(eps) and eps >= 0):
                raise DecorrError(f"{where}: eps {row['eps']!r} is not a radius (a finite number >= 0, pixel units); "
                                  "fix the eps column")
            if label < 0:
                raise DecorrError(f"{where}: label {label} is negative; labels are class indices 0..K-1")
            file = folder / row["file"]
            if not file.is_file():
                raise DecorrError(f"{where}: image {file} not found; fix the path (relative to {folder})")
            group = groups.setdefault((row["source"], row.get("attack") or default_attack, eps), {k: [] for k in
                                                             ("files", "float_files", "labels", "indices", "source_pred",
                                                                              "lines")})
            group["files"].append(file)
            group["float_files"].append(folder / row["float_file"] if row.get("float_file") else None)
            group["labels"].append(label)
            group["indices"].append(index)
            group["source_pred"].append(pred)
            group["lines"].append(line)
    if not groups:
        raise DecorrError(f"{path} lists no images; write one row per adversarial image")
    check_complete(folder, sum(len(g["files"]) for g in groups.values()))
    return groups


def _float_batches(files: Sequence[Path | None], batch_size: int) -> Any:
    if any(f is None for f in files):
        raise DecorrError("--adversarial-float needs every image's float copy (float_file column; --save-float)")
    for start in range(0, len(files), batch_size):
        arrays = []
        for f in files[start : start + batch_size]:
            try:
                arrays.append(np.load(f, allow_pickle=False))
            except (OSError, ValueError) as err:
                raise DecorrError(f"cannot read the float copy {f} ({type(err).__name__}); save it with numpy.save") from None
        yield torch.from_numpy(np.stack(arrays).astype(np.float32))


@torch.no_grad()
def evaluate_adversarial_folder(
    targets: Mapping[str, nn.Module], folder: str | Path, *, surrogates: Mapping[str, nn.Module] | None = None,
    use_float: bool = False, batch_size: int = 256, device: torch.device | str = "cpu",
    memory_budget_mb: float | None = None, workers: int | None = None,
    model_info: Mapping[str, Mapping[str, Any]] | None = None, log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The targets (and named sources) on the saved examples: a ``decorr-transfer/1`` result (see above)."""
    folder = Path(folder)
    groups = read_index(folder)
    models = {**dict(surrogates or {}), **dict(targets)}
    for model in models.values():
        model.to(device).eval()
    decoders = image_shapes(groups)
    _check_models_fit(models, groups, decoders, device, folder)
    say = log or (lambda _m: None)
    sources = list(dict.fromkeys(src for src, _, _ in groups))
    attacks = list(dict.fromkeys(attack for _, attack, _ in groups))
    eps_list = list(dict.fromkeys(eps for _, _, eps in groups))
    notes: set[str] = set()
    if not (folder / MARKER_FILE).is_file():
        notes.add(FOREIGN_NOTE.format(folder=folder, marker=MARKER_FILE))
    saved = json.loads((folder / SETTINGS_FILE).read_text()) if (folder / SETTINGS_FILE).is_file() else {}
    rows = []
    for attack, eps in [(a, e) for a in attacks for e in eps_list if any(k[1:] == (a, e) for k in groups)]:
        kinds = ["float", "8bit"] if use_float else ["8bit"]
        record = {kind: _empty(sources, list(targets)) for kind in kinds}
        lost: dict[str, int | None] = {}
        counts: dict[str, int] = {}
        for src in sources:
            group = groups.get((src, attack, eps))
            if group is None:
                lost[src] = None
                continue
            say(f"adversarial files: {src}, {attack} at eps {eps:g} ({len(group['files'])} images)")
            y = torch.tensor(group["labels"], dtype=torch.int64)
            counts[src] = len(y)
            run = list(targets) + ([src] if src in models and src not in targets else [])
            split = file_split(group["files"], y, decoders[(src, attack, eps)],
                               memory_budget_mb=memory_budget_mb, workers=workers, source=str(folder))
            streams = {"8bit": (to_float(images) for images, _ in split.batches(batch_size))}
            if use_float:
                streams["float"] = _float_batches(group["float_files"], batch_size)
            preds = {kind: {name: [] for name in run} for kind in kinds}
            for kind, stream in streams.items():
                for x in stream:
                    x = x.to(device)
                    for name in run:
                        preds[kind][name].append(models[name](x).argmax(dim=1).cpu())
            preds = {kind: {name: torch.cat(p) for name, p in by.items()} for kind, by in preds.items()}
            recorded = group["source_pred"]
            reference = preds["float"].get(src) if use_float else None
            if reference is None and all(p is not None for p in recorded):
                reference = torch.tensor(recorded, dtype=torch.int64)
            for kind in kinds:
                src_pred = preds[kind].get(src)
                if src_pred is None:
                    if kind == "8bit" and reference is not None:
                        notes.add(f"source {src} was not loaded: its fooled set is the index's source_pred (the "
                                  "unrounded examples); give it as --surrogate for rates on the saved images")
                    src_pred = reference
                _fill(record[kind], src, list(targets), preds[kind], src_pred, y)
            delivered = preds["8bit"].get(src)
            lost[src] = (None if reference is None or delivered is None
                         else int(((reference != y) & (delivered == y)).sum()))
        row = {"attack": attack, "eps": eps, "attack_eps": _attack_eps(saved, eps), **record[kinds[0]], "num_samples": counts,
               "quantisation_lost": lost, "pairs": _pairs(record[kinds[0]]["transfer"], list(targets))}
        if use_float:
            row["quantised"] = record["8bit"]
        rows.append(row)
    settings = {**{k: v for k, v in saved.items() if k not in ("num_samples", "num_candidates")},
                "eps": eps_list, "adversarial": str(folder), "images": "float" if use_float else "8-bit PNG",
                "batch_size": batch_size, "num_samples": max(len(g["files"]) for g in groups.values()),
                "num_candidates": None}
    settings.setdefault("norm", "linf")
    return _folder_result(settings, models, list(targets), sources, model_info, rows, notes)


def _folder_result(settings: dict[str, Any], models: Mapping[str, nn.Module], target_names: list[str],
                   sources: list[str], model_info: Mapping[str, Mapping[str, Any]] | None,
                   rows: list[dict[str, Any]], notes: set[str]) -> dict[str, Any]:
    """The ``results.json`` of a folder evaluation: no natural pass, no features, the rows as read."""
    model_records = {}
    for name in models:
        role = ("target+source" if name in target_names and name in sources
                else "target" if name in target_names else "source")
        model_records[name] = {"role": role, "arch": (model_info or {}).get(name, {}).get("arch"), "feature_layer": None,
                               "natural_accuracy": None, "natural_correct": None, "natural_accuracy_ci95": None,
                               **{k: v for k, v in (model_info or {}).get(name, {}).items() if k != "arch"}}
    return {"format": "decorr-transfer/2", "kind": "adversarial-files", "settings": settings, "models": model_records,
            "sources": sources, "targets": target_names,
            "pairs": [{"a": a, "b": b, "same_arch": None, "parameter_distance": None, "natural_features": None}
                      for i, a in enumerate(target_names) for b in target_names[i + 1:]],
            "by_eps": rows, "notes": sorted(notes), "timing": {}}


def evaluate_adversarial_specs(specs: Sequence[str], folder: str | Path, *, surrogates: Sequence[str] = (),
                               device: torch.device | str = "cpu", spec_options: Any = None,
                               **kwargs: Any) -> dict[str, Any]:
    """:func:`evaluate_adversarial_folder` on the models of ``specs`` (targets) and ``surrogates`` (sources)."""
    from decorr.specs import load_specs

    from decorr.specs import check_input_shape

    groups = read_index(folder)  # a bad folder fails before any model is loaded
    targets = load_specs(specs, spec_options, device=device)
    sources = load_specs(surrogates, spec_options, device=device) if surrogates else {}
    loaded = {**sources, **targets}
    for (src, attack, eps), decoder in image_shapes(groups).items():  # the --dataset path's check, on the images
        check_input_shape(loaded, decoder.shape, data=f"{folder} (the images of {src}, {attack} at eps {eps:g})",
                          fix="the saved images must have every model's input shape; evaluate models of the kind "
                              "they were made for, or save them again")
    return evaluate_adversarial_folder(
        {n: m.module for n, m in targets.items()}, folder, surrogates={n: m.module for n, m in sources.items()},
        device=device, model_info={n: m.info for n, m in loaded.items()}, **kwargs)


def _folder_attack(folder: Path) -> str:
    """The attack of a folder whose index has no attack column: the one its settings.json names, else external."""
    try:
        saved = json.loads((folder / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return "external"
    attacks = saved.get("attacks") if isinstance(saved, dict) else None
    if isinstance(attacks, list) and len(attacks) == 1 and isinstance(attacks[0], dict):
        return str(attacks[0].get("attack", "external"))
    return str(saved.get("attack", "external")) if isinstance(saved, dict) else "external"


def image_shapes(groups: Mapping[tuple[str, str, float], Mapping[str, list]]) -> dict[tuple[str, str, float], Any]:
    """The decoder of every (source, attack, eps) group's images, from their headers: one size per group, and RGB
    unless every image is grayscale."""
    return {key: probe_images(group["files"], None, None) for key, group in groups.items()}


def _check_models_fit(models: Mapping[str, nn.Module], groups: Mapping[tuple[str, str, float], Mapping[str, list]],
                      decoders: Mapping[tuple[str, str, float], Any], device: torch.device | str, folder: Path) -> None:
    """Refuse, before any evaluation, images a model cannot take and labels beyond its outputs."""
    outputs: dict[tuple[str, tuple[int, ...]], int] = {}
    for (src, attack, eps), group in groups.items():
        shape = tuple(decoders[(src, attack, eps)].shape)
        largest = max(group["labels"])
        for name, model in models.items():
            if (name, shape) not in outputs:
                try:
                    with torch.no_grad():
                        outputs[(name, shape)] = int(model(torch.zeros((1, *shape), device=device)).shape[-1])
                except RuntimeError as err:
                    detail = str(err).strip().splitlines()[0][:160]
                    raise DecorrError(f"model {name} cannot take the images of {src}, {attack} at eps {eps:g} in {folder}, "
                                      f"{shape} ({detail}); the saved images must have the model's input shape") from None
            classes = outputs[(name, shape)]
            if largest >= classes:
                line = group["lines"][group["labels"].index(largest)]
                raise DecorrError(f"{folder / INDEX_FILE} line {line}: label {largest} is out of range for model {name}, "
                                  f"which has {classes} outputs (classes 0..{classes - 1}); fix the labels or evaluate "
                                  "models of these classes")


def _attack_eps(saved: Mapping[str, Any], eps: float) -> float:
    pairs = dict(zip(saved.get("eps", []), saved.get("attack_eps", [])))
    return float(pairs.get(eps, eps))


def _empty(sources: list[str], targets: list[str]) -> dict[str, Any]:
    per_target = lambda: {s: {t: None for t in targets} for s in sources}  # noqa: E731
    return {"white_box_accuracy": {s: None for s in sources}, "white_box_correct": {s: None for s in sources},
            "white_box_accuracy_ci95": {s: None for s in sources}, "accuracy": per_target(), "correct": per_target(),
            "accuracy_ci95": per_target(), "transfer": per_target(), "transfer_ci95": per_target(),
            "source_fooled": {s: None for s in sources}, "transferred": per_target()}


def _count(pred: Tensor, y: Tensor) -> tuple[int, tuple[float, float] | None]:
    correct = int((pred == y).sum())
    return correct, wilson_interval(correct, len(y))


def _number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _fill(record: dict[str, Any], src: str, targets: list[str], preds: Mapping[str, Tensor],
          src_pred: Tensor | None, y: Tensor) -> None:
    if src in preds:
        record["white_box_accuracy"][src] = _number(accuracy(preds[src], y))
        record["white_box_correct"][src], record["white_box_accuracy_ci95"][src] = _count(preds[src], y)
    for tgt in targets:
        record["accuracy"][src][tgt] = _number(accuracy(preds[tgt], y))
        record["correct"][src][tgt], record["accuracy_ci95"][src][tgt] = _count(preds[tgt], y)
        if src_pred is not None:
            result = transfer_rate(src_pred, preds[tgt], y)
            record["source_fooled"][src] = result.source_fooled
            if tgt != src:
                record["transfer"][src][tgt], record["transferred"][src][tgt] = _number(result.rate), result.transferred
                if result.source_fooled:
                    record["transfer_ci95"][src][tgt] = wilson_interval(result.transferred, result.source_fooled)
    if src_pred is not None and not targets:
        record["source_fooled"][src] = int((src_pred != y).sum())


def _pairs(matrix: Mapping[str, Mapping[str, float | None]], targets: list[str]) -> list[dict[str, Any]]:
    out = []
    for i, a in enumerate(targets):
        for b in targets[i + 1:]:
            ab, ba = (matrix.get(a) or {}).get(b), (matrix.get(b) or {}).get(a)
            out.append({"a": a, "b": b, "a_to_b": ab, "b_to_a": ba,
                        "mean": 0.5 * (ab + ba) if ab is not None and ba is not None else None,
                        "on_adv_of_a": None, "on_adv_of_b": None})
    return out
