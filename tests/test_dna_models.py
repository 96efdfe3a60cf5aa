"""The DNA / autoencoder models (SPEC section 6) and their attack objectives, losses and metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from decorr.errors import DecorrError
from decorr.models import ResidualUnit, create_model, model_spec
from dna.models import DualNeckAutoencoder, forward_with_latents, latent_layers
from dna.objectives import (
    adaptive_objective,
    autoencoder_loss,
    autoencoder_loss_from_errors,
    dna_accuracy,
    paper_objective,
    path_predictions,
    reconstruction_errors,
)

AUTOENCODERS = ["dna_mnist", "ae_mnist", "dna_cifar", "ae_cifar"]
ALL_MODELS = AUTOENCODERS + ["dna_classifier_mnist", "dna_classifier_cifar"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _linear(a: int, b: int) -> int:
    return a * b + b


def _residual(a: int, b: int) -> int:
    # BN(a) [BN, ReLU, conv3x3 a->b, BN(b), ReLU, conv3x3 b->b] (no conv bias) + 1x1 skip when a != b
    return 2 * a + 9 * a * b + 2 * b + 9 * b * b + (a * b if a != b else 0)


def _conv_t2x2(c: int) -> int:
    return 4 * c * c + c


# Parameter counts of the six stages of one path, straight from the SPEC's layer list.
MNIST_STAGE_PARAMS = [_linear(784, 100), _linear(100, 128), _linear(128, 64), _linear(64, 128),
                      _linear(128, 100), _linear(100, 784)]
CIFAR_STAGE_PARAMS = [_residual(3, 16), _residual(16, 32), _residual(32, 32) + _residual(32, 7),
                      _residual(7, 32) + _residual(32, 32), _conv_t2x2(32) + _residual(32, 16),
                      _conv_t2x2(16) + _residual(16, 3)]


def _expected_params(stage_params: list[int], unshared: int, paths: int) -> int:
    first, last = (6 - unshared) // 2, (6 + unshared) // 2
    return sum(p * (paths if first <= i < last else 1) for i, p in enumerate(stage_params))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _path_modules(model: DualNeckAutoencoder, path: int) -> list[nn.Module]:
    return [*model.encoder.modules(), *model.bottlenecks[path].modules(), *model.decoder.modules()]


# --- architectures ---------------------------------------------------------------------------

@pytest.mark.parametrize("unshared", [2, 4, 6])
def test_mnist_path_has_the_spec_linear_layers(unshared):
    model = create_model("dna_mnist", unshared=unshared)
    for path in range(2):
        linears = [m for m in _path_modules(model, path) if isinstance(m, nn.Linear)]
        assert [tuple(m.weight.shape) for m in linears] == [
            (100, 784), (128, 100), (64, 128), (128, 64), (100, 128), (784, 100)
        ]


@pytest.mark.parametrize("unshared", [2, 4, 6])
def test_cifar_path_has_the_spec_residual_units(unshared):
    model = create_model("dna_cifar", unshared=unshared)
    for path in range(2):
        modules = _path_modules(model, path)
        units = [m for m in modules if isinstance(m, ResidualUnit)]
        assert [(u.branch[2].in_channels, u.branch[5].out_channels) for u in units] == [
            (3, 16), (16, 32), (32, 32), (32, 7), (7, 32), (32, 32), (32, 16), (16, 3)
        ]
        ups = [m for m in modules if isinstance(m, nn.ConvTranspose2d)]
        assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in ups] == [
            (32, 32, (2, 2), (2, 2)), (16, 16, (2, 2), (2, 2))
        ]
        assert sum(isinstance(m, nn.Tanh) for m in modules) == 1


@pytest.mark.parametrize("unshared", [2, 4, 6])
def test_parameter_counts_match_the_spec(unshared):
    assert _n_params(create_model("dna_mnist", unshared=unshared)) == _expected_params(
        MNIST_STAGE_PARAMS, unshared, 2)
    assert _n_params(create_model("dna_cifar", unshared=unshared)) == _expected_params(
        CIFAR_STAGE_PARAMS, unshared, 2)


def test_plain_autoencoders_are_one_path():
    assert _n_params(create_model("ae_mnist")) == sum(MNIST_STAGE_PARAMS)
    assert _n_params(create_model("ae_cifar")) == sum(CIFAR_STAGE_PARAMS)
    assert len(create_model("ae_mnist")(torch.rand(2, 1, 28, 28))) == 1


def test_default_dna_is_shared_encoder_two_bottlenecks_shared_decoder():
    mnist = create_model("dna_mnist")
    assert [m.weight.shape[0] for m in mnist.encoder.modules() if isinstance(m, nn.Linear)] == [100, 128]
    for neck in mnist.bottlenecks:
        assert [m.weight.shape[0] for m in neck.modules() if isinstance(m, nn.Linear)] == [64, 128]
    assert [m.weight.shape[0] for m in mnist.decoder.modules() if isinstance(m, nn.Linear)] == [100, 784]
    cifar = create_model("dna_cifar")
    encoded = cifar.encoder(cifar.input_map(torch.rand(2, 3, 32, 32)))
    assert encoded.shape == (2, 32, 8, 8)
    assert len(cifar.bottlenecks) == 2


@pytest.mark.parametrize("name", AUTOENCODERS)
def test_reconstructions_are_images_in_unit_range(name):
    model = create_model(name).eval()
    shape = model_spec(name).input_shape
    x = torch.rand(3, *shape)
    x[0] = 0.0
    x[1] = 1.0
    recons = model(x)
    assert isinstance(recons, tuple) and len(recons) == (2 if name.startswith("dna") else 1)
    for recon in recons:
        assert recon.shape == x.shape
        assert recon.min() >= 0 and recon.max() <= 1


def test_cifar_autoencoder_maps_pixels_to_minus_one_one_and_tanh_back():
    model = create_model("dna_cifar").eval()
    x = torch.rand(2, 3, 32, 32)
    seen = {}
    model.encoder.register_forward_pre_hook(lambda m, args: seen.setdefault("in", args[0]))
    model.decoder.register_forward_hook(lambda m, args, out: seen.setdefault("tanh", out))
    recon = model(x)[0]
    torch.testing.assert_close(seen["in"], 2 * x - 1)
    assert seen["tanh"].min() >= -1 and seen["tanh"].max() <= 1
    torch.testing.assert_close(recon, (seen["tanh"] + 1) / 2)


@pytest.mark.parametrize("name, width", [("dna_classifier_mnist", 288), ("dna_classifier_cifar", 512)])
def test_classifiers_shapes(name, width):
    model = create_model(name).eval()
    x = torch.rand(2, *model_spec(name).input_shape)
    assert model(x).shape == (2, 10)
    fc = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(fc) == 1 and tuple(fc[0].weight.shape) == (10, width)


def test_mnist_classifier_layers():
    convs = [m for m in create_model("dna_classifier_mnist").modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 8, (3, 3), (1, 1)), (8, 16, (3, 3), (1, 1)), (16, 32, (3, 3), (1, 1))
    ]


def test_cifar_classifier_layers():
    model = create_model("dna_classifier_cifar")
    units = [m for m in model.modules() if isinstance(m, ResidualUnit)]
    assert [(u.branch[2].in_channels, u.branch[5].out_channels) for u in units] == [
        (64, 128), (128, 256), (256, 512)
    ]
    stem = model.features.conv1
    assert (stem.in_channels, stem.out_channels, stem.kernel_size) == (3, 64, (3, 3))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_feature_layers_resolve_by_name(name):
    model = create_model(name)
    assert model_spec(name).feature_layer in dict(model.named_modules())


@pytest.mark.parametrize("name, unshared", [("dna_mnist", 2), ("dna_mnist", 4), ("dna_mnist", 6),
                                            ("dna_cifar", 2), ("dna_cifar", 6), ("ae_cifar", None)])
def test_latents_by_name_have_the_spec_shape(name, unshared):
    model = create_model(name) if unshared is None else create_model(name, unshared=unshared)
    names = latent_layers(model)
    assert names == [f"bottlenecks.{n}.latent" for n in range(model.paths)]
    modules = dict(model.named_modules())
    assert all(n in modules for n in names)
    x = torch.rand(4, *model_spec(name).input_shape)
    recons, latents = forward_with_latents(model, x)
    expected = (64,) if "mnist" in name else (7, 8, 8)
    assert [tuple(z.shape[1:]) for z in latents] == [expected] * model.paths
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed again
    for recon, direct in zip(recons, model(x)):
        torch.testing.assert_close(recon, direct)


def test_mnist_latent_is_the_relu_of_linear_128_to_64():
    model = create_model("dna_mnist")
    x = torch.rand(5, 1, 28, 28)
    _, latents = forward_with_latents(model, x)
    w1, b1 = model.encoder.encode1.fc.weight, model.encoder.encode1.fc.bias
    w2, b2 = model.encoder.encode2.fc.weight, model.encoder.encode2.fc.bias
    h = torch.relu(torch.relu(x.flatten(1) @ w1.T + b1) @ w2.T + b2)
    for n in range(2):
        fc = model.bottlenecks[n].latent.fc
        torch.testing.assert_close(latents[n], torch.relu(h @ fc.weight.T + fc.bias))
    assert not torch.allclose(latents[0], latents[1])  # two different bottlenecks


def test_latent_layers_look_through_a_wrapper_and_reject_other_models():
    class Wrapper(nn.Module):  # what DDP looks like from the outside
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    model = create_model("dna_mnist")
    assert latent_layers(Wrapper(model)) == ["bottlenecks.0.latent", "bottlenecks.1.latent"]
    _, latents = forward_with_latents(Wrapper(model), torch.rand(2, 1, 28, 28))
    assert len(latents) == 2
    with pytest.raises(DecorrError):
        latent_layers(create_model("dna_classifier_mnist"))


# --- sharing -----------------------------------------------------------------------------------

def _params_used_by_path(model: DualNeckAutoencoder, path: int) -> set[str]:
    names, params = zip(*model.named_parameters())
    shape = (1, 28, 28) if isinstance(model.input_map, nn.Flatten) else (3, 32, 32)
    recon = model(torch.rand(2, *shape))[path]
    grads = torch.autograd.grad(recon.sum(), params, allow_unused=True)
    return {n for n, g in zip(names, grads) if g is not None}


@pytest.mark.parametrize("name", ["dna_mnist", "dna_cifar"])
@pytest.mark.parametrize("unshared", [2, 4, 6])
def test_paths_share_exactly_the_outer_stages(name, unshared):
    model = create_model(name, unshared=unshared)
    used0, used1 = _params_used_by_path(model, 0), _params_used_by_path(model, 1)
    everything = {n for n, _ in model.named_parameters()}
    assert used0 | used1 == everything
    shared = used0 & used1
    assert all(n.startswith(("encoder.", "decoder.")) for n in shared)
    stage_params = MNIST_STAGE_PARAMS if name == "dna_mnist" else CIFAR_STAGE_PARAMS
    first = (6 - unshared) // 2
    expected = sum(stage_params[:first]) + sum(stage_params[6 - first:])
    assert sum(p.numel() for n, p in model.named_parameters() if n in shared) == expected
    assert (len(shared) == 0) == (unshared == 6)  # six unshared stages: two separate autoencoders
    if unshared == 2:  # SPEC: the whole encoder and decoder are common to both paths
        assert shared == {n for n in everything if not n.startswith("bottlenecks.")}


def test_gradients_reach_both_bottlenecks_through_the_training_loss():
    model = create_model("dna_mnist")
    x = torch.rand(8, 1, 28, 28)
    recons, latents = forward_with_latents(model, x)

    def cross_covariance(z1, z2):
        return ((z1 - z1.mean(0)).T @ (z2 - z2.mean(0))).pow(2).mean()

    autoencoder_loss(recons, x, latents, lambda_corr=0.05, corr_fn=cross_covariance).backward()
    for neck in model.bottlenecks:
        assert neck.latent.fc.weight.grad.abs().sum() > 0
        assert neck.expand.fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs", [{"unshared": 3}, {"unshared": 0}, {"unshared": 8}, {"paths": 0}])
def test_bad_settings_are_clear_errors(kwargs):
    with pytest.raises(DecorrError):
        create_model("dna_mnist", **kwargs)


def test_more_than_two_paths():
    model = create_model("dna_cifar", paths=3)
    assert len(model(torch.rand(2, 3, 32, 32))) == 3
    assert latent_layers(model)[-1] == "bottlenecks.2.latent"


# --- objectives ----------------------------------------------------------------------------------

class LogitPaths(nn.Module):
    """A stand-in autoencoder: x [N, P, K] holds the classifier logits of each path directly."""

    def forward(self, x):
        return tuple(x[:, p] for p in range(x.shape[1]))


def _np_ce(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-sample cross entropy in float64."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(y)), y]


def _np_margin(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    others = logits.copy()
    others[np.arange(len(y)), y] = -np.inf
    return others.max(axis=1) - logits[np.arange(len(y)), y]


LOGITS = torch.tensor([[[2.0, 0.5, -1.0], [0.0, 1.5, 0.2]],
                       [[0.1, 0.3, 3.0], [1.0, 1.0, -2.0]],
                       [[-0.5, 2.5, 0.0], [0.3, 0.2, 0.1]],
                       [[1.0, 0.0, 0.0], [0.0, 0.0, 4.0]]])  # [N=4, P=2, K=3]
LABELS = torch.tensor([0, 2, 1, 2])


def test_paper_objective_against_hand_computation():
    z, y = LOGITS.double().numpy(), LABELS.numpy()
    ce = [_np_ce(z[:, p], y).mean() for p in range(2)]
    value = paper_objective(LogitPaths(), nn.Identity())(LOGITS, LABELS)
    assert value.item() == pytest.approx(ce[0] ** 2 + ce[1] ** 2, rel=1e-6)
    one_path = paper_objective(LogitPaths(), nn.Identity())(LOGITS[:, :1], LABELS)
    assert one_path.item() == pytest.approx(ce[0], rel=1e-6)  # the AE: CE, not squared


def test_paper_objective_composes_autoencoder_and_classifier():
    # Linear "autoencoder" paths and a linear classifier: the loss is CE of the composed maps.
    w = torch.randn(2, 3, 3)

    class LinearPaths(nn.Module):
        def forward(self, x):
            return tuple(x @ w[p] for p in range(2))

    ae = LinearPaths()
    clf = nn.Linear(3, 3)
    x = torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 1, 0])
    logits = [clf(x @ w[p]).detach().double().numpy() for p in range(2)]
    expected = sum(_np_ce(z, y.numpy()).mean() ** 2 for z in logits)
    assert paper_objective(ae, clf)(x, y).item() == pytest.approx(expected, rel=1e-5)


def test_adaptive_min_against_hand_computation():
    z, y = LOGITS.double().numpy(), LABELS.numpy()
    per_path = np.stack([_np_ce(z[:, p], y) for p in range(2)])
    value = adaptive_objective(LogitPaths(), nn.Identity(), kind="min")(LOGITS, LABELS)
    assert value.item() == pytest.approx(per_path.min(axis=0).mean(), rel=1e-6)


@pytest.mark.parametrize("kappa", [0.0, 0.5])
def test_adaptive_margin_against_hand_computation(kappa):
    z, y = LOGITS.double().numpy(), LABELS.numpy()
    per_path = np.stack([np.minimum(_np_margin(z[:, p], y), kappa) for p in range(2)])
    value = adaptive_objective(LogitPaths(), nn.Identity(), kind="margin", kappa=kappa)(LOGITS, LABELS)
    assert value.item() == pytest.approx(per_path.sum(axis=0).mean(), rel=1e-6)


def _two_paths(fool0: float, fool1: float) -> torch.Tensor:
    """One sample of class 0; path p's logits favour class 1 by fool_p (negative: still correct)."""
    return torch.tensor([[[0.0, fool0, -5.0], [0.0, fool1, -5.0]]])


