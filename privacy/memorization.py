"""Memorization check: does a synthetic image copy a training image?

For every synthetic image, the nearest *training* image and its distance are found in three spaces:

- `pixel`    exact nearest neighbour (faiss) of zero-mean unit-norm pixels: exact copies, noise, brightness and
             contrast changes (see `privacy.embeddings`).
- `learned`  exact nearest neighbour (faiss) in the self-supervised copy-detection embedding, querying each image
             and its mirror image (a flip is a copier's cheapest edit; the minimum of the two distances is kept).
- `registered`  geometric verification, as copy-detection systems re-rank candidates: the top candidates from the
             two spaces above are compared pixel by pixel after the best small alignment of the synthetic image
             (integer shift up to `max_shift_px`, mirror, zoom-out by each of `scales` to undo a crop-resize), on a
             central window (both lightly blurred, σ = 0.7 px, to forgive a resized copy's interpolation); the
             distance is that of the best-matching candidate. A 2-px shifted or cropped copy, far away in raw
             pixels, comes back at ~0 here. Mirror-image copies reach it through the learned space's mirrored
             queries (pixel candidates are searched unmirrored, to keep the costliest search single).

All distances are Euclidean between unit vectors (`sqrt(2 − 2·cos)`, in [0, 2]; an exact duplicate comes back at
~1e-3, not 0, from float32 rounding, so everything compares against thresholds).

Thresholds are calibrated, not hard-coded. The null distribution is that of real images the model never saw:
each real *holdout* image's distance to its nearest training image. A synthetic image closer to a training image
than all but a `quantile` of holdout images is flagged. Holdout images that *are* training images (same pixels by
sha256; or a near-duplicate: pixel or registered distance <= `near_duplicate_distance`) are excluded from the
null and counted, since they would drag the threshold to ~0 and make the check blind. With several spaces the
rule "flag in ANY space" is calibrated jointly (default): the per-space thresholds are taken at the same rank of
their null distributions, the largest rank at which at most m (below) null images are flagged in any space, so
`quantile` bounds the false-flag rate of the whole rule, not of each space.

Quantile semantics (split-conformal, so that q is the false-flag rate on *unseen* real images, not just on the
calibration images): with n null distances, at most m = floor(q·(n+1)) − 1 of them may be flagged; the threshold
is the (r+1)-th smallest null distance (r <= m) and flagging is strict (`d < threshold`), so at most r null images
fall below it, ties included, and an unseen exchangeable image falls below it with probability (r+1)/(n+1) <= q.
With q·(n+1) < 2 the threshold is the smallest null distance and the rate is 1/(n+1) (recorded as
`quantile_below_resolution` when even that exceeds q).

Shardable work. The check is three steps with one code path whether it runs in one process or over many:

1. `prepare_reference(train, holdout)`: embed the training and holdout images, search holdout → train (the null,
   registered space included), calibrate the thresholds; build approximate indexes once (so every shard searches
   the same one).
2. `search_shard(reference, synthetic_images, shard_index=i, shard_count=S)`: only shard i's synthetic rows, a
   contiguous range of whole blocks of `block_size` rows. Every per-row computation (embedding, faiss search,
   registration, exact search for the recall sample) runs on one block at a time, anchored at global row indices
   and padded to the block size, so a row's results are bit-identical whatever the shard (conv nets and BLAS give
   last-bit differences when a batch's shape changes; faiss takes a non-BLAS path below 20 queries).
3. `merge_shards(reference, synthetic, shards)`: the per-image table, the null table, the summary (timings apart,
   under "timings"), closest pairs and histograms, identical for any shard count.

`check_memorization` runs the three in memory; `privacy.audit` writes them as artifacts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from privacy.embeddings import LEARNED, PIXEL, EmbeddingSpace, PixelSpace, check_embeddings
from privacy.search import RECALL_TOLERANCE as RECALL_TOLERANCE
from privacy.search import (
    SearchConfig,
    base_ranges,
    build_index,
    check_dimension,
    combine_views,
    cpu_index,
    exact_nearest,
    map_blocks,
    merge_topk,
    place_index,
    recall_at_1,
    recall_rows,
    search_base_shard,
    search_views,
    to_distance,
    use_gpu,
)
from privacy.search import brute_force_nearest as brute_force_nearest
from synth.errors import ConfigError, InputError, where

REGISTERED = "registered"
SPACES: tuple[str, ...] = (PIXEL, LEARNED, REGISTERED)
FAISS_SPACES: tuple[str, ...] = (PIXEL, LEARNED)
SpaceName = Literal["pixel", "learned", "registered"]
DCR_QUANTILES = (0.01, 0.05, 0.1, 0.5)


class RegistrationConfig(BaseModel):
    """Geometric verification of candidates (the `registered` space)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_shift_px: int = Field(3, ge=0)
    # Zoom-outs applied to the synthetic image to undo a crop-resize (1.16 undoes cropping 28 → 24 px).
    scales: tuple[float, ...] = (1.0, 1.08, 1.16, 1.24)
    flips: bool = True
    # Gaussian blur (σ in pixels) of both sides before correlating: forgives the interpolation blur and sub-pixel
    # misfit of a resized copy. 0 = none.
    blur_sigma: float = Field(0.7, ge=0.0, le=3.0)
    candidates: int = Field(5, ge=1)  # nearest candidates taken from each faiss space (and query view)
    chunk: int = Field(256, ge=1)

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not (1.0 <= s <= 2.0) for s in v):
            raise ValueError(f"scales must be a non-empty list of zoom factors in [1, 2], got {list(v)}")
        return tuple(v)


