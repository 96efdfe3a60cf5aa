"""Architectures named by a string: registry names, ``torchvision.NAME``, ``timm.NAME``, and the wrapper
that puts a model's input preprocessing (normalisation, resize) inside it.

``build_architecture(arch, kwargs, preprocess)`` is what ``decorr.checkpoint.build_model`` and
``decorr.specs`` build from; a checkpoint entry ``{"arch": "torchvision.resnet18", "kwargs":
{"num_classes": 10}, "preprocess": {"mean": [...], "std": [...], "input_size": [224, 224]}}`` rebuilds
``Preprocessed(torchvision resnet18)``.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from decorr.errors import DecorrError
from decorr.models.blocks import Normalize
from decorr.models.registry import create_model, list_models, model_spec

__all__ = ["FOREIGN_PREFIXES", "Preprocessed", "accepts_num_classes", "build_architecture", "check_arguments",
           "classifier_width"]

FOREIGN_PREFIXES = ("torchvision.", "timm.", "robustbench.")


class Preprocessed(nn.Module):
    """``net(normalize(resize(crop(resize(x)))))``: pixels in [0, 1] at any size in, the wrapped model's input out.

    ``resize`` (the shorter side, or H, W), ``crop`` (a centre crop, H, W), ``interpolation`` and ``antialias``
    are a pretrained model's own eval transform (torchvision's ``Resize`` + ``CenterCrop`` on tensors, as
    ``weights.transforms()`` and timm's eval transform apply them); ``input_size`` a plain bilinear resize to
    exactly H x W; ``mean``/``std`` a :class:`Normalize`.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 input_size: Sequence[int] | None = None, resize: Sequence[int] | None = None,
                 crop: Sequence[int] | None = None, interpolation: str = "bilinear", antialias: bool = True) -> None:
        super().__init__()
        self.input_size = tuple(int(s) for s in input_size) if input_size is not None else None
        self.resize = [int(s) for s in resize] if resize is not None else None
        self.crop = [int(s) for s in crop] if crop is not None else None
        self.interpolation, self.antialias = str(interpolation), bool(antialias)
        self.normalize = Normalize(mean, std) if mean is not None else nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize is not None or self.crop is not None:
            from torchvision.transforms import InterpolationMode
            from torchvision.transforms import functional as TF

            if self.resize is not None:
                x = TF.resize(x, self.resize, interpolation=InterpolationMode(self.interpolation),
                              antialias=self.antialias)
            if self.crop is not None:
                x = TF.center_crop(x, self.crop)
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        return self.net(self.normalize(x))


def build_architecture(arch: str, kwargs: Mapping[str, Any] | None = None,
                       preprocess: Mapping[str, Any] | None = None) -> nn.Module:
    """A freshly initialised ``arch`` (registry, ``torchvision.NAME`` or ``timm.NAME``), wrapped in
    :class:`Preprocessed` when ``preprocess`` (``{mean, std, input_size}``) is given."""
    kwargs = dict(kwargs or {})
    if arch.startswith("torchvision."):
        import torchvision

        name = arch[len("torchvision."):]
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise DecorrError(f"torchvision has no classification model {name!r}; see "
                              "torchvision.models.list_models() for the names")
        try:
            model = torchvision.models.get_model(name, weights=None, **kwargs)
        except (TypeError, ValueError) as err:
            raise DecorrError(f"torchvision model {name!r} does not accept {kwargs} ({err})") from None
    elif arch.startswith("timm."):
        try:
            import timm
        except ImportError:
            raise DecorrError(f"{arch} needs timm, which is not installed; pip install timm") from None
        try:
            model = timm.create_model(arch[len("timm."):], pretrained=False, **kwargs)
        except (RuntimeError, TypeError, ValueError) as err:
            raise DecorrError(f"timm cannot build {arch[len('timm.'):]!r} with {kwargs} ({err})") from None
    elif arch.startswith("robustbench."):
        from decorr.models.robustbench import robustbench_architecture

        model = robustbench_architecture(arch, **kwargs)
    elif arch in list_models():
        check_arguments(arch, kwargs)
        model = create_model(arch, **kwargs)
    else:
        raise DecorrError(f"unknown architecture {arch!r}; use a registry name ({', '.join(list_models())}), "
                          "torchvision.NAME or timm.NAME")
    return Preprocessed(model, **preprocess) if preprocess else model


def check_arguments(arch: str, kwargs: Mapping[str, Any]) -> None:
    """One-line DecorrError when the registry builder of ``arch`` takes no argument of one of ``kwargs``."""
    parameters = inspect.signature(model_spec(arch).builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    taken = [name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key in kwargs:
        if key not in parameters:
            raise DecorrError(f"architecture {arch} takes no argument {key!r}; it takes {', '.join(taken) or 'none'}")


def accepts_num_classes(arch: str) -> bool:
    if arch.startswith("robustbench."):
        return False
    if arch.startswith(FOREIGN_PREFIXES):
        return True
    return "num_classes" in inspect.signature(model_spec(arch).builder).parameters


def classifier_width(arch: str, state: Mapping[str, torch.Tensor], by_order: bool,
                     kwargs: Mapping[str, Any] | None = None) -> int | None:
    """Outputs of the weights' classifier: the tensor in the place of ``arch``'s last 2+-D weight (by
    order: among the tensors that by-order matching fills, :func:`decorr.models.weights.order_keys`)."""
    from decorr.models.weights import constant_buffers, order_keys

    net = build_architecture(arch, kwargs)
    theirs = [t for k, t in state.items() if not k.endswith("num_batches_tracked")]
    expected = net.state_dict()
    ours = [(k, expected[k]) for k in order_keys(expected, constant_buffers(net), theirs)]
    last = [i for i, (k, t) in enumerate(ours) if k.endswith("weight") and t.dim() >= 2]
    if not last:
        return None
    if by_order:
        found = theirs[last[-1]] if last[-1] < len(theirs) else None
    else:
        found = state.get(ours[last[-1]][0])
    return int(found.shape[0]) if found is not None and found.dim() >= 1 else None
