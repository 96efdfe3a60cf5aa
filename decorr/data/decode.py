"""Decoding image files with Pillow into uint8 (C, H, W) arrays, resized and centre-cropped as torchvision does.

``Decoder(channels, crop, resize)`` is a small picklable callable (DataLoader workers get a copy):
``Decoder(3, 224, 256)(path)`` is ``Resize(256)`` + ``CenterCrop(224)`` of ``Image.open(path).convert("RGB")``
with torchvision's arithmetic (shorter side to ``resize``, the longer one ``int(resize * long / short)``,
bilinear; the crop's corner at ``int(round((side - crop) / 2))``), computed here with Pillow alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from decorr.errors import DecorrError

__all__ = ["GRAYSCALE_MODES", "IMAGE_EXTENSIONS", "Decoder", "is_image_file", "probe_images", "resize_center_crop"]

#: torchvision ImageFolder's extensions (lower case); other files in a folder are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: Pillow modes decoded as one channel; every other mode becomes RGB (alpha dropped, as ``convert("RGB")``).
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "no message"
    text = f"{type(err).__name__}: {text}"
    return text if len(text) <= 160 else text[:157] + "..."


def resize_center_crop(image, crop: int, resize: int | None = None):
    """torchvision's ``Resize(resize or crop)`` then ``CenterCrop(crop)`` of a PIL image, with Pillow."""
    from PIL import Image

    resize = crop if resize is None else resize
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short != resize:
        new_short, new_long = resize, int(resize * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        image = image.resize((new_w, new_h), Image.BILINEAR)
    w, h = image.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return image.crop((left, top, left + crop, top + crop))


@dataclass(frozen=True)
class Decoder:
    """``path -> uint8 (C, H, W)``: ``channels`` 1 (``convert("L")``) or 3 (``convert("RGB")``), then
    resize + centre crop to ``crop`` (None: the image's own size, which must then be ``size``)."""

    channels: int
    crop: int | None = None
    resize: int | None = None
    #: (H, W) every image must have when ``crop`` is None.
    size: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, int, int] | None:
        if self.crop is not None:
            return (self.channels, self.crop, self.crop)
        return None if self.size is None else (self.channels, *self.size)

    def __call__(self, path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as image:
                image = image.convert("L" if self.channels == 1 else "RGB")
                if self.crop is not None:
                    image = resize_center_crop(image, self.crop, self.resize)
                array = np.asarray(image, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise DecorrError(f"cannot decode image {path} ({_short(err)}); replace or remove the file") from None
        if self.crop is None and self.size is not None and array.shape[:2] != tuple(self.size):
            raise DecorrError(f"image {path} is {array.shape[1]}x{array.shape[0]} but the others are "
                              f"{self.size[1]}x{self.size[0]} (width x height); give --image-size N to resize "
                              "and centre-crop them all")
        return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


def probe_images(files: Sequence[Path], crop: int | None, resize: int | None) -> Decoder:
    """Read every file's header (not its pixels): RGB unless all are grayscale, and one size unless ``crop``.

    An unreadable file, or (without ``crop``) images of different sizes, is a one-line error naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    if crop is not None:
        if crop < 1 or (resize is not None and resize < crop):
            raise DecorrError(f"--image-size {crop} and --resize {resize}: need 1 <= image size <= resize")
    gray, first = True, None
    for path in files:
        try:
            with Image.open(path) as image:
                mode, size = image.mode, image.size
        except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as err:
            raise DecorrError(f"cannot read image {path} ({_short(err)}); replace or remove the file") from None
        gray = gray and mode in GRAYSCALE_MODES
        if crop is None:
            if first is None:
                first = (path, size)
            elif size != first[1]:
                raise DecorrError(
                    f"image {path} is {size[0]}x{size[1]} but {first[0].name} is {first[1][0]}x{first[1][1]} "
                    "(width x height); give --image-size N to resize and centre-crop them all to N x N")
    size = None if first is None else (first[1][1], first[1][0])
    return Decoder(1 if gray else 3, crop, resize, size)


def batch_bytes(shape: Sequence[int], n: int) -> int:
    return int(n) * math.prod(int(s) for s in shape)
