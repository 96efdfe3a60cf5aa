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

__all__ = ["find_module", "record_features", "get_features", "layer_output"]


def find_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    for candidate in (name, f"module.{name}", name.removeprefix("module.")):
        if candidate in modules:
            return modules[candidate]
    sample = ", ".join(n for n in list(modules)[1:12] if n)
    raise DecorrError(f"model has no module named {name!r}; some of its modules: {sample}, ...")


class StopForward(Exception):
    """Raised by a ``stop=True`` hook once every wanted layer has run: the rest of the forward is skipped."""


@contextmanager
def record_features(model: nn.Module, layers: str | Sequence[str], *,
                    stop: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward pass stores the outputs of ``layers`` in the yielded dict.

    The outputs keep their autograd graph, so a loss on them trains the model::

        with record_features(model, "features.pool2") as feats:
            logits = model(x)
        loss = ce(logits, y) + correlation_loss(feats["features.pool2"], ...)

    With ``stop=True`` the forward raises :class:`StopForward` as soon as every layer has recorded
    its output (the caller catches it; :func:`layer_output` does).
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    recorded: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(layer_name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            recorded[layer_name] = output
            if stop and len(recorded) == len(names):
                raise StopForward

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


def layer_output(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The output of module ``layer`` for input ``x``, computing nothing after it.

    The hook of :func:`record_features` (``stop=True``) records the output and stops the forward, so
    the layers above ``layer`` never run (about half the cost of ``mnist_cnn`` at ``features.pool2``).
    The output keeps its autograd graph.
    """
    with record_features(model, layer, stop=True) as recorded:
        try:
            model(x)
        except StopForward:
            pass
    if layer not in recorded:
        raise DecorrError(f"module {layer!r} was not called in the forward pass; choose another layer")
    return recorded[layer]
