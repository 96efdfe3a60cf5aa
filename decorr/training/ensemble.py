"""Ensembles of N members, one trainer for every diversity method (``train/ensemble.py``).

:class:`EnsembleConfig` holds the settings of every method (flags from its fields); ``--method NAME``
picks one task class of :mod:`decorr.training.methods` (``ce``, ``dec``, ``dverge``, ``adp``, ``gal``, ``trs``,
``dec-frozen``), which :func:`train_ensemble` runs on the one loop (:func:`decorr.training.loop.fit`). The
checkpoint kind is ``ensemble`` with members ``model0 .. model{N-1}`` (any registry architecture, one
repeated or one per member: heterogeneous ensembles), loadable by :func:`decorr.checkpoint.load_models`
and by every model spec (``eval/transfer.py RUN_DIR``, ``--ensemble ens=RUN_DIR``).

The optimiser recipe is the paper's MNIST pair recipe for every method (Adam 5e-3, batch 1000, 20
epochs), so that methods compare on the objective alone; each objective's coefficients are its
authors' defaults (:mod:`decorr.training.methods`).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from decorr.checkpoint import model_entry
from decorr.training.classifier import check_model_fits, dataset_model_kwargs
from decorr.config import opt
from decorr.data import ImageDataset, load_dataset, require_training_images
from decorr.errors import DecorrError, pixel_value
from decorr.features import find_module
from decorr.training.methods import METHODS, EnsembleTask, Members, Surrogate, method_class
from decorr.training.methods.base import EpochMonitor
from decorr.models import create_model, model_spec
from decorr.specs import SpecOptions, load_specs
from decorr.training.epoch_metrics import drop_small_last_batch, feature_width
from decorr.training.entry import RunOptions, run_training
from decorr.config import check_at_least, check_finite, check_positive, check_seed, check_subset

__all__ = ["EnsembleConfig", "train_ensemble", "state_sha256", "DEFAULT_ARCH", "DEFAULT_MODELS"]

DEFAULT_ARCH = "mnist_cnn"
DEFAULT_DATASET = "mnist"
#: Members when neither --num-models nor several --arch names say (DVERGE's and TRS's 3).
DEFAULT_MODELS = 3


@dataclass
class EnsembleConfig:
    """Hyperparameters of an ensemble run; recipe defaults are the paper's MNIST pairs (SPEC section 2)."""

    method: str = opt("ce", "training method", choices=tuple(METHODS))
    num_models: int | None = opt(None, f"members N (default {DEFAULT_MODELS}, or the number of --arch names or "
                                       "--init models; dec-frozen trains 1)")
    arch: tuple[str, ...] = opt((), f"registry model name, repeated N times, or one per member (heterogeneous "
                                    f"ensembles; default {DEFAULT_ARCH})")
    dataset: str | None = opt(None, "dataset name or path to an .npz (default: the --init models' dataset, else mnist)")
    epochs: int = opt(20, "number of epochs")
    batch_size: int = opt(1000, "global batch size")
    lr: float = opt(5e-3, "Adam learning rate")
    batches_per_epoch: int | None = opt(None, "stop every epoch after N batches of its shuffle (default: all)")
    feature_layer: tuple[str, ...] = opt((), "module name of the features, one for all members or one per member "
                                             "(default: each model's)")
    lambda_corr: float = opt(0.05, "weight of the correlation loss (dec, dec-frozen)")
    corr_direction: str = opt("one-way", "dec: regress member j on member i for i < j (the paper) or every "
                                         "ordered pair", choices=("one-way", "both"))
    corr_eps: str = opt("absolute", "the correlation loss's eps: absolute (the paper) or relative to SStot "
                                    "(a function of R^2 alone)", choices=("absolute", "relative"))
    corr_warmup_epochs: int = opt(0, "epochs of cross-entropy alone before the correlation loss starts (paper: 0)")
    adp_alpha: float = opt(2.0, "ADP: weight of the ensemble entropy (Pang et al.)")
    adp_beta: float = opt(0.5, "ADP: weight of the log-det diversity (Pang et al.)")
    gal_lambda: float = opt(0.5, "GAL: weight of the gradient coherence (Kariyappa & Qureshi)")
    trs_scale: float = opt(5.0, "TRS: scale of the regulariser (TRS code)")
    trs_coeff: float = opt(2.0, "TRS: weight of the gradient-cosine term")
    trs_lambda: float = opt(2.0, "TRS: weight of the smoothness term")
    trs_init_eps: float = opt(0.1, "TRS: smoothness radius in the first epoch", type=pixel_value)
    trs_adv_eps: float = opt(0.2, "TRS: radius the schedule grows towards", type=pixel_value)
    trs_plus_adv: bool = opt(False, "TRS: smoothness term at TRS's PGD batch (default: at the clean inputs, "
                                    "as the released scripts run)")
    trs_steps: int = opt(6, "TRS: PGD steps of --trs-plus-adv")
    dverge_eps: float = opt(0.15, "DVERGE: distillation Linf radius", type=pixel_value)
    dverge_steps: int = opt(20, "DVERGE: distillation steps")
    dverge_step_size: float = opt(3 / 255, "DVERGE: distillation step", type=pixel_value)
    dverge_layers: tuple[str, ...] = opt((), "DVERGE: distillation layer(s), one drawn per epoch (default: each "
                                             "member's feature layer)", metavar="MODULE")
    dverge_random_start: bool = opt(False, "DVERGE: random start of the distillation")
    dverge_momentum: float = opt(0.0, "DVERGE: MI momentum of the distillation")
    dverge_plus_adv: bool = opt(False, "DVERGE: also train each member on its own PGD examples")
    dverge_adv_weight: float = opt(1.0, "DVERGE: weight of the plus-adv cross-entropy")
    dverge_adv_eps: float | None = opt(None, "DVERGE: plus-adv PGD radius (default: --dverge-eps)", type=pixel_value)
    dverge_adv_steps: int = opt(10, "DVERGE: plus-adv PGD steps")
    dverge_adv_step_size: float | None = opt(None, "DVERGE: plus-adv PGD step (default: --dverge-step-size)",
                                             type=pixel_value)
    param_distance: float = opt(1000.0, "param: the squared parameter distance D every pair is pushed to")
    param_weight: float = opt(1e-5, "param: weight of the distance term")
    init: tuple[str, ...] = opt((), "start from these models (model specs: checkpoints, CKPT:MODEL, ARCH=WEIGHTS) "
                                    "instead of fresh ones", metavar="SPEC")
    surrogate: str | None = opt(None, "dec-frozen: the frozen surrogate (a model spec)", metavar="SPEC")
    seed: int = opt(0, "seed of the initialisation and the batches")
    train_subset: int | None = opt(None, "use only the first N training images")
    test_subset: int | None = opt(None, "use only the first N test images")
    eval_batch_size: int = opt(1000, "batch size of the evaluation after every epoch")
    model_kwargs: dict[str, Any] = opt({}, "keyword arguments for every registry model, e.g. "
                                           "'{\"mean\": [0], \"std\": [1]}' (raw pixels)")

    def __post_init__(self) -> None:
        cls = method_class(self.method)
        self.arch, self.feature_layer = tuple(self.arch), tuple(self.feature_layer)
        self.init, self.dverge_layers = tuple(self.init), tuple(self.dverge_layers)
        for name in ("epochs", "batch_size", "eval_batch_size", "trs_steps", "dverge_adv_steps"):
            check_at_least(name, getattr(self, name), 1)
        check_subset("batches_per_epoch", self.batches_per_epoch)
        check_at_least("corr_warmup_epochs", self.corr_warmup_epochs, 0)
        check_at_least("dverge_steps", self.dverge_steps, 0)
        check_positive("lr", self.lr)
        for name in ("lambda_corr", "adp_alpha", "adp_beta", "gal_lambda", "trs_scale", "trs_coeff", "trs_lambda",
                     "trs_init_eps", "trs_adv_eps", "dverge_eps", "dverge_step_size", "dverge_momentum",
                     "dverge_adv_weight", "param_weight"):
            check_finite(name, getattr(self, name), minimum=0)
        check_finite("param_distance", self.param_distance)
        for name in ("dverge_adv_eps", "dverge_adv_step_size"):
            if getattr(self, name) is not None:
                check_finite(name, getattr(self, name), minimum=0)
        if len(set(self.dverge_layers)) != len(self.dverge_layers):
            raise DecorrError("a layer is listed twice in --dverge-layers; list each once")
        check_seed(self.seed)
        check_subset("train_subset", self.train_subset)
        check_subset("test_subset", self.test_subset)
        if cls.uses_correlation and self.lambda_corr == 0:
            raise DecorrError(f"--method {self.method} with --lambda-corr 0 has no correlation term; use --method ce, "
                              "or a positive --lambda-corr (the paper: 0.05)")
        if cls.uses_correlation and self.corr_warmup_epochs >= self.epochs:
            raise DecorrError(f"a warm-up of {self.corr_warmup_epochs} epochs leaves none of the {self.epochs} for the "
                              "correlation loss; lower --corr-warmup-epochs or raise --epochs")
        if (self.surrogate is None) == (self.method == "dec-frozen"):
            raise DecorrError("--method dec-frozen needs --surrogate SPEC (the frozen model)" if self.surrogate is None
                              else f"--surrogate is for --method dec-frozen, not {self.method}; drop it")
        if self.init and (self.arch or self.model_kwargs):
            raise DecorrError("--init models bring their own architectures; drop --arch and --model-kwargs")
        if self.init and self.method == "dec-frozen":
            raise DecorrError("dec-frozen trains one fresh model; --init is for ensembles (drop it)")
        if not self.init:
            self.set_members(self.arch or (DEFAULT_ARCH,), self.feature_layer)

    def set_members(self, archs: tuple[str, ...], layers: tuple[str | None, ...]) -> None:
        """Resolve ``num_models``, ``arch`` (one per member) and ``feature_layer`` (one per member)."""
        cls = method_class(self.method)
        default = cls.min_models if cls.max_models == 1 else DEFAULT_MODELS
        count = self.num_models if self.num_models is not None else (len(archs) if len(archs) > 1 else default)
        if not isinstance(count, int) or isinstance(count, bool) or count < cls.min_models or (
                cls.max_models is not None and count > cls.max_models):
            bound = (f"exactly {cls.min_models}" if cls.max_models == cls.min_models else
                     f"at least {cls.min_models}" + (f" and at most {cls.max_models}" if cls.max_models else ""))
            raise DecorrError(f"--num-models {count}: --method {self.method} trains {bound} models")
        for name, values in (("arch", archs), ("feature_layer", layers)):
            if len(values) not in (0, 1, count):
                raise DecorrError(f"--{name.replace('_', '-')} lists {len(values)} values for {count} members; give "
                                  f"one (for all) or {count}")
        self.num_models = count
        self.arch = tuple(archs) * count if len(archs) == 1 else tuple(archs)
        chosen = tuple(layers) * count if len(layers) == 1 else tuple(layers)
        resolved = []
        for m, arch in enumerate(self.arch):
            layer = chosen[m] if chosen else None
            if layer is None and not self.init:
                layer = model_spec(arch).feature_layer  # an unknown architecture is a DecorrError listing them
            if layer is None:
                raise DecorrError(f"member {m} ({arch}) has no default feature layer; pass --feature-layer MODULE_NAME")
            resolved.append(layer)
        self.feature_layer = tuple(resolved)

    def lambda_at(self, epoch: int) -> float:
        """The correlation weight in epoch ``epoch`` (0-based): 0 during the warm-up."""
        return 0.0 if epoch < self.corr_warmup_epochs else self.lambda_corr


