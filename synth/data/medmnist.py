"""MedMNIST `.npz` files: `{train,val,test}_{images,labels}`.

Named MedMNIST sets are looked up in the data directory (`synth.data.locate.data_dir`); when missing and the network
is reachable, the file is downloaded from MedMNIST's Zenodo record and its published md5 checked before use.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from synth.artifacts import atomic_file, sha256_file
from synth.data.canonical import SPLITS
from synth.data.limits import check_npz_size
from synth.data.locate import ENV_VAR, data_dir
from synth.data.sources import SourceData
from synth.errors import InputError, where

MEDMNIST_LICENSE = "CC BY 4.0"
# Without class names, labels 0..max become the classes: a stray huge label must not create millions of them.
MAX_CLASSES = 1000
MEDMNIST_ATTRIBUTION = "MedMNIST v2 (Yang et al., Scientific Data 2023)"


@dataclass(frozen=True)
class MedMNISTInfo:
    """A MedMNIST set we know how to fetch and describe."""

    name: str
    url: str
    md5: str
    class_names: tuple[str, ...]
    original_source: str


KNOWN: dict[str, MedMNISTInfo] = {
    "pneumoniamnist": MedMNISTInfo(
        name="pneumoniamnist",
        url="https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1",
        md5="28209eda62fecd6e6a2d98b1501bb15f",
        class_names=("normal", "pneumonia"),
        original_source="Kermany et al., Cell 2018 (pediatric chest X-rays)",
    ),
}


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def resolve(name_or_path: str) -> Path:
    """A path to an existing `.npz`, or a known MedMNIST name resolved in the data dir (downloading if needed)."""
    path = Path(name_or_path).expanduser()
    if path.exists() or path.suffix == ".npz" or "/" in name_or_path:
        return path
    key = name_or_path.lower()
    if key not in KNOWN:
        raise InputError(where(name_or_path, f"no such file, and not a known MedMNIST set ({', '.join(KNOWN)})"))
    target = data_dir() / f"{key}.npz"
    if not target.exists():
        download(KNOWN[key], target)
    return target


def download(info: MedMNISTInfo, target: Path, *, timeout: float = 60.0) -> Path:
    """Download a MedMNIST file atomically and check its published md5."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(target) as tmp:
            # Zenodo rejects script traffic that claims to be a browser; a plain agent works.
            request = urllib.request.Request(info.url, headers={"User-Agent": "synthgate"})
            with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as f:
                while block := response.read(1 << 20):
                    f.write(block)
            got = md5_file(tmp)
            if got != info.md5:
                raise InputError(where(info.url, f"downloaded file has md5 {got}, expected {info.md5}"))
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise InputError(
            where(
                target,
                f"missing and could not be downloaded ({e.__class__.__name__}); put {target.name} there "
                f"or set {ENV_VAR} to the folder holding it",
            )
        ) from None
    return target


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise InputError(where(path, "no such file"))
    if not path.is_file():
        raise InputError(where(path, "is not a file"))
    if path.stat().st_size == 0:
        raise InputError(where(path, "is empty (0 bytes)"))
    with open(path, "rb") as f:
        magic = f.read(6)
    if not magic.startswith(b"PK\x03\x04"):
        # np.load would try to unpickle anything that is neither zip nor .npy: check the signature ourselves.
        what = "a single .npy array" if magic == b"\x93NUMPY" else "not a zip archive"
        raise InputError(where(path, f"is not a valid .npz archive ({what})"))
    # Sizes come from the arrays' headers, before anything is decompressed: a bomb is refused, not expanded.
    check_npz_size(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, EOFError) as e:
        raise InputError(where(path, f"is not a valid .npz archive (truncated or corrupt: {e})")) from None
    except ValueError as e:
        msg = str(e).splitlines()[0]
        if "pickle" in msg.lower():
            msg = "holds pickled objects, which are not loaded for safety"
        raise InputError(where(path, f"cannot be read as .npz ({msg})")) from None
    except OSError as e:
        raise InputError(where(path, f"cannot be read ({e.strerror or e})")) from None


def check_image_array(path: Path, key: str, images: np.ndarray) -> None:
    """Refuse image arrays ingest cannot represent faithfully: wrong rank, empty images, non-real dtypes."""
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise InputError(where(path, f"{key} has shape {images.shape}; expected N×H×W or N×H×W×{{1,3}}"))
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise InputError(where(path, f"{key} has shape {images.shape}: images without pixels"))
    # Only real numbers are pixels: complex values would lose their imaginary part in a silent cast.
    if images.dtype.kind not in "uif":
        raise InputError(where(path, f"{key} has dtype {images.dtype}; expected integer or real float pixels"))


