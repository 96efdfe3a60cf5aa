"""Ensemble training methods by name (``train/ensemble.py --method NAME``): one task class each, one file
per method family.

Importing this package registers every built-in method in :data:`METHODS`; a new method is one
:class:`EnsembleTask` subclass decorated with ``@register_method("name")`` in one file, imported here
(``docs/design.md``, "Adding a method").
"""

from decorr.training.methods.base import METHODS, EnsembleTask, Members, Surrogate, method_class, register_method
# Importing registers them; this order is the order --method lists them in.
from decorr.training.methods import independent, adp, gal, trs, dverge, frozen, distance  # noqa: F401,I001

__all__ = ["METHODS", "EnsembleTask", "Members", "Surrogate", "method_class", "register_method"]