@pytest.mark.parametrize("kind", ["min", "margin"])
def test_adaptive_objectives_only_rise_when_every_path_is_pushed(kind):
    y = torch.tensor([0])
    adaptive = adaptive_objective(LogitPaths(), nn.Identity(), kind=kind, kappa=1.0)
    paper = paper_objective(LogitPaths(), nn.Identity())
    # Path 1 stays correct (class 0 ahead by 2); pushing path 0 ever further past the boundary ...
    path0_only = [_two_paths(fool0, -2.0) for fool0 in (2.0, 5.0, 20.0)]
    adaptive_values = [adaptive(x, y).item() for x in path0_only]
    paper_values = [paper(x, y).item() for x in path0_only]
    assert paper_values[0] < paper_values[1] < paper_values[2]  # ... pays off for the paper objective
    assert adaptive_values[0] == pytest.approx(adaptive_values[1]) == pytest.approx(adaptive_values[2])
    # ... and gives no gradient into the already-fooled path: the step goes to the correct one.
    x = _two_paths(5.0, -2.0).requires_grad_()
    (grad,) = torch.autograd.grad(adaptive(x, y), x)
    assert torch.all(grad[0, 0] == 0) and grad[0, 1, 1] > 0
    # Pushing the still-correct path does raise it.
    assert adaptive(_two_paths(5.0, -1.0), y).item() > adaptive_values[1]
    assert adaptive(_two_paths(5.0, 3.0), y).item() > adaptive(_two_paths(5.0, -1.0), y).item()


