"""Hidden features by module name, with forward hooks; train/eval mode bookkeeping (:func:`eval_mode`).

Any ``nn.Module`` works, including torchvision models and models wrapped for data parallelism: the
layer is looked up in ``model.named_modules()`` (a ``module.`` prefix added by DDP is tolerated).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from decorr.errors import DecorrError

__all__ = ["DEAD_FEATURES_BELOW", "dead_features_warning", "eval_mode", "feature_diagnostics", "find_module",
           "get_features", "layer_output", "record_features"]

#: A feature layer with fewer active columns than this fraction is reported as collapsed (the training
#: scripts warn once per epoch; see :func:`dead_features_warning`).
DEAD_FEATURES_BELOW = 0.05


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


def feature_diagnostics(z: torch.Tensor) -> dict[str, float | int]:
    """How many feature columns are alive and how many directions the features really use.

    ``z`` (N, ...) is flattened to an (N, M) matrix (N samples, M features) and read in float64:

    - ``active_features``: the number of columns that vary over the N samples (max > min); a dead ReLU
      unit or channel is constant. ``active_fraction`` = ``active_features / M``.
    - ``effective_rank`` (Roy & Vetterli, "The effective rank: a measure of effective dimensionality",
      EUSIPCO 2007): with s the singular values of the column-centred (N, M) matrix, p = s / sum(s),
      ``effective_rank = exp(-sum_i p_i log p_i)`` (0 log 0 = 0). It lies in [1, rank]: k equal
      singular values give k, a rank-k matrix at most k. Singular values at or below
      ``max(N, M) * machine epsilon * s_max`` (the rounding floor, as ``torch.linalg.matrix_rank``)
      count as zero. A constant matrix (no active column, s = 0) has effective rank **0** by convention
      (the formula is 0/0 there): no direction of variation at all, so a dead layer reads 0, not 1.
      NaN when ``z`` holds NaN or inf (the active count then ignores the columns with NaN).

    Only the active columns enter the SVD (constant ones are exactly zero once centred); cost is one
    float64 SVD (singular values only) of N x active_features.
    """
    if z.dim() < 1 or z.shape[0] == 0:
        raise DecorrError(f"feature_diagnostics needs at least one sample, got shape {tuple(z.shape)}")
    z = z.detach().reshape(z.shape[0], -1).double()
    width = z.shape[1]
    if width == 0:
        raise DecorrError("feature_diagnostics needs at least one feature column, got none")
    active = z.amax(dim=0) > z.amin(dim=0)
    count = int(active.sum())
    result: dict[str, float | int] = {"active_features": count, "active_fraction": count / width}
    if not bool(torch.isfinite(z).all()):
        result["effective_rank"] = math.nan
        return result
    x = z[:, active]
    if count == 0:
        result["effective_rank"] = 0.0
        return result
    x = x - x.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(x.cpu())
    s = s[s > s.max() * max(x.shape) * torch.finfo(torch.float64).eps]
    if s.numel() == 0:  # varying only at the rounding level
        result["effective_rank"] = 0.0
        return result
    p = s / s.sum()
    result["effective_rank"] = float(torch.exp(-(p * p.log()).sum()))
    return result


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


def dead_features_warning(name: str, layer: str, active: float, *, correlation: bool = False,
                          warmup_epochs: int = 0) -> str:
    """The one-line warning for a collapsed feature layer (``active``: the fraction of columns that vary).

    With the correlation loss on (``correlation``) a constant layer is its trivial minimum (L_corr = 0), and
    without a warm-up the fix is to start with cross-entropy alone for an epoch (or another seed).
    """
    why = (": a constant feature layer is a trivial minimum of the correlation loss (L_corr = 0) and this model "
           "will not learn" if correlation else "; this model will not learn")
    fix = "; restart with --corr-warmup-epochs 1 (or another --seed)" if correlation and warmup_epochs == 0 else ""
    return (f"warning: {name}'s features at {layer} are (almost) constant on the test set ({100 * active:.1f}% of "
            f"columns vary){why}{fix}")


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


def r2_text(value: float, model: nn.Module, layer: str, input_shape: Sequence[int]) -> str:
    """An epoch line's feature R^2: three decimals, or why it is missing (R^2 needs more samples than
    features + 1; with fewer it is NaN). The feature count is measured on ``model`` only in that case."""
    if math.isfinite(value):
        return f"{value:.3f}"
    param = next(iter(model.parameters()), None)
    with eval_mode(model), torch.no_grad(), record_features(model, layer) as feats:
        model(torch.zeros((1, *input_shape), device=param.device if param is not None else "cpu"))
    width = int(feats[layer][0].numel())
    return f"n/a (needs more than {width}+1 test images)"
