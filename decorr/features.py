"""Hidden features by module name, with forward hooks.

Any ``nn.Module`` works, including torchvision models and models wrapped for data parallelism: the
layer is looked up in ``model.named_modules()`` (a ``module.`` prefix added by DDP is tolerated).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from decorr.errors import DecorrError

__all__ = ["find_module", "record_features", "get_features"]


def find_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    for candidate in (name, f"module.{name}", name.removeprefix("module.")):
        if candidate in modules:
            return modules[candidate]
    sample = ", ".join(n for n in list(modules)[1:12] if n)
    raise DecorrError(f"model has no module named {name!r}; some of its modules: {sample}, ...")


@contextmanager
def record_features(model: nn.Module, layers: str | Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward pass stores the outputs of ``layers`` in the yielded dict.

    The outputs keep their autograd graph, so a loss on them trains the model::

        with record_features(model, "features.pool2") as feats:
            logits = model(x)
        loss = ce(logits, y) + correlation_loss(feats["features.pool2"], ...)
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    recorded: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(layer_name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            recorded[layer_name] = output

        return hook

    try:
        for layer_name in names:
            handles.append(find_module(model, layer_name).register_forward_hook(make_hook(layer_name)))
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def get_features(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """Run ``model(x)`` and return the output of ``layer`` (with its graph unless under no_grad)."""
    with record_features(model, layer) as recorded:
        model(x)
    if layer not in recorded:
        raise DecorrError(f"module {layer!r} was not called in the forward pass; choose another feature layer")
    return recorded[layer]