class MemorizationConfig(BaseModel):
    """What the memorization check compares and how its thresholds are calibrated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    quantile: float = Field(0.01, gt=0.0, le=0.5)
    calibration: Literal["joint", "per_space"] = "joint"
    near_duplicate_distance: float = Field(0.05, ge=0.0, le=2.0)
    spaces: tuple[SpaceName, ...] = SPACES
    flip_queries: bool = True  # learned space: also query each image's mirror image
    top_k: int = Field(20, ge=1)
    histogram_bins: int = Field(40, ge=2)
    # Synthetic rows are embedded, searched and registered in blocks of this many rows (anchored at global row
    # indices, the last one padded): a shard is whole blocks, so results never depend on the sharding. A set
    # smaller than a block is one block of its own size.
    block_size: int = Field(1024, ge=1)
    search: SearchConfig = SearchConfig()
    registration: RegistrationConfig = RegistrationConfig()

    @field_validator("spaces")
    @classmethod
    def _spaces(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"spaces must be a non-empty list without repeats, got {list(v)}")
        if REGISTERED in v and not set(v) & set(FAISS_SPACES):
            raise ValueError("the registered space verifies candidates from 'pixel' or 'learned': add one of them")
        return tuple(s for s in SPACES if s in v)  # canonical order

    @property
    def candidates(self) -> int:
        """Nearest training rows kept per query view and faiss space (registration candidates, or just 1)."""
        return self.registration.candidates if REGISTERED in self.spaces else 1


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


# --------------------------------------------------------------------------------------------------------------
# Search of one space over whole arrays (the check itself goes through prepare_reference / search_shard)


def _views(emb: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
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
    h_views = [check_embeddings(v, what=f"{name} holdout embeddings") for v in _views(holdout)]
    s_views = [check_embeddings(v, what=f"{name} synthetic embeddings") for v in _views(synthetic)]
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


# --------------------------------------------------------------------------------------------------------------
# Registration (geometric verification)


def _float_images(images: np.ndarray):
    """uint8 N×H×W[×C] → torch float32 N×C×H×W."""
    import torch

    x = torch.from_numpy(np.array(images, copy=True)).float()  # a copy: memory-mapped chunks are read-only
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def _window(h: int, w: int, r: int) -> tuple[int, int]:
    # One pixel of margin beyond the largest shift keeps every shifted window inside the image.
    wh, ww = h - 2 * r - 2, w - 2 * r - 2
    if min(wh, ww) < 8:
        raise ConfigError(f"registration: max_shift_px {r} leaves a {wh}×{ww} window on {h}×{w} images (< 8)")
    return wh, ww


def _blur(x, sigma: float):
    """Separable Gaussian blur of N×C×H×W (edge-replicated), or `x` itself for sigma 0."""
    import torch
    import torch.nn.functional as F

    if sigma <= 0:
        return x
    r = max(1, math.ceil(2.5 * sigma))
    g = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32) ** 2) / (2 * sigma * sigma))
    g = g / g.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)


def _center_windows(images: np.ndarray, r: int, sigma: float = 0.0):
    """Zero-mean unit-norm central windows (N, C, wh, ww) of candidate (training) images."""
    x = _blur(_float_images(images), sigma)
    _, _, h, w = x.shape
    wh, ww = _window(h, w, r)
    oy, ox = (h - wh) // 2, (w - ww) // 2
    win = x[:, :, oy : oy + wh, ox : ox + ww]
    win = win - win.mean(dim=(1, 2, 3), keepdim=True)
    norm = win.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return (win / norm.clamp_min(1e-6)) * (norm > 1e-6)


def _query_regions(images: np.ndarray, cfg: RegistrationConfig):
    """Each query's versions (mirror × zoom-out), cropped to the region its shifted windows cover:
    (B, V, C, wh + 2r, ww + 2r)."""
    import torch
    import torch.nn.functional as F

    x = _blur(_float_images(images), cfg.blur_sigma)
    b, c, h, w = x.shape
    r = cfg.max_shift_px
    wh, ww = _window(h, w, r)
    versions = []
    for flip in (False, True) if cfg.flips else (False,):
        xf = x.flip(-1) if flip else x
        for s in cfg.scales:
            if s == 1.0:
                versions.append(xf)
                continue
            # Sampling a region s× larger than the image (border-padded) zooms the content out by 1/s.
            theta = torch.tensor([[s, 0.0, 0.0], [0.0, s, 0.0]]).expand(b, 2, 3)
            grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
            versions.append(F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False))
    v = torch.stack(versions, 1)
    oy, ox = (h - wh) // 2, (w - ww) // 2
    return v[:, :, :, oy - r : oy + wh + r, ox - r : ox + ww + r]


def _window_norms(region, wh: int, ww: int):
    """‖window − its mean‖ of every (wh × ww) window of `region` (B, V, C, Hr, Wr), channels pooled: (B, V, sy, sx).
    Box sums from integral images, in float64 (the variance is a difference of large sums)."""
    import torch.nn.functional as F

    x = region.double()
    out = []
    for t in (x, x * x):
        ii = F.pad(t.sum(dim=2).cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        out.append(ii[..., wh:, ww:] - ii[..., :-wh, ww:] - ii[..., wh:, :-ww] + ii[..., :-wh, :-ww])
    n = region.shape[2] * wh * ww
    return (out[1] - out[0] * out[0] / n).clamp_min(0.0).sqrt().float()


def registered_distances(
    queries: np.ndarray, train: np.ndarray, candidates: np.ndarray, cfg: RegistrationConfig
) -> tuple[np.ndarray, np.ndarray]:
    """For each query image, the best candidate training image after alignment: (distance, training row).

    The distance is that of unit vectors at the best normalised cross-correlation between the query's aligned
    central windows (all shifts up to `max_shift_px`, mirror, zoom-outs) and the candidate's central window. The
    correlations of all shifts come from one grouped `conv2d` per chunk (each query's candidates are its kernels).
    """
    import torch
    import torch.nn.functional as F

    n = len(queries)
    dist = np.full(n, np.sqrt(2.0), dtype=np.float32)
    best_row = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return dist, best_row
    candidates = np.where(candidates < 0, candidates[:, :1], candidates)
    needed, inverse = np.unique(candidates, return_inverse=True)
    inverse = torch.from_numpy(inverse.reshape(candidates.shape))
    k = candidates.shape[1]
    with torch.no_grad():
        # only the candidates' windows
        cand_win = _center_windows(np.asarray(train[needed]), cfg.max_shift_px, cfg.blur_sigma)
        _, c, wh, ww = cand_win.shape
        for lo in range(0, n, cfg.chunk):
            hi = min(n, lo + cfg.chunk)
            b = hi - lo
            region = _query_regions(np.asarray(queries[lo:hi]), cfg)  # B×V×C×Hr×Wr
            v = region.shape[1]
            kernels = cand_win[inverse[lo:hi].reshape(-1)]  # (B·K)×C×wh×ww, zero-mean: Σ(q − q̄)·c = Σ q·c
            inp = region.transpose(0, 1).reshape(v, b * c, region.shape[3], region.shape[4])
            scores = F.conv2d(inp, kernels, groups=b).view(v, b, k, -1)  # V×B×K×shifts
            norm = _window_norms(region, wh, ww).transpose(0, 1).reshape(v, b, 1, -1)
            ncc = torch.where(norm > 1e-6, scores / norm.clamp_min(1e-6), torch.zeros(()))
            per_cand = ncc.amax(dim=(0, 3))  # B×K
            best, arg = per_cand.max(dim=1)
            dist[lo:hi] = to_distance(best.numpy())
            best_row[lo:hi] = candidates[lo:hi][np.arange(b), arg.numpy()]
    return dist, best_row


# --------------------------------------------------------------------------------------------------------------
# Calibration


def allowed_flags(n: int, quantile: float) -> int:
    """How many of n null images may be flagged so that an unseen image is flagged with probability <= q:
    floor(q·(n+1)) − 1 (the split-conformal bound: a new exchangeable value falls below the (m+1)-th smallest of n
    with probability (m+1)/(n+1)); 0 when the null is too small to resolve q."""
    return max(0, math.floor(quantile * (n + 1) + 1e-9) - 1)


def threshold_at(null: np.ndarray, quantile: float) -> float:
    """The single-space calibrated threshold: the (m+1)-th smallest null distance, m = `allowed_flags` (flag
    `d < threshold`)."""
    null = np.sort(np.asarray(null, dtype=np.float64))
    if not len(null):
        raise InputError("calibration: the null distribution is empty")
    return float(null[min(allowed_flags(len(null), quantile), len(null) - 1)])


def calibrate(null: Mapping[str, np.ndarray], *, quantile: float, joint: bool = True) -> dict[str, Any]:
    """Per-space thresholds such that at most m = `allowed_flags(n, q)` null images are flagged (in any space
    when `joint`, else in each space separately). Returns the thresholds, the rank used, the null's flagged
    fractions and the expected false-flag rate on unseen real images, (flagged + 1)/(n + 1)."""
    names = list(null)
    d = np.stack([np.asarray(null[s], dtype=np.float64) for s in names], axis=1)
    n = len(d)
    if n == 0:
        raise InputError("calibration: no holdout images left to calibrate on (all excluded or none given)")
    allowed = allowed_flags(n, quantile)
    ordered = np.sort(d, axis=0)

    def at(rank: int) -> np.ndarray:
        return ordered[min(rank, n - 1)]

    def union(rank: int) -> int:
        return int((d < at(rank)).any(axis=1).sum())

    rank = allowed
    if joint and len(names) > 1:
        lo, hi = 0, allowed  # union(rank) is non-decreasing in rank and union(0) == 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if union(mid) <= allowed:
                lo = mid
            else:
                hi = mid - 1
        rank = lo
    t = at(rank)
    flagged_any = union(rank)
    return {
        "thresholds": {s: float(t[i]) for i, s in enumerate(names)},
        "rank": rank,
        "max_flagged": allowed,
        "null_flagged_fraction": {s: float((d[:, i] < t[i]).mean()) for i, s in enumerate(names)},
        "null_flagged_fraction_any": flagged_any / n,
        "expected_false_flag_rate": (flagged_any + 1) / (n + 1),
        "quantile_below_resolution": quantile * (n + 1) < 1,
    }


# --------------------------------------------------------------------------------------------------------------
# The check: reference (train + holdout), synthetic shards, merge


def _check_images(s: ImageSet) -> None:
    if s.images.dtype != np.uint8 or s.images.ndim not in (3, 4):
        raise InputError(f"{s.name}: expected uint8 N×H×W[×C] images, got {s.images.dtype} {s.images.shape}")
    if len(s) == 0:
        raise InputError(f"{s.name}: no images")


def _check_spec(s: ImageSet, spec: tuple[int, int, int]) -> None:
    if s.spec != spec:
        raise InputError(
            f"{s.name}: images are {s.spec[0]}×{s.spec[1]}×{s.spec[2]} (H×W×C) but the training images are "
            f"{spec[0]}×{spec[1]}×{spec[2]}"
        )


def _check_sets(train: ImageSet, holdout: ImageSet, synthetic: ImageSet) -> None:
    for s in (train, holdout, synthetic):
        _check_images(s)
    for s in (holdout, synthetic):
        _check_spec(s, train.spec)


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


def _query_views(
    space: str, model: EmbeddingSpace | None, images: np.ndarray, flip: bool, block: int | None
) -> list[np.ndarray]:
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
        _check_images(s)
    _check_spec(holdout, train.spec)
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
            h = [check_embeddings(v, what=f"{space} holdout embeddings") for v in _views(given["holdout"])]
        else:
            t = model.embed(train.images)
            h = _query_views(space, model, holdout.images, config.flip_queries, None)
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
            "max_shift_px": config.registration.max_shift_px,
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
            views = [check_embeddings(v, what=f"{space} synthetic embeddings") for v in _views(given)]
            if len(views[0]) != n:
                raise InputError(f"{space} synthetic embeddings: {len(views[0])} rows for {n} images")
            views = [v[lo:hi] for v in views]
        else:
            views = _query_views(space, ref.model, images, config.flip_queries, block)
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
    _check_sets(train, holdout, synthetic)
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


# --------------------------------------------------------------------------------------------------------------
# Filtering


def filter_flagged(
    synthetic_dir: Path,
    result: MemorizationResult,
    out: Path,
    *,
    k: int | None = None,
    real_attributes: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic canonical dataset without its flagged images to `out`; with `k`, also apply the
    k-anonymity suppression of `privacy.disclosure` to what is left. Returns `out`."""
    from privacy.disclosure import suppress
    from synth.data.canonical import load_dataset, write_dataset

    ds = load_dataset(synthetic_dir)
    meta = ds.metadata
    ids = meta["image_id"].astype(str)
    if len(result.table) != len(meta) or set(result.table["image_id"]) != set(ids):
        raise InputError(where(synthetic_dir, "the memorization result was computed on a different dataset"))
    keep = ~ids.isin(set(result.flagged_ids)).to_numpy()
    kept_meta = meta[keep].drop(columns="sha256").reset_index(drop=True)
    images = np.asarray(ds.images[keep])
    disclosure_counts: dict[str, int] | None = None
    if k is not None:
        kept_meta, mask, disclosure_counts = suppress(kept_meta, k=k, real_attributes=real_attributes)
        kept_meta, images = kept_meta[mask].reset_index(drop=True), images[mask]
    if not len(images):
        raise InputError(where(synthetic_dir, "every synthetic image was filtered out; nothing to write"))
    standard = {
        "source",
        "class_names",
        "license",
        "attribution",
        "image",
        "attributes",
        "has_patient_id",
        "counts",
        "duplicates",
        "kind",
        "schema_version",
        "content_hash",
        "inputs",
        "config",
        "files",
        "created",
    }
    extra = {key: v for key, v in ds.header.items() if key not in standard}
    extra["filtered"] = {
        "from": ds.content_hash,
        "removed_memorized": int((~keep).sum()),
        "thresholds": result.summary["thresholds"],
        "quantile": result.summary["quantile"],
        "disclosure_k": k,
        "disclosure": disclosure_counts,
    }
    return write_dataset(
        out,
        images,
        kept_meta,
        class_names=ds.class_names,
        source=ds.header["source"],
        license=ds.header.get("license", "unknown"),
        attribution=ds.header.get("attribution", ""),
        duplicates=ds.header.get("duplicates"),
        inputs={"synthetic": ds.content_hash},
        config=dict(ds.header.get("config", {})),
        extra=extra,
        overwrite=overwrite,
    )
