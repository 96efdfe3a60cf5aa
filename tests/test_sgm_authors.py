"""decorr's SGM against an independent re-implementation of the SGM authors' ReLU hooks.

The authors (Wu et al. 2020, csdongxian/skip-connections-matter, ``utils_sgm.py``) decay SGM by a
backward hook on ReLU modules chosen by name: on a ResNet every module whose name contains ``relu``
but not ``0.relu`` (factor gamma per use for BasicBlock nets, gamma ** 0.5 for Bottleneck nets), on a
DenseNet every ``*relu*`` module outside the transitions (factor gamma ** 0.5). The hooks below are
written here from that description, on deep copies whose ReLUs are made not in place (a backward hook
on an in-place ReLU is unreliable); decorr's ``skip_gradient`` runs on the original models, in-place
ReLUs kept. Their hooks also scale the whole gradient by one number (the post-addition and stem
ReLUs), so the comparison is per-image direction: cosine and the largest difference of the
unit-normalised gradients.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import densenet121, resnet18, resnet50

from decorr.attacks import residual_branches, skip_gradient
from decorr.attacks.skip_gradient import _ScaleGradient
from decorr.errors import DecorrError
from decorr.models import ResidualUnit, create_model
from test_skip_gradient import randomise_batch_norm  # tests/ is on pytest's path

#: What the tests measured is printed with ``pytest -s``; the thresholds are the issue's.
MIN_COSINE = 0.9999
MAX_REL_DIFF = 1e-4


# --- the authors' rule, re-implemented ------------------------------------------------------------


def _relu_decay(factor: float):
    def hook(module, grad_input, grad_output):
        return (factor * grad_input[0],)

    return hook


def authors_sgm_copy(model: nn.Module, arch: str, gamma: float) -> nn.Module:
    """A deep copy of ``model`` with the authors' SGM hooks (not-in-place ReLUs)."""
    hooked = copy.deepcopy(model)
    for module in hooked.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    if arch.startswith("densenet"):
        factor, chosen = gamma**0.5, lambda name: "relu" in name and "transition" not in name
    else:
        factor = gamma**0.5 if arch in ("resnet50", "resnet101", "resnet152") else gamma
        chosen = lambda name: "relu" in name and "0.relu" not in name  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # register_backward_hook is deprecated; it is what they use
        for name, module in hooked.named_modules():
            if chosen(name) and isinstance(module, nn.ReLU):
                module.register_backward_hook(_relu_decay(factor))
    return hooked


def input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return grad


def direction_agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(minimum over images of the cosine, maximum over images of max|a^ - b^| / max|a^|), a^ = a / |a|."""
    # Not F.cosine_similarity / F.normalize: they clamp norms at 1e-8 / 1e-12, and the authors' hooks
    # scale ResNet-56's gradient by 0.2 ** 25 (one factor per block and the stem) to norms near 1e-20.
    a, b = a.flatten(1), b.flatten(1)
    a_hat, b_hat = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    cosine = (a_hat * b_hat).sum(1)
    rel = (a_hat - b_hat).abs().amax(1) / a_hat.abs().amax(1)
    return float(cosine.min()), float(rel.max())


# --- the hooks themselves -------------------------------------------------------------------------


class _ReluTwice(nn.Module):
    """relu(3 relu(x) - 1): one ReLU module used twice, like BasicBlock's ``relu``."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(3 * self.relu(x) - 1.0)


@pytest.mark.parametrize("kind", ["deprecated", "full"])
def test_a_backward_hook_fires_at_every_use_of_a_module(kind):
    model = _ReluTwice()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        register = model.relu.register_backward_hook if kind == "deprecated" else model.relu.register_full_backward_hook
        register(_relu_decay(0.5))
        x = torch.tensor([1.0, 2.0, -1.0], requires_grad=True)
        model(x).sum().backward()
    # d/dx = 3 where x > 1/3, 0 where x < 0; hooked twice: 3 * 0.5 * 0.5.
    assert torch.equal(x.grad, torch.tensor([0.75, 0.75, 0.0]))


def test_authors_rule_picks_the_relus_we_think():
    model = authors_sgm_copy(resnet18(weights=None, num_classes=10), "resnet18", 0.2)
    hooked = [name for name, m in model.named_modules() if m._backward_hooks]
    assert hooked == ["relu"] + [f"layer{s}.1.relu" for s in range(1, 5)]
    model = authors_sgm_copy(create_model("resnet56"), "resnet56", 0.2)
    hooked = {name for name, m in model.named_modules() if m._backward_hooks}
    assert len(hooked) == 1 + 3 * 8 and "layer2.0.relu" not in hooked and "layer2.8.relu" in hooked


# --- decorr vs the authors --------------------------------------------------------------------------

CASES = [
    # name, builder, arch for the authors' rule, gamma, images
    ("resnet18", lambda: resnet18(weights=None, num_classes=10), "resnet18", 0.2, 3),
    ("resnet50", lambda: resnet50(weights=None, num_classes=10), "resnet50", 0.2, 2),
    ("densenet121", lambda: densenet121(weights=None, num_classes=10), "densenet121", 0.5, 2),
    ("resnet20", lambda: create_model("resnet20"), "resnet20", 0.2, 3),
    ("resnet56", lambda: create_model("resnet56"), "resnet56", 0.2, 3),
]


