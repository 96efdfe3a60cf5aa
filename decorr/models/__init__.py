"""Model registry and the toolkit's models."""

from decorr.models.blocks import Normalize, ResidualUnit
from decorr.models.registry import (
    ModelSpec,
    create_model,
    default_feature_layer,
    list_models,
    model_spec,
    register_model,
)

__all__ = [
    "ModelSpec",
    "Normalize",
    "ResidualUnit",
    "create_model",
    "default_feature_layer",
    "list_models",
    "model_spec",
    "register_model",
]
