"""The training data: a canonical dataset's train split as tensors with condition indices, and the DataLoader
that feeds the trainer (`make_loader`, the one place batches are drawn)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from synth.conditioning import ConditionSpace
from synth.data.canonical import load_dataset
from synth.errors import ConfigError, InputError, where
from synth.model import ModelConfig
from synth.model import preset as model_preset
from synth.train_config import TrainConfig

# A categorical attribute with more values than this is almost certainly continuous (age in years, an ID):
# bin it before conditioning on it, or the joint condition space explodes.
MAX_ATTRIBUTE_VALUES = 32
MAX_CONDITIONS = 512


@dataclass(frozen=True)
class TrainingData:
    """The train split as tensors, plus what the model card needs to describe it."""

    images: torch.Tensor  # uint8 N×C×H×W pixels, or float32 scaled latents (synth.latent_training)
    conditions: torch.Tensor  # int64 N
    space: ConditionSpace
    dataset_hash: str
    image: dict[str, int]  # height, width, channels
    condition_counts: list[int]
    license: str = "unknown"  # of the training data; generated sets inherit it (with its attribution)
    attribution: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])


class ImageConditionDataset(torch.utils.data.Dataset):
    """(image float C×H×W in [-1, 1], condition index int64) pairs from uint8 images (kept uint8 in memory), or
    from float latents (returned as they are)."""

    def __init__(self, images: torch.Tensor, conditions: torch.Tensor):
        self.images = images
        self.conditions = conditions

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index]
        if x.dtype.is_floating_point:
            return x, self.conditions[index]
        return x.float().div_(127.5).sub_(1.0), self.conditions[index]


def auto_attributes(meta: pd.DataFrame, candidates: list[str]) -> tuple[str, ...]:
    """The dataset attributes worth conditioning on by default: no missing values, at most MAX_ATTRIBUTE_VALUES
    distinct values, and a joint label × attribute space within MAX_CONDITIONS (attributes taken in order)."""
    chosen: list[str] = []
    combos = max(int(meta["label"].nunique()), 1)
    for name in candidates:
        if name not in meta.columns or meta[name].isna().any():
            continue
        distinct = int(meta[name].astype(str).nunique())
        if 1 < distinct <= MAX_ATTRIBUTE_VALUES and combos * distinct <= MAX_CONDITIONS:
            chosen.append(name)
            combos *= distinct
    return tuple(chosen)


def load_training_data(dataset_dir: Path, attributes: tuple[str, ...] | str = ()) -> TrainingData:
    """Load the **train split** of a canonical dataset and encode each image's condition index.

    `attributes="auto"` conditions on the dataset's usable categorical attributes (`auto_attributes`)."""
    dataset_dir = Path(dataset_dir)
    ds = load_dataset(dataset_dir)
    images, meta = ds.split("train")
    n = len(meta)
    if n == 0:
        splits = sorted(ds.metadata["split"].unique())
        raise InputError(where(dataset_dir, f"has no 'train' split to train on (splits: {splits})"))
    class_names = ds.class_names
    labels = meta["label"].to_numpy()
    if attributes == "auto":
        attributes = auto_attributes(meta, list(ds.header.get("attributes") or []))
    bad = sorted({int(v) for v in labels if not 0 <= v < len(class_names)})
    if bad:
        raise InputError(where(dataset_dir, f"train labels {bad[:5]} outside 0..{len(class_names) - 1}"))
    for name in attributes:
        if name not in meta.columns:
            known = ds.header.get("attributes") or []
            raise ConfigError(where(dataset_dir, f"has no attribute column {name!r} to condition on (has {known})"))
        missing = int(meta[name].isna().sum())
        if missing:
            raise ConfigError(
                where(dataset_dir, f"attribute {name!r} is missing for {missing} of {n} train images; fill or drop")
            )
        distinct = meta[name].astype(str).nunique()
        if distinct > MAX_ATTRIBUTE_VALUES:
            raise ConfigError(
                where(
                    dataset_dir,
                    f"attribute {name!r} has {distinct} distinct values (max {MAX_ATTRIBUTE_VALUES}); bin it first",
                )
            )
    space = ConditionSpace.from_metadata(meta, class_names, attributes)
    if space.num_conditions > MAX_CONDITIONS:
        raise ConfigError(
            where(dataset_dir, f"{space.num_conditions} label×attribute conditions (max {MAX_CONDITIONS})")
        )
    conditions = space.encode_frame(meta)
    tensor = _nchw(images)
    return TrainingData(
        images=tensor,
        conditions=torch.from_numpy(conditions.astype(np.int64)),
        space=space,
        dataset_hash=ds.content_hash,
        image={"height": int(tensor.shape[2]), "width": int(tensor.shape[3]), "channels": int(tensor.shape[1])},
        condition_counts=np.bincount(conditions, minlength=space.num_conditions).tolist(),
        license=str(ds.header.get("license", "unknown")),
        attribution=str(ds.header.get("attribution", "")),
    )


