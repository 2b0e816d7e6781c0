"""Files of the memorization check's shardable artifacts: the privacy reference and a synthetic shard's results.

`privacy.audit` writes the directories atomically with their headers; this module only lays out and reads back
the payload, so that a reference or shard read from disk is the same object `privacy.memorization` computed
(float32/int64 arrays round-trip exactly through `.npy` and parquet, faiss indexes through `write_index`).

Reference payload (kind "privacy_reference"; it holds real training images and embeddings derived from them:
an internal artifact, never part of a release):

    train.parquet                   image_id, sha256 of the training images (the members)
    holdout.parquet                 image_id, sha256, exact_duplicate, near_duplicate of the holdout images
    train_images.npy                uint8 training images (registration compares candidates pixel by pixel)
    <space>/train-0000.npy …        float32 training embeddings, one file per base shard (a worker loads its own)
    <space>/holdout.npy             float32 holdout embeddings (unmirrored)
    <space>/index-0000.faiss …      prebuilt approximate index per base shard (none for exact search)
    <space>/null_distance.npy, null_rows.npy, null_candidates.npy     holdout → train search
    registered/null_distance.npy, null_rows.npy                         holdout → train after registration
    memorization_reference.json     the memorization config, calibration (thresholds), search info per space, base
                                    shards: hashed with the arrays, so a reference with other thresholds has
                                    another content hash (timings stay in the header)

Shard payload (kind "memorization_shard"): `rows.parquet`, one row per synthetic row of the shard, with per space
`<space>_distance`, `<space>_neighbour_row`, and for faiss spaces `<space>_holdout_distance` and
`<space>_exact_distance` (the recall sample's exact distance, NaN elsewhere).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from privacy.embeddings import PIXEL, EmbeddingSpace, PixelSpace
from privacy.memorization_config import REGISTERED, MemorizationConfig
from privacy.memorization_reference import Reference, SpaceReference
from privacy.memorization_shards import ShardResult
from synth.artifacts import write_json
from synth.errors import ConfigError, InputError, where

TRAIN_TABLE = "train.parquet"
HOLDOUT_TABLE = "holdout.parquet"
TRAIN_IMAGES = "train_images.npy"
SHARD_ROWS = "rows.parquet"
REFERENCE_BODY = "memorization_reference.json"


def _npy(root: Path, rel: str, array: np.ndarray, files: list[str]) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(array), allow_pickle=False)
    files.append(rel)


def write_reference_files(reference: Reference, root: Path) -> tuple[list[str], dict[str, Any]]:
    """Write a reference's payload under `root`; returns (relative file paths, the header body describing it)."""
    import faiss

    files: list[str] = []
    pd.DataFrame({"image_id": reference.train_ids.astype(str), "sha256": reference.train_sha.astype(str)}).to_parquet(
        root / TRAIN_TABLE, index=False)
    pd.DataFrame({
        "image_id": reference.holdout_ids.astype(str),
        "sha256": reference.holdout_sha.astype(str),
        "exact_duplicate": reference.exact_holdout,
        "near_duplicate": reference.near,
    }).to_parquet(root / HOLDOUT_TABLE, index=False)
    files += [TRAIN_TABLE, HOLDOUT_TABLE]
    _npy(root, TRAIN_IMAGES, reference.train_images, files)
    spaces: dict[str, Any] = {}
    for name, s in reference.spaces.items():
        for j, part in enumerate(s.train):
            _npy(root, f"{name}/train-{j:04d}.npy", part, files)
        _npy(root, f"{name}/holdout.npy", s.holdout, files)
        _npy(root, f"{name}/null_distance.npy", s.null_dist, files)
        _npy(root, f"{name}/null_rows.npy", s.null_nn, files)
        _npy(root, f"{name}/null_candidates.npy", s.null_cands, files)
        with_index = []
        for j in range(len(s.ranges)):
            index = s.index(j)
            if index is not None:
                rel = f"{name}/index-{j:04d}.faiss"
                faiss.write_index(index, str(root / rel))
                files.append(rel)
            with_index.append(index is not None)
        spaces[name] = {
            "search": s.search,
            "base_ranges": [[lo, hi] for lo, hi in s.ranges],
            "prebuilt_index": with_index,
            "dim": int(s.holdout.shape[1]),
        }
    if reference.registered_null is not None:
        _npy(root, f"{REGISTERED}/null_distance.npy", reference.registered_null[0], files)
        _npy(root, f"{REGISTERED}/null_rows.npy", reference.registered_null[1], files)
    body = {
        "config": reference.config.model_dump(mode="json"),
        "image": dict(zip(("height", "width", "channels"), reference.spec, strict=True)),
        "train_images": len(reference.train_ids),
        "holdout_images": len(reference.holdout_ids),
        "spaces": spaces,
        "registered_search": reference.registered_search,
        "calibration": reference.calibration,
        "near_rule_spaces": reference.near_rule_spaces,
    }
    write_json(root / REFERENCE_BODY, body)
    files.append(REFERENCE_BODY)
    return files, {**body, "timings": reference.timings}


