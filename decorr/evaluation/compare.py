"""Paired comparison of two transfer evaluations on the same images (McNemar's exact test).

A transfer evaluation records which images it evaluated (``settings.samples_sha256``, see
:func:`samples_fingerprint`) and, per epsilon, source and evaluated model, which adversarial examples
fool that model (``by_eps[i]["fooled"][source][model]``: the boolean array packed with
:func:`pack_outcomes`: ``base64(numpy.packbits(fooled, bitorder="little"))``, ``settings.num_samples``
bits, image i at bit i; decode with :func:`unpack_outcomes`). The source's own entry is its white-box
outcome.

:func:`compare_results` matches two such results on (source, target, eps) and reports, per match, both
transfer rates and their difference (``b - a``) and McNemar's exact test on the paired per-image
outcome "the target is fooled by the source's adversarial example" over all ``num_samples`` images:
``only_a`` images fooled in A only, ``only_b`` in B only, ``p_value``. The transfer rate conditions on
the images that fool the source, a set that differs between the runs, so the paired test is on the
target's per-image error (its adversarial error rate, ``error_a``/``error_b``; with ``--only-correct``
that is SGM's success rate), the quantity both runs measure on the same images. Results from different
images (fingerprint or count) are refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from decorr.errors import DecorrError
from decorr.evaluation.stats import mcnemar

__all__ = ["COMPARE_FORMAT", "compare_results", "load_results", "attack_worst_rows", "pack_outcomes", "row_attack", "rows_of",
           "samples_fingerprint", "unpack_outcomes"]

COMPARE_FORMAT = "decorr-transfer-compare/1"


def samples_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 (hex) of the evaluated samples: dtype, shape and bytes of the images, then the int64 labels."""
    images = images.detach().cpu().contiguous()
    return _fingerprint(images.dtype, tuple(images.shape), [images], labels)


def data_fingerprint(data: Any) -> str:
    """:func:`samples_fingerprint` of an ``(x, y)`` pair, an ``ImageSplit`` or a streamed split (batch by
    batch, the same digest as the split held in memory)."""
    if isinstance(data, tuple):
        return samples_fingerprint(*data)
    from decorr.data import ImageSplit

    if isinstance(data, ImageSplit):
        return samples_fingerprint(data.images, data.labels)
    shape = (len(data), *data.image_shape)
    # batch by batch within the split's memory budget: a streamed split must never be held whole
    batches = data.batches(data.budget_batch_size())
    return _fingerprint(torch.uint8, shape, (images for images, _ in batches), data.labels)