def load_split_images(dataset_dir: Path, split: str, *, limit: int) -> torch.Tensor | None:
    """Up to `limit` images of `split` as uint8 N×C×H×W (in the dataset's order), or None when it has none."""
    images, _ = load_dataset(Path(dataset_dir)).split(split)
    return _nchw(images[:limit]) if len(images) else None


def _nchw(images: np.ndarray) -> torch.Tensor:
    """Canonical uint8 N×H×W or N×H×W×C pixels as a uint8 N×C×H×W tensor."""
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    return tensor.unsqueeze(1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2).contiguous()


def model_config_for(data: TrainingData, preset_name: str, *, where_: Path) -> ModelConfig:
    """The UNet preset for the data's image size, channels and number of conditions."""
    height, width, channels = data.image["height"], data.image["width"], data.image["channels"]
    if height != width:
        raise InputError(where(where_, f"images are {height}×{width}; the UNet presets need square images"))
    try:
        return model_preset(
            preset_name, sample_size=height, channels=channels, num_conditions=data.space.num_conditions
        )
    except (ConfigError, ValueError) as e:  # pydantic wraps validator errors in a ValueError subclass
        raise ConfigError(where(where_, str(e).splitlines()[0])) from None



def class_balance_weights(labels: np.ndarray, power: float) -> torch.Tensor:
    """Per-example sampling weights n_c^-power for class counts n_c (power 0: uniform over examples, 1: uniform
    over the classes present)."""
    counts = np.bincount(labels)
    return torch.from_numpy(counts[labels].astype(np.float64) ** -power)


def make_loader(data: TrainingData, config: TrainConfig, generator: torch.Generator) -> DataLoader:
    """The trainer's DataLoader: shuffled by `generator` (the data-order stream), fixed-size batches. A privacy
    strategy replaces its sampler with Poisson sampling at rate 1/len(loader) (`PrivacyStrategy.attach`).

    With `config.class_balance` > 0 (non-private runs) batches are drawn with replacement, an example of class c
    with weight n_c^-class_balance, so that rare classes are seen more often. Why: with one class at 1% of the data
    a few hundred steps show its embedding a few hundred examples in all and the generator never learns that
    class's condition; the released set is generated per class anyway, so the model needs p(image | class) for
    every class, not the data's class prior."""
    dataset = ImageConditionDataset(data.images, data.conditions)
    sampler = None
    if config.class_balance == "auto":
        raise ConfigError("train config: class_balance 'auto' reached the loader unresolved "
                          "(synth.train_config.resolve_class_balance)")
    if config.class_balance > 0:
        labels = data.space.labels_of(data.conditions.numpy())
        sampler = torch.utils.data.WeightedRandomSampler(
            class_balance_weights(labels, config.class_balance), num_samples=len(data), replacement=True,
            generator=generator,
        )
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,  # fixed-size batches; the dropped remainder differs every epoch
        generator=generator if sampler is None else None,
        num_workers=config.num_workers,
    )