def read_reference(root: Path, encoder: EmbeddingSpace | None, *, timings: dict[str, Any] | None = None) -> Reference:
    """The reference written by `write_reference_files` (big arrays memory-mapped, indexes loaded on use); check
    the directory's content hash first (`synth.artifacts.verify_content`)."""
    import faiss
    from pydantic import ValidationError

    from synth.config import describe

    root = Path(root)
    try:
        body = json.loads((root / REFERENCE_BODY).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(where(root / REFERENCE_BODY, f"cannot be read as JSON ({e.__class__.__name__})")) from None
    try:
        config = MemorizationConfig.model_validate(body["config"])
    except ValidationError as e:
        raise ConfigError(where(root / REFERENCE_BODY, describe(e))) from None
    except (KeyError, TypeError):
        raise ConfigError(where(root / REFERENCE_BODY, "has no memorization config")) from None

    def npy(rel: str) -> np.ndarray:
        path = root / rel
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(where(path, f"cannot be read as a numpy array ({e.__class__.__name__})")) from None

    def table(rel: str) -> pd.DataFrame:
        try:
            return pd.read_parquet(root / rel)
        except (OSError, ValueError) as e:
            raise InputError(where(root / rel, f"cannot be read ({e.__class__.__name__})")) from None

    train, holdout = table(TRAIN_TABLE), table(HOLDOUT_TABLE)
    spaces: dict[str, SpaceReference] = {}
    for name in (n for n in config.spaces if n in body["spaces"]):  # canonical order, not the JSON's sorted keys
        s = body["spaces"][name]
        ranges = [(int(lo), int(hi)) for lo, hi in s["base_ranges"]]
        indexes: list[Any] = [
            (lambda p=str(root / f"{name}/index-{j:04d}.faiss"): faiss.read_index(p)) if prebuilt else None
            for j, prebuilt in enumerate(s["prebuilt_index"])
        ]
        spaces[name] = SpaceReference(
            name=name,
            model=PixelSpace() if name == PIXEL else encoder,
            ranges=ranges,
            train=[npy(f"{name}/train-{j:04d}.npy") for j in range(len(ranges))],
            holdout=np.asarray(npy(f"{name}/holdout.npy")),
            indexes=indexes,
            null_dist=np.asarray(npy(f"{name}/null_distance.npy")),
            null_nn=np.asarray(npy(f"{name}/null_rows.npy")),
            null_cands=np.asarray(npy(f"{name}/null_candidates.npy")),
            search=dict(s["search"]),
        )
    registered = None
    if body.get("registered_search") is not None:
        registered = (np.asarray(npy(f"{REGISTERED}/null_distance.npy")),
                      np.asarray(npy(f"{REGISTERED}/null_rows.npy")))
    image = body["image"]
    return Reference(
        config=config,
        spec=(int(image["height"]), int(image["width"]), int(image["channels"])),
        train_ids=train["image_id"].astype(str).to_numpy(),
        train_sha=train["sha256"].astype(str).to_numpy(),
        train_images=npy(TRAIN_IMAGES),
        holdout_ids=holdout["image_id"].astype(str).to_numpy(),
        holdout_sha=holdout["sha256"].astype(str).to_numpy(),
        exact_holdout=holdout["exact_duplicate"].to_numpy(dtype=bool),
        near=holdout["near_duplicate"].to_numpy(dtype=bool),
        spaces=spaces,
        registered_null=registered,
        registered_search=body.get("registered_search"),
        calibration=body["calibration"],
        near_rule_spaces=list(body["near_rule_spaces"]),
        timings=dict(timings or {}),
    )


def write_shard_files(shard: ShardResult, root: Path) -> list[str]:
    """Write a shard's per-row results under `root`; returns the relative file paths."""
    cols: dict[str, np.ndarray] = {"row": np.arange(shard.lo, shard.hi, dtype=np.int64)}
    for space in shard.distance:
        cols[f"{space}_distance"] = shard.distance[space].astype(np.float32)
        cols[f"{space}_neighbour_row"] = shard.neighbour[space].astype(np.int64)
        if space in shard.holdout_distance:
            cols[f"{space}_holdout_distance"] = shard.holdout_distance[space].astype(np.float32)
        if space in shard.exact_distance:
            cols[f"{space}_exact_distance"] = shard.exact_distance[space].astype(np.float32)
    pd.DataFrame(cols).to_parquet(root / SHARD_ROWS, index=False)
    return [SHARD_ROWS]


def read_shard(root: Path, header: dict[str, Any]) -> ShardResult:
    """The shard written by `write_shard_files` (with its header's row range, size, GPU use and timings)."""
    path = Path(root) / SHARD_ROWS
    try:
        rows = pd.read_parquet(path)
    except (OSError, ValueError) as e:
        raise InputError(where(path, f"cannot be read ({e.__class__.__name__})")) from None
    lo, hi = (int(v) for v in header["rows"])
    if len(rows) != hi - lo or (len(rows) and (rows["row"].iloc[0] != lo or rows["row"].iloc[-1] != hi - 1)):
        raise InputError(where(path, f"holds {len(rows)} rows, not the rows [{lo}, {hi}) its header names"))
    spaces = [c[: -len("_distance")] for c in rows.columns
              if c.endswith("_distance") and not c.endswith(("_holdout_distance", "_exact_distance"))]

    def col(name: str) -> np.ndarray:
        return rows[name].to_numpy()

    return ShardResult(
        lo=lo,
        hi=hi,
        n_total=int(header["synthetic_images"]),
        distance={s: col(f"{s}_distance").astype(np.float32) for s in spaces},
        neighbour={s: col(f"{s}_neighbour_row").astype(np.int64) for s in spaces},
        holdout_distance={s: col(f"{s}_holdout_distance").astype(np.float32) for s in spaces
                          if f"{s}_holdout_distance" in rows.columns},
        exact_distance={s: col(f"{s}_exact_distance").astype(np.float32) for s in spaces
                        if f"{s}_exact_distance" in rows.columns},
        gpu={s: bool(v) for s, v in header.get("gpu", {}).items()},
        timings=dict(header.get("timings", {})),
    )
