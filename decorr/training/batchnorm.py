"""Batch norm over the global batch of all processes, on any device (CPU/gloo included).

``torch.nn.SyncBatchNorm`` refuses CPU tensors, so data-parallel runs on CPU (and the gloo tests that
check N processes against one) could not normalise over the global batch. :class:`GlobalBatchNorm`
does it with two differentiable all-reduces per call: the per-channel sums and counts give the global
mean, then the sums of squared deviations from it give the global (biased) variance. Two passes
instead of one sum of squares keep the variance as accurate as plain batch norm's.

Every process computes the statistics of the same global batch and each sample's gradient reaches the
process that owns it (see :mod:`decorr.distributed` for why the all-reduce's backward is again an
all-reduce), so N processes with ``GlobalBatchNorm`` train exactly like one process with plain batch
norm on the whole batch. In eval mode, or without ``torch.distributed``, it *is* plain batch norm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from decorr.distributed import is_distributed

__all__ = ["GlobalBatchNorm", "all_reduce_sum_with_grad", "convert_sync_batchnorm"]


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over processes. Every process's output feeds the same global loss, so the gradient of one
    process's input is the sum of all processes' output gradients: the backward is an all-reduce too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over processes, differentiable; identity in one process."""
    if not is_distributed():
        return x
    return _AllReduceSumWithGrad.apply(x)


class GlobalBatchNorm(_BatchNorm):
    """Batch norm whose training-mode statistics are those of the global batch across processes.

    A drop-in replacement for ``BatchNorm1d/2d/3d`` (same parameters, buffers and state-dict keys), for
    inputs of shape (N, C, ...). Running statistics are updated like batch norm's, with the unbiased
    variance of the global batch. Statistics are computed in float32 (float64 inputs stay float64),
    and the output has the input's dtype, as with batch norm under autocast.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C, ...), got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        use_batch_stats = self.training or not self.track_running_stats
        if not (use_batch_stats and is_distributed()):
            return super().forward(input)

        x = input if input.dtype == torch.float64 else input.float()
        dims = [d for d in range(x.dim()) if d != 1]
        per_channel = x.numel() // max(x.shape[1], 1)
        local = torch.cat([x.sum(dim=dims), x.new_full((1,), float(per_channel))])
        totals = all_reduce_sum_with_grad(local)
        count = totals[-1].detach()
        # The check needs the global count on the host (a device synchronisation) only when this
        # process alone holds fewer than two values per channel.
        if per_channel < 2 and float(count) <= 1:
            raise ValueError(f"batch norm needs more than one value per channel in the global batch, got {int(count)}")
        mean = totals[:-1] / count
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x - mean.view(shape)
        var = all_reduce_sum_with_grad(centred.square().sum(dim=dims)) / count

        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average, as in _BatchNorm (no host read)
                    factor = (1.0 / self.num_batches_tracked).to(self.running_mean.dtype)
                else:
                    factor = self.momentum
                unbiased = var * (count / (count - 1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)

        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every batch norm layer in ``module`` by a :class:`GlobalBatchNorm` with the same weights.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, but the result also runs on CPU. Returns
    the converted module (the same object unless ``module`` itself is a batch norm layer).
    """
    converted = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            converted.weight = module.weight
            converted.bias = module.bias
        if module.track_running_stats:
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child))
    return converted
