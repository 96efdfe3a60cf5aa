"""Benchmark: every attack of the suite against a bare PyTorch loop computing the same attack (goal <= 1.10x).

Each attack crafts on one ``resnet20`` (random init, eval mode, 32x32 inputs; ``ens``/``svre`` on two of them as
an ensemble attacked on its members) with ``--steps`` iterations at eps 16/255 and the paper defaults of every
other setting, ``parse_attack(NAME, {"--steps": STEPS}).craft(...)``, against a loop written here in plain
PyTorch (no decorr code in the loop: its own forward of the ResNet for SGM, LinBP and Ghost, its own DI, TI
kernel, DCT, BSR, ILA/FIA/NAA objectives). Both draw their randomness in the same order from a CPU generator
seeded alike, so their outputs are compared: ``equal`` is true when they agree to float rounding (max abs
difference <= 1e-6); the JSON records the max difference and the fraction of pixels that differ either way.

Timing: a warm-up run of each, then ``--repeats`` rounds; in every round each attack runs ours then bare (the
order alternates between rounds), one thread. Seconds per image are the median over rounds divided by the
batch size; ``ratio`` = ours / bare.

    OMP_NUM_THREADS=1 python benchmarks/attack_suite.py [--batch 32] [--steps 10] [--repeats 5] \
        [--attacks mifgsm dim ...] [--json benchmarks/results/attack_suite.json]
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from decorr.attacks import Source, parse_attack
from decorr.io import write_json
from decorr.models import create_model

EPS = 16 / 255
LAYER = "layer2"  # resnet20's default feature layer for ila/fia/naa (decorr.attacks.feature_level.DEFAULT_LAYERS)

# ------------------------------------------------------------------------------------------------
# The bare network: resnet20's forward written out, with the three model-side variants


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma):  # type: ignore[override]
        ctx.gamma = gamma
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad * ctx.gamma, None


class _LinBPUnit(torch.autograd.Function):
    """A post-activation BasicBlock whose branch ReLU backpropagates linearly, the branch's gradient rescaled to
    the norm of its true one per sample (LinBP with renormalisation)."""

    @staticmethod
    def forward(ctx, x, block):  # type: ignore[override]
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            pre = block.bn1(block.conv1(leaf))
            act = pre.detach().relu().requires_grad_(True)
            branch = block.bn2(block.conv2(act))
            branch_leaf = branch.detach().requires_grad_(True)
            skip = leaf if block.downsample is None else block.downsample(leaf)
            out = torch.relu(branch_leaf + skip)
        ctx.parts = (leaf, pre, act, branch, branch_leaf, out)
        return out.detach()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        leaf, pre, act, branch, branch_leaf, out = ctx.parts
        at_skip, at_branch = torch.autograd.grad(out, (leaf, branch_leaf), grad)
        (at_act,) = torch.autograd.grad(branch, act, at_branch)
        linear, = torch.autograd.grad(pre, leaf, at_act, retain_graph=True)
        true, = torch.autograd.grad(pre, leaf, at_act * (pre > 0))
        shape = (-1, 1, 1, 1)
        t, l_ = true.flatten(1).norm(dim=1).view(shape), linear.flatten(1).norm(dim=1).view(shape)
        ratio = torch.where(l_ > 0, t / torch.where(l_ > 0, l_, 1.0), 0.0)
        return at_skip + linear * ratio, None


def _block(block, h, *, mode=None, draw=None, first=False, linear=False):
    if mode == "linbp" and linear:
        return _LinBPUnit.apply(h, block)
    out = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(h)))))
    if mode == "sgm" and not first:
        out = _ScaleGrad.apply(out, 0.2)
    if mode == "ghost" and block.downsample is None:
        out = out + (draw(h.shape[1]) - 1) * h
        skip = h
    else:
        skip = h if block.downsample is None else block.downsample(h)
        if mode == "ghost":
            skip = skip * draw(skip.shape[1])
    return torch.relu(out + skip)


def bare_forward(model, x, *, mode=None, draw=None, upto=None):
    """resnet20's logits (or ``upto="layer2"``'s output); mode sgm / linbp (from layer2.1 on) / ghost."""
    h = torch.relu(model.bn1(model.conv1(model.normalize(x))))
    linear = False
    for stage in (1, 2, 3):
        for index, block in enumerate(getattr(model, f"layer{stage}")):
            linear = linear or (stage, index) == (2, 1)
            h = _block(block, h, mode=mode, draw=draw, first=index == 0, linear=linear)
        if upto == f"layer{stage}":
            return h
    return model.fc(torch.flatten(model.avgpool(h), 1))


# ------------------------------------------------------------------------------------------------
# Bare pieces: draws, steps, input transformations


def uniform(gen, shape, low, high):
    return torch.empty(tuple(shape)).uniform_(low, high, generator=gen)


def l1(g):
    scale = g.abs().mean(dim=(1, 2, 3), keepdim=True)
    return g / torch.where(scale > 0, scale, torch.ones_like(scale))


def step(x, x_adv, direction, size, eps=EPS):
    moved = x_adv.detach() + size * direction.sign()
    return torch.clamp(x + torch.clamp(moved - x, -eps, eps), 0, 1).detach()


def grad_of(loss_at: Callable[[Tensor], Tensor], point: Tensor, copies=lambda p: [p]) -> Tensor:
    point = point.detach().requires_grad_(True)
    made = copies(point)
    total = 0
    for i, c in enumerate(made):
        (g,) = torch.autograd.grad(loss_at(c), point, retain_graph=i < len(made) - 1)
        total = total + g
    return total / len(made)


def momentum_loop(x, steps, gradient, *, decay=1.0, nesterov=False, variance=None, size=None):
    """MI-FGSM (NI: look-ahead; variance: VMI's neighbour term ``variance(x_adv) -> mean neighbour gradient``)."""
    size = EPS / steps if size is None else size
    x_adv, m, v = x.clone(), torch.zeros_like(x), torch.zeros_like(x)
    for _ in range(steps):
        g = gradient(x_adv + size * decay * m if nesterov else x_adv)
        m = l1(g + v if variance else g) + decay * m
        if variance:
            v = variance(x_adv) - g
        x_adv = step(x, x_adv, m, size)
    return x_adv


def neighbours(gen, gradient, n=20, beta=1.5):
    def mean(x_adv):
        total = 0
        for _ in range(n):
            total = total + gradient(x_adv.detach() + uniform(gen, x_adv.shape, -beta * EPS, beta * EPS))
        return total / n
    return mean


def di(gen, x, prob=0.5, rate=0.9):
    size = x.shape[-1]
    low = int(size * rate)
    side = int(torch.randint(low, size, (1,), dtype=torch.int32, generator=gen))
    rem = size - side
    top = int(torch.randint(0, rem, (1,), dtype=torch.int32, generator=gen))
    left = int(torch.randint(0, rem, (1,), dtype=torch.int32, generator=gen))
    if not bool(torch.rand(1, generator=gen) < prob):
        return x
    return F.pad(F.interpolate(x, size=[side, side], mode="bilinear", align_corners=False),
                 [left, rem - left, top, rem - top], value=0.0)


def ti_kernel(size=15, nsig=3.0):
    from scipy import stats

    k1 = stats.norm.pdf(np.linspace(-nsig, nsig, size))
    k = np.outer(k1, k1)
    return torch.from_numpy((k / k.sum()).astype(np.float32)).expand(3, 1, size, size)


def dct_matrix(n):
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float()


def rotate(x, degrees):
    if degrees == 0:
        return x
    h, w = x.shape[-2:]
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def bsr_copy(gen, image, blocks=3, max_angle=24.0):
    def cut(t, dim):
        weights = uniform(gen, (blocks,), 1.0, 2.0).double()
        sizes = torch.round(weights / weights.sum() * t.shape[dim]).long()
        sizes[sizes.argmax()] += t.shape[dim] - sizes.sum()
        pieces = t.split(sizes.tolist(), dim=dim)
        return [pieces[i] for i in torch.randperm(blocks, generator=gen).tolist()]

    first, second = (2, 3) if int(torch.randint(0, 2, (1,), generator=gen)) == 0 else (3, 2)
    strips = []
    for strip in cut(image, first):
        angle = float(uniform(gen, (1,), -max_angle, max_angle))
        strips.append(torch.cat(cut(rotate(strip, angle), second), dim=second))
    return torch.cat(strips, dim=first)


# ------------------------------------------------------------------------------------------------
# The bare attacks: (model(s), x, y, steps, generator) -> x_adv


def _ce(model, y, **kw):
    return lambda x_in: F.cross_entropy(bare_forward(model, x_in, **kw), y)


def bare_mi(model, x, y, steps, gen, **kw):
    loss = _ce(model, y)
    return momentum_loop(x, steps, lambda p: grad_of(loss, p), **kw)


def bare_vmi(model, x, y, steps, gen, nesterov=False):
    loss = _ce(model, y)
    gradient = lambda p: grad_of(loss, p)  # noqa: E731
    return momentum_loop(x, steps, gradient, nesterov=nesterov, variance=neighbours(gen, gradient))


def bare_dim(model, x, y, steps, gen):
    loss = _ce(model, y)
    return momentum_loop(x, steps, lambda p: grad_of(loss, p, lambda q: [di(gen, q)]))


def bare_tim(model, x, y, steps, gen):
    loss, kernel = _ce(model, y), ti_kernel()
    return momentum_loop(x, steps, lambda p: F.conv2d(grad_of(loss, p), kernel, padding="same", groups=3))


def bare_sim(model, x, y, steps, gen):
    loss = _ce(model, y)
    return momentum_loop(x, steps, lambda p: grad_of(loss, p, lambda q: [q / 2**i for i in range(5)]))


def bare_admix(model, x, y, steps, gen):
    loss = _ce(model, y)

    def copies(q):
        out = []
        for _ in range(3):
            mixed = q + 0.2 * q[torch.randperm(q.shape[0], generator=gen)].detach()
            out.extend(mixed / 2**i for i in range(5))
        return out

    return momentum_loop(x, steps, lambda p: grad_of(loss, p, copies))


def bare_ssm(model, x, y, steps, gen, copies=20, rho=0.5):
    d = dct_matrix(x.shape[-1])

    def gradient(p):
        p = p.detach()
        total = 0
        for _ in range(copies):
            noise = torch.empty(p.shape).normal_(0.0, EPS, generator=gen)
            mask = uniform(gen, p.shape, 1 - rho, 1 + rho)
            spectral = d.T @ ((d @ (p + noise) @ d.T) * mask) @ d
            point = (p + (spectral - p)).requires_grad_(True)  # the gradient at the copy, used at x
            (g,) = torch.autograd.grad(F.cross_entropy(bare_forward(model, point), y), point)
            total = total + g
        return total / copies

    return momentum_loop(x, steps, gradient)


def bare_bsr(model, x, y, steps, gen):
    loss = _ce(model, y)
    return momentum_loop(x, steps, lambda p: grad_of(loss, p, lambda q: [bsr_copy(gen, q) for _ in range(20)]))


def bare_ila(model, x, y, steps, gen):
    baseline = bare_mi(model, x, y, 10, gen)
    with torch.no_grad():
        clean, base = bare_forward(model, x, upto=LAYER), bare_forward(model, baseline, upto=LAYER)
    d = (base - clean).flatten(1)
    length = d.norm(dim=1).clamp_min(torch.finfo(d.dtype).tiny)

    def loss(x_in):
        return (((bare_forward(model, x_in, upto=LAYER) - clean).flatten(1) * d).sum(dim=1) / length).mean()

    x_adv = x.clone()
    for _ in range(steps):  # I-FGSM on the projection
        x_adv = step(x, x_adv, grad_of(loss, x_adv), EPS / steps)
    return x_adv


def _feature_grad(model, x, out):
    feats = {}
    with torch.enable_grad():
        h = bare_forward(model, x.detach(), upto=LAYER).detach().requires_grad_(True)
        feats = h
        logits = model.fc(torch.flatten(model.avgpool(model.layer3(feats)), 1))
        (g,) = torch.autograd.grad(out(logits).sum(), feats)
    return g


def _unit(t):
    return t / t.flatten(1).norm(p=2, dim=1).view(-1, 1, 1, 1).clamp_min(torch.finfo(t.dtype).tiny)


def bare_fia(model, x, y, steps, gen, copies=30, drop=0.3):
    total = None
    for _ in range(copies):
        mask = (uniform(gen, x.shape, 0.0, 1.0) >= drop).float()
        g = _feature_grad(model, x * mask, lambda logits: logits.gather(1, y[:, None]))
        total = g if total is None else total + g
    w = _unit(total)
    loss = lambda x_in: -(w * bare_forward(model, x_in, upto=LAYER)).flatten(1).sum(dim=1).mean()  # noqa: E731
    return momentum_loop(x, steps, lambda p: grad_of(loss, p))


def bare_naa(model, x, y, steps, gen, path=30, gamma=1.0):
    total = 0
    for k in range(1, path + 1):
        total = total + _feature_grad(model, x * (k / path), lambda lg: F.softmax(lg, dim=1).gather(1, y[:, None]))
    w = _unit(total / path)
    with torch.no_grad():
        black = bare_forward(model, torch.zeros_like(x), upto=LAYER)

    def loss(x_in):
        a = ((bare_forward(model, x_in, upto=LAYER) - black) * w).flatten(1)
        return -(a.clamp(min=0).sum(dim=1) + gamma * a.clamp(max=0).sum(dim=1)).mean()

    return momentum_loop(x, steps, lambda p: grad_of(loss, p))


def bare_model_side(mode):
    def attack(model, x, y, steps, gen):
        draw = (lambda c: uniform(gen, (1, c, 1, 1), 0.78, 1.22)) if mode == "ghost" else None
        loss = _ce(model, y, mode=mode, draw=draw)
        return momentum_loop(x, steps, lambda p: grad_of(loss, p))
    return attack


def bare_pgd(model, x, y, steps, gen, size=3 / 255):
    x_adv = torch.clamp(x + uniform(gen, x.shape, -EPS, EPS), 0, 1)
    loss = _ce(model, y)
    for _ in range(steps):
        x_adv = step(x, x_adv, grad_of(loss, x_adv), size)
    return x_adv


def _mean_logits_ce(models, y):
    def loss(x_in):
        total = 0
        for m in models:
            total = total + bare_forward(m, x_in)
        return F.cross_entropy(total / len(models), y)
    return loss


def bare_ens(models, x, y, steps, gen):
    loss = _mean_logits_ce(models, y)
    return momentum_loop(x, steps, lambda p: grad_of(loss, p))


def bare_svre(models, x, y, steps, gen):
    ens, size = _mean_logits_ce(models, y), EPS / steps
    member = [_ce(m, y) for m in models]

    def gradient(point):
        point = point.detach()
        at_ens = grad_of(ens, point)
        at_point, inner, acc = {}, point, torch.zeros_like(point)
        for _ in range(4 * len(models)):
            k = int(torch.randint(0, len(models), (1,), generator=gen).item())
            g = grad_of(member[k], inner)
            if k not in at_point:
                at_point[k] = grad_of(member[k], point)
            acc = l1(g - (at_point[k] - at_ens)) + acc
            inner = step(x, inner, acc, size)
        return acc

    return momentum_loop(x, steps, gradient)


BARE = {
    "mifgsm": bare_mi, "nifgsm": lambda *a: bare_mi(*a, nesterov=True),
    "vmifgsm": bare_vmi, "vnifgsm": lambda *a: bare_vmi(*a, nesterov=True),
    "dim": bare_dim, "tim": bare_tim, "sim": bare_sim, "admix": bare_admix, "ssm": bare_ssm, "bsr": bare_bsr,
    "ila": bare_ila, "fia": bare_fia, "naa": bare_naa,
    "sgm": bare_model_side("sgm"), "linbp": bare_model_side("linbp"), "ghost": bare_model_side("ghost"),
    "pgd": bare_pgd, "ens": bare_ens, "svre": bare_svre,
}
ENSEMBLE = ("ens", "svre")


# ------------------------------------------------------------------------------------------------
# Running


def run_pair(name, models, x, y, steps, seed):
    """(ours, bare) closures returning x_adv, each with its own generator seeded ``seed``."""
    attack = parse_attack(name, {"--steps": steps})
    if name in ENSEMBLE:
        source, target = Source(members=tuple(models), combine="loss", name="ens"), models
    else:
        source, target = Source.of(models[0], arch="resnet20"), models[0]
    ours = lambda: attack.craft(source, x, y, eps=EPS, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    bare = lambda: BARE[name](target, x, y, steps, torch.Generator().manual_seed(seed))  # noqa: E731
    return ours, bare


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attacks", nargs="+", default=list(BARE), choices=list(BARE))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here (e.g. benchmarks/results/attack_suite.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = []
    for k in range(2):
        torch.manual_seed(k)
        models.append(create_model("resnet20").eval())
    torch.manual_seed(100)
    x, y = torch.rand(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    pairs = {name: run_pair(name, models, x, y, args.steps, args.seed) for name in args.attacks}
    results = {}
    plain = parse_attack("mifgsm", {"--steps": args.steps}).craft(models[0], x, y, eps=EPS)
    for name, (ours, bare) in pairs.items():  # warm-up, and the outputs compared
        a, _ = timed(ours)
        b, _ = timed(bare)
        diff = (a - b).abs()
        results[name] = {"max_abs_diff": diff.max().item(), "differing_fraction": (diff > 1e-6).float().mean().item(),
                         "equal": bool(diff.max().item() <= 1e-6),
                         # the comparison can tell attacks apart: each differs from plain MI-FGSM on the same batch
                         "differs_from_mifgsm": bool((a - plain).abs().max().item() > 1e-6),
                         "ours_s": [], "bare_s": []}
        print(f"{name:8s} equal={results[name]['equal']} max diff {results[name]['max_abs_diff']:.3g}", flush=True)
    for r in range(args.repeats):
        for name, (ours, bare) in pairs.items():
            order = (("ours_s", ours), ("bare_s", bare)) if r % 2 == 0 else (("bare_s", bare), ("ours_s", ours))
            for key, fn in order:
                results[name][key].append(timed(fn)[1])
    print(f"{'attack':8s} {'ours s/img':>11s} {'bare s/img':>11s} {'ratio':>6s} {'min':>5s} equal")
    for name, rec in results.items():
        rec["ours_s_per_image"] = statistics.median(rec["ours_s"]) / args.batch
        rec["bare_s_per_image"] = statistics.median(rec["bare_s"]) / args.batch
        rec["ratio"] = rec["ours_s_per_image"] / rec["bare_s_per_image"]
        rec["ratio_of_minima"] = min(rec["ours_s"]) / min(rec["bare_s"])  # less sensitive to a busy machine
        print(f"{name:8s} {rec['ours_s_per_image']:11.4f} {rec['bare_s_per_image']:11.4f} {rec['ratio']:6.2f} {rec['ratio_of_minima']:5.2f} "
              f"{rec['equal']}", flush=True)
    record = {"benchmark": "attack_suite", "command": " ".join(["python", *sys.argv]), "arch": "resnet20", "input_shape": [3, 32, 32], "batch_size": args.batch,
              "steps": args.steps, "eps": "16/255", "repeats": args.repeats, "threads": torch.get_num_threads(),
              "seed": args.seed, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "host": platform.node(), "goal_ratio": 1.10,
              "note": "seconds per image: median over interleaved repeats / batch; ratio = ours / bare; equal: "
                      "outputs agree to 1e-6 with the randomness drawn alike; differs_from_mifgsm: the attack's output is not "
                      "plain MI-FGSM's; ens/svre on 2 resnet20s",
              "results": results}
    if args.json:
        write_json(args.json, record)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