def test_margin_objective_reaches_its_maximum_only_when_all_paths_are_fooled():
    y = torch.tensor([0])
    adaptive = adaptive_objective(LogitPaths(), nn.Identity(), kind="margin", kappa=1.0)
    assert adaptive(_two_paths(3.0, 3.0), y).item() == pytest.approx(2.0)  # P * kappa
    assert adaptive(_two_paths(3.0, 0.5), y).item() < 2.0
    assert adaptive(_two_paths(3.0, -0.5), y).item() < 1.0


def test_unknown_adaptive_kind_is_an_error():
    with pytest.raises(DecorrError):
        adaptive_objective(LogitPaths(), nn.Identity(), kind="max")


def test_objectives_give_input_gradients_through_real_models():
    ae, clf = create_model("dna_mnist").eval(), create_model("dna_classifier_mnist").eval()
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    for loss_fn in (paper_objective(ae, clf), adaptive_objective(ae, clf, "min"),
                    adaptive_objective(ae, clf, "margin", kappa=1e6)):
        (grad,) = torch.autograd.grad(loss_fn(x, y), x)
        assert grad.shape == x.shape and grad.abs().sum() > 0


# --- predictions and accuracy ------------------------------------------------------------------

def test_path_predictions_are_per_path_argmax():
    preds = path_predictions(LogitPaths(), nn.Identity(), LOGITS)
    expected = LOGITS.numpy().argmax(axis=2).T  # [P, N]
    assert preds.shape == (2, 4)
    np.testing.assert_array_equal(preds.numpy(), expected)


