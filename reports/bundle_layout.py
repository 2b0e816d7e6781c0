"""Where things go in a release bundle: one definition shared by the writer, the card and the Croissant file.

    BUNDLE/
      README.md                     Hugging Face dataset card (YAML header: configs, features with class names)
      datasheet.md                  Datasheet for Datasets (Gebru et al.)
      croissant.json                Croissant 1.1 + RAI metadata
      data/train/metadata.csv       file_name, label (int), image_id, attribute columns
      data/train/<NN>_<slug>/syn-<index>.png   one PNG per synthetic image, one folder per class
      report/                       the public audit report and JSON summaries (when given)

Class folders are named `<label index, zero-padded>_<slug of the class name>` so that a sorted listing of the
folders is label order: torchvision's `ImageFolder`, which sorts folder names to assign indices, then gives
every image its true label. Hugging Face `imagefolder` ignores folder names when `metadata.csv` exists and reads
`label` from it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

DATA_DIR = "data"
SPLIT = "train"
SPLIT_DIR = f"{DATA_DIR}/{SPLIT}"
METADATA_CSV = f"{SPLIT_DIR}/metadata.csv"
PNG_GLOB = f"{SPLIT_DIR}/*/*.png"
README = "README.md"
DATASHEET = "datasheet.md"
CROISSANT = "croissant.json"
REPORT_DIR = "report"
IMAGE_PREFIX = "syn-"


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:40] or "class"


def class_folder_names(class_names: Sequence[str]) -> list[str]:
    """Folder name per label index; sorted(folders) == folders, so ImageFolder's indices equal the labels."""
    width = len(str(max(len(class_names) - 1, 0)))
    return [f"{i:0{width}d}_{_slug(name)}" for i, name in enumerate(class_names)]


def image_file_name(index: int, total: int) -> str:
    """`syn-000123.png`: zero-padded (at least 6 digits) so names sort in generation order."""
    width = max(6, len(str(max(total - 1, 0))))
    return f"{IMAGE_PREFIX}{index:0{width}d}.png"


def imagefolder_indices(folders: Sequence[str]) -> dict[str, int]:
    """torchvision ImageFolder's rule (without torchvision): sorted folder names -> 0, 1, 2, ..."""
    return {name: i for i, name in enumerate(sorted(folders))}
