"""Image folders as (evaluation) datasets: class subfolders, or a folder of images with a labels CSV/TSV.

Layouts, found from the path given as ``--dataset`` (``decorr.data.load_dataset(path)``):

- **class subfolders** (torchvision ``ImageFolder``): ``ROOT/<class>/**/<image>``; classes are the sorted
  subfolder names (hidden ones skipped), class ``k`` the ``k``-th; images in ``os.walk`` order, sorted, as
  ImageFolder lists them. An image file directly in ROOT or a class folder without images is an error.
  When every class folder is named by a non-negative integer (``0`` ... ``9``), that integer is the class
  index (unlike ImageFolder, whose positions would shift every label after a missing folder, and order
  ``10`` before ``2``); the number of classes is then the largest + 1. Mixing number and word names is an
  error unless ``--class-map`` says what each folder is.
- **labels file**: ``ROOT/*.csv`` or ``*.tsv`` (or the path of that file), one row per image, file name and
  label; a file name is looked up beside the labels file, then in its ``images/`` folder, and without an
  extension with each image extension appended (the NIPS 2017 dev set's ``ImageId``). The first row is a
  header when it names a file column (``filename``, ``file``, ``imageid``, ``image``, ``image_id``, ``path``,
  ``name``) and a label column (``label``, ``truelabel``, ``true_label``, ``class``, ``class_index``, case and
  ``_`` ignored); otherwise columns 1 and 2 are file and label. Images not listed are ignored.

Labels are integers (plus ``label_offset``: the NIPS 2017 ``TrueLabel`` is 1-based, for 1001-class models;
give -1 for torchvision's 1000 classes), or, with a ``class_map`` file, keys of that map: a JSON object
``{"name": index}``, or text with one class per line (index = line number, the line's first field; a
synset list such as ``LOC_synset_mapping.txt`` works), or ``name,index`` lines. With class subfolders the
map turns folder names into indices. The dataset's images fill the test split; the train split is empty
(folders are evaluation data; the training tools refuse them with a one-line error).
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import torch

from decorr.data.base import ImageDataset, ImageSplit
from decorr.data.decode import IMAGE_EXTENSIONS, is_image_file, probe_images
from decorr.data.stream import file_split
from decorr.errors import DecorrError

__all__ = ["FILE_COLUMNS", "LABEL_COLUMNS", "find_images_by_class", "is_image_dataset", "load_image_folder",
           "read_class_map", "read_label_file"]

FILE_COLUMNS = ("filename", "file", "imageid", "image", "path", "name")
LABEL_COLUMNS = ("label", "truelabel", "class", "classindex")
LABEL_SUFFIXES = (".csv", ".tsv")
#: Labels files preferred when a folder holds several CSV/TSV files.
LABEL_FILE_NAMES = ("labels.csv", "labels.tsv", "dev_dataset.csv", "val.csv")


def is_image_dataset(path: str | os.PathLike) -> bool:
    """Whether ``load_dataset`` should read ``path`` as an image folder (a folder, or a .csv/.tsv file)."""
    p = Path(os.path.expanduser(str(path)))
    return p.is_dir() or (p.is_file() and p.suffix.lower() in LABEL_SUFFIXES)


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def read_class_map(path: str | os.PathLike) -> dict[str, int]:
    """``{label text: class index}`` from a JSON object, ``name,index`` lines, or one class name per line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DecorrError(f"cannot read the class map {path} ({type(err).__name__}); give a readable text or JSON file") from None
    if path.suffix.lower() == ".json":
        try:
            mapping = json.loads(text)
            if not isinstance(mapping, dict) or not all(isinstance(v, int) and v >= 0 for v in mapping.values()):
                raise ValueError
        except ValueError:
            raise DecorrError(f"class map {path} must be a JSON object {{\"name\": index >= 0}}") from None
        return {str(k): int(v) for k, v in mapping.items()}
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    fields = [re.split(r"\s*[,\t]\s*", line) for line in lines]
    if fields and all(len(f) == 2 and re.fullmatch(r"\d+", f[1]) for f in fields):
        mapping = {f[0]: int(f[1]) for f in fields}
    else:
        mapping = {re.split(r"[\s,\t]+", line)[0]: i for i, line in enumerate(lines)}
    if not mapping:
        raise DecorrError(f"class map {path} is empty; list one class per line (or name,index lines, or JSON)")
    if len(mapping) != len(lines):
        raise DecorrError(f"class map {path} lists a class twice; list each once")
    return mapping