def test_dna_accuracy_on_hand_made_predictions():
    preds = torch.tensor([[0, 1, 2, 3], [0, 0, 0, 3]])
    y = torch.tensor([0, 0, 2, 1])
    # either: sample 0 (both), 1 (path 1), 2 (path 0) correct, 3 wrong
    assert dna_accuracy(preds, y) == {"either": 0.75, "path0": 0.5, "path1": 0.5, "mean": 0.5}
    uneven = dna_accuracy(torch.tensor([[0, 0, 2, 1], [1, 1, 1, 1]]), y)
    assert uneven == {"either": 1.0, "path0": 1.0, "path1": 0.25, "mean": 0.625}


def test_dna_accuracy_of_one_path_is_its_accuracy():
    acc = dna_accuracy(torch.tensor([[0, 1, 1, 1]]), torch.tensor([0, 0, 2, 1]))
    assert acc == {"either": 0.5, "path0": 0.5, "mean": 0.5}
    with pytest.raises(ValueError):
        dna_accuracy(torch.tensor([0, 1]), torch.tensor([0, 1]))


# --- training loss -----------------------------------------------------------------------------

def test_reconstruction_errors_and_loss_against_hand_computation():
    x = torch.rand(6, 1, 4, 4)
    recons = (torch.rand(6, 1, 4, 4), torch.rand(6, 1, 4, 4))
    xn, rn = x.double().numpy(), [r.double().numpy() for r in recons]
    per_sample = np.stack([((r - xn) ** 2).reshape(6, -1).mean(axis=1) for r in rn])
    errors = reconstruction_errors(recons, x)
    np.testing.assert_allclose(errors.numpy(), per_sample, rtol=1e-5)
    mse = per_sample.mean(axis=1)
    latents = [torch.randn(6, 3), torch.randn(6, 2, 2)]
    seen = []

    def fake_corr(z1, z2):
        seen.append((tuple(z1.shape), tuple(z2.shape)))
        return torch.tensor(2.0)

    loss = autoencoder_loss(recons, x, latents, lambda_corr=0.05, corr_fn=fake_corr)
    assert loss.item() == pytest.approx(math.sqrt(mse[0] ** 2 + mse[1] ** 2) + 0.05 * 2.0, rel=1e-5)
    assert seen == [((6, 3), (6, 4))]  # latents flattened after the batch dimension
    no_corr = autoencoder_loss(recons, x, None, lambda_corr=0.0)
    assert no_corr.item() == pytest.approx(math.sqrt(mse[0] ** 2 + mse[1] ** 2), rel=1e-5)
    one_path = autoencoder_loss(recons[:1], x, None, lambda_corr=0.05)
    assert one_path.item() == pytest.approx(mse[0], rel=1e-5)  # plain MSE, no correlation term


