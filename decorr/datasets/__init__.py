"""Datasets beyond the registry: image folders and labels files (``folder``), decoding (``decode``), streamed
splits (``stream``) and adversarial examples saved as image files (``adversarial``)."""

from decorr.datasets.decode import Decoder, resize_center_crop
from decorr.datasets.folder import is_image_dataset, load_image_folder, read_class_map
from decorr.datasets.stream import DEFAULT_MEMORY_BUDGET_MB, StreamedSplit, file_split

__all__ = ["DEFAULT_MEMORY_BUDGET_MB", "Decoder", "StreamedSplit", "file_split", "is_image_dataset",
           "load_image_folder", "read_class_map", "resize_center_crop"]
