"""Benchmark: decorr's correlation_loss against the paper's algorithm, forward + backward.

The paper's algorithm (P1, Algorithm 1, as its code does it): QR column check on Z1, then the
pseudo-inverse of X = [Z1_kept, 1] and the N x N projection X X^+ applied to Z2; autograd through it.
Both run side by side in one process on the same inputs; prints JSON with both times (median of
``--repeats`` interleaved runs), the ratio, and the largest relative differences of values and gradients.

    python benchmarks/correlation_loss.py [--repeats 7] [--device cuda] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch

from decorr.loss import correlation_loss

SIZES = [(1000, 784), (1250, 448), (500, 64)]


def paper_correlation_loss(z1: torch.Tensor, z2: torch.Tensor, eta: float = 5e-4, eps: float = 1e-3) -> torch.Tensor:
    z1 = z1.flatten(1)
    z2 = z2.flatten(1)
    with torch.no_grad():
        r = torch.linalg.qr(z1, mode="r")[1]
        diag = r.diagonal().abs()
        keep = diag / diag.max() > eta
    x = torch.cat([z1[:, keep], torch.ones(len(z1), 1, dtype=z1.dtype, device=z1.device)], dim=1)
    projection = x @ torch.linalg.pinv(x)
    z2_hat = projection @ z2
    ss_res = (z2 - z2_hat).square().sum()
    ss_tot = (z2 - z2.mean(dim=0)).square().sum()
    return torch.log(ss_tot + eps) - torch.log(ss_res + eps)


def features(n: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two ReLU feature sets, the second partly an affine image of the first (R^2 about 0.6)."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.relu(torch.randn(n, m, generator=g))
    z2 = torch.relu(z1 @ (torch.randn(m, m, generator=g) / math.sqrt(m)) + torch.randn(n, m, generator=g))
    return z1, z2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(fn, z1: torch.Tensor, z2: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    a = z1.clone().requires_grad_()
    b = z2.clone().requires_grad_()
    _sync(a.device)
    start = time.perf_counter()
    loss = fn(a, b)
    loss.backward()
    _sync(a.device)
    elapsed = time.perf_counter() - start
    return elapsed, loss.detach(), a.grad, b.grad


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).abs().max() / reference.double().abs().max().clamp_min(1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", default=None, help="also write the report to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    results = []
    for n, m in SIZES:
        z1, z2 = (z.to(device) for z in features(n, m, seed=n + m))
        # Warm-up both (first LAPACK calls allocate workspaces).
        forward_backward(correlation_loss, z1, z2)
        forward_backward(paper_correlation_loss, z1, z2)
        ours_times, paper_times = [], []
        for _ in range(args.repeats):
            t, loss, g1, g2 = forward_backward(correlation_loss, z1, z2)
            ours_times.append(t)
            t, ref_loss, ref_g1, ref_g2 = forward_backward(paper_correlation_loss, z1, z2)
            paper_times.append(t)
        ours_ms = statistics.median(ours_times) * 1e3
        paper_ms = statistics.median(paper_times) * 1e3
        results.append(
            {
                "n": n,
                "m": m,
                "ours_ms": round(ours_ms, 2),
                "paper_ms": round(paper_ms, 2),
                "speedup": round(paper_ms / ours_ms, 2),
                "loss": float(loss),
                "paper_loss": float(ref_loss),
                "rel_diff_value": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
                "rel_diff_grad_z1": relative_difference(g1, ref_g1),
                "rel_diff_grad_z2": relative_difference(g2, ref_g2),
            }
        )
    report = {"benchmark": "correlation_loss", "dtype": "float32", "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "results": results}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