def test_loss_from_per_sample_errors_equals_loss_on_the_whole_batch():
    # What a data-parallel trainer does: per-sample errors of two shards, concatenated.
    x = torch.rand(8, 3, 4, 4)
    recons = (torch.rand(8, 3, 4, 4), torch.rand(8, 3, 4, 4))
    shards = [reconstruction_errors([r[i:i + 4] for r in recons], x[i:i + 4]) for i in (0, 4)]
    whole = autoencoder_loss(recons, x, None, lambda_corr=0.0)
    torch.testing.assert_close(autoencoder_loss_from_errors(torch.cat(shards, dim=1), None, 0.0), whole)


def test_correlation_term_sums_over_all_pairs_of_paths():
    x = torch.rand(4, 5)
    recons = tuple(torch.rand(4, 5) for _ in range(3))
    pairs = []
    autoencoder_loss(recons, x, [torch.randn(4, 2) for _ in range(3)], 0.1,
                     corr_fn=lambda a, b: pairs.append(1) or torch.tensor(0.0))
    assert len(pairs) == 3


def test_default_correlation_loss_is_decorr_loss():
    from decorr.loss import correlation_loss

    x = torch.rand(200, 1, 28, 28)  # the correlation loss needs a batch larger than the latent (64)
    model = create_model("dna_mnist")
    recons, latents = forward_with_latents(model, x)
    expected = autoencoder_loss(recons, x, latents, 0.05, corr_fn=correlation_loss)
    torch.testing.assert_close(autoencoder_loss(recons, x, latents, 0.05), expected)
