"""Planted-copy harness: does the memorization check find copies of training images, and leave other images alone?

A test and benchmark harness, not part of the product: tests/test_planted.py runs it on a slice, and
benchmarks/bench_memorization.py on the full data (the table in benchmarks/README.md). The edits (`apply_transform`)
also plant copies in other memorization tests.

Real TRAINING images are edited the way a copier (or a memorising generator) would and planted into a synthetic
set; recall per edit is the share of planted copies the check flags. The false-flag rate is the share of *clean*
images flagged. Without a trained generator the clean set is real images that are not training images: the
dataset's holdout splits (images pixel-identical to a training image are dropped and counted). The false-flag rate
is measured out of sample by cross-fitting: thresholds calibrated on `val` judge the `test` images and thresholds
calibrated on `test` judge the `val` images, so no clean image helps choose the thresholds that judge it (and
all of them count). Calibrating on val+test and judging test, as a shortcut, would give ≈ the quantile by
construction.

Edits (8-bit images, grey levels 0–255; "target" edits are the mild ones the check must catch, >= 99% recall):

    exact          the training image itself                                        target
    hflip          mirror image                                                     target
    shift1/shift2  translation by 1 / 2 px (random direction, diagonals included;  target
                   edge pixels replicated)
    noise          Gaussian noise, σ = 5 grey levels (≈2% of the range)             target
    brighter/darker  ±20 grey levels (≈8%)                                          target
    contrast_up/contrast_down  ×1.25 / ×0.8 around the image mean                  target
    crop_resize    random 24×24 crop (6/7 of the side) resized back to 28×28        target
    noise_strong   σ = 10 grey levels                                               stress (reported, no target)
    crop_strong    random 20×20 crop resized back (a 1.4× zoom)                     stress
    rotate5        rotation by ±5°                                                  stress
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from privacy.embeddings import EmbeddingSpace
from privacy.image_set import ImageSet
from privacy.memorization import check_memorization
from privacy.memorization_config import SPACES, MemorizationConfig
from synth.data.canonical import load_dataset, pixel_sha256
from synth.errors import ConfigError, InputError, where

Edit = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def shift(images: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Translate each image by its integer (dx, dy) pixels, replicating edge pixels into the gap."""
    pad = int(max(np.abs(dx).max(initial=0), np.abs(dy).max(initial=0)))
    n, h, w = images.shape[:3]
    widths = [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (images.ndim - 3)
    padded = np.pad(images, widths, mode="edge")
    out = np.empty_like(images)
    for i in range(n):
        y0, x0 = pad - int(dy[i]), pad - int(dx[i])
        out[i] = padded[i, y0 : y0 + h, x0 : x0 + w]
    return out


def _random_shift(n_px: int) -> Edit:
    def edit(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ring = [
            (dx, dy) for dx in range(-n_px, n_px + 1) for dy in range(-n_px, n_px + 1) if max(abs(dx), abs(dy)) == n_px
        ]
        pick = rng.integers(0, len(ring), len(images))
        d = np.asarray(ring)[pick]
        return shift(images, d[:, 0], d[:, 1])

    return edit


def _torch_images(images: np.ndarray):
    import torch

    x = torch.from_numpy(np.asarray(images, dtype=np.float32))
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def _from_torch(x, like: np.ndarray) -> np.ndarray:
    out = x.numpy()
    return _to_uint8(out[:, 0] if like.ndim == 3 else out.transpose(0, 2, 3, 1))


def crop_resize(images: np.ndarray, rng: np.random.Generator, *, fraction: float) -> np.ndarray:
    """A random crop of `fraction` of each side, resized back to full size (bilinear)."""
    import torch
    import torch.nn.functional as F

    n, h, w = images.shape[:3]
    ch, cw = round(h * fraction), round(w * fraction)
    oy, ox = rng.integers(0, h - ch + 1, n), rng.integers(0, w - cw + 1, n)
    crops = np.stack([images[i, oy[i] : oy[i] + ch, ox[i] : ox[i] + cw] for i in range(n)])
    with torch.no_grad():
        out = F.interpolate(_torch_images(crops), size=(h, w), mode="bilinear", align_corners=False)
    return _from_torch(out, images)


def rotate(images: np.ndarray, rng: np.random.Generator, *, degrees: float) -> np.ndarray:
    """Rotation by ±`degrees` (random sign) about the centre, bilinear, edge pixels replicated."""
    import torch
    import torch.nn.functional as F

    n = len(images)
    a = torch.from_numpy(rng.choice([-1.0, 1.0], n) * np.deg2rad(degrees)).float()
    theta = torch.stack(
        [torch.stack([a.cos(), -a.sin(), torch.zeros(n)], 1), torch.stack([a.sin(), a.cos(), torch.zeros(n)], 1)], 1
    )
    x = _torch_images(images)
    with torch.no_grad():
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return _from_torch(out, images)


def _contrast(factor: float) -> Edit:
    def edit(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = images.astype(np.float32)
        axes = tuple(range(1, x.ndim))
        m = x.mean(axis=axes, keepdims=True)
        return _to_uint8((x - m) * factor + m)

    return edit


def _noise(sigma: float) -> Edit:
    def edit(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _to_uint8(images.astype(np.float32) + rng.normal(0.0, sigma, images.shape))

    return edit


def _brightness(delta: float) -> Edit:
    return lambda images, rng: _to_uint8(images.astype(np.float32) + delta)


@dataclass(frozen=True)
class Transform:
    name: str
    description: str
    edit: Edit
    target: bool = True


TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        Transform("exact", "the training image itself", lambda x, rng: x.copy()),
        Transform("hflip", "mirror image", lambda x, rng: np.ascontiguousarray(x[:, :, ::-1])),
        Transform("shift1", "shift 1 px (any direction, edge replicated)", _random_shift(1)),
        Transform("shift2", "shift 2 px (any direction, edge replicated)", _random_shift(2)),
        Transform("noise", "Gaussian noise σ=5/255", _noise(5.0)),
        Transform("brighter", "+20/255 brightness", _brightness(20.0)),
        Transform("darker", "−20/255 brightness", _brightness(-20.0)),
        Transform("contrast_up", "contrast ×1.25 around the mean", _contrast(1.25)),
        Transform("contrast_down", "contrast ×0.8 around the mean", _contrast(0.8)),
        Transform(
            "crop_resize", "random 24/28 crop resized back", lambda x, rng: crop_resize(x, rng, fraction=24 / 28)
        ),
        Transform("noise_strong", "Gaussian noise σ=10/255", _noise(10.0), target=False),
        Transform(
            "crop_strong",
            "random 20/28 crop resized back",
            lambda x, rng: crop_resize(x, rng, fraction=20 / 28),
            target=False,
        ),
        Transform("rotate5", "rotation ±5°", lambda x, rng: rotate(x, rng, degrees=5.0), target=False),
    )
}


def apply_transform(images: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    """Apply the named edit to uint8 images N×H×W[×C]; returns uint8 of the same shape."""
    if name not in TRANSFORMS:
        raise ConfigError(f"planted transform {name!r} is not one of {sorted(TRANSFORMS)}")
    return TRANSFORMS[name].edit(np.asarray(images), rng)


@dataclass
class PlantedResult:
    """Recall per edit (overall and per space), false flags on the clean set, and how it was set up."""

    rows: list[dict[str, Any]]
    false_flag_rate: float
    false_flags_per_space: dict[str, float]
    clean_images: int
    setup: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        target = self.setup["recall_target"]
        return all(r["recall"] >= target for r in self.rows if r["target"]) and (
            self.false_flag_rate <= self.setup["false_flag_target"]
        )

    def markdown(self) -> str:
        """The results as a markdown table (one row per edit, then the clean set)."""
        spaces = self.setup["spaces"]
        head = ["edit", "target", "n", "recall (any)", *(f"recall {s}" for s in spaces), "source found"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [
                r["transform"],
                ">= 0.99" if r["target"] else "stress",
                str(r["n"]),
                f"{r['recall']:.3f}",
                *(f"{r['recall_per_space'][s]:.3f}" for s in spaces),
                f"{r['source_found']:.3f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        cells = [
            "clean (false flags)",
            "<= 0.01",
            str(self.clean_images),
            f"{self.false_flag_rate:.4f}",
            *(f"{self.false_flags_per_space[s]:.4f}" for s in spaces),
            "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def run_planted(
    real_dir: Path,
    *,
    encoder: EmbeddingSpace | None,
    config: MemorizationConfig | None = None,
    per_transform: int = 200,
    transforms: Sequence[str] | None = None,
    folds: Sequence[tuple[str, str]] | None = None,
    holdout_splits: Sequence[str] = ("val", "test"),
    train_split: str = "train",
    seed: int = 0,
    recall_target: float = 0.99,
    false_flag_target: float = 0.01,
) -> PlantedResult:
    """Plant `per_transform` edited copies of random training images per edit among clean real images, run the
    memorization check, and measure recall per edit and the false-flag rate on the clean images.

    Default (`folds=None`): the holdout splits are pooled and split at random into two halves, A and B;
    thresholds calibrated on A judge B and vice versa (2-fold cross-fitting), so every clean image is judged out
    of sample and all of them count. `folds` instead names (calibration split, clean split) pairs, e.g.
    `[("val", "test"), ("test", "val")]` to see how a shift between splits moves the false-flag rate. The same
    planted copies are judged in every fold; recall is their flagged share over all folds.
    """
    config = config or MemorizationConfig()
    names = list(transforms or TRANSFORMS)
    for name in names:
        if name not in TRANSFORMS:
            raise ConfigError(f"planted transform {name!r} is not one of {sorted(TRANSFORMS)}")
    if folds is not None and not folds:
        raise ConfigError("planted-copy harness: give at least one (calibration split, clean split) fold")
    needed = [train_split, *(holdout_splits if folds is None else [s for fold in folds for s in fold])]
    splits = _load_splits(real_dir, needed)
    train = ImageSet.from_frame(*splits[train_split], name="train")
    rng = np.random.default_rng(seed)
    if folds is None:
        folds = _pooled_halves(splits, holdout_splits, rng)
    planted = _plant(train, names, per_transform, rng)
    judged = _judge_folds(train, splits, folds, planted, encoder=encoder, config=config)
    clean = pd.concat(judged.clean_parts, ignore_index=True)
    setup = {
        "train_split": train_split, "train_images": len(train), "folds": judged.fold_info,
        "holdout_splits": list(holdout_splits) if judged.fold_info[0]["calibration_split"] == "holdout-A" else None,
        "per_transform": planted.n, "seed": seed, "spaces": judged.spaces,
        "quantile": config.quantile, "calibration": config.calibration,
        "recall_target": recall_target, "false_flag_target": false_flag_target,
        "false_flags": int(clean["flagged"].sum()),
        "check_seconds": round(judged.seconds, 2),
    }
    return PlantedResult(
        rows=_recall_rows(names, train, planted, judged),
        false_flag_rate=float(clean["flagged"].mean()),
        false_flags_per_space={s: float(clean[f"{s}_flagged"].mean()) for s in judged.spaces},
        clean_images=len(clean),
        setup=setup,
        summary=judged.summary,
    )


def _load_splits(real_dir: Path, needed: Sequence[str]) -> dict[str, tuple[np.ndarray, pd.DataFrame]]:
    """Images and metadata of each needed split of the real dataset (each must hold images)."""
    ds = load_dataset(real_dir)
    splits: dict[str, tuple[np.ndarray, Any]] = {}
    for split in dict.fromkeys(needed):
        images, meta = ds.split(split)
        if not len(images):
            raise InputError(where(real_dir, f"has no {split!r} images for the planted-copy harness"))
        splits[split] = (images, meta)
    return splits


def _pooled_halves(splits: dict[str, tuple[np.ndarray, pd.DataFrame]], holdout_splits: Sequence[str],
                   rng: np.random.Generator) -> list[tuple[str, str]]:
    """Pool the holdout splits and cut them at random into two exchangeable halves, added to `splits` as
    "holdout-A" and "holdout-B"; returns the two cross-fitting folds (A judges B, B judges A)."""
    pooled_images = np.concatenate([splits[s][0] for s in holdout_splits])
    pooled_meta = pd.concat([splits[s][1] for s in holdout_splits], ignore_index=True)
    order = rng.permutation(len(pooled_images))
    halves = (np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :]))
    for name, rows in zip(("holdout-A", "holdout-B"), halves, strict=True):
        splits[name] = (pooled_images[rows], pooled_meta.iloc[rows].reset_index(drop=True))
    return [("holdout-A", "holdout-B"), ("holdout-B", "holdout-A")]


@dataclass(frozen=True)
class _Planted:
    """The planted copies: `n` per edit, edit by edit, with their ids, edits and their sources' pixel hashes."""

    images: np.ndarray
    ids: list[str]
    transforms: np.ndarray
    source_sha: np.ndarray
    n: int


def _plant(train: ImageSet, names: Sequence[str], per_transform: int, rng: np.random.Generator) -> _Planted:
    """Edited copies of `per_transform` random training images per edit (fewer when the training set is smaller)."""
    images, ids, sources, transforms = [], [], [], []
    n = min(per_transform, len(train))
    for name in names:
        src = rng.choice(len(train), n, replace=False)
        images.append(apply_transform(train.images[src], name, rng))
        ids += [f"planted-{name}-{i:05d}" for i in range(n)]
        sources.append(src)
        transforms += [name] * n
    return _Planted(images=np.concatenate(images), ids=ids, transforms=np.asarray(transforms),
                    source_sha=train.sha256[np.concatenate(sources)], n=n)


@dataclass
class _Judged:
    """Per fold: the check's table rows of the planted copies and of the clean images, and what the fold was."""

    planted_parts: list[pd.DataFrame] = field(default_factory=list)
    clean_parts: list[pd.DataFrame] = field(default_factory=list)
    fold_info: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    spaces: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _judge_folds(train: ImageSet, splits: dict[str, tuple[np.ndarray, pd.DataFrame]],
                 folds: Sequence[tuple[str, str]], planted: _Planted, *, encoder: EmbeddingSpace | None,
                 config: MemorizationConfig) -> _Judged:
    """Run the check once per fold: thresholds calibrated on the fold's calibration split judge its clean split
    (minus images pixel-identical to a training image) with the planted copies among them."""
    out = _Judged()
    for calibration_split, clean_split in folds:
        holdout = ImageSet.from_frame(*splits[calibration_split], name=calibration_split)
        clean_images, clean_meta = splits[clean_split]
        leaked = clean_meta["sha256"].isin(set(train.sha256)).to_numpy()  # a training image is not "clean"
        clean_images, clean_meta = clean_images[~leaked], clean_meta[~leaked].reset_index(drop=True)
        synth_images = np.concatenate([clean_images, planted.images])
        ids = np.concatenate([clean_meta["image_id"].astype(str).to_numpy(),
                              np.asarray(planted.ids, dtype=object)])
        synthetic = ImageSet(images=synth_images, ids=ids, sha256=np.asarray(pixel_sha256(synth_images)),
                             name="synthetic")
        t0 = time.perf_counter()
        result = check_memorization(train, holdout, synthetic, encoder=encoder, config=config)
        out.seconds += time.perf_counter() - t0
        out.spaces = [s for s in SPACES if s in result.summary["spaces"]]
        n_clean = len(clean_images)
        out.clean_parts.append(result.table.iloc[:n_clean])
        out.planted_parts.append(result.table.iloc[n_clean:].reset_index(drop=True))
        out.summary[f"{calibration_split}->{clean_split}"] = result.summary
        out.fold_info.append({"calibration_split": calibration_split, "calibration_images": len(holdout),
                              "clean_split": clean_split, "clean_images": n_clean,
                              "clean_dropped_as_training_copies": int(leaked.sum()),
                              "thresholds": result.summary["thresholds"],
                              "expected_false_flag_rate": result.summary["null"]["expected_false_flag_rate"],
                              "false_flag_rate": float(result.table.iloc[:n_clean]["flagged"].mean())})
    return out


def _recall_rows(names: Sequence[str], train: ImageSet, planted: _Planted, judged: _Judged) -> list[dict[str, Any]]:
    """Per edit: the share of its planted copies flagged (over all folds), per space, and with the source found."""
    sha_by_id = dict(zip(train.ids, train.sha256, strict=True))
    rows = []
    for name in names:
        sel = planted.transforms == name
        parts = [p[sel] for p in judged.planted_parts]
        part = pd.concat(parts, ignore_index=True)
        found = np.zeros(len(part), dtype=bool)
        sources = np.concatenate([planted.source_sha[sel]] * len(parts))
        for s in judged.spaces:  # flagged, with the source (or a pixel-identical copy of it) as the neighbour
            nn_sha = np.array([sha_by_id.get(i) for i in part[f"{s}_neighbour_id"]], dtype=object)
            found |= (nn_sha == sources) & part[f"{s}_flagged"].to_numpy()
        found |= part["exact_copy"].to_numpy()
        rows.append({
            "transform": name,
            "description": TRANSFORMS[name].description,
            "target": TRANSFORMS[name].target,
            "n": int(sel.sum()),
            "recall": float(part["flagged"].mean()),
            "recall_per_space": {s: float(part[f"{s}_flagged"].mean()) for s in judged.spaces},
            "source_found": float(found.mean()),
        })
    return rows
