"""Step 1 of the memorization check: the reference computed once from the real data.

Embed the training and holdout images in every faiss space, search holdout → train (the null, registered space
included), exclude holdout (near-)duplicates of training images from the null, calibrate the thresholds
(`privacy.calibration`), and build approximate indexes once so that every synthetic shard searches the same one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privacy.calibration import calibrate
from privacy.embeddings import LEARNED, PIXEL, EmbeddingSpace, PixelSpace, check_embeddings
from privacy.image_set import ImageSet, check_images, check_spec
from privacy.memorization_config import FAISS_SPACES, REGISTERED, MemorizationConfig
from privacy.registration import registered_distances
from privacy.search import (
    base_ranges,
    build_index,
    check_dimension,
    combine_views,
    cpu_index,
    map_blocks,
    merge_topk,
    search_base_shard,
)
from privacy.space_search import as_views
from synth.errors import ConfigError, InputError


def _mirror(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images[:, :, ::-1])


def _model_for(space: str, encoder: EmbeddingSpace | None) -> EmbeddingSpace:
    if space == PIXEL:
        return PixelSpace()
    if encoder is None:
        raise ConfigError("the learned space needs a trained encoder (privacy.embeddings.train_encoder/load_encoder)")
    return encoder


def embed_blocks(model: EmbeddingSpace, images: np.ndarray, block: int | None) -> np.ndarray:
    """`model.embed` over fixed padded blocks of `images` (see `privacy.search.map_blocks`)."""
    return map_blocks(lambda x: (model.embed(x),), [np.asarray(images)], block)[0]


def query_views(
    space: str, model: EmbeddingSpace | None, images: np.ndarray, flip: bool, block: int | None
) -> list[np.ndarray]:
    """The query views of `images` in a faiss space: their embedding, plus their mirror image's in the learned
    space when `flip`."""
    if model is None:
        raise ConfigError(f"the {space} space has no embedding model: give its synthetic embeddings too")
    views = [embed_blocks(model, images, block)]
    if space == LEARNED and flip:
        views.append(embed_blocks(model, _mirror(images), block))
    return views


@dataclass
class SpaceReference:
    """One faiss space of a reference: training embeddings per base shard, holdout embeddings (unmirrored), the
    prebuilt approximate indexes (None for exact search, which needs none), and the null search's results."""

    name: str
    model: EmbeddingSpace | None
    ranges: list[tuple[int, int]]  # base shards' training rows [lo, hi)
    train: list[np.ndarray]  # one (hi − lo, d) array per base shard (possibly memory-mapped)
    holdout: np.ndarray  # (N_h, d)
    indexes: list[Any]  # per base shard: a faiss index, a zero-argument loader of one, or None (exact)
    null_dist: np.ndarray
    null_nn: np.ndarray
    null_cands: np.ndarray  # (N_h, V·k) candidate rows for registration
    search: dict[str, Any]

    @property
    def train_size(self) -> int:
        return self.ranges[-1][1]

    def index(self, j: int) -> Any:
        """The prebuilt index of base shard `j` (loaded if stored as a loader), or None for exact search."""
        ix = self.indexes[j]
        return ix() if callable(ix) else ix


@dataclass
class Reference:
    """Everything the per-shard synthetic search and the merge need, computed once from the real data."""

    config: MemorizationConfig
    spec: tuple[int, int, int]
    train_ids: np.ndarray
    train_sha: np.ndarray
    train_images: np.ndarray  # registration compares candidates pixel by pixel
    holdout_ids: np.ndarray
    holdout_sha: np.ndarray
    exact_holdout: np.ndarray  # holdout images pixel-identical to a training image
    near: np.ndarray  # holdout near-duplicates of training images (excluded from the null)
    spaces: dict[str, SpaceReference]
    registered_null: tuple[np.ndarray, np.ndarray] | None  # (distance, training row) per holdout image
    registered_search: dict[str, Any] | None
    calibration: dict[str, Any]
    near_rule_spaces: list[str]
    timings: dict[str, Any] = field(default_factory=dict)

    @property
    def keep(self) -> np.ndarray:
        """Holdout images in the null (calibration set)."""
        return ~(self.exact_holdout | self.near)

    @property
    def share_rows(self) -> np.ndarray:
        """Holdout rows the closer-to-train share compares synthetic images with (not copies of training images)."""
        return np.flatnonzero(~self.exact_holdout)