def state_sha256(module: nn.Module) -> str:
    """SHA-256 over a model's state dict (keys sorted; name, dtype, shape and bytes of each tensor)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def load_init_models(paths: Sequence[str], options: SpecOptions | None = None
                     ) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]], list[dict[str, Any]], str | None]:
    """The starting models: every model of each spec in order (``decorr.specs``: checkpoints,
    ``PATH:MODEL``, or ``ARCH=WEIGHTS`` files), renamed ``model0 .. model{N-1}``.

    Returns the models, their checkpoint entries (arch, kwargs, feature_layer, and for preprocessed
    foreign models ``preprocess``: what the run's checkpoints rebuild them from), where each came from
    (``{"name", "checkpoint", "model", "epoch"}``, or ``{"name", "spec", "weights", "sha256"}``) and the
    checkpoints' common dataset.
    """
    loaded = load_specs(paths, options)
    models: dict[str, nn.Module] = {}
    entries: dict[str, dict[str, Any]] = {}
    origins: list[dict[str, Any]] = []
    datasets: set[str] = set()
    for full_name, model in loaded.items():
        name = f"model{len(models)}"
        models[name] = model.module
        entries[name] = {k: v for k, v in model.entry.items() if k in ("arch", "kwargs", "feature_layer", "preprocess")}
        info = model.info
        if "checkpoint" in info:
            origins.append({"name": name, "checkpoint": info["checkpoint"], "model": full_name.rsplit("/", 1)[1],
                            "epoch": info["epoch"]})
            if info.get("dataset"):
                datasets.add(info["dataset"])
        else:
            origins.append({"name": name, "spec": info["spec"], "weights": info["weights"], "sha256": info["sha256"]})
    if len(models) < 2:
        raise DecorrError(f"an ensemble trains at least 2 models but {', '.join(map(str, paths))} hold "
                          f"{len(models)}; pass a pair run (--init-from) or several checkpoints (--init A B)")
    if len(datasets) > 1:
        raise DecorrError(f"the starting checkpoints were trained on different datasets ({', '.join(sorted(datasets))}); "
                          "start from models of one dataset")
    return models, entries, origins, (datasets.pop() if datasets else None)


def _load_init(config: EnsembleConfig, options: SpecOptions | None) -> tuple[Members, dict[str, Any], str | None]:
    models, entries, origins, dataset = load_init_models(config.init, options)
    if config.num_models is not None and config.num_models != len(models):
        raise DecorrError(f"--init gives {len(models)} models ({', '.join(models)}), not --num-models "
                          f"{config.num_models}; drop --num-models (the --init models are the members) or give "
                          f"{config.num_models} models to --init")
    layers = [entries[n].get("feature_layer") for n in models]
    config.set_members(tuple(entries[n]["arch"] for n in models), config.feature_layer or tuple(layers))
    names = list(models)
    members = Members({n: entries[n]["arch"] for n in names}, {n: dict(entries[n].get("kwargs", {})) for n in names},
                      dict(zip(names, config.feature_layer)), initial=models, origins=origins)
    for n, layer in members.layers.items():
        entries[n] = {**entries[n], "feature_layer": layer}
    return members, entries, dataset


def _load_surrogate(config: EnsembleConfig, options: SpecOptions | None) -> Surrogate:
    loaded = load_specs([config.surrogate], options)
    if len(loaded) != 1:
        raise DecorrError(f"--surrogate {config.surrogate} holds {len(loaded)} models ({', '.join(loaded)}); "
                          "pick one with CKPT:MODEL")
    (model,) = loaded.values()
    layer = model.entry.get("feature_layer") or model.info.get("feature_layer")
    if layer is None:
        raise DecorrError(f"the surrogate {config.surrogate} has no feature layer; add @feature_layer=MODULE to its spec")
    return Surrogate(model.module.eval(), layer, str(config.surrogate), state_sha256(model.module))


def _check_members(config: EnsembleConfig, cls: type[EnsembleTask], dataset: ImageDataset, members: Members) -> bool:
    """Refuse models that do not fit the data and batches too small for the method, before any work;
    return whether to drop the epoch's last partial batch (as the pair trainer decides it)."""
    with torch.random.fork_rng():  # probe models that leave the members' initialisation untouched
        probes = members.initial or {n: create_model(members.archs[n], **members.kwargs[n]) for n in members.names}
        modules = dict(probes)
        layers = dict(members.layers)
        if members.surrogate is not None:
            modules["surrogate"], layers["surrogate"] = members.surrogate.module, members.surrogate.layer
        for n in members.names:
            check_model_fits(probes[n], members.archs[n], dataset)
            for layer in config.dverge_layers:
                find_module(probes[n], layer)  # a one-line error naming the layer a member lacks
        minimum = cls.min_batch
        if cls.uses_correlation:
            widths = {n: feature_width(modules[n], layers[n], dataset.input_shape)
                      for n in cls.regressors(config, members.names)}
            widest = max(widths, key=widths.__getitem__)
            minimum = max(minimum, widths[widest] + 2)
            if config.batch_size < minimum:
                raise DecorrError(f"batch size {config.batch_size} is too small for the correlation loss on "
                                  f"{widths[widest]} features ({widest}'s layer {layers[widest]!r}); use --batch-size "
                                  f"{minimum} or more, or a narrower --feature-layer")
    return drop_small_last_batch(list(probes.values()), len(dataset.train), config.batch_size, minimum)


def train_ensemble(config: EnsembleConfig, options: RunOptions = RunOptions(), *,
                   spec_options: SpecOptions | None = None, kind: str = "ensemble",
                   recorded: dict[str, Any] | None = None, monitors: Sequence[EpochMonitor] = (),
                   default_name: str | None = None) -> Any:
    """Train ``config.method`` as configured, checkpointing after every epoch; return the last metrics
    (or what a monitor returns: the DVERGE recipe's record).

    Everything is checked before the run directory is written: the method and N, the models against
    the data, the batch against the correlation loss; ``--init`` and ``--surrogate`` models are loaded
    first. ``kind`` and ``recorded`` are what the checkpoint records as its kind and hyperparameters
    (a recipe's own settings: ``train/pair_classifiers.py`` records its PairConfig); ``monitors`` add
    evaluations before training and after every epoch (:class:`EpochMonitor`).
    """
    cls = method_class(config.method)
    extra: dict[str, Any] = {}
    members, entries = None, None
    if config.init:
        members, entries, init_dataset = _load_init(config, spec_options)
        if config.dataset is None:
            config.dataset = init_dataset
        elif init_dataset is not None and init_dataset != config.dataset:
            raise DecorrError(f"the --init models were trained on {init_dataset!r}, not --dataset {config.dataset!r}; "
                              f"pass --dataset {init_dataset}")
    config.dataset = config.dataset or DEFAULT_DATASET
    dataset = options.dataset if options.dataset is not None else load_dataset(config.dataset, options.data_root)
    require_training_images(dataset)
    if config.train_subset or config.test_subset:
        dataset = dataset.subset(train=config.train_subset, test=config.test_subset)
    if members is None:
        names = [f"model{m}" for m in range(config.num_models)]
        kwargs = {n: dataset_model_kwargs(a, dataset, config.model_kwargs) for n, a in zip(names, config.arch)}
        members = Members(dict(zip(names, config.arch)), kwargs, dict(zip(names, config.feature_layer)))
        entries = {n: model_entry(members.archs[n], kwargs[n], members.layers[n]) for n in names}
    if config.surrogate is not None:
        members.surrogate = _load_surrogate(config, spec_options)
        extra["surrogate_sha256"] = members.surrogate.sha256
    drop_last = _check_members(config, cls, dataset, members)
    hyperparameters = asdict(config) if recorded is None else dict(recorded)
    if hyperparameters.get("dataset") is None:  # a recipe that let the --init models name it
        hyperparameters["dataset"] = config.dataset
    run_config = {"kind": kind, "models": entries, "dataset": config.dataset,
                  "hyperparameters": {**hyperparameters, **extra}}
    return run_training(lambda run: cls(config, run.place(dataset), members, drop_last, run, monitors), run_config,
                        options, seed=config.seed,
                        default_name=default_name or f"ensemble_{config.method}{config.num_models}")