@pytest.mark.parametrize("name, build, arch, gamma, n", CASES, ids=[c[0] for c in CASES])
def test_default_matches_the_authors_hooks(name, build, arch, gamma, n):
    torch.manual_seed(0)
    model = randomise_batch_norm(build()).double()
    x = torch.rand(n, 3, 64, 64, dtype=torch.float64)
    y = torch.arange(n) % 10
    theirs = input_gradients(authors_sgm_copy(model, arch, gamma), x, y)
    with skip_gradient(model, gamma) as branches:
        ours = input_gradients(model, x, y)
    plain = input_gradients(model, x, y)
    cosine, rel = direction_agreement(ours, theirs)
    plain_cosine, _ = direction_agreement(plain, theirs)
    print(f"\n{name}: {len(branches)} units decayed, min cosine {cosine:.12f}, max rel diff {rel:.3e}, "
          f"(plain gradient vs theirs: min cosine {plain_cosine:.4f})")
    assert cosine > MIN_COSINE and rel < MAX_REL_DIFF
    assert plain_cosine < 0.999  # the comparison can tell decayed from plain gradients


def test_default_differs_from_decaying_every_block_on_resnet18():
    torch.manual_seed(0)
    model = randomise_batch_norm(resnet18(weights=None, num_classes=10)).double()
    x = torch.rand(3, 3, 64, 64, dtype=torch.float64)
    y = torch.tensor([1, 4, 7])
    with skip_gradient(model, 0.2) as default:
        first = input_gradients(model, x, y)
    with skip_gradient(model, 0.2, exclude="none") as every:
        all_blocks = input_gradients(model, x, y)
    assert len(default) == 4 and len(every) == 8
    cosine, _ = direction_agreement(first, all_blocks)
    theirs = input_gradients(authors_sgm_copy(model, "resnet18", 0.2), x, y)
    none_vs_theirs, _ = direction_agreement(all_blocks, theirs)
    print(f"\nresnet18: default vs exclude='none' min cosine {cosine:.4f}; exclude='none' vs authors {none_vs_theirs:.4f}")
    assert cosine < 0.99 and none_vs_theirs < 0.99


def _old_skip_gradient_input_gradient(model: nn.Module, gamma: float, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """decorr before ``exclude`` existed, written out: every unit's branch output is grad-scaled."""
    from torchvision.models.densenet import _DenseLayer
    from torchvision.models.resnet import BasicBlock, Bottleneck

    getters = {BasicBlock: lambda u: u.bn2, Bottleneck: lambda u: u.bn3, _DenseLayer: lambda u: u,
               ResidualUnit: lambda u: u.branch}
    handles = []
    for module in model.modules():
        if type(module) in getters:
            handles.append(getters[type(module)](module).register_forward_hook(
                lambda _m, _i, out: _ScaleGradient.apply(out, gamma)))
    try:
        return input_gradients(model, x, y)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("name", ["resnet18", "densenet_small", "resnet20"])
def test_exclude_none_is_the_old_behaviour_bit_for_bit(name):
    torch.manual_seed(0)
    model = randomise_batch_norm(resnet18(weights=None, num_classes=10) if name == "resnet18" else create_model(name))
    x = torch.rand(2, 3, 32, 32)
    y = torch.tensor([3, 5])
    want = _old_skip_gradient_input_gradient(model, 0.2, x, y)
    with skip_gradient(model, 0.2, exclude="none"):
        got = input_gradients(model, x, y)
    assert torch.equal(got, want)
    with skip_gradient(model, 0.2):
        default = input_gradients(model, x, y)
    assert torch.equal(default, want) == (name == "densenet_small")  # DenseNet: nothing is excluded


# --- the exclude argument -----------------------------------------------------------------------------


def test_first_of_stage_per_unit_type():
    model = resnet50(weights=None)
    assert residual_branches(model) == [
        model.get_submodule(f"layer{s}.{i}").bn3 for s, n in zip(range(1, 5), (3, 4, 6, 3)) for i in range(1, n)
    ]
    assert len(residual_branches(model, "none")) == 16
    dense = create_model("densenet_small")
    assert residual_branches(dense) == residual_branches(dense, "none")
    classifier = create_model("dna_classifier_cifar")  # three ResidualUnits, one parent: res2 is first
    assert residual_branches(classifier) == [classifier.features.res3.branch, classifier.features.res4.branch]
    unit = ResidualUnit(2, 2)  # a unit that is the whole model is never excluded
    assert residual_branches(unit) == [unit.branch]
    stage = nn.Sequential(ResidualUnit(2, 2), ResidualUnit(2, 2))
    with pytest.raises(DecorrError, match="exclude='none'"):
        with skip_gradient(nn.Sequential(stage[0]), 0.5):
            pass
    assert residual_branches(stage) == [stage[1].branch]


def test_exclude_by_names_and_by_callable():
    model = create_model("resnet20")
    names = [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    assert residual_branches(model, ["layer1.0", "layer2.0", "layer3.0"]) == residual_branches(model)
    assert residual_branches(model, ("layer3.2",)) == [model.get_submodule(n).bn2 for n in names[:-1]]
    assert residual_branches(model, []) == residual_branches(model, "none")
    by_stride = residual_branches(model, lambda name, unit: unit.downsample is not None)
    assert by_stride == [model.get_submodule(n).bn2 for n in names if n not in ("layer2.0", "layer3.0")]
    with pytest.raises(DecorrError, match="not a module name"):
        residual_branches(model, ["layer4.0"])
    with pytest.raises(DecorrError, match="not a residual unit"):
        residual_branches(model, ["layer1.0.bn2"])
    with pytest.raises(DecorrError, match="unknown SGM exclude 'first'"):
        with skip_gradient(model, 0.5, exclude="first"):
            pass
    with pytest.raises(DecorrError, match="exclude='none'"):
        with skip_gradient(model, 0.5, exclude=lambda name, unit: True):
            pass
