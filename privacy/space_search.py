"""Search of one space over whole arrays: each holdout and synthetic embedding's nearest training embedding.

The memorization check itself searches through `privacy.memorization_reference` and
`privacy.memorization_shards` (base-sharded, block by block); `space_distances` is the one-call form over
in-memory arrays, and `SpaceDistances` the per-space result both produce for the merge.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privacy.embeddings import check_embeddings
from privacy.search import (
    SearchConfig,
    build_index,
    check_dimension,
    exact_nearest,
    recall_at_1,
    recall_rows,
    search_views,
)


@dataclass
class SpaceDistances:
    """Nearest-training-image search results of one space."""

    name: str
    synth_dist: np.ndarray  # (N_s,) distance to the nearest training image
    synth_nn: np.ndarray  # (N_s,) its row in the training set
    null_dist: np.ndarray  # (N_h,) the same for holdout images
    null_nn: np.ndarray
    synth_cands: np.ndarray | None = None  # (N_s, k) candidate rows for registration
    null_cands: np.ndarray | None = None
    synth_holdout_dist: np.ndarray | None = None  # distance to the nearest (calibration) holdout image
    holdout_reference_size: int = 0
    search: dict[str, Any] = field(default_factory=dict)



def as_views(emb: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """Embeddings given as one array or as several query views (e.g. image and mirror image): a list of views."""
    return [emb] if isinstance(emb, np.ndarray) else list(emb)


def space_distances(
    name: str,
    train: np.ndarray,
    holdout: np.ndarray | Sequence[np.ndarray],
    synthetic: np.ndarray | Sequence[np.ndarray],
    *,
    search: SearchConfig,
    k: int = 1,
    holdout_rows_for_share: np.ndarray | None = None,
) -> SpaceDistances:
    """Nearest training images of holdout and synthetic embeddings (each given as one or several views) in one
    space, plus the distances that the closer-to-train share needs. All arrays are validated (finite, 2-D, same
    dimension)."""
    train = check_embeddings(train, what=f"{name} training embeddings")
    h_views = [check_embeddings(v, what=f"{name} holdout embeddings") for v in as_views(holdout)]
    s_views = [check_embeddings(v, what=f"{name} synthetic embeddings") for v in as_views(synthetic)]
    check_dimension(name, train.shape[1], [*h_views, *s_views])
    t0 = time.perf_counter()
    index, info = build_index(train, search)
    s_dist, s_idx = search_views(index, s_views, k)
    h_dist, h_idx = search_views(index, h_views, k)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    if info["index"] != "exact":
        sample = recall_rows(len(s_views[0]), search)
        exact_d, _ = exact_nearest(train, [v[sample] for v in s_views])
        info.update(recall_at_1=recall_at_1(s_dist[sample, 0], exact_d), recall_sample=len(sample))
    result = SpaceDistances(
        name=name,
        synth_dist=s_dist[:, 0],
        synth_nn=s_idx[:, 0],
        null_dist=h_dist[:, 0],
        null_nn=h_idx[:, 0],
        synth_cands=s_idx,
        null_cands=h_idx,
        search=info,
    )
    # Closer-to-train share needs each synthetic image's nearest holdout image too.
    rows = holdout_rows_for_share if holdout_rows_for_share is not None else np.arange(len(h_views[0]))
    if len(rows):
        result.synth_holdout_dist, _ = exact_nearest(h_views[0][rows], s_views)
        result.holdout_reference_size = len(rows)
    return result
