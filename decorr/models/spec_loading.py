"""Loading the model of one ``ARCH[(ARGS)]=WEIGHTS[@OPTIONS]`` spec (:func:`decorr.specs.load_specs` parses
the spec and calls this for every spec that is not a checkpoint): a weights file of any format (told by its
content), published pretrained weights with their preprocessing (:mod:`decorr.models.pretrained`), or a
RobustBench model (:mod:`decorr.models.robustbench`). Returns the module, its results record (``info``)
and the checkpoint entry that rebuilds it (``entry``: arch, kwargs with the spec's architecture
arguments, feature layer, preprocess).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from decorr.errors import DecorrError
from decorr.models.foreign import FOREIGN_PREFIXES, Preprocessed, accepts_num_classes, build_architecture, classifier_width
from decorr.models.pretrained import (TRANSFORM_MODES, names_pretrained, timm_preprocess, timm_pretrained,
                                      torchvision_preprocess, torchvision_weights)
from decorr.models.registry import model_spec
from decorr.models.weights import file_format, fit_state_dict, read_state_dict, sha256_of

__all__ = ["load_weights_spec"]


def load_weights_spec(spec: Any, options: Any, say: Callable[[str], None]) -> tuple[nn.Module, dict[str, Any],
                                                                                     dict[str, Any]]:
    """``(module, info, entry)`` of the parsed spec ``spec`` (:class:`decorr.specs.ParsedSpec`) under its
    effective options ``options`` (:class:`decorr.specs.SpecOptions`); ``say`` gets the by-order mapping."""
    arch = spec.arch
    foreign = arch.startswith(FOREIGN_PREFIXES)
    if options.transforms is not None and options.transforms not in TRANSFORM_MODES:
        raise DecorrError(f"transforms={options.transforms} in spec {spec.text!r}; use one of {', '.join(TRANSFORM_MODES)}")
    arguments = dict(spec.arch_kwargs or {})
    if arch.startswith("robustbench."):
        if arguments:
            raise DecorrError(f"robustbench models take no architecture arguments; drop ({', '.join(arguments)}) "
                              f"from {spec.text!r} and give dataset=/threat= after @")
        from decorr.models.robustbench import load_robustbench

        net, kwargs, record = load_robustbench(arch, spec.weights, options.dataset or "cifar10",
                                               options.threat or "Linf", log=say)
        automatic: dict[str, Any] = {}
    elif names_pretrained(arch, spec.weights):
        net, kwargs, record, automatic = _pretrained(arch, spec.weights, arguments, options)
    else:
        net, kwargs, record, automatic = _from_file(spec, arguments, options, say)
    explicit = {k: list(v) for k, v in (("mean", options.mean), ("std", options.std),
                                        ("input_size", options.input_size)) if v is not None}
    preprocess = {**automatic, **explicit}
    layer = _feature_layer(arch, net, options.feature_layer, foreign)
    module = Preprocessed(net, **preprocess) if preprocess else net
    full_layer = f"net.{layer}" if preprocess and layer else layer
    entry = {"arch": arch, "kwargs": kwargs, "feature_layer": full_layer, **({"preprocess": preprocess} if preprocess else {})}
    info = {"arch": arch, "spec": spec.text, "kwargs": dict(kwargs), "num_classes": kwargs.get("num_classes"),
            "mean": preprocess.get("mean"), "std": preprocess.get("std"), "input_size": preprocess.get("input_size"),
            "preprocess": preprocess or None, "feature_layer": full_layer, "match_by_order": options.match_by_order,
            **record}
    return module, info, entry


def _feature_layer(arch: str, net: nn.Module, layer: str | None, foreign: bool) -> str | None:
    if layer is None and not foreign:
        return model_spec(arch).feature_layer
    if layer is not None and layer not in dict(net.named_modules()):
        from decorr.features import find_module

        find_module(net, layer)  # the one-line error listing some of its modules
    return layer


def _num_classes(arch: str, state: Any, options: Any, arguments: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(arguments)
    if not accepts_num_classes(arch):
        return kwargs
    number = options.num_classes if options.num_classes is not None else kwargs.get("num_classes")
    if number is None and state is not None:
        number = classifier_width(arch, state, options.match_by_order, arguments)
    if number is not None:
        kwargs["num_classes"] = number
    return kwargs


def _from_file(spec: Any, arguments: dict[str, Any], options: Any,
               say: Callable[[str], None]) -> tuple[nn.Module, dict[str, Any], dict[str, Any], dict[str, Any]]:
    arch, path = spec.arch, Path(spec.weights)
    state = read_state_dict(path)
    kind = file_format(path)
    if options.match_by_order and kind == "safetensors":
        raise DecorrError(f"{path}: --match-by-order needs a torch.save state dict (safetensors files do not keep "
                          "the tensors' order); load it by name or save the state dict with torch.save")
    kwargs = _num_classes(arch, state, options, arguments)
    net = build_architecture(arch, kwargs)
    fit_state_dict(net, state, by_order=options.match_by_order, source=str(path), arch=arch, log=say)
    automatic: dict[str, Any] = {}
    record: dict[str, Any] = {"weights": str(path), "format": kind, "sha256": sha256_of(path)}
    if arch.startswith("timm.") and options.mean is None:
        automatic, record["data_config"] = timm_preprocess(net, options.transforms or "weights")
    return net, kwargs, record, automatic


def _pretrained(arch: str, name: str, arguments: dict[str, Any],
                options: Any) -> tuple[nn.Module, dict[str, Any], dict[str, Any], dict[str, Any]]:
    mode = options.transforms or "weights"
    if arch.startswith("timm."):
        kwargs = dict(arguments, **({"num_classes": options.num_classes} if options.num_classes else {}))
        net, record = timm_pretrained(arch, kwargs)
        automatic, record["data_config"] = timm_preprocess(net, mode)
        return net, kwargs, record, automatic
    state, weights, path = torchvision_weights(arch, name)
    kwargs = _num_classes(arch, state, replace(options, match_by_order=False), arguments)
    if arch == "torchvision.inception_v3":
        kwargs.update(aux_logits=True, transform_input=True, init_weights=False)  # as torchvision builds it
    net = build_architecture(arch, kwargs)
    fit_state_dict(net, state, source=str(path), arch=arch)
    record = {"weights": f"torchvision:{weights}", "weights_name": weights.name, "weights_requested": name, "weights_file": str(path),
              "sha256": sha256_of(path)}
    return net, kwargs, record, torchvision_preprocess(weights, mode)
