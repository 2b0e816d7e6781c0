"""Memorization check: does a synthetic image copy a training image?

For every synthetic image, the nearest *training* image and its distance are found in three spaces:

- `pixel`    exact nearest neighbour (faiss) of zero-mean unit-norm pixels: exact copies, noise, brightness and
             contrast changes (see `privacy.embeddings`).
- `learned`  exact nearest neighbour (faiss) in the self-supervised copy-detection embedding, querying each image
             and its mirror image (a flip is a copier's cheapest edit; the minimum of the two distances is kept).
- `registered`  geometric verification (`privacy.registration`), as copy-detection systems re-rank candidates: the
             top candidates from the two spaces above are compared pixel by pixel after the best small alignment
             of the synthetic image; the distance is that of the best-matching candidate. Mirror-image copies reach
             it through the learned space's mirrored queries (pixel candidates are searched unmirrored, to keep the
             costliest search single).

All distances are Euclidean between unit vectors (`sqrt(2 − 2·cos)`, in [0, 2]; an exact duplicate comes back at
~1e-3, not 0, from float32 rounding, so everything compares against thresholds).

Thresholds are calibrated, not hard-coded (`privacy.calibration`: split-conformal quantiles of the null, jointly
over the spaces by default). The null distribution is that of real images the model never saw: each real
*holdout* image's distance to its nearest training image. Holdout images that *are* training images (same pixels
by sha256; or a near-duplicate: pixel or registered distance <= `near_duplicate_distance`) are excluded from the
null and counted, since they would drag the threshold to ~0 and make the check blind.

Shardable work. The check is three steps with one code path whether it runs in one process or over many:

1. `prepare_reference(train, holdout)` (`privacy.memorization_reference`): embed the training and holdout images,
   search holdout → train (the null, registered space included), calibrate the thresholds; build approximate
   indexes once (so every shard searches the same one).
2. `search_shard(reference, synthetic_images, shard_index=i, shard_count=S)` (`privacy.memorization_shards`): only
   shard i's synthetic rows, a contiguous range of whole blocks of `block_size` rows, each row's results
   bit-identical whatever the shard.
3. `merge_shards(reference, synthetic, shards)` (here): the per-image table, the null table, the summary (timings
   apart, under "timings"), closest pairs and histograms, identical for any shard count.

`check_memorization` runs the three in memory; `privacy.audit` writes them as artifacts
(`privacy.memorization_artifacts`). The config is `privacy.memorization_config`, the inputs
`privacy.image_set.ImageSet`; `privacy.filtering.filter_flagged` writes the synthetic set without its flagged
images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from privacy.embeddings import EmbeddingSpace
from privacy.image_set import ImageSet, check_sets
from privacy.memorization_config import REGISTERED, MemorizationConfig
from privacy.memorization_reference import Reference, prepare_reference
from privacy.memorization_shards import ShardResult, search_shard
from privacy.search import recall_at_1, recall_rows
from privacy.space_search import SpaceDistances
from synth.errors import InputError

DCR_QUANTILES = (0.01, 0.05, 0.1, 0.5)


@dataclass
class MemorizationResult:
    """Per-synthetic-image table, the null table, the summary, the closest pairs and histogram data."""

    table: pd.DataFrame
    null_table: pd.DataFrame
    summary: dict[str, Any]
    top_pairs: dict[str, list[dict[str, Any]]]
    histograms: dict[str, dict[str, Any]]

    @property
    def flagged_ids(self) -> list[str]:
        return self.table.loc[self.table["flagged"], "image_id"].tolist()


def merge_shards(reference: Reference, synthetic: ImageSet, shards: Sequence[ShardResult]) -> MemorizationResult:
    """Step 3 of the check: put the shards' rows back in order (any order given; together they must cover every
    synthetic row exactly once), measure approximate indexes' recall on the sample, and build the per-image table,
    the null table, the summary, the closest pairs and the histograms."""
    config = reference.config
    n = len(synthetic)
    shards = sorted(shards, key=lambda s: (s.lo, s.hi))
    at = 0
    for s in shards:
        if s.n_total != n:
            raise InputError(f"memorization shard of rows [{s.lo}, {s.hi}) was searched on {s.n_total} synthetic "
                             f"images, not {n}")
        if s.lo > at:
            raise InputError(f"memorization shards: rows [{at}, {s.lo}) are missing")
        if s.lo < at:
            raise InputError(f"memorization shards: rows [{s.lo}, {min(at, s.hi)}) are repeated")
        at = s.hi
    if at != n:
        raise InputError(f"memorization shards: rows [{at}, {n}) are missing")

    def cat(get) -> np.ndarray:
        return np.concatenate([get(s) for s in shards])

    results: dict[str, SpaceDistances] = {}
    share = reference.share_rows
    for space, ref in reference.spaces.items():
        info = dict(ref.search)
        info["gpu"] = bool(info["gpu"] or any(s.gpu.get(space, False) for s in shards))
        dist = cat(lambda s, sp=space: s.distance[sp])
        if info["index"] != "exact":
            sample = recall_rows(n, config.search)
            exact = cat(lambda s, sp=space: s.exact_distance[sp])
            info.update(recall_at_1=recall_at_1(dist[sample], exact[sample]), recall_sample=len(sample))
        results[space] = SpaceDistances(
            name=space, synth_dist=dist, synth_nn=cat(lambda s, sp=space: s.neighbour[sp]),
            null_dist=ref.null_dist, null_nn=ref.null_nn,
            synth_holdout_dist=cat(lambda s, sp=space: s.holdout_distance[sp]) if len(share) else None,
            holdout_reference_size=len(share), search=info,
        )
    if reference.registered_null is not None:
        results[REGISTERED] = SpaceDistances(
            name=REGISTERED, synth_dist=cat(lambda s: s.distance[REGISTERED]),
            synth_nn=cat(lambda s: s.neighbour[REGISTERED]), null_dist=reference.registered_null[0],
            null_nn=reference.registered_null[1], search=dict(reference.registered_search or {}),
        )
    thresholds = reference.calibration["thresholds"]
    keep = reference.keep
    table = _synthetic_table(synthetic, reference.train_ids, results, thresholds, set(reference.train_sha.tolist()),
                             set(reference.holdout_sha.tolist()))
    null_table = _null_table(reference.holdout_ids, reference.train_ids, results, reference.exact_holdout,
                             reference.near)
    summary = _summary(config, len(reference.train_ids), len(reference.holdout_ids), results,
                       reference.calibration, table, keep, reference.exact_holdout, reference.near,
                       reference.near_rule_spaces)
    summary["timings"] = {
        "reference": reference.timings,
        "shards": [{"rows": [s.lo, s.hi], **s.timings} for s in shards],
    }
    return MemorizationResult(
        table=table,
        null_table=null_table,
        summary=summary,
        top_pairs=_top_pairs(table, list(results), config.top_k),
        histograms=_histograms(results, keep, thresholds, config.histogram_bins),
    )


def check_memorization(
    train: ImageSet,
    holdout: ImageSet,
    synthetic: ImageSet,
    *,
    encoder: EmbeddingSpace | None = None,
    config: MemorizationConfig | None = None,
    embeddings: Mapping[str, Mapping[str, Any]] | None = None,
) -> MemorizationResult:
    """Find each synthetic image's nearest training image in every configured space, calibrate thresholds on the
    holdout → train null, and flag synthetic images closer than the thresholds (in any space) or pixel-identical
    to a real image (training: `exact_copy`; holdout: `holdout_copy`, a leak of a real image rather than
    memorization). In memory: `prepare_reference` → `search_shard` (one shard) → `merge_shards`.

    `embeddings` optionally provides precomputed embeddings per faiss space: `{space: {"train": (N, d),
    "holdout": (N_h, d) or [views], "synthetic": (N_s, d) or [views]}}` (validated: finite, 2-D).
    """
    check_sets(train, holdout, synthetic)
    embeddings = embeddings or {}
    reference = prepare_reference(train, holdout, encoder=encoder, config=config, embeddings=embeddings)
    given = {s: e["synthetic"] for s, e in embeddings.items() if "synthetic" in e}
    shard = search_shard(reference, synthetic.images, embeddings=given)
    return merge_shards(reference, synthetic, [shard])


def _synthetic_table(
    synthetic: ImageSet,
    train_ids: np.ndarray,
    results: Mapping[str, SpaceDistances],
    thresholds: Mapping[str, float],
    train_sha: set[str],
    holdout_sha: set[str],
) -> pd.DataFrame:
    table = pd.DataFrame({"image_id": synthetic.ids.astype(str)})
    if synthetic.labels is not None:
        table["label"] = np.asarray(synthetic.labels).astype(np.int64)
    table["exact_copy"] = np.array([s in train_sha for s in synthetic.sha256], dtype=bool)
    # A real holdout image in a synthetic set is a real patient's image too (a pipeline leak, not memorization).
    table["holdout_copy"] = np.array([s in holdout_sha for s in synthetic.sha256], dtype=bool)
    flagged = (table["exact_copy"] | table["holdout_copy"]).to_numpy().copy()
    for s, r in results.items():
        table[f"{s}_distance"] = r.synth_dist.astype(np.float32)
        table[f"{s}_neighbour_id"] = _ids(train_ids, r.synth_nn)
        table[f"{s}_flagged"] = r.synth_dist < thresholds[s]
        flagged |= table[f"{s}_flagged"].to_numpy()
        if r.synth_holdout_dist is not None:
            table[f"{s}_holdout_distance"] = r.synth_holdout_dist.astype(np.float32)
    table["flagged"] = flagged
    return table


def _ids(ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    out = np.asarray(ids, dtype=object)[np.clip(rows, 0, None)]
    out[rows < 0] = None
    return out


def _null_table(
    holdout_ids: np.ndarray, train_ids: np.ndarray, results: Mapping[str, SpaceDistances], exact: np.ndarray,
    near: np.ndarray
) -> pd.DataFrame:
    table = pd.DataFrame({"image_id": np.asarray(holdout_ids).astype(str)})
    for s, r in results.items():
        table[f"{s}_distance"] = r.null_dist.astype(np.float32)
        table[f"{s}_neighbour_id"] = _ids(train_ids, r.null_nn)
    table["excluded"] = np.where(exact, "exact_duplicate", np.where(near, "near_duplicate", None))
    return table


def _quantiles(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, dtype=np.float64)
    return {f"q{round(q * 100):02d}": float(np.quantile(x, q)) for q in DCR_QUANTILES} if len(x) else {}


def _summary(
    config: MemorizationConfig,
    train_size: int,
    holdout_size: int,
    results: Mapping[str, SpaceDistances],
    cal: Mapping[str, Any],
    table: pd.DataFrame,
    keep: np.ndarray,
    exact: np.ndarray,
    near: np.ndarray,
    near_rule_spaces: list[str],
) -> dict[str, Any]:
    n = len(table)
    per_space = {}
    for s, r in results.items():
        flagged = int(table[f"{s}_flagged"].sum())
        entry: dict[str, Any] = {
            "threshold": cal["thresholds"][s],
            "null_flagged_fraction": cal["null_flagged_fraction"][s],
            "flagged": flagged,
            "flagged_fraction": flagged / n,
            "dcr_synthetic": _quantiles(r.synth_dist),
            "dcr_holdout": _quantiles(r.null_dist[keep]),
            "search": r.search,
            "closer_to_train": None,
        }
        if r.synth_holdout_dist is not None:
            closer = r.synth_dist < r.synth_holdout_dist
            ties = r.synth_dist == r.synth_holdout_dist
            share = float(closer.mean() + 0.5 * ties.mean())
            n_t, n_h = int(train_size), int(r.holdout_reference_size)
            # An image exchangeable with the real ones has its nearest of the n_t + n_h reference images in the
            # training set with probability n_t / (n_t + n_h): the share of a generator that copies nothing.
            baseline = n_t / (n_t + n_h)
            entry["closer_to_train"] = {
                "share": share,
                "expected_if_not_memorising": baseline,
                "excess": (share - baseline) / (1 - baseline),
                "train_size": n_t,
                "holdout_size": n_h,
                "method": "share of synthetic images nearer to their nearest training image than to their nearest "
                "holdout image (ties count half); excess = (share − expected) / (1 − expected): 0 for a "
                "generator that copies nothing, 1 when every image is nearer to training",
            }
        per_space[s] = entry
    flagged = int(table["flagged"].sum())
    return {
        "spaces": list(results),
        "quantile": config.quantile,
        "calibration": config.calibration,
        "thresholds": dict(cal["thresholds"]),
        "synthetic_images": n,
        "flagged": flagged,
        "flagged_fraction": flagged / n,
        "exact_copies": int(table["exact_copy"].sum()),
        "holdout_copies": int(table["holdout_copy"].sum()),
        "null": {
            "holdout_images": holdout_size,
            "size": int(keep.sum()),
            "excluded_exact_duplicates": int(exact.sum()),
            "excluded_near_duplicates": int(near.sum()),
            "near_duplicate_distance": config.near_duplicate_distance,
            "near_duplicate_rule": "same sha256 as a training image, or nearest-training distance <= "
            f"near_duplicate_distance in {near_rule_spaces or 'no pixel-level space'}",
            "max_flagged": cal["max_flagged"],
            "rank": cal["rank"],
            "flagged_fraction_any": cal["null_flagged_fraction_any"],
            "expected_false_flag_rate": cal["expected_false_flag_rate"],
            "quantile_below_resolution": cal["quantile_below_resolution"],
        },
        "per_space": per_space,
    }


def _top_pairs(table: pd.DataFrame, spaces: list[str], k: int) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for s in spaces:
        top = table.nsmallest(k, f"{s}_distance", keep="first")
        out[s] = [
            {
                "synthetic_id": str(r["image_id"]),
                "train_id": r[f"{s}_neighbour_id"],
                "distance": float(r[f"{s}_distance"]),
                "flagged": bool(r[f"{s}_flagged"]),
            }
            for _, r in top.iterrows()
        ]
    return out


def _histograms(
    results: Mapping[str, SpaceDistances], keep: np.ndarray, thresholds: Mapping[str, float], bins: int
) -> dict[str, dict[str, Any]]:
    out = {}
    for s, r in results.items():
        null = r.null_dist[keep]
        hi = float(max(np.max(r.synth_dist), np.max(null) if len(null) else 0.0, thresholds[s])) * 1.02 or 1.0
        edges = np.linspace(0.0, hi, bins + 1)
        out[s] = {
            "edges": edges.round(6).tolist(),
            "synthetic_to_train": np.histogram(r.synth_dist, edges)[0].tolist(),
            "holdout_to_train": np.histogram(null, edges)[0].tolist(),
            "threshold": thresholds[s],
        }
    return out
