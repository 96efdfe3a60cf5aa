"""RobustBench models (``robustbench.NAME[=MODEL_DIR]@dataset=cifar10,threat=Linf``) through the ``robustbench``
package (``pip install 'decorr[zoo]'``).

The architecture is RobustBench's own (``robustbench.model_zoo.model_dicts[dataset][threat][NAME]["model"]``)
and the weights its file ``MODEL_DIR/<dataset>/<threat>/NAME.pt`` (MODEL_DIR default ``models``, as
``robustbench.utils.load_model``), downloaded by RobustBench's ``download_gdrive_new`` when missing, but read
here with ``weights_only=True`` (never unpickling code, unlike ``torch.load`` in older RobustBench) and fitted
strictly after RobustBench's own key clean-up (``module.`` / ``model.`` prefixes). The clean accuracy the
leaderboard reports (``model_info/<dataset>/<threat>/NAME.json`` of a RobustBench checkout, when found) is
recorded as ``reported_clean_accuracy`` beside the evaluation's own natural accuracy. RobustBench models take
pixels in [0, 1] (their normalisation is inside them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn as nn

from decorr.errors import DecorrError, short_reason
from decorr.models.weights import fit_state_dict, read_state_dict, sha256_of

__all__ = ["load_robustbench", "robustbench_architecture"]

_INSTALL = "pip install 'decorr[zoo]'"


def _package() -> Any:
    try:
        import robustbench.model_zoo
        import robustbench.model_zoo.enums
        import robustbench.utils  # noqa: F401
    except ImportError as err:
        raise DecorrError(f"robustbench.* models need the robustbench package ({short_reason(err, 80)}); "
                          f"{_INSTALL}") from None
    return robustbench


def _zoo_entry(name: str, dataset: str, threat: str) -> tuple[Any, Any, dict[str, Any]]:
    package = _package()
    enums = package.model_zoo.enums
    try:
        dataset_ = enums.BenchmarkDataset(dataset)
    except ValueError:
        known = ", ".join(d.value for d in enums.BenchmarkDataset)
        raise DecorrError(f"RobustBench has no dataset {dataset!r}; use dataset= one of {known}") from None
    try:
        threat_ = enums.ThreatModel(threat)
    except ValueError:
        known = ", ".join(t.value for t in enums.ThreatModel)
        raise DecorrError(f"RobustBench has no threat model {threat!r}; use threat= one of {known}") from None
    models = package.model_zoo.model_dicts.get(dataset_, {}).get(threat_, {})
    if name not in models:
        some = ", ".join(list(models)[:5])
        raise DecorrError(f"RobustBench has no model {name!r} for {dataset_.value} {threat_.value}; names include "
                          f"{some} (robustbench.model_zoo.model_dicts, or its leaderboard)")
    return dataset_, threat_, models[name]


def robustbench_architecture(arch: str, dataset: str = "cifar10", threat: str = "Linf") -> nn.Module:
    """A freshly initialised RobustBench architecture of ``robustbench.NAME``."""
    name = arch[len("robustbench."):]
    _, _, entry = _zoo_entry(name, dataset, threat)
    if isinstance(entry.get("gdrive_id"), list):
        raise DecorrError(f"RobustBench model {name} is an ensemble of several files; load it with robustbench itself")
    return entry["model"]()


def load_robustbench(arch: str, model_dir: str, dataset: str, threat: str,
                     log: Any = None) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The model with its weights, its checkpoint entry kwargs and its results record."""
    package = _package()
    name = arch[len("robustbench."):]
    dataset_, threat_, entry = _zoo_entry(name, dataset, threat)
    net = robustbench_architecture(arch, dataset_.value, threat_.value)
    path = Path(model_dir) / dataset_.value / threat_.value / f"{name}.pt"
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            package.utils.download_gdrive_new(entry["gdrive_id"], path)
        except Exception as err:  # noqa: BLE001 - network, quota, missing id: all "no weights"
            raise DecorrError(f"cannot download RobustBench weights of {name} to {path} ({type(err).__name__}: "
                              f"{short_reason(err, 120)}); this needs internet once, or place the file there") from None
    state = read_state_dict(path)
    state = package.utils.rm_substr_from_state_dict(state, "module.")
    state = package.utils.rm_substr_from_state_dict(state, "model.")
    expected = net.state_dict()
    if dataset_.value == "imagenet" and not set(state) <= set(expected):
        state = package.utils.add_substr_to_state_dict(state, "model.")
    fit_state_dict(net, state, source=str(path), arch=arch, log=log)
    kwargs = {"dataset": dataset_.value, "threat": threat_.value}
    record = {"weights": f"robustbench:{dataset_.value}/{threat_.value}/{name}", "weights_file": str(path),
              "sha256": sha256_of(path), "reported_clean_accuracy": _reported_clean_accuracy(package, name, kwargs)}
    return net, kwargs, record


def _reported_clean_accuracy(package: Any, name: str, kwargs: dict[str, str]) -> float | None:
    """The leaderboard's clean accuracy (a fraction) of ``name``, from a RobustBench checkout's model_info."""
    root = Path(package.__file__).resolve().parent.parent
    for base in (root / "model_info", Path("model_info")):
        path = base / kwargs["dataset"] / kwargs["threat"] / f"{name}.json"
        if path.is_file():
            try:
                return float(json.loads(path.read_text())["clean_acc"]) / 100
            except (ValueError, KeyError, TypeError):
                return None
    return None
