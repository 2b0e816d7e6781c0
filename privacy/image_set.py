"""The images the memorization check compares: one set (training, holdout or synthetic) and its input checks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from synth.errors import InputError


@dataclass(frozen=True)
class ImageSet:
    """Images (uint8 N×H×W[×C]) with their ids, pixel hashes and (optionally) labels."""

    images: np.ndarray
    ids: np.ndarray
    sha256: np.ndarray
    labels: np.ndarray | None = None
    name: str = "images"

    @classmethod
    def from_frame(cls, images: np.ndarray, metadata: pd.DataFrame, *, name: str = "images") -> ImageSet:
        if len(images) != len(metadata):
            raise InputError(f"{name}: {len(images)} images but {len(metadata)} metadata rows")
        labels = metadata["label"].to_numpy() if "label" in metadata.columns else None
        return cls(
            images=np.asarray(images),
            ids=metadata["image_id"].astype(str).to_numpy(),
            sha256=metadata["sha256"].astype(str).to_numpy(),
            labels=labels,
            name=name,
        )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def spec(self) -> tuple[int, int, int]:
        im = self.images
        return int(im.shape[1]), int(im.shape[2]), 1 if im.ndim == 3 else int(im.shape[3])


def check_images(s: ImageSet) -> None:
    """`s` holds at least one uint8 N×H×W[×C] image."""
    if s.images.dtype != np.uint8 or s.images.ndim not in (3, 4):
        raise InputError(f"{s.name}: expected uint8 N×H×W[×C] images, got {s.images.dtype} {s.images.shape}")
    if len(s) == 0:
        raise InputError(f"{s.name}: no images")


def check_spec(s: ImageSet, spec: tuple[int, int, int]) -> None:
    """`s`'s images are H×W×C = `spec` (the training images')."""
    if s.spec != spec:
        raise InputError(
            f"{s.name}: images are {s.spec[0]}×{s.spec[1]}×{s.spec[2]} (H×W×C) but the training images are "
            f"{spec[0]}×{spec[1]}×{spec[2]}"
        )


def check_sets(train: ImageSet, holdout: ImageSet, synthetic: ImageSet) -> None:
    """All three sets hold images, and holdout and synthetic images have the training images' shape."""
    for s in (train, holdout, synthetic):
        check_images(s)
    for s in (holdout, synthetic):
        check_spec(s, train.spec)