def prepare_reference(
    train: ImageSet,
    holdout: ImageSet,
    *,
    encoder: EmbeddingSpace | None = None,
    config: MemorizationConfig | None = None,
    embeddings: Mapping[str, Mapping[str, Any]] | None = None,
) -> Reference:
    """Step 1 of the check: embed the training and holdout images in every faiss space, search holdout → train (the
    null, and the registered space's), exclude holdout duplicates of training images, calibrate the thresholds.

    `embeddings` optionally provides precomputed embeddings per faiss space (`{space: {"train": (N, d), "holdout":
    (N_h, d) or [views]}}`, validated: finite, 2-D, same dimension)."""
    config = config or MemorizationConfig()
    for s in (train, holdout):
        check_images(s)
    check_spec(holdout, train.spec)
    embeddings = embeddings or {}
    search, k = config.search, config.candidates
    train_sha = set(train.sha256.tolist())
    exact_holdout = np.array([s in train_sha for s in holdout.sha256], dtype=bool)
    timings: dict[str, Any] = {}
    spaces: dict[str, SpaceReference] = {}
    for space in (s for s in config.spaces if s in FAISS_SPACES):
        t0 = time.perf_counter()
        given = embeddings.get(space)
        model = None if given is not None and space == LEARNED and encoder is None else _model_for(space, encoder)
        if given is not None:
            t = check_embeddings(given["train"], what=f"{space} training embeddings")
            h = [check_embeddings(v, what=f"{space} holdout embeddings") for v in as_views(given["holdout"])]
        else:
            t = model.embed(train.images)
            h = query_views(space, model, holdout.images, config.flip_queries, None)
        for what, arr, n in (("train", t, len(train)), ("holdout", h[0], len(holdout))):
            if len(arr) != n:
                raise InputError(f"{space} {what} embeddings: {len(arr)} rows for {n} images")
        check_dimension(space, t.shape[1], h)
        t1 = time.perf_counter()
        ranges = base_ranges(len(t), search)
        parts, indexes, infos = [], [], []
        for lo, hi in ranges:
            index, info = build_index(t[lo:hi], search, n_total=len(t))
            parts.append(search_base_shard(t[lo:hi], lo, h, k, search, index=index))
            indexes.append(None if info["index"] == "exact" else cpu_index(index, info["gpu"]))
            infos.append(info)
            del index
        null_d, null_r = combine_views(*merge_topk(parts, k))
        spaces[space] = SpaceReference(
            name=space, model=model, ranges=ranges, train=[t[lo:hi] for lo, hi in ranges], holdout=h[0],
            indexes=indexes, null_dist=null_d[:, 0], null_nn=null_r[:, 0], null_cands=null_r,
            search=_space_info(infos, ranges),
        )
        timings[space] = {"embed_seconds": round(t1 - t0, 3), "search_seconds": round(time.perf_counter() - t1, 3)}
    registered_null, registered_search = None, None
    if REGISTERED in config.spaces:
        t0 = time.perf_counter()
        h_cands = np.concatenate([r.null_cands for r in spaces.values()], axis=1)
        registered_null = registered_distances(holdout.images, train.images, h_cands, config.registration)
        registered_search = {
            "index": "candidates",
            "candidates_per_query": int(h_cands.shape[1]),
            "from": list(spaces),
            "max_shift_px": config.registration.max_shift_px,  # in view pixels: × pool_factor at full resolution
            "pool_factor": config.registration.pool_factor(*train.spec[:2]),
            "scales": list(config.registration.scales),
            "flips": config.registration.flips,
        }
        timings[REGISTERED] = {"seconds": round(time.perf_counter() - t0, 3)}

    # Calibration set: holdout images that are not (near-)duplicates of training images.
    null_dists = {s: r.null_dist for s, r in spaces.items()}
    if registered_null is not None:
        null_dists[REGISTERED] = registered_null[0]
    near = np.zeros(len(holdout), dtype=bool)
    near_rule_spaces = [s for s in (PIXEL, REGISTERED) if s in null_dists]
    for s in near_rule_spaces:
        near |= null_dists[s] <= config.near_duplicate_distance
    near &= ~exact_holdout
    keep = ~(exact_holdout | near)
    cal = calibrate({s: d[keep] for s, d in null_dists.items()}, quantile=config.quantile,
                    joint=config.calibration == "joint")
    return Reference(
        config=config, spec=train.spec, train_ids=np.asarray(train.ids), train_sha=np.asarray(train.sha256),
        train_images=train.images, holdout_ids=np.asarray(holdout.ids), holdout_sha=np.asarray(holdout.sha256),
        exact_holdout=exact_holdout, near=near, spaces=spaces, registered_null=registered_null,
        registered_search=registered_search, calibration=cal, near_rule_spaces=near_rule_spaces, timings=timings,
    )


def _space_info(infos: list[dict[str, Any]], ranges: list[tuple[int, int]]) -> dict[str, Any]:
    """One space's search info: the index kind and its parameters (per base shard when sharded)."""
    info = dict(infos[0])
    info["gpu"] = any(i["gpu"] for i in infos)
    if len(ranges) > 1:
        params = [{k: v for k, v in i.items() if k not in ("index", "chosen_by", "gpu")} for i in infos]
        for key in params[0]:
            info.pop(key, None)
        info["base_shards"] = [{"rows": [lo, hi], **p} for (lo, hi), p in zip(ranges, params, strict=True)]
    return info
