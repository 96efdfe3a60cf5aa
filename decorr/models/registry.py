"""One registry of models: ``create_model(name, **kwargs)``.

Models are plain ``nn.Module``s. What the toolkit needs to know about a model beyond its weights
(its default feature layer, the input it expects) lives here in the registry, not as attributes the
model sets on itself, so that any torchvision or user model can be registered the same way.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

from decorr.errors import DecorrError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    #: Module name (as in ``model.named_modules()``) of the default feature layer: the hidden
    #: representation that the correlation loss, the feature R^2 and DVERGE use.
    feature_layer: str | None
    #: Default input shape (C, H, W) in pixel units [0, 1]; None when it depends on kwargs.
    input_shape: tuple[int, int, int] | None = None
    #: Module names that are residual units (for SGM) - informational.
    description: str = ""
    default_kwargs: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str | None = None,
    *,
    feature_layer: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
    description: str = "",
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder function under ``name`` (default: the function's name)."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or builder.__name__
        if key in _REGISTRY and _REGISTRY[key].builder is not builder:
            raise ValueError(f"model {key!r} is registered twice")
        doc = description or (builder.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[key] = ModelSpec(key, builder, feature_layer, input_shape, doc)
        return builder

    return decorator


#: Modules that register models when they are imported, by the name prefix of their models ("" for any
#: name): decorr's own model modules. Packages outside decorr (this project's autoencoder package, a user's
#: package) declare theirs as entry points of the group :data:`ENTRY_POINT_GROUP` in their ``pyproject.toml``,
#: named by the prefix::
#:
#:     [project.entry-points."decorr.models"]
#:     mine_ = "mypackage.models"
#:
#: The registry imports a provider only when a name it does not know is asked for (or every model is
#: listed): it imports no model module at load time and names no package above it, so the imports point
#: downward.
PROVIDERS: list[tuple[str, str]] = [("", "decorr.models.mnist"), ("", "decorr.models.cifar")]
ENTRY_POINT_GROUP = "decorr.models"
_loaded: set[str] = set()
_entry_points_read = False


def register_provider(prefix: str, module: str) -> None:
    """Declare that importing ``module`` registers the models whose names start with ``prefix`` (the
    Python API's equivalent of an entry point)."""
    if (prefix, module) not in PROVIDERS:
        PROVIDERS.append((prefix, module))


def _read_entry_points() -> None:
    """Add the installed packages' providers (entry points of :data:`ENTRY_POINT_GROUP`) once."""
    global _entry_points_read
    if _entry_points_read:
        return
    _entry_points_read = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        register_provider(entry.name, entry.value)


def _load_providers(name: str | None = None) -> None:
    """Import the provider modules of ``name`` (None: all of them) that are not imported yet."""
    _read_entry_points()
    for prefix, module in list(PROVIDERS):
        if module in _loaded or (name is not None and not name.startswith(prefix)):
            continue
        _loaded.add(module)
        try:
            importlib.import_module(module)
        except ImportError as err:  # e.g. an optional provider that is not installed
            if err.name is None or not module.startswith(err.name):
                raise


def list_models() -> list[str]:
    _load_providers()
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        _load_providers(name)
    if name not in _REGISTRY:
        _load_providers()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DecorrError(
            f"unknown model {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}"
        ) from None


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with freshly initialised weights."""
    spec = model_spec(name)
    try:
        return spec.builder(**kwargs)
    except TypeError as err:
        raise DecorrError(f"model {name!r} does not accept these arguments {kwargs}: {err}") from None


def default_feature_layer(name: str) -> str:
    spec = model_spec(name)
    if spec.feature_layer is None:
        raise DecorrError(f"model {name!r} has no default feature layer; pass --feature-layer MODULE_NAME")
    return spec.feature_layer