def _fingerprint(dtype: torch.dtype, shape: tuple, parts: Any, labels: torch.Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(f"{dtype}|{shape}|".encode())
    for part in parts:
        digest.update(memoryview(part.detach().cpu().contiguous().numpy()).cast("B"))
    digest.update(memoryview(labels.detach().cpu().to(torch.int64).contiguous().numpy()).cast("B"))
    return digest.hexdigest()


def pack_outcomes(outcome: torch.Tensor | np.ndarray) -> str:
    """A boolean vector as ``base64(packbits(bitorder="little"))`` (ASCII)."""
    bits = np.packbits(np.asarray(outcome, dtype=bool).ravel(), bitorder="little")
    return base64.b64encode(bits.tobytes()).decode("ascii")


def unpack_outcomes(text: str, count: int) -> np.ndarray:
    """The inverse of :func:`pack_outcomes`: ``count`` booleans."""
    raw = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    if raw.size * 8 < count:
        raise DecorrError(f"packed outcomes hold {raw.size * 8} bits, fewer than the {count} samples; the file is damaged")
    return np.unpackbits(raw, count=count, bitorder="little").astype(bool)


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """A transfer evaluation's ``results.json`` (the file, or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise DecorrError(f"{path} does not exist; pass a results.json of eval/transfer.py or its folder")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DecorrError(f"{path} is not JSON ({err.msg}); pass a results.json of eval/transfer.py") from None
    if not isinstance(result, dict) or not str(result.get("format", "")).startswith("decorr-transfer/"):
        raise DecorrError(f"{path} is not a transfer evaluation (format decorr-transfer/1 or /2); pass eval/transfer.py's results.json")
    return result


def row_attack(result: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """The attack of a ``by_eps`` row (results of format 1 had one attack, named in the settings)."""
    return row.get("attack") or result.get("settings", {}).get("attack") or "pgd"


def attack_worst_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The worst case's per-source rows (attack ``any``) when the run had several attacks (with one attack
    they repeat its rows; the ``all_sources`` part of every worst-case row stands on its own)."""
    attacks = {row_attack(result, row) for row in result["by_eps"]}
    return list(result.get("worst_case", [])) if len(attacks) > 1 else []


def rows_of(result: Mapping[str, Any], attack: str | None = None) -> list[dict[str, Any]]:
    """The ``by_eps`` rows of one attack (default: the first attack of the result)."""
    rows = result["by_eps"]
    if not rows:
        return []
    wanted = attack if attack is not None else row_attack(result, rows[0])
    chosen = [row for row in rows if row_attack(result, row) == wanted]
    if not chosen:
        names = sorted({row_attack(result, r) for r in rows})
        raise DecorrError(f"the result has no attack {wanted!r}; it has {', '.join(names)}")
    return chosen


def _check_same_images(a: Mapping[str, Any], b: Mapping[str, Any], labels: tuple[str, str]) -> int:
    fingerprints = [r["settings"].get("samples_sha256") for r in (a, b)]
    for label, fingerprint in zip(labels, fingerprints):
        if not fingerprint:
            raise DecorrError(f"{label} records no sample fingerprint (written by an older version); re-run its "
                              "evaluation to compare")
    counts = [r["settings"]["num_samples"] for r in (a, b)]
    if fingerprints[0] != fingerprints[1] or counts[0] != counts[1]:
        raise DecorrError(f"{labels[0]} ({counts[0]} samples) and {labels[1]} ({counts[1]} samples) were evaluated "
                          "on different images; a paired test needs the same images (same --dataset, --num-samples "
                          "and --only-correct selection)")
    return int(counts[0])


def compare_results(a: Mapping[str, Any], b: Mapping[str, Any], *, labels: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    """Per (attack, source, target, eps) present in both: both transfer rates, the difference and McNemar's p.

    Returns ``{format, a, b, num_samples, samples_sha256, rows: [{attack, source, target, eps, transfer_a,
    transfer_b, difference, error_a, error_b, only_a, only_b, p_value}], unmatched: {a: n, b: n}}``.
    """
    n = _check_same_images(a, b, labels)
    every = {side: list(r["by_eps"]) + attack_worst_rows(r) for side, r in (("a", a), ("b", b))}
    rows_b = {(row_attack(b, row), float(row["eps"])): row for row in every["b"]}
    rows, matched = [], 0
    total = {"a": 0, "b": 0}
    for side, result in (("a", a), ("b", b)):
        total[side] = sum(len(row["transfer"][src]) for row in every[side] for src in row["transfer"])
    for row_a in every["a"]:
        attack = row_attack(a, row_a)
        row_b = rows_b.get((attack, float(row_a["eps"])))
        if row_b is None:
            continue
        for label, row in zip(labels, (row_a, row_b)):
            if "fooled" not in row:
                raise DecorrError(f"{label} has no per-image outcomes (written by an older version); re-run its "
                                  "evaluation to compare")
        for src, targets in row_a["transfer"].items():
            for tgt in targets:
                if src not in row_b["transfer"] or tgt not in row_b["transfer"][src]:
                    continue
                matched += 1
                fooled_a = unpack_outcomes(row_a["fooled"][src][tgt], n)
                fooled_b = unpack_outcomes(row_b["fooled"][src][tgt], n)
                test = mcnemar(fooled_a, fooled_b)
                t_a, t_b = row_a["transfer"][src][tgt], row_b["transfer"][src][tgt]
                rows.append({
                    "attack": attack, "source": src, "target": tgt, "eps": row_a["eps"], "transfer_a": t_a, "transfer_b": t_b,
                    "difference": t_b - t_a if t_a is not None and t_b is not None else None,
                    "error_a": float(fooled_a.mean()) if n else None, "error_b": float(fooled_b.mean()) if n else None,
                    "only_a": test.only_first, "only_b": test.only_second, "p_value": test.p_value,
                })
    if not rows:
        raise DecorrError(f"{labels[0]} and {labels[1]} share no (attack, source, target, eps); compare evaluations "
                          "of the same model names with the same attacks at the same epsilons")
    return {"format": COMPARE_FORMAT, "a": labels[0], "b": labels[1], "num_samples": n,
            "samples_sha256": a["settings"]["samples_sha256"], "rows": rows,
            "unmatched": {"a": total["a"] - matched, "b": total["b"] - matched}}
