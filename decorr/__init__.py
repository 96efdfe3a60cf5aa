"""decorr: ensemble defenses against transferable adversarial examples.

The pieces most scripts and notebooks need are importable from the top level; everything else lives in
its submodule (``decorr.data``, ``decorr.attacks``, ``decorr.checkpoint``, ...).
"""

from decorr.errors import DecorrError
from decorr.features import get_features, record_features
from decorr.loss import correlation_loss, parameter_distance, pca_pearson, pearson, r_squared
from decorr.models import create_model, default_feature_layer, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "DecorrError",
    "correlation_loss",
    "create_model",
    "default_feature_layer",
    "get_features",
    "list_models",
    "parameter_distance",
    "pca_pearson",
    "pearson",
    "r_squared",
    "record_features",
    "register_model",
]
