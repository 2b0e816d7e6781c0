"""The privacy audit's inputs, checked before anything is computed or written: the real and synthetic datasets as
image sets (real `train` split = members, `val` + `test` = holdout), the model card, the copy-detection encoder,
and the output paths. Every problem is an `InputError` naming the file."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privacy.audit_config import PrivacyAuditConfig
from privacy.embeddings import Encoder, load_encoder, train_encoder, training_data_id
from privacy.image_set import ImageSet
from synth.artifacts import read_header
from synth.data.canonical import Dataset, image_spec, load_dataset
from synth.errors import InputError, where

MEMBER_SPLIT = "train"
HOLDOUT_SPLITS = ("val", "test")


def dataset_images(ds: Dataset) -> np.ndarray:
    """The dataset's images, checked: readable, uint8 N×H×W[×C], one per metadata row."""
    path = ds.root / "images.npy"
    try:
        images = ds.images
    except (ValueError, OSError, EOFError) as e:
        raise InputError(where(path, f"cannot be read as a numpy array ({e.__class__.__name__}: {e})")) from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise InputError(where(path, f"must hold uint8 N×H×W[×C] images, got {images.dtype} {images.shape}"))
    try:
        n_meta = len(ds.metadata)
    except (ValueError, OSError) as e:
        raise InputError(where(ds.root / "metadata.parquet", f"cannot be read ({e.__class__.__name__})")) from None
    if len(images) != n_meta:
        raise InputError(where(ds.root, f"{len(images)} images but {n_meta} metadata rows"))
    return images


def _image_set(ds: Dataset, images: np.ndarray, splits: tuple[str, ...] | None, name: str) -> ImageSet:
    meta = ds.metadata
    for col in ("image_id", "sha256"):
        if col not in meta.columns:
            raise InputError(where(ds.root / "metadata.parquet", f"has no {col!r} column"))
    mask = np.ones(len(meta), dtype=bool) if splits is None else meta["split"].isin(splits).to_numpy()
    return ImageSet.from_frame(np.asarray(images[mask]), meta[mask].reset_index(drop=True), name=name)


def _spec_text(spec: Mapping[str, Any]) -> str:
    return f"{spec['height']}×{spec['width']}×{spec['channels']} (H×W×C)"


@dataclass(frozen=True)
class AuditInputs:
    """The checked inputs of one audit: both datasets, their image sets, and the model card (when a model is given)."""

    real: Dataset
    synthetic: Dataset
    train: ImageSet
    holdout: ImageSet
    synth: ImageSet
    model_hash: str | None
    model_card: dict[str, Any] | None


def real_sets(real: Dataset, real_images: np.ndarray, real_dir: Path) -> tuple[ImageSet, ImageSet]:
    """The real dataset's members (train split) and holdout (val + test) image sets, neither empty."""
    train = _image_set(real, real_images, (MEMBER_SPLIT,), "real train split")
    if not len(train):
        raise InputError(where(real_dir, f"has no {MEMBER_SPLIT!r} split (the members the audit protects)"))
    holdout = _image_set(real, real_images, HOLDOUT_SPLITS, "real holdout (val+test)")
    if not len(holdout):
        raise InputError(where(real_dir, "has no holdout images (val or test split) to calibrate thresholds on"))
    return train, holdout


def load_inputs(real_dir: Path, synthetic_dir: Path, model_dir: Path | None) -> AuditInputs:
    """Load and check both datasets (and the model card): readable images of one shape, splits present."""
    real, synthetic = load_dataset(real_dir), load_dataset(synthetic_dir)
    real_images, synth_images = dataset_images(real), dataset_images(synthetic)
    if not len(synth_images):
        raise InputError(where(synthetic_dir, "the synthetic dataset holds no images"))
    check_image_spec(synthetic_dir, image_spec(synth_images), image_spec(real_images))
    train, holdout = real_sets(real, real_images, real_dir)
    synth = _image_set(synthetic, synth_images, None, "synthetic")
    model_hash, card = None, None
    if model_dir is not None:
        card = read_header(Path(model_dir), "model_card.json", kind="model")
        model_hash = str(card["content_hash"])
    return AuditInputs(real, synthetic, train, holdout, synth, model_hash, card)


def check_image_spec(synthetic_dir: Path, synth_spec: Mapping[str, Any], real_spec: Mapping[str, Any]) -> None:
    """The synthetic images have the real images' height, width and channels."""
    if (real_spec["height"], real_spec["width"], real_spec["channels"]) != (
        synth_spec["height"], synth_spec["width"], synth_spec["channels"]
    ):
        raise InputError(where(synthetic_dir, f"synthetic images are {_spec_text(synth_spec)} but the real images "
                                              f"are {_spec_text(real_spec)}"))


def audit_encoder(config: PrivacyAuditConfig, real: Dataset, train: ImageSet) -> tuple[Encoder, bool]:
    """The copy-detection encoder: trained here on the real training split (`True`), or the saved one of
    `config.encoder_dir`, checked to be trained on this dataset's training split (`False`)."""
    data_hash = training_data_id(real.content_hash, MEMBER_SPLIT)
    if config.encoder_dir is None:
        return train_encoder(train.images, config.encoder, data_hash=data_hash), True
    enc = load_encoder(config.encoder_dir)
    trained_on = enc.meta.get("trained_on", {}).get("data_hash")
    if trained_on != data_hash:
        raise InputError(where(config.encoder_dir, f"encoder was trained on {trained_on!r}, not on this real "
                                                   f"dataset's training split ({data_hash!r})"))
    return enc, False


def check_outputs(out: Path, filter_out: Path | None) -> None:
    """The output directories do not exist yet, their parents do, and they differ."""
    for path, what in ((out, "--out"), (filter_out, "--filter")):
        if path is None:
            continue
        if Path(path).exists():
            raise InputError(where(path, f"already exists; choose another {what} or remove it"))
        if not Path(path).parent.is_dir():
            raise InputError(where(Path(path).parent, f"{what}'s parent directory does not exist"))
    if filter_out is not None and Path(filter_out).resolve() == Path(out).resolve():
        raise InputError(where(filter_out, "--filter and --out must be different directories"))
