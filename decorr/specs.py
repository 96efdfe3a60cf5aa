"""Model specs: one way to name a model anywhere a model is taken (evaluation, alignment, DVERGE, conversion).

Grammar (``SPEC_HELP`` is the same text for ``--help``)::

    SPEC     := CKPT | CKPT:MODEL | ARCH[(ARGS)]=WEIGHTS[@OPTIONS] | robustbench.NAME[=DIR][@OPTIONS]
    CKPT     := a decorr run directory or checkpoint directory (every model; :MODEL picks one)
    ARCH     := a registry name (decorr.models.list_models()) | torchvision.NAME | timm.NAME
    ARGS     := KEY=VALUE[,...]: the architecture builder's arguments (decorr.models.arguments), e.g.
                mnist_cnn(mean=0,std=1); recorded in the model's kwargs
    WEIGHTS  := a weights file, its format read from its content (safetensors, torch.save zip or legacy
                pickle; torch.load with weights_only=True, map_location="cpu")
              | with torchvision.NAME: a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), read from torch
                hub's cache (downloaded once), its transforms() in front of the model
              | with timm.NAME: pretrained (timm's loader), its resolve_data_config preprocessing in front
    OPTIONS  := KEY=VALUE[,KEY=VALUE...]   KEY one of num_classes, mean, std, input_size, feature_layer,
                                            match_by_order, name, transforms, dataset, threat
                mean/std: one value per channel separated by "/" (0.485/0.456/0.406); input_size: 224 or
                224x192 (height x width); match_by_order: 1/0; name: the model's name in results;
                transforms: weights (the pretrained weights' eval transform) | normalize (mean/std only) | none;
                dataset/threat: robustbench.NAME's (decorr.models.robustbench)

    torchvision.resnet18=r18.pth@num_classes=10,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,input_size=224

The global flags (``--num-classes``, ``--mean``/``--std``, ``--input-size``, ``--feature-layer``,
``--match-by-order``; :func:`add_spec_arguments`) apply to every ``ARCH=WEIGHTS`` spec that does not set
the option itself, except that ``--mean``/``--std`` skip registry architectures, which normalise inside
themselves (their weights hold the mean and std). ``mean``/``std`` put a :class:`decorr.models.Normalize`
and ``input_size`` a bilinear resize in front of the model (:class:`Preprocessed`), so inputs stay pixels
in [0, 1] at the data's size. ``num_classes`` defaults to the output count of the weights' classifier
(the tensor in the place of the architecture's last weight of two or more dimensions). A foreign model is named after its weights file's stem
(``r18``); checkpoint models ``<run name>/<model>`` as always.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from decorr.errors import DecorrError
from decorr.models.arguments import ARCH_HEAD, parse_arguments
from decorr.models.foreign import FOREIGN_PREFIXES, Preprocessed, build_architecture
from decorr.models.registry import list_models, model_spec

__all__ = [
    "NamedModel", "ParsedSpec", "Preprocessed", "SPEC_HELP", "SpecOptions", "add_spec_arguments",
    "build_architecture", "check_input_shape", "load_specs", "parse_spec", "spec_options", "split_model_selector",
]

SPEC_HELP = """model specs (positional models, --surrogate, --init):
  CKPT | CKPT:MODEL            a decorr run or checkpoint directory (all its models, or one)
  ARCH[(ARGS)]=WEIGHTS[@KEY=VALUE,...]
                               ARCH: a registry name, torchvision.NAME or timm.NAME; ARGS: the builder's
                               arguments, quoted: "mnist_cnn(mean=0,std=1)=paper_cnn@match_by_order=1";
                               WEIGHTS: a weights file of any name (safetensors or torch.save, told by its
                               content; never unpickles code; GPU files load on CPU), or published weights
                               with their own preprocessing in front: torchvision.resnet50=DEFAULT (or
                               IMAGENET1K_V2 ...), timm.NAME=pretrained (both download once; cached)
  robustbench.NAME[=DIR]@dataset=cifar10,threat=Linf
                               a RobustBench model (pip install 'decorr[zoo]'), weights in DIR (models)
  per-spec KEYs: num_classes, mean, std (values joined by /), input_size (224 or HxW), feature_layer,
  match_by_order (1/0), name, transforms (weights|normalize|none), dataset, threat; e.g.
  torchvision.resnet18=r18.pth@num_classes=10,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,input_size=224
  the global --num-classes --mean --std --input-size --feature-layer --match-by-order apply to every
  ARCH=WEIGHTS spec without its own value (--mean/--std not to registry archs: they normalise inside)"""

SPEC_KEYS = ("num_classes", "mean", "std", "input_size", "feature_layer", "match_by_order", "name", "transforms",
             "dataset", "threat")
#: Where robustbench.NAME looks for its weights without =MODEL_DIR (robustbench.utils.load_model's default).
ROBUSTBENCH_DIR = "models"


@dataclass(frozen=True)
class SpecOptions:
    """Options of ``ARCH=WEIGHTS`` specs (global flags, or one spec's ``@KEY=VALUE`` suffix)."""

    num_classes: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_size: tuple[int, int] | None = None
    feature_layer: str | None = None
    match_by_order: bool = False
    name: str | None = None
    transforms: str | None = None  # pretrained weights: their whole eval transform (weights) or mean/std only
    dataset: str | None = None  # robustbench.NAME: RobustBench's dataset (cifar10, cifar100, imagenet)
    threat: str | None = None  # robustbench.NAME: RobustBench's threat model (Linf, L2, corruptions)


@dataclass(frozen=True)
class ParsedSpec:
    text: str
    checkpoint: str | None = None  # CKPT
    model: str | None = None  # CKPT:MODEL
    arch: str | None = None
    weights: str | None = None
    options: Mapping[str, Any] | None = None  # the spec's own options, by key
    arch_kwargs: Mapping[str, Any] | None = None  # ARCH(KEY=VALUE,...): the architecture's arguments


@dataclass
class NamedModel:
    """A loaded model (eval mode): ``info`` is its results record, ``entry`` the checkpoint entry rebuilding it."""

    name: str
    module: nn.Module
    info: dict[str, Any]
    entry: dict[str, Any]


# ------------------------------------------------------------------------------------------------
# Parsing


def split_model_selector(path: str) -> tuple[str, str | None]:
    """``PATH:MODEL`` picks one model of a checkpoint (only when PATH itself is not a file or folder)."""
    if os.path.exists(path) or ":" not in path:
        return path, None
    base, _, name = path.rpartition(":")
    if not name or "/" in name or os.sep in name:
        return path, None
    return base, name


def parse_spec(text: str) -> ParsedSpec:
    """Which form ``text`` is (see the module docstring); options are parsed and checked, nothing is loaded."""
    text = str(text)
    if os.path.isfile(text) and text.lower().endswith((".safetensors", ".pt", ".pth", ".bin")):
        raise DecorrError(f"spec {text!r} is a weights file without its architecture; write ARCH={text}, "
                          "e.g. torchvision.resnet18=" + Path(text).name)
    if os.path.exists(text):
        return ParsedSpec(text, checkpoint=text)
    match = ARCH_HEAD.match(text)
    after = text[match.end():match.end() + 1] if match else ""
    if match and after == "=" or (match and text.startswith("robustbench.") and after in ("@", "")):
        head = match.group("arch")
        arguments = parse_arguments(match.group("args"), text) if match.group("args") is not None else {}
        rest = text[match.end() + 1:] if after == "=" else ROBUSTBENCH_DIR + text[match.end():]
        weights, options = rest, {}
        if "@" in rest:
            path, _, tail = rest.rpartition("@")
            if "=" in tail.split(",")[0] and not os.path.exists(rest):
                weights, options = path, _parse_options(tail, text)
        if not weights:
            raise DecorrError(f"spec {text!r} names no weights file; write ARCH=WEIGHTS, e.g. resnet20=r20.safetensors")
        return ParsedSpec(text, arch=head, weights=weights, options=options, arch_kwargs=arguments)
    if text.lower().endswith((".safetensors", ".pt", ".pth", ".bin")):
        raise DecorrError(f"spec {text!r} is a weights file without its architecture; write ARCH={text}, "
                          "e.g. torchvision.resnet18=" + Path(text).name)
    base, model = split_model_selector(text)
    return ParsedSpec(text, checkpoint=base, model=model)


def spec_paths(specs: Sequence[str]) -> dict[str, str]:
    """The existing checkpoint folder or weights file of each spec, by the spec's text (what a command reads,
    so that no output of the command may overwrite it; see :func:`decorr.io.check_paths_apart`)."""
    paths = {}
    for spec in specs:
        parsed = parse_spec(spec)
        path = parsed.checkpoint or parsed.weights
        if path and os.path.exists(path):
            paths[spec] = path
    return paths


def _parse_options(tail: str, text: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in tail.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in SPEC_KEYS or not sep:
            raise DecorrError(f"unknown option {item!r} in spec {text!r}; use KEY=VALUE with KEY one of "
                              f"{', '.join(SPEC_KEYS)}")
        options[key] = _option_value(key, value.strip(), text)
    return options


def _option_value(key: str, value: str, text: str) -> Any:
    try:
        if key == "num_classes":
            return int(value)
        if key in ("mean", "std"):
            return tuple(float(v) for v in value.split("/"))
        if key == "input_size":
            return tuple(int(v) for v in value.lower().split("x"))
        if key == "match_by_order":
            return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[value.lower()]
    except (ValueError, KeyError):
        raise DecorrError(f"bad value {value!r} for {key} in spec {text!r}; e.g. num_classes=10, "
                          "mean=0.485/0.456/0.406, input_size=224 or 224x224, match_by_order=1") from None
    if not value:
        raise DecorrError(f"empty value for {key} in spec {text!r}")
    return value


def _effective(spec: ParsedSpec, defaults: SpecOptions, registry: bool) -> SpecOptions:
    own = {k: v for k, v in (spec.options or {}).items() if k != "name"}
    if registry and "mean" not in own and "std" not in own:  # registry models normalise inside themselves
        defaults = replace(defaults, mean=None, std=None)
    options = replace(defaults, name=None, **own)
    if (options.mean is None) != (options.std is None):
        raise DecorrError(f"spec {spec.text!r} has a mean without a std (or the reverse); give both")
    if options.mean is not None:
        if len(options.mean) != len(options.std) or min(options.std) <= 0:
            raise DecorrError(f"mean {options.mean} and std {options.std} of {spec.text!r} need one value per "
                              "channel each, std > 0")
    if options.input_size is not None:
        size = tuple(options.input_size) * (2 if len(options.input_size) == 1 else 1)
        if len(size) != 2 or min(size) < 1:
            raise DecorrError(f"input size {options.input_size} of {spec.text!r} must be N or HxW, positive")
        options = replace(options, input_size=size)
    if options.num_classes is not None and options.num_classes < 1:
        raise DecorrError(f"num_classes of {spec.text!r} must be >= 1, got {options.num_classes}")
    return options


# ------------------------------------------------------------------------------------------------
# Loading


def load_specs(specs: Sequence[str | os.PathLike], options: SpecOptions | None = None, *,
               device: torch.device | str = "cpu", log: Callable[[str], None] | None = None) -> dict[str, NamedModel]:
    """Every model of every spec, by unique name, in eval mode on ``device`` (the one loading function).

    Checkpoint models are named ``<run name>/<model>`` (shortest trailing path parts that tell the runs
    apart) and rebuilt from their config; ``ARCH=WEIGHTS`` models are named ``name=`` or their file's
    stem (with parent folders when stems clash). ``options`` are the global flags; ``log`` gets the
    by-order mapping (default: stderr).
    """
    options = options or SpecOptions()
    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    parsed = [parse_spec(str(s)) for s in specs]
    from decorr.checkpoint import resolve_checkpoint

    directories = {i: resolve_checkpoint(p.checkpoint) for i, p in enumerate(parsed) if p.checkpoint is not None}
    keys = [(d.resolve(), parsed[i].model) for i, d in directories.items()]
    if len(set(keys)) != len(keys):
        raise DecorrError("the same checkpoint is given twice; list each checkpoint once")
    labels = dict(zip(directories, _unique_labels([_run_name(d) for d in directories.values()])))
    stems = {i: Path(p.arch.split(".", 1)[1]) if _names_published(p) else Path(p.weights).with_suffix("")
             for i, p in enumerate(parsed) if p.weights is not None}
    stem_labels = dict(zip(stems, _unique_labels(list(stems.values()))))
    loaded: dict[str, NamedModel] = {}
    for i, spec in enumerate(parsed):
        if spec.checkpoint is not None:
            models = _load_checkpoint_models(directories[i], spec.model, labels[i])
        else:
            models = [_load_weights_spec(spec, options, stem_labels[i], say)]
        for model in models:
            if model.name in loaded:
                raise DecorrError(f"two models are both named {model.name!r}; give distinct run directories, or "
                                  "name a weights spec with @name=NAME")
            model.module.to(device).eval()
            loaded[model.name] = model
    return loaded


def _load_checkpoint_models(directory: Path, only: str | None, label: str) -> list[NamedModel]:
    from decorr.checkpoint import build_model, load_checkpoint

    checkpoint = load_checkpoint(directory, load_weights=False)
    names = checkpoint.model_names
    if only is not None and only not in names:
        raise DecorrError(f"checkpoint {directory} has no model {only!r}; it holds {', '.join(names)}")
    checkpoint = load_checkpoint(directory)
    models = []
    for name in names if only is None else [only]:
        entry = dict(checkpoint.config["models"][name])
        module = build_model(entry, checkpoint.state_dicts[name], source=str(directory / f"{name}.safetensors"))
        info = {"arch": entry["arch"], "kwargs": dict(entry.get("kwargs", {})), "feature_layer": entry.get("feature_layer"),
                "checkpoint": str(directory), "dataset": checkpoint.config.get("dataset"),
                "epoch": checkpoint.config.get("epoch")}
        if entry.get("preprocess"):
            info["preprocess"] = dict(entry["preprocess"])
        models.append(NamedModel(f"{label}/{name}", module, info, entry))
    return models


def _load_weights_spec(spec: ParsedSpec, defaults: SpecOptions, label: str, say: Callable[[str], None]) -> NamedModel:
    from decorr.models.spec_loading import load_weights_spec

    foreign = spec.arch.startswith(FOREIGN_PREFIXES)
    if not foreign and spec.arch not in list_models():
        build_architecture(spec.arch)  # the one-line error naming the known architectures
    options = _effective(spec, defaults, registry=not foreign)
    module, info, entry = load_weights_spec(spec, options, say)
    return NamedModel((spec.options or {}).get("name") or label, module, info, entry)


def _names_published(spec: ParsedSpec) -> bool:
    """Published weights (``torchvision.NAME=DEFAULT``, ``timm.NAME=pretrained``, ``robustbench.NAME``): named NAME."""
    from decorr.models.pretrained import names_pretrained

    return (spec.arch or "").startswith("robustbench.") or names_pretrained(spec.arch, spec.weights)


def _run_name(directory: Path) -> Path:
    # RUN_DIR/checkpoint -> RUN_DIR; a bare checkpoint directory stands for itself.
    return directory.parent if directory.name in ("checkpoint", "checkpoint.old") else directory


def _unique_labels(paths: list[Path]) -> list[str]:
    """Shortest trailing path parts that tell the paths apart (usually just the last one)."""
    if not paths:
        return []
    resolved = [p.resolve() for p in paths]
    distinct = list(dict.fromkeys(resolved))
    depth = 1
    while True:
        labels = {p: "/".join(p.parts[-depth:]) for p in distinct}
        if len(set(labels.values())) == len(distinct) or depth >= max(len(p.parts) for p in distinct):
            return [labels[p] for p in resolved]
        depth += 1


# ------------------------------------------------------------------------------------------------
# Checks and command-line options


#: Registry kwargs that leave a model's input shape (C, H, W) as registered (in_channels is checked).
_SHAPE_NEUTRAL = {"mean", "std", "num_classes", "in_channels", "shortcut"}


def check_input_shape(models: Mapping[str, NamedModel], shape: Sequence[int], *, data: str = "the data",
                      fix: str | None = None) -> None:
    """One-line DecorrError when a model cannot take the data's inputs ``shape`` (C, H, W).

    ``data`` names the inputs in the message and ``fix`` replaces its advice (default: evaluate the model
    on its own dataset).
    """
    shape = tuple(int(s) for s in shape)
    for name, model in models.items():
        entry = model.entry
        arch, kwargs = entry["arch"], dict(entry.get("kwargs", {}))
        resized = bool((entry.get("preprocess") or {}).get("input_size"))
        if not arch.startswith(FOREIGN_PREFIXES) and arch in list_models():
            expected = model_spec(arch).input_shape
            if expected is not None and set(kwargs) <= _SHAPE_NEUTRAL:
                expected = (int(kwargs.get("in_channels", expected[0])), *expected[1:])
                # A model built for another dataset than its nominal one (train/classifier.py sets
                # in_channels, e.g. resnet20 on 28x28 Fashion-MNIST) has a registry size that is not its
                # own: then only the channels are checked here, the size by the forward probe below.
                adapted = "in_channels" in kwargs
                if expected[0] != shape[0] or (not resized and not adapted and tuple(expected[1:]) != shape[1:]):
                    raise DecorrError(f"model {name} ({arch}) takes inputs {expected} but {data} has {shape}; "
                                      + (fix or "evaluate it on the dataset it was trained for (--dataset)"))
        param = next(iter(model.module.parameters()), None)
        probe = torch.zeros((1, *shape), device=param.device if param is not None else "cpu")
        try:
            with torch.no_grad():
                model.module(probe)
        except RuntimeError as err:
            detail = str(err).strip().splitlines()[0][:160]
            raise DecorrError(f"model {name} ({arch}) cannot take {data}'s inputs {shape} ({detail}); "
                              + (fix or "evaluate it on its own dataset (--dataset) or give it input_size=")) from None


def add_spec_arguments(parser: Any) -> None:
    """The global options of ``ARCH=WEIGHTS`` specs (one set for every script that takes models)."""
    group = parser.add_argument_group("options of ARCH=WEIGHTS model specs (a spec's own @KEY=VALUE wins)")
    group.add_argument("--num-classes", type=int, default=None,
                       help="classifier outputs (default: read from the weights' last layer)")
    group.add_argument("--mean", nargs="+", type=float, default=None,
                       help="per-channel mean the weights were trained with (a Normalize in front; not registry archs)")
    group.add_argument("--std", nargs="+", type=float, default=None, help="per-channel std, with --mean")
    group.add_argument("--input-size", nargs="+", type=int, default=None, metavar="N",
                       help="resize inputs (bilinear) to N or H W in front of the model")
    group.add_argument("--feature-layer", default=None, help="module name for feature statistics")
    group.add_argument("--match-by-order", action="store_true",
                       help="load weights whose names differ by position (same order and shapes); prints the mapping")


def spec_options(args: Any) -> SpecOptions:
    """The :class:`SpecOptions` of parsed :func:`add_spec_arguments` flags."""
    if args.input_size is not None and len(args.input_size) not in (1, 2):
        raise DecorrError(f"--input-size takes N or H W, got {len(args.input_size)} numbers")
    return SpecOptions(
        num_classes=args.num_classes, mean=tuple(args.mean) if args.mean else None,
        std=tuple(args.std) if args.std else None,
        input_size=tuple(args.input_size) if args.input_size else None,
        feature_layer=args.feature_layer, match_by_order=args.match_by_order,
    )
