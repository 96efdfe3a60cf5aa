"""The evaluation a training run makes after every epoch: test accuracy of every model, the feature R^2
and 1-D PCA Pearson of every pair, dead feature columns and effective rank; and the checks of a batch
against the models before any work (feature width, a last partial batch too small to keep).

This is training's own monitoring (no attack): the transfer evaluation is :mod:`decorr.evaluation`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from decorr.data import ImageSplit, iterate_batches, last_batch_too_small
from decorr.distributed import all_gather_with_grad, all_reduce_sum, unwrap
from decorr.errors import DecorrError
from decorr.features import eval_mode, feature_diagnostics, record_features
from decorr.loss import pca_pearson, r_squared
from decorr.training.run import check_finite_features

__all__ = ["drop_small_last_batch", "evaluate_models", "feature_width"]


def feature_width(model: nn.Module, layer: str, input_shape: tuple[int, ...]) -> int:
    """Number of features (after flattening) that ``layer`` produces for one input."""
    with eval_mode(model), torch.no_grad(), record_features(model, layer) as feats:
        model(torch.zeros(1, *input_shape))
    return int(feats[layer][0].numel())

@torch.no_grad()
def evaluate_models(
    models: dict[str, nn.Module],
    split: ImageSplit,
    layers: dict[str, str],
    *,
    batch_size: int = 1000,
    device: torch.device | str = "cpu",
    shard: tuple[int, int] = (0, 1),
    ensemble: bool = False,
) -> dict[str, Any]:
    """Test accuracy of every model and, for each pair of models, the feature R^2 and 1-D PCA Pearson.

    With ``ensemble=True`` also ``acc_ensemble``: the accuracy of the models' mean softmax, from the
    same forward passes.

    Per model also ``active_features_<name>`` (the fraction of feature columns that vary over the split)
    and ``effective_rank_<name>`` (of the centred features, see :func:`decorr.features.feature_diagnostics`).

    Each process evaluates its shard; features and counts are gathered so every process gets the
    numbers of the whole split.
    """
    names = list(models)
    plain = {name: unwrap(models[name]) for name in names}
    with eval_mode(*plain.values()):
        return _evaluate(plain, split, layers, batch_size, device, shard, ensemble)

def _evaluate(plain: dict[str, nn.Module], split: ImageSplit, layers: dict[str, str], batch_size: int,
              device: torch.device | str, shard: tuple[int, int], ensemble: bool = False) -> dict[str, Any]:
    names = list(plain)
    correct = {name: torch.zeros((), device=device) for name in names}
    correct_ensemble = torch.zeros((), device=device)
    features: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    count = torch.zeros((), device=device)
    for x, y in iterate_batches(split, batch_size, shuffle=False, shard=shard, device=device):
        probs = 0
        for name in names:
            with record_features(plain[name], layers[name]) as feats:
                logits = plain[name](x)
            correct[name] += (logits.argmax(1) == y).sum()
            features[name].append(feats[layers[name]].flatten(1).float().cpu())
            if ensemble:
                probs = probs + F.softmax(logits.float(), dim=1)
        if ensemble:
            correct_ensemble += (probs.argmax(1) == y).sum()
        count += len(y)
    total = all_reduce_sum(count)
    result: dict[str, Any] = {f"acc_{n}": float(all_reduce_sum(correct[n]) / total) for n in names}
    if ensemble:
        result["acc_ensemble"] = float(all_reduce_sum(correct_ensemble) / total)
    gathered = {n: all_gather_with_grad(torch.cat(features[n]).to(device)).cpu() for n in names}
    check_finite_features(gathered, "on the test images")  # before the SVDs below
    for n in names:
        # Fraction of feature columns that vary over the split (0: a dead, constant layer), and the
        # effective rank of the centred features (decorr.features.feature_diagnostics).
        z = gathered[n]
        diagnostics = feature_diagnostics(z) if len(z) else {"active_fraction": math.nan, "effective_rank": math.nan}
        result[f"active_features_{n}"] = float(diagnostics["active_fraction"])
        result[f"effective_rank_{n}"] = float(diagnostics["effective_rank"])
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            za, zb = gathered[a], gathered[b]
            if za.shape[0] > za.shape[1] + 1:
                result[f"r2_{a}_{b}"] = r_squared(za, zb, gather=False)
            else:
                result[f"r2_{a}_{b}"] = math.nan
            result[f"pca_pearson_{a}_{b}"] = pca_pearson(za, zb)
    return result

def drop_small_last_batch(models: Sequence[nn.Module], num_train: int, batch_size: int, minimum: int) -> bool:
    """Whether to drop an epoch's last partial batch: when it has fewer samples than the loss needs
    (``minimum``) or, with batch norm, fewer than 2 per process. Refuses a training set smaller than both
    a batch and that minimum."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for model in models for m in model.modules()):
        # The process group may not exist yet; the launcher's WORLD_SIZE says how many shards there will be.
        minimum = max(minimum, 2 * int(os.environ.get("WORLD_SIZE", "1")))
    if num_train < batch_size and num_train < minimum:
        raise DecorrError(f"the {num_train} training images are fewer than one batch needs ({minimum}); "
                          "use more training images or a model with a narrower feature layer")
    return last_batch_too_small(num_train, batch_size, minimum)