def find_images_by_class(root: Path, class_map: dict[str, int] | None = None,
                         map_name: str = "") -> tuple[list[Path], list[int], int]:
    """Files, labels and the number of classes of a class-subfolder folder, in ImageFolder's order."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    stray = sorted(p for p in root.iterdir() if p.is_file() and is_image_file(p))
    if stray:
        raise DecorrError(f"image {stray[0]} lies directly in {root}, a folder of class subfolders; move it into its "
                          "class folder (or give a labels .csv beside the images)")
    if not classes:
        raise DecorrError(f"{root} holds neither class subfolders nor a labels .csv/.tsv file; use "
                          "ROOT/<class>/<image> or ROOT/labels.csv with filename,label rows")
    if class_map is not None:
        unknown = [c for c in classes if c not in class_map]
        if unknown:
            raise DecorrError(f"class folder {root / unknown[0]} is not in the class map {map_name}; add it to the "
                              "map or remove the folder")
    numbered = [c for c in classes if re.fullmatch(r"\d+", c)]
    if class_map is None and numbered and len(numbered) != len(classes):
        named = next(c for c in classes if c not in numbered)
        raise DecorrError(f"{root} mixes class folders named by number ({numbered[0]}) and by word ({named}); name "
                          "them all by class index, or give --class-map FILE mapping each folder name to its index")
    if class_map is None and numbered:
        # Folder names are the class indices: a missing class must not shift the labels of the others.
        class_map = {c: int(c) for c in classes}
    files, labels = [], []
    for index, name in enumerate(classes):
        found = []
        for folder, _, names in sorted(os.walk(root / name, followlinks=True)):
            found += [Path(folder) / n for n in sorted(names) if is_image_file(Path(n))]
        if not found:
            raise DecorrError(f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add "
                              "images or remove the folder")
        files += found
        labels += [class_map[name] if class_map is not None else index] * len(found)
    num_classes = max(class_map.values()) + 1 if class_map is not None else len(classes)
    return files, labels, num_classes


def _resolve(name: str, base: Path) -> Path | None:
    for folder in (base, base / "images"):
        candidate = folder / name
        if candidate.is_file():
            return candidate
        if not Path(name).suffix:
            for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
                if (folder / (name + ext)).is_file():
                    return folder / (name + ext)
    return None


def read_label_file(path: Path, class_map: dict[str, int] | None = None, map_name: str = "",
                    label_offset: int = 0) -> tuple[list[Path], list[int]]:
    """Files and labels listed in a CSV/TSV (see the module docstring for the columns accepted)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DecorrError(f"cannot read the labels file {path} ({type(err).__name__}); give a UTF-8 CSV or TSV") from None
    lines = text.splitlines()
    delimiter = "\t" if path.suffix.lower() == ".tsv" or (lines and "\t" in lines[0] and "," not in lines[0]) else ","
    rows = [(i + 1, row) for i, row in enumerate(csv.reader(lines, delimiter=delimiter)) if any(c.strip() for c in row)]
    if not rows:
        raise DecorrError(f"labels file {path} lists no images; write one filename,label row per image")
    header = [_key(c) for c in rows[0][1]]
    file_col = next((header.index(c) for c in FILE_COLUMNS if c in header), None)
    label_col = next((header.index(c) for c in LABEL_COLUMNS if c in header), None)
    if file_col is not None and label_col is not None:
        rows = rows[1:]
    else:
        file_col, label_col = 0, 1
    files, labels, seen = [], [], {}
    for line, row in rows:
        name = row[file_col].strip() if len(row) > file_col else ""
        label = row[label_col].strip() if len(row) > label_col else ""
        where = f"{path.name} line {line}"
        if not name:
            raise DecorrError(f"{where} names no image file; give filename,label")
        if not label:
            raise DecorrError(f"{where}: image {name} has no label; give filename,label")
        file = _resolve(name, path.parent)
        if file is None:
            raise DecorrError(f"{where}: image {name} not found in {path.parent} or {path.parent / 'images'}; "
                              "fix the name or add the file")
        if file in seen:
            raise DecorrError(f"{where}: image {name} is listed twice (first on line {seen[file]}); list it once")
        seen[file] = line
        if class_map is not None:
            if label not in class_map:
                raise DecorrError(f"{where}: label {label!r} of image {name} is not in the class map {map_name}; add "
                                  "it to the map or fix the label")
            value = class_map[label]
        else:
            if not re.fullmatch(r"[+-]?\d+", label):
                raise DecorrError(f"{where}: label {label!r} of image {name} is not an integer; give class indices "
                                  "or a class map (--class-map FILE)")
            value = int(label) + label_offset
            if value < 0:
                raise DecorrError(f"{where}: label {label} of image {name} is negative after --label-offset "
                                  f"{label_offset}; labels must be class indices 0..K-1")
        files.append(file)
        labels.append(value)
    return files, labels


