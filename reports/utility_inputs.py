"""The utility audit's inputs (`reports.utility`): both datasets opened, checked against each other, with their
splits in memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from synth.data.canonical import SPLITS, Dataset, load_dataset
from synth.errors import InputError, where

SYNTHETIC_SPLIT = "synthetic"


@dataclass(frozen=True)
class Split:
    images: np.ndarray
    metadata: pd.DataFrame

    @property
    def labels(self) -> np.ndarray:
        return self.metadata["label"].to_numpy(dtype=np.int64)


@dataclass(frozen=True)
class AuditInputs:
    """Both datasets, checked against each other, with their splits in memory."""

    real: Dataset
    synthetic: Dataset
    class_names: list[str]
    train: Split
    val: Split
    test: Split
    synth: Split
    synthetic_split: str  # "synthetic", or "all" when the set has no rows marked synthetic

    @property
    def image(self) -> dict[str, int]:
        return image_shape(self.train.images)


def image_shape(images: np.ndarray) -> dict[str, int]:
    """Height, width and channels of an N×H×W[×C] array."""
    return {"height": int(images.shape[1]), "width": int(images.shape[2]),
            "channels": 1 if images.ndim == 3 else int(images.shape[3])}


def load_audit_inputs(real_dir: Path, synthetic_dir: Path) -> AuditInputs:
    """Open both datasets and check they can be compared; every problem is one-line `InputError`."""
    real_dir, synthetic_dir = Path(real_dir), Path(synthetic_dir)
    real, syn = load_dataset(real_dir), load_dataset(synthetic_dir)
    names = real.class_names
    if len(names) < 2:
        raise InputError(where(real_dir, f"needs at least two classes to audit utility, has {names}"))
    if syn.class_names != names:
        raise InputError(where(synthetic_dir, f"class names {syn.class_names} differ from the real set's {names}"))

    counts = real.metadata["split"].value_counts()
    missing = [s for s in SPLITS if counts.get(s, 0) == 0]
    if missing:
        found = ", ".join(f"{s}={n}" for s, n in counts.items()) or "no images"
        raise InputError(where(real_dir, f"real set needs train/val/test splits; missing {', '.join(missing)} "
                                         f"(found {found})"))
    splits = {s: Split(*real.split(s)) for s in SPLITS}

    meta = syn.metadata
    marked = (meta["split"] == SYNTHETIC_SPLIT).to_numpy()
    mask = marked if marked.any() else np.ones(len(meta), dtype=bool)
    if not mask.any():
        raise InputError(where(synthetic_dir, "synthetic set is empty (0 images)"))
    synth = Split(np.asarray(syn.images[mask]), meta[mask].reset_index(drop=True))

    spec_r, spec_s = image_shape(splits["train"].images), image_shape(synth.images)
    if spec_r != spec_s:
        raise InputError(where(synthetic_dir, f"images are {spec_s['height']}×{spec_s['width']}×"
                                              f"{spec_s['channels']} (H×W×C) but the real set's are "
                                              f"{spec_r['height']}×{spec_r['width']}×{spec_r['channels']}"))

    k = len(names)
    for split_name, where_dir, split, need_all in (
        ("train", real_dir, splits["train"], True),
        ("synthetic", synthetic_dir, synth, True),
        ("val", real_dir, splits["val"], False),
        ("test", real_dir, splits["test"], False),
    ):
        labels = split.labels
        bad = labels[(labels < 0) | (labels >= k)]
        if len(bad):
            raise InputError(where(where_dir, f"{split_name} label {int(bad[0])} is outside 0..{k - 1}"))
        absent = [names[c] for c in range(k) if not (labels == c).any()]
        if need_all and absent:
            raise InputError(where(where_dir, f"{split_name} set has no images of class(es) {absent}"))
        if not need_all and k - len(absent) < 2:
            raise InputError(where(where_dir, f"{split_name} split needs images of at least two classes "
                                              f"(missing {absent})"))
    return AuditInputs(real=real, synthetic=syn, class_names=names, train=splits["train"], val=splits["val"],
                       test=splits["test"], synth=synth,
                       synthetic_split=SYNTHETIC_SPLIT if marked.any() else "all")


def attribute_groups(ds: Dataset, meta: pd.DataFrame) -> dict[str, np.ndarray]:
    """Subgroups: the dataset's categorical attributes, never a generator's per-image columns (seed, sampler...)."""
    bookkeeping = set(ds.info.generation_columns)
    attrs = [a for a in ds.info.attributes if a in meta.columns and a not in bookkeeping]
    return {a: meta[a].to_numpy() for a in attrs}
