"""One registry of models: ``create_model(name, **kwargs)``.

Models are plain ``nn.Module``s. What the toolkit needs to know about a model beyond its weights
(its default feature layer, the input it expects) lives here in the registry, not as attributes the
model sets on itself, so that any torchvision or user model can be registered the same way.
"""

from __future__ import annotations

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


def _ensure_builtin_models() -> None:
    # Importing the model modules registers them; dna registers its autoencoders too.
    import decorr.models.mnist  # noqa: F401
    import decorr.models.cifar  # noqa: F401

    try:
        import dna.models  # noqa: F401
    except ImportError:  # pragma: no cover - dna is part of the same distribution
        pass


def list_models() -> list[str]:
    _ensure_builtin_models()
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    _ensure_builtin_models()
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
