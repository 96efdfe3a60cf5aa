"""Train/eval mode bookkeeping in one place: :func:`eval_mode`."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch.nn as nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Within the block every module of ``models`` is in eval mode; on exit (also on an error) each
    submodule gets back the mode it had, so a model with a frozen (eval) part keeps it. ``None``
    entries are skipped, and a module listed twice (or inside another) is restored once."""
    saved: dict[int, tuple[nn.Module, bool]] = {}
    for model in models:
        if model is None:
            continue
        for module in model.modules():
            saved.setdefault(id(module), (module, module.training))
    try:
        for model in models:
            if model is not None:
                model.eval()
        yield
    finally:
        for module, training in saved.values():
            module.training = training