def _to_uint8(path: Path, key: str, images: np.ndarray) -> np.ndarray:
    check_image_array(path, key, images)
    if images.size == 0:  # an empty split: nothing to scale (min/max of nothing is undefined)
        return images.astype(np.uint8)
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating):
        bad = int((~np.isfinite(images)).reshape(len(images), -1).any(axis=1).sum())
        if bad:
            raise InputError(where(path, f"{key} has {bad} image(s) with NaN or infinite values"))
        lo, hi = float(images.min()), float(images.max())
        # Float MedMNIST-style arrays are either in [0, 1] or already in [0, 255].
        scale = 255.0 if hi <= 1.0 and lo >= 0.0 else 1.0
        images = images * scale
    lo, hi = float(images.min()), float(images.max())
    if lo < 0 or hi > 255:
        raise InputError(where(path, f"{key} values span [{lo:g}, {hi:g}], outside 0..255"))
    return np.rint(images).astype(np.uint8)


def read_medmnist(
    source: str | Path, *, class_names: list[str] | None = None, splits: tuple[str, ...] = SPLITS
) -> SourceData:
    """Read a MedMNIST `.npz` (or a known set's name) into `SourceData`."""
    path = resolve(str(source))
    arrays = _load_arrays(path)
    info = KNOWN.get(path.stem.lower())
    present = [s for s in splits if f"{s}_images" in arrays or f"{s}_labels" in arrays]
    missing = [f"{s}_{kind}" for s in splits for kind in ("images", "labels") if f"{s}_{kind}" not in arrays]
    if missing:
        raise InputError(where(path, f"missing arrays {missing}; expected {{train,val,test}}_{{images,labels}}"))

    images, frames = [], []
    for split in present:
        imgs = _to_uint8(path, f"{split}_images", arrays[f"{split}_images"])
        labels = arrays[f"{split}_labels"]
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise InputError(where(path, f"{split}_labels has shape {labels.shape}; multi-label sets unsupported"))
        if len(labels) != len(imgs):
            raise InputError(where(path, f"{split} has {len(imgs)} images but {len(labels)} labels"))
        integral = np.issubdtype(labels.dtype, np.integer) or (
            np.issubdtype(labels.dtype, np.floating)
            and bool(np.all(np.isfinite(labels)))
            and bool(np.all(labels == np.round(labels)))
        )
        if not integral:
            raise InputError(where(path, f"{split}_labels are not integers ({labels.dtype})"))
        images.append(imgs)
        frames.append(
            pd.DataFrame(
                {
                    "image_id": [f"{split}-{i:05d}" for i in range(len(imgs))],
                    "split": split,
                    "label": labels.astype(np.int64),
                }
            )
        )
    if sum(len(im) for im in images) == 0:
        raise InputError(where(path, "holds no images (every split is empty)"))
    shapes = {im.shape[1:] for im in images}
    if len(shapes) != 1:
        raise InputError(where(path, f"splits have different image shapes {sorted(shapes)}"))
    metadata = pd.concat(frames, ignore_index=True)

    names = list(class_names or (info.class_names if info else []))
    labels = metadata["label"]
    if not names:
        top = int(labels.max())
        if top >= MAX_CLASSES:
            raise InputError(where(path, f"label {top} implies {top + 1} classes; at most {MAX_CLASSES} are "
                                         "supported (pass --classes to name them)"))
        names = [str(i) for i in range(top + 1)]
    bad = sorted(int(v) for v in labels.unique() if not 0 <= v < len(names))
    if bad:
        raise InputError(where(path, f"labels {bad} outside the class list {names} (0..{len(names) - 1})"))

    return SourceData(
        images=np.concatenate(images),
        metadata=metadata,
        class_names=names,
        source={
            "format": "medmnist",
            "file": path.name,
            "sha256": sha256_file(path),
            "name": info.name if info else path.stem,
            "original_source": info.original_source if info else "",
        },
        license=MEDMNIST_LICENSE if info else "unknown",
        attribution=(f"{MEDMNIST_ATTRIBUTION}; {info.original_source}" if info else ""),
    )
