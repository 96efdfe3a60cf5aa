"""ADP, GAL and TRS objectives against hand computations with explicit loops (float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from decorr.training.methods.adp import adp_loss
from decorr.training.methods.gal import gal_loss
from decorr.training.methods.shared import member_input_gradients
from decorr.training.methods.trs import trs_loss, trs_schedule, trs_smooth_inputs
from decorr.errors import DecorrError

D = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


# ------------------------------------------------------------------------------------------------
# Hand computations: plain Python floats, explicit loops


def softmax_row(row):
    top = max(row)
    e = [math.exp(v - top) for v in row]
    return [v / sum(e) for v in e]


def hand_ce(logits, y):
    """Sum over members of the batch-mean cross-entropy."""
    total = 0.0
    for z in logits:
        total += sum(-math.log(softmax_row(z[b])[y[b]]) for b in range(len(y))) / len(y)
    return total


def det(a):
    n = len(a)
    if n == 1:
        return a[0][0]
    # Laplace expansion along the first row.
    return sum((-1) ** j * a[0][j] * det([row[:j] + row[j + 1:] for row in a[1:]]) for j in range(n))


def hand_adp(logits, y, alpha, beta, offset=1e-6):
    members, batch, classes = len(logits), len(y), len(logits[0][0])
    entropy = log_det = 0.0
    for b in range(batch):
        probs = [softmax_row(z[b]) for z in logits]
        mean = [sum(p[k] for p in probs) / members for k in range(classes)]
        entropy += -sum(m * math.log(m + 1e-20) for m in mean) / batch
        vectors = []
        for p in probs:
            v = [p[k] for k in range(classes) if k != y[b]]
            norm = math.sqrt(sum(t * t for t in v))
            vectors.append([t / norm for t in v])
        gram = [[sum(vectors[i][k] * vectors[j][k] for k in range(classes - 1)) + (offset if i == j else 0.0)
                 for j in range(members)] for i in range(members)]
        log_det += math.log(det(gram)) / batch
    ce = hand_ce(logits, y)
    return ce - alpha * entropy - beta * log_det, ce, entropy, log_det


def flat(g):
    return [list(map(float, row)) for row in g.reshape(g.shape[0], -1)]


def cosine(a, b):
    dot = sum(s * t for s, t in zip(a, b))
    return dot / (math.sqrt(sum(s * s for s in a)) * math.sqrt(sum(t * t for t in b)))


def hand_coherence(grads):
    grads = [flat(g) for g in grads]
    batch, members = len(grads[0]), len(grads)
    total = 0.0
    for b in range(batch):
        s = sum(math.exp(cosine(grads[i][b], grads[j][b])) for i in range(members) for j in range(i + 1, members))
        total += math.log(s + 1e-20) / batch
    return total


def hand_trs_terms(grads, smooth):
    grads, smooth = [flat(g) for g in grads], [flat(g) for g in smooth]
    batch, members = len(grads[0]), len(grads)
    pairs = [(i, j) for i in range(members) for j in range(i + 1, members)]
    cos = sum(sum(abs(cosine(grads[i][b], grads[j][b])) for b in range(batch)) / batch for i, j in pairs) / len(pairs)
    mag = sum(2.0 * sum(sum(t * t for t in s[b]) for b in range(batch)) / batch for s in smooth) / members
    return cos, mag


def as_lists(logits):
    return [z.tolist() for z in logits]


# ------------------------------------------------------------------------------------------------
# ADP


@pytest.mark.parametrize("members,batch,classes", [(2, 3, 3), (3, 4, 4), (3, 2, 4)])
def test_adp_matches_hand(members, batch, classes):
    logits = [rand(batch, classes, seed=m) * 2 for m in range(members)]
    y = torch.arange(batch) % classes
    loss, terms = adp_loss(logits, y, alpha=2.0, beta=0.5)
    want, ce, entropy, log_det = hand_adp(as_lists(logits), y.tolist(), 2.0, 0.5)
    assert abs(float(loss) - want) < 1e-10
    assert abs(float(terms["ce"]) - ce) < 1e-10
    assert abs(float(terms["entropy"]) - entropy) < 1e-10
    assert abs(float(terms["log_det"]) - log_det) < 1e-10


def test_adp_other_coefficients_and_offset():
    logits = [rand(3, 4, seed=10 + m) for m in range(3)]
    y = torch.tensor([3, 0, 2])
    loss, _ = adp_loss(logits, y, alpha=0.7, beta=1.3, det_offset=1e-3)
    want, *_ = hand_adp(as_lists(logits), y.tolist(), 0.7, 1.3, offset=1e-3)
    assert abs(float(loss) - want) < 1e-10


def test_adp_identical_members_hit_the_offset():
    z = rand(2, 4)
    _, terms = adp_loss([z, z.clone()], torch.tensor([0, 1]))
    # Two equal unit vectors: Gram [[1, 1], [1, 1]] + 1e-6 I, det = 2e-6 + 1e-12.
    assert abs(float(terms["log_det"]) - math.log(2e-6 + 1e-12)) < 1e-8


def test_adp_gradcheck():
    logits = [rand(2, 3, seed=m).requires_grad_(True) for m in range(2)]
    y = torch.tensor([1, 2])
    assert torch.autograd.gradcheck(lambda a, b: adp_loss([a, b], y)[0], logits)


# ------------------------------------------------------------------------------------------------
# GAL


@pytest.mark.parametrize("members", [2, 3])
def test_gal_matches_hand(members):
    grads = [rand(3, 2, 2, seed=20 + m) for m in range(members)]
    logits = [rand(3, 4, seed=30 + m) for m in range(members)]
    y = torch.tensor([0, 3, 1])
    loss, terms = gal_loss(grads, lamda=0.5)
    assert abs(float(loss) - 0.5 * hand_coherence(grads)) < 1e-10
    assert float(terms["ce"]) == 0.0
    loss, terms = gal_loss(grads, logits=logits, y=y, lamda=0.3)
    ce = hand_ce(as_lists(logits), y.tolist())
    assert abs(float(loss) - (ce + 0.3 * hand_coherence(grads))) < 1e-10
    assert abs(float(terms["coherence"]) - hand_coherence(grads)) < 1e-10
    loss, terms = gal_loss(grads, logits=logits, y=y, ce_reduction="mean")
    assert abs(float(loss) - (ce / members + 0.5 * hand_coherence(grads))) < 1e-10


def test_gal_is_per_sample():
    # Sample 0 aligned, sample 1 opposed: per sample log(e^1) and log(e^-1) average to 0, while the
    # cosine of the flattened batch (norms 1 and 10 per sample) would be -0.956.
    g1 = torch.tensor([[1.0, 0.0], [0.0, 10.0]], dtype=D)
    g2 = torch.tensor([[2.0, 0.0], [0.0, -10.0]], dtype=D)
    _, terms = gal_loss([g1, g2])
    assert abs(float(terms["coherence"]) - 0.0) < 1e-12
    g2 = torch.tensor([[2.0, 0.0], [0.0, 10.0]], dtype=D)
    assert abs(float(gal_loss([g1, g2])[1]["coherence"]) - 1.0) < 1e-12


def test_gal_gradcheck():
    grads = [rand(2, 3, seed=40 + m).requires_grad_(True) for m in range(3)]
    assert torch.autograd.gradcheck(lambda *g: gal_loss(list(g))[0], grads)


# ------------------------------------------------------------------------------------------------
# TRS


@pytest.mark.parametrize("members", [2, 3])
def test_trs_matches_hand(members):
    grads = [rand(4, 3, seed=50 + m) for m in range(members)]
    smooth = [rand(4, 3, seed=60 + m) * 0.1 for m in range(members)]
    logits = [rand(4, 3, seed=70 + m) for m in range(members)]
    y = torch.tensor([0, 1, 2, 1])
    ce = hand_ce(as_lists(logits), y.tolist())
    cos, mag = hand_trs_terms(grads, grads)
    loss, terms = trs_loss(grads, logits=logits, y=y)
    assert abs(float(loss) - (ce + 5.0 * (2.0 * cos + 2.0 * mag))) < 1e-10
    assert abs(float(terms["cos"]) - cos) < 1e-10 and abs(float(terms["smooth"]) - mag) < 1e-10
    cos, mag = hand_trs_terms(grads, smooth)
    loss, terms = trs_loss(grads, smooth_grads=smooth, logits=logits, y=y, scale=1.5, coeff=0.5, lamda=3.0)
    assert abs(float(loss) - (ce + 1.5 * (0.5 * cos + 3.0 * mag))) < 1e-10


def test_trs_gradcheck():
    grads = [rand(2, 3, seed=80 + m).requires_grad_(True) for m in range(2)]
    assert torch.autograd.gradcheck(lambda a, b: trs_loss([a, b])[0], grads)


def test_trs_schedule():
    assert trs_schedule(0, 120) == pytest.approx(0.1, abs=1e-15)
    assert trs_schedule(60, 120) == pytest.approx(0.15, abs=1e-15)
    assert trs_schedule(119, 120) == pytest.approx(0.1 + 0.1 * 119 / 120, abs=1e-15)
    assert trs_schedule(3, 4, init_eps=0.0, adv_eps=0.04) == pytest.approx(0.03, abs=1e-15)
    for bad in [(-1, 10), (10, 10), (0, 0), (1.0, 10)]:
        with pytest.raises(DecorrError):
            trs_schedule(*bad)


# ------------------------------------------------------------------------------------------------
# Input gradients and double backprop


def tiny_members(count, seed=0):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double() for _ in range(count)]


def test_member_input_gradients_of_a_linear_model():
    models = [nn.Linear(3, 4).double() for _ in range(2)]
    x, y = rand(3, 3), torch.tensor([0, 3, 1])
    grads, logits = member_input_gradients(models, x, y)
    for model, g, z in zip(models, grads, logits):
        p = torch.softmax(model(x), dim=-1)
        p[torch.arange(3), y] -= 1.0
        want = p @ model.weight / 3  # d mean CE / dx = (softmax - onehot) W / batch
        assert torch.allclose(g, want, atol=1e-12, rtol=0) and torch.equal(z, model(x))


@pytest.mark.parametrize("which", ["gal", "trs_cos", "trs_smooth"])
def test_similarity_terms_reach_the_parameters(which):
    models = tiny_members(3)
    x, y = rand(4, 4, seed=5), torch.tensor([0, 1, 2, 0])
    grads, _ = member_input_gradients(models, x, y, create_graph=True)
    if which == "gal":
        term = gal_loss(grads)[0]
    elif which == "trs_cos":
        term = trs_loss(grads, lamda=0.0)[0]
    else:
        term = trs_loss(grads, coeff=0.0)[0]
    params = [p for m in models for p in m.parameters()]
    got = torch.autograd.grad(term, params)
    # Every member's first-layer weight gets a non-zero gradient from the term alone.
    assert all(float(g.abs().sum()) > 0 for g in got[::4])


def test_gal_parameter_gradcheck():
    models = tiny_members(2)
    x, y = rand(2, 4, seed=6), torch.tensor([1, 2])
    w0, w1 = models[0][0].weight, models[1][0].weight

    def f(a, b):
        return gal_loss(member_input_gradients([_with(models[0], a), _with(models[1], b)], x, y)[0])[0]

    weights = (w0.detach().clone().requires_grad_(True), w1.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(f, weights)


def _with(model, weight):
    """model with its first weight replaced by ``weight`` (functionally, keeping the graph)."""
    return lambda x: model[2](model[1](torch.nn.functional.linear(x, weight, model[0].bias)))


def test_trs_smooth_inputs():
    models = tiny_members(2)
    for m in models:
        m.eval()
    x = torch.rand(6, 4, generator=torch.Generator().manual_seed(1), dtype=D)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out = trs_smooth_inputs(models, x, y, 0.05, generator=torch.Generator().manual_seed(2))
    again = trs_smooth_inputs(models, x, y, 0.05, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out, again) and out.shape == x.shape and not out.requires_grad
    assert torch.equal(out[:3], x[:3])
    assert float((out[3:] - x[3:]).abs().max()) <= 0.05 + 1e-12
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # Steps of eps/3 from a random start: the perturbation is not the start itself.
    start = trs_smooth_inputs(models, x, y, 0.05, steps=0, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(out[3:], start[3:])


# ------------------------------------------------------------------------------------------------
# Refusals


def one_line(err):
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("call", [
    lambda: adp_loss([rand(2, 3)], torch.tensor([0, 1])),
    lambda: adp_loss(rand(2, 3), torch.tensor([0, 1])),
    lambda: adp_loss([rand(2, 3), rand(2, 4)], torch.tensor([0, 1])),
    lambda: adp_loss([rand(2, 3), rand(2, 3)], torch.tensor([0, 1, 2])),
    lambda: adp_loss([rand(2, 3), rand(2, 3)], torch.tensor([0.0, 1.0])),
    lambda: adp_loss([rand(2, 3), rand(2, 3)], torch.tensor([0, 1]), alpha=-1.0),
    lambda: adp_loss([rand(2, 3), rand(2, 3)], torch.tensor([0, 1]), beta=float("nan")),
    lambda: adp_loss([rand(2, 3), rand(2, 3)], torch.tensor([0, 1]), det_offset=0.0),
    lambda: gal_loss([rand(2, 3)]),
    lambda: gal_loss([rand(2, 3), rand(3, 3)]),
    lambda: gal_loss([rand(2, 3), rand(2, 3)], lamda=float("inf")),
    lambda: gal_loss([rand(2, 3), rand(2, 3)], lamda=True),
    lambda: gal_loss([rand(2, 3), rand(2, 3)], ce_reduction="max"),
    lambda: gal_loss([rand(2, 3), rand(2, 3)], logits=[rand(2, 3), rand(2, 3)]),
    lambda: gal_loss([rand(2, 3), rand(2, 3)], logits=[rand(2, 3)] * 3, y=torch.tensor([0, 1])),
    lambda: trs_loss([rand(2, 3), rand(2, 3)], coeff=-2.0),
    lambda: trs_loss([rand(2, 3), rand(2, 3)], smooth_grads=[rand(2, 3)] * 3),
    lambda: trs_loss([rand(2, 3), rand(2, 3)], smooth_grads=[rand(2, 4)] * 2),
    lambda: member_input_gradients([nn.Linear(3, 2).double()], rand(2, 3), torch.tensor([0, 1])),
    lambda: trs_smooth_inputs(tiny_members(2), rand(2, 4), torch.tensor([0, 1]), -0.1),
])
def test_refusals(call):
    with pytest.raises(DecorrError) as err:
        call()
    one_line(err)
