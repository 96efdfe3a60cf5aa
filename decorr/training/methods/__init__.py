"""Ensemble training methods by name (``train/ensemble.py --method NAME``): one task class each.

Importing this package registers every built-in method in :data:`METHODS`; a new method is one
:class:`EnsembleTask` subclass decorated with ``@register_method("name")`` (``docs/design.md``).
"""

from decorr.training.methods.base import METHODS, EnsembleTask, Members, Surrogate, method_class, register_method
from decorr.training.methods import independent, diversity, dverge, frozen  # noqa: F401  (they register themselves)

__all__ = ["METHODS", "EnsembleTask", "Members", "Surrogate", "method_class", "register_method"]