def _label_file_in(root: Path) -> Path | None:
    found = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in LABEL_SUFFIXES)
    if len(found) > 1:
        preferred = [p for name in LABEL_FILE_NAMES for p in found if p.name.lower() == name]
        if not preferred:
            raise DecorrError(f"{root} holds several labels files ({', '.join(p.name for p in found)}); pass the "
                              "one to use as --dataset PATH.csv")
        return preferred[0]
    return found[0] if found else None


def load_image_folder(path: str | os.PathLike, *, image_size: int | None = None, resize: int | None = None,
                      class_map: str | os.PathLike | None = None, label_offset: int = 0,
                      memory_budget_mb: float | None = None, workers: int | None = None) -> ImageDataset:
    """An image folder (or labels file) as a dataset whose test split holds its images.

    ``image_size``/``resize``: torchvision's ``Resize(resize or image_size)`` + ``CenterCrop(image_size)``
    (None: images kept at their size, which must then be one). The split is in memory (uint8) when it fits
    ``memory_budget_mb`` (default ``DEFAULT_MEMORY_BUDGET_MB``), else streamed by ``workers`` DataLoader
    workers (:class:`decorr.data.stream.StreamedSplit`).
    """
    root = Path(os.path.expanduser(str(path)))
    if resize is not None and image_size is None:
        raise DecorrError("--resize needs --image-size (the centre crop after resizing)")
    mapping = read_class_map(class_map) if class_map is not None else None
    map_name = str(class_map or "")
    labels_file = root if root.is_file() else _label_file_in(root)
    if labels_file is not None:
        if label_offset and mapping is not None:
            raise DecorrError("--label-offset and --class-map do not combine; put the indices into the map")
        files, labels = read_label_file(labels_file, mapping, map_name, label_offset)
        largest = max(labels)
        num_classes = max(mapping.values()) + 1 if mapping is not None else largest + 1
        folder = labels_file.parent
    else:
        if label_offset:
            raise DecorrError("--label-offset applies to a labels .csv, not to class subfolders; use --class-map")
        files, labels, num_classes = find_images_by_class(root, mapping, map_name)
        folder = root
    decoder = probe_images(files, image_size, resize)
    test = file_split(files, labels, decoder, memory_budget_mb=memory_budget_mb, workers=workers,
                      source=str(labels_file or root))
    train = ImageSplit(torch.empty((0, *decoder.shape), dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
    return ImageDataset(folder.name or str(folder), train, test, num_classes, source=str(labels_file or root))
