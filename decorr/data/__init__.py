"""The data part: datasets as uint8 tensors in memory (or streamed from image files), float batches made on
the fly, whole-batch augmentation.

``load_dataset(name)`` finds a dataset in the folders people actually keep it in (no network needed),
falls back to torchvision's downloader, and otherwise raises one :class:`DecorrError` listing every
folder it looked in. Modules: ``base`` (the types), ``registry`` and ``builtin`` (datasets by name),
``npz``, ``folder`` (image folders and labels files), ``decode`` and ``stream`` (decoding, streaming under a
memory budget), ``accounting``, ``locate`` (where files are searched, downloads), ``batches``
(deterministic sharded batches), ``load``. The names most code needs are re-exported here
(``from decorr.data import ImageSplit, load_dataset``).
"""

from decorr.data.base import (Augment, AugmentDraw, ImageDataset, ImageSplit, PathLike, require_training_images,
                              to_float)
from decorr.data.batches import epoch_generator, iterate_batches, last_batch_too_small, num_batches
from decorr.data.builtin import read_idx
from decorr.data.decode import Decoder, resize_center_crop
from decorr.data.folder import is_image_dataset, load_image_folder, read_class_map
from decorr.data.load import check_dataset_name, dataset_augment, load_dataset
from decorr.data.locate import DATA_ROOT_ENV, search_roots
from decorr.data.npz import load_npz_dataset
from decorr.data.registry import list_datasets, register_dataset
from decorr.data.stream import DEFAULT_MEMORY_BUDGET_MB, StreamedSplit, file_split

__all__ = ["check_dataset_name", "Augment", "AugmentDraw", "DATA_ROOT_ENV", "DEFAULT_MEMORY_BUDGET_MB", "Decoder", "ImageDataset",
           "ImageSplit", "PathLike", "StreamedSplit", "dataset_augment", "epoch_generator", "file_split",
           "is_image_dataset", "iterate_batches", "last_batch_too_small", "list_datasets", "load_dataset",
           "load_image_folder", "load_npz_dataset", "num_batches", "read_class_map", "read_idx", "register_dataset",
           "require_training_images", "resize_center_crop", "search_roots", "to_float"]
