"""Step 2 of the memorization check: one shard of the synthetic rows searched against the reference.

A shard is a contiguous range of whole blocks of `block_size` rows. Every per-row computation (embedding, faiss
search, registration, exact search for the recall sample) runs on one block at a time, anchored at global row
indices and padded to the block size, so a row's results are bit-identical whatever the shard (conv nets and BLAS
give last-bit differences when a batch's shape changes; faiss takes a non-BLAS path below 20 queries).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privacy.embeddings import check_embeddings
from privacy.memorization_config import REGISTERED, MemorizationConfig
from privacy.memorization_reference import Reference, SpaceReference, query_views
from privacy.registration import registered_distances
from privacy.search import (
    SearchConfig,
    build_index,
    check_dimension,
    combine_views,
    map_blocks,
    merge_topk,
    place_index,
    recall_rows,
    search_base_shard,
    use_gpu,
)
from privacy.space_search import as_views
from synth.errors import ConfigError, InputError


def synthetic_block_size(n_synthetic: int, config: MemorizationConfig) -> int:
    """The block size used for a synthetic set of `n_synthetic` rows: `config.block_size`, or the whole set when
    smaller (it depends on the set only, never on the sharding)."""
    return max(1, min(config.block_size, n_synthetic))


def shard_rows(n: int, shard_index: int, shard_count: int, block: int) -> tuple[int, int]:
    """Rows [lo, hi) of shard `shard_index` of `shard_count` over `n` rows: contiguous whole blocks of `block`
    rows, blocks spread as evenly as possible (a shard may be empty when there are more shards than blocks)."""
    if shard_count < 1:
        raise ConfigError(f"shard_count must be >= 1, got {shard_count}")
    if not 0 <= shard_index < shard_count:
        raise ConfigError(f"shard_index must be in [0, {shard_count - 1}], got {shard_index}")
    blocks = -(-n // block)
    lo_b, hi_b = shard_index * blocks // shard_count, (shard_index + 1) * blocks // shard_count
    return min(n, lo_b * block), min(n, hi_b * block)


@dataclass
class ShardResult:
    """Step 2's output for synthetic rows [lo, hi) of `n_total`: per space, each row's nearest training distance
    and row, its nearest-holdout distance (faiss spaces), and the exact nearest distance on the recall sample rows
    (approximate indexes; NaN elsewhere)."""

    lo: int
    hi: int
    n_total: int
    distance: dict[str, np.ndarray]
    neighbour: dict[str, np.ndarray]
    holdout_distance: dict[str, np.ndarray]
    exact_distance: dict[str, np.ndarray]
    gpu: dict[str, bool]
    timings: dict[str, Any] = field(default_factory=dict)


def search_shard(
    reference: Reference,
    synthetic_images: np.ndarray,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    embeddings: Mapping[str, Any] | None = None,
) -> ShardResult:
    """Step 2 of the check: nearest training images of shard `shard_index`'s synthetic rows in every space.

    `synthetic_images` is the WHOLE synthetic set (a memory map is fine: only the shard's rows are read); the rows
    searched are `shard_rows(len, shard_index, shard_count, block)`. `embeddings` optionally gives each faiss
    space's synthetic embeddings for the whole set (`{space: (N, d) or [views]}`)."""
    config = reference.config
    n = len(synthetic_images)
    if n == 0:
        raise InputError("synthetic: no images")
    block = synthetic_block_size(n, config)
    lo, hi = shard_rows(n, shard_index, shard_count, block)
    images = np.asarray(synthetic_images[lo:hi])
    k, search = config.candidates, config.search
    exact_search = search.model_copy(update={"index": "exact"})
    share = reference.share_rows
    out = ShardResult(lo=lo, hi=hi, n_total=n, distance={}, neighbour={}, holdout_distance={}, exact_distance={},
                      gpu={})
    if hi == lo:  # more shards than blocks: this one has no rows
        empty_f, empty_i = np.zeros(0, np.float32), np.zeros(0, np.int64)
        for space in (*reference.spaces, *([REGISTERED] if REGISTERED in config.spaces else [])):
            out.distance[space], out.neighbour[space] = empty_f, empty_i
            if space in reference.spaces:
                out.exact_distance[space], out.gpu[space] = empty_f, False
                if len(share):
                    out.holdout_distance[space] = empty_f
        return out
    cands = []
    for space, ref in reference.spaces.items():
        t0 = time.perf_counter()
        given = (embeddings or {}).get(space)
        if given is not None:
            views = [check_embeddings(v, what=f"{space} synthetic embeddings") for v in as_views(given)]
            if len(views[0]) != n:
                raise InputError(f"{space} synthetic embeddings: {len(views[0])} rows for {n} images")
            views = [v[lo:hi] for v in views]
        else:
            views = query_views(space, ref.model, images, config.flip_queries, block)
        check_dimension(space, ref.holdout.shape[1], views)
        t1 = time.perf_counter()
        # Base shards outermost: one base shard's index in memory at a time.
        parts, on_gpu = [], use_gpu(search, ref.search["index"])
        for j, (b_lo, _) in enumerate(ref.ranges):
            index = ref.index(j)  # a prebuilt approximate index (CPU), or None: exact, built by search_base_shard
            if index is not None:
                index = place_index(index, on_gpu)
            parts.append(search_base_shard(ref.train[j], b_lo, views, k, search, n_total=ref.train_size,
                                           index=index, block=block))
            del index
        dist, rows = combine_views(*merge_topk(parts, k))
        t2 = time.perf_counter()
        out.distance[space], out.neighbour[space] = dist[:, 0], rows[:, 0]
        cands.append(rows)
        if len(share):
            h_dist, _ = combine_views(*search_base_shard(ref.holdout[share], 0, views, 1, exact_search, block=block))
            out.holdout_distance[space] = h_dist[:, 0]
        exact = np.full(hi - lo, np.nan, dtype=np.float32)
        if ref.search["index"] != "exact":
            exact = _exact_on_sample(ref, views, lo, hi, n, block, search)
        out.exact_distance[space] = exact
        out.gpu[space] = on_gpu
        out.timings[space] = {"embed_seconds": round(t1 - t0, 3), "search_seconds": round(t2 - t1, 3),
                              "holdout_and_recall_seconds": round(time.perf_counter() - t2, 3)}
    if REGISTERED in config.spaces:
        t0 = time.perf_counter()
        all_cands = np.concatenate(cands, axis=1) if cands else np.zeros((hi - lo, 0), np.int64)
        d, r = map_blocks(lambda q, c: registered_distances(q, reference.train_images, c, config.registration),
                          [images, all_cands], block)
        out.distance[REGISTERED], out.neighbour[REGISTERED] = d, r
        out.timings[REGISTERED] = {"seconds": round(time.perf_counter() - t0, 3)}
    return out


def _exact_on_sample(
    ref: SpaceReference, views: list[np.ndarray], lo: int, hi: int, n: int, block: int, search: SearchConfig
) -> np.ndarray:
    """Exact nearest distance of the recall sample's rows within [lo, hi) (NaN elsewhere), searched block by block
    (a block's sample rows are the same whatever the shard, so are their results)."""
    out = np.full(hi - lo, np.nan, dtype=np.float32)
    exact = search.model_copy(update={"index": "exact"})
    sample = recall_rows(n, search)
    local = sample[(sample >= lo) & (sample < hi)] - lo
    groups = [g for b in range(0, hi - lo, block) if len(g := local[(local >= b) & (local < b + block)])]
    parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in groups]
    for t, (b_lo, _) in zip(ref.train, ref.ranges, strict=True):  # one exact index per base shard
        index, _ = build_index(t, exact, n_total=ref.train_size)
        for g, rows in enumerate(groups):
            parts[g].append(search_base_shard(t, b_lo, [v[rows] for v in views], 1, exact, index=index))
        del index
    for rows, p in zip(groups, parts, strict=True):
        out[rows] = combine_views(*merge_topk(p, 1))[0][:, 0]
    return out
