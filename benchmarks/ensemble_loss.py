"""Benchmark: pairwise_correlation_loss over an ensemble against separate correlation_loss calls.

N = 5 members at (batch, features) = (1000, 784), float32, forward + backward. "both" takes all 20
ordered pairs, "one-way" the 10 pairs i < j; the reference is the plain loop of ``correlation_loss``
calls over the same pairs (each factorises its regressor again). Both run side by side in one process
on the same inputs, repetitions interleaved; prints JSON with the median times, the ratio and the
largest relative differences of value and gradients (between the two, and of each against the
float64 loss), and writes ``benchmarks/results/ensemble_loss.json``.

    python benchmarks/ensemble_loss.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from decorr.loss import correlation_loss, pairwise_correlation_loss

MEMBERS, BATCH, WIDTH = 5, 1000, 784
RESULTS = Path(__file__).parent / "results" / "ensemble_loss.json"


def features(count: int, n: int, m: int, seed: int) -> list[torch.Tensor]:
    """ReLU feature sets that share a common part (pairwise R^2 about 0.3-0.5), as parallel models would."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, m, generator=g)
    return [torch.relu(base @ (torch.randn(m, m, generator=g) / math.sqrt(m)) + torch.randn(n, m, generator=g))
            for _ in range(count)]


def pairs_of(count: int, direction: str) -> list[tuple[int, int]]:
    if direction == "one-way":
        return [(i, j) for i in range(count) for j in range(i + 1, count)]
    return [(i, j) for i in range(count) for j in range(count) if i != j]


def separate_calls(direction: str):
    def loss(zs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([correlation_loss(zs[i], zs[j]) for i, j in pairs_of(len(zs), direction)]).sum()

    return loss


def all_pairs(direction: str):
    return lambda zs: pairwise_correlation_loss(zs, direction, "sum")


def forward_backward(fn, zs: list[torch.Tensor]) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
    leaves = [z.clone().requires_grad_() for z in zs]
    start = time.perf_counter()
    loss = fn(leaves)
    loss.backward()
    elapsed = time.perf_counter() - start
    return elapsed, loss.detach(), [z.grad for z in leaves]


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).abs().max() / reference.double().abs().max().clamp_min(1e-30))


def accuracy(loss: torch.Tensor, grads: list[torch.Tensor], exact: tuple) -> dict[str, float]:
    exact_loss, exact_grads = exact
    return {"rel_diff_value": abs(float(loss) - float(exact_loss)) / abs(float(exact_loss)),
            "rel_diff_grad": max(relative_difference(g, r) for g, r in zip(grads, exact_grads))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    zs = features(MEMBERS, BATCH, WIDTH, seed=0)
    results = []
    for direction in ("both", "one-way"):
        ours_fn, loop_fn = all_pairs(direction), separate_calls(direction)
        exact = forward_backward(ours_fn, [z.double() for z in zs])[1:]
        forward_backward(ours_fn, zs)  # warm-up (LAPACK workspaces)
        forward_backward(loop_fn, zs)
        ours_times, loop_times = [], []
        for _ in range(args.repeats):
            t, loss, grads = forward_backward(ours_fn, zs)
            ours_times.append(t)
            t, ref_loss, ref_grads = forward_backward(loop_fn, zs)
            loop_times.append(t)
        ours_ms = statistics.median(ours_times) * 1e3
        loop_ms = statistics.median(loop_times) * 1e3
        results.append({
            "direction": direction,
            "members": MEMBERS,
            "pairs": len(pairs_of(MEMBERS, direction)),
            "n": BATCH,
            "m": WIDTH,
            "pairwise_ms": round(ours_ms, 1),
            "separate_calls_ms": round(loop_ms, 1),
            "speedup": round(loop_ms / ours_ms, 2),
            "loss": float(loss),
            "separate_loss": float(ref_loss),
            "rel_diff_value": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
            "rel_diff_grad": max(relative_difference(g, r) for g, r in zip(grads, ref_grads)),
            # Each route against the float64 loss (the separate calls' own float32 error is the larger).
            "pairwise_vs_float64": accuracy(loss, grads, exact),
            "separate_vs_float64": accuracy(ref_loss, ref_grads, exact),
        })
    report = {"benchmark": "ensemble_loss", "dtype": "float32", "threads": torch.get_num_threads(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "repeats": args.repeats,
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
