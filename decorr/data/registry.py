"""The dataset registry: a name, a loader ``loader(root, download=...)`` and the default augmentation.

Built-in loaders register themselves in :mod:`decorr.data.builtin` (imported by ``decorr.data``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


from decorr.data.base import Augment, ImageDataset

__all__ = ["DatasetLoader", "list_datasets", "register_dataset"]

# ----------------------------------------------------------------------------------------------
# Registry


#: A dataset loader: ``loader(root, download=...)``, ``root`` a Path or None.
DatasetLoader = Callable[..., ImageDataset]


@dataclass(frozen=True)
class _DatasetEntry:
    loader: DatasetLoader
    augment: Augment | None


_DATASETS: dict[str, _DatasetEntry] = {}


def register_dataset(
    name: str, *, augment: Augment | None = None
) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator registering ``loader(root: Path | None, *, download: bool) -> ImageDataset``.

    ``augment`` is the dataset's default training augmentation (see :func:`dataset_augment`). A loader
    can use :func:`search_roots` to look where the built-in datasets look.
    """

    def decorator(loader: DatasetLoader) -> DatasetLoader:
        if name in _DATASETS and _DATASETS[name].loader is not loader:
            raise ValueError(f"dataset {name!r} is registered twice")
        _DATASETS[name] = _DatasetEntry(loader, augment)
        return loader

    return decorator


def list_datasets() -> list[str]:
    """Registered dataset names (any ``.npz`` file path is accepted by :func:`load_dataset` too)."""
    return sorted(_DATASETS)


def _registered_name(name: str) -> str | None:
    if name in _DATASETS:
        return name
    normalised = name.lower().replace("_", "-")
    return normalised if normalised in _DATASETS else None
