"""Nearest-training-image search with faiss: index choice, base shards, GPU placement and fixed query blocks.

- **Index by size** (`SearchConfig.index = "auto"`): exact inner product up to `exact_max` training vectors, IVF
  beyond; the kind and its parameters are recorded, and an approximate index's recall@1 against exact search is
  measured on a sample of queries by the caller (`privacy.memorization`).
- **Base shards** (`SearchConfig.base_shard_size`): the training vectors split into contiguous row ranges, each
  searched on its own (`search_base_shard`, a plain function a Dask/Ray worker can run on its own shard file) and
  the parts merged into the global top-k (`merge_topk`). With exact search the merged result is the single exact
  index's result (up to the order of exact ties, which is canonical here: distance, then row).
- **GPU** (`SearchConfig.gpu`): with faiss-gpu installed and a GPU visible, indexes are cloned onto all GPUs for
  searching ("auto"); "always" without a GPU is a configuration error; "never" stays on the CPU. Indexes are built
  (and IVF trained) on the CPU, so a saved index is the same whichever machine searches it.
- **Fixed query blocks** (`map_blocks`): BLAS gives a row's dot products last-bit differences when the query matrix'
  shape changes (and faiss switches to a non-BLAS loop below 20 queries), so callers that need bit-identical
  results however the queries are sharded search them in blocks of a fixed size anchored at global row indices,
  padding the last block by repeating its first row. OpenBLAS' results also change with the thread count
  (`faiss.omp_set_num_threads`): shards agree bit for bit only at the same thread count.

Distances are Euclidean between unit vectors, `sqrt(2 − 2·cos)` in [0, 2]; misses (IVF/HNSW return row -1) come
back as distance inf and row -1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from privacy.embeddings import check_embeddings
from synth.errors import ConfigError, InputError

# Recall@1 of an approximate index counts a query as found when its distance is within this of the exact one
# (ties between equidistant training images are not misses).
RECALL_TOLERANCE = 1e-4
_NO_ROW = np.iinfo(np.int64).max


class SearchConfig(BaseModel):
    """The faiss index searched for nearest training images. Exact (inner product over unit vectors) by default: at
    MedMNIST scale it is fast and never misses; IVF/HNSW for very large training sets, with recall@1 measured
    against exact."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # "auto": exact up to `exact_max` training vectors (where exact search still takes seconds: see
    # benchmarks/README.md), IVF beyond; the choice and its parameters are recorded with the recall measured.
    index: Literal["auto", "exact", "ivf", "hnsw"] = "auto"
    exact_max: int = Field(250_000, ge=1)
    nlist: int | None = Field(None, ge=1)  # IVF lists; None: 4·sqrt(N), at least 39 training points per list
    nprobe: int = Field(16, ge=1)
    hnsw_m: int = Field(32, ge=4)
    ef_search: int = Field(128, ge=1)
    ef_construction: int = Field(80, ge=1)
    recall_sample: int = Field(1000, ge=1)  # synthetic queries searched exactly too, to measure recall@1
    seed: int = 0
    # Training vectors per base shard (each searched on its own, results merged); None: one index over all.
    base_shard_size: int | None = Field(None, ge=1)
    # faiss on GPU: "auto" when faiss-gpu sees a GPU, "always" (an error without one), "never".
    gpu: Literal["auto", "never", "always"] = "auto"

    def kind_for(self, n: int) -> str:
        """The index kind used for `n` training vectors (the whole training set, whatever the base shards)."""
        if self.index != "auto":
            return self.index
        return "exact" if n <= self.exact_max else "ivf"


def to_distance(similarity: np.ndarray) -> np.ndarray:
    """Inner product of unit vectors → Euclidean distance `sqrt(2 − 2·s)` (float32, clipped at 0)."""
    return np.sqrt(np.clip(2.0 - 2.0 * np.asarray(similarity, dtype=np.float64), 0.0, None)).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# GPU


def gpu_count() -> int:
    """GPUs faiss can use (0 with faiss-cpu, or faiss-gpu without a visible CUDA device)."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def use_gpu(search: SearchConfig, kind: str) -> bool:
    """Whether an index of `kind` is searched on GPU under `search.gpu`. faiss has no GPU HNSW, so HNSW stays on the
    CPU under "auto"; "always" with HNSW or without a GPU raises ConfigError."""
    if search.gpu == "never":
        return False
    gpus = gpu_count()
    if search.gpu == "always":
        if gpus == 0:
            raise ConfigError("search gpu 'always': faiss sees no GPU (needs faiss-gpu and a CUDA device); "
                              "use gpu 'auto' or 'never'")
        if kind == "hnsw":
            raise ConfigError("search gpu 'always': faiss has no GPU HNSW index; use index 'exact' or 'ivf'")
    return gpus > 0 and kind != "hnsw"


def place_index(index: Any, gpu: bool) -> Any:
    """The index to search: cloned onto all GPUs when `gpu`, else `index` itself."""
    if not gpu:
        return index
    import faiss

    return faiss.index_cpu_to_all_gpus(index)


# --------------------------------------------------------------------------------------------------------------
# Indexes


class FlatIndex:
    """Exact inner-product search over `base` without copying it (`faiss.knn`: the same BLAS computation as
    `IndexFlatIP.search`, bit for bit): a memory-mapped 1M×784 base is searched in place."""

    def __init__(self, base: np.ndarray):
        self.base = base
        self.ntotal = len(base)
        self.d = base.shape[1]

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        return faiss.knn(np.ascontiguousarray(x, dtype=np.float32), self.base, k, metric=faiss.METRIC_INNER_PRODUCT)


def build_index(base: np.ndarray, search: SearchConfig, *, n_total: int | None = None) -> tuple[Any, dict[str, Any]]:
    """A faiss inner-product index over the unit vectors `base` (N, d), of the kind `search` chooses for
    `n_total` training vectors (default N: pass the whole training set's size when `base` is one base shard),
    placed on GPU when `use_gpu` says so. Returns (index, info); info records the kind, its parameters and "gpu".
    """
    import faiss

    base = check_embeddings(base, what="training embeddings")
    n, d = base.shape
    kind = search.kind_for(n_total if n_total is not None else n)
    gpu = use_gpu(search, kind)
    info: dict[str, Any] = {"index": kind, "chosen_by": "size" if search.index == "auto" else "config"}
    if kind == "exact":
        if gpu:
            index = faiss.IndexFlatIP(d)
            index.add(base)
        else:  # no copy of the base (see FlatIndex)
            index = FlatIndex(base)
    elif kind == "ivf":
        nlist = search.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
        if nlist > n:
            raise ConfigError(f"IVF nlist {nlist} exceeds the {n} training vectors")
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = search.seed
        index.cp.verbose = False
        # k-means on a seeded sample of at most 64 points per list: enough for the centroids, bounded cost
        train_rows = np.random.default_rng(search.seed).permutation(n)[: 64 * nlist]
        index.train(base[np.sort(train_rows)])
        index.nprobe = min(search.nprobe, nlist)
        index.quantizer_trains_alone = 0
        index.add(base)
        info.update(nlist=nlist, nprobe=int(index.nprobe))
    else:
        index = faiss.IndexHNSWFlat(d, search.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = search.ef_construction
        index.hnsw.efSearch = search.ef_search
        index.add(base)
        info.update(M=search.hnsw_m, ef_search=search.ef_search, ef_construction=search.ef_construction)
    info["gpu"] = gpu
    return place_index(index, gpu), info


def cpu_index(index: Any, gpu: bool) -> Any:
    """A CPU copy of an index that `build_index` placed on GPU (`gpu`), for `faiss.write_index`; else itself."""
    if not gpu:
        return index
    import faiss

    return faiss.index_gpu_to_cpu(index)


def base_ranges(n: int, search: SearchConfig) -> list[tuple[int, int]]:
    """The base shards' row ranges [lo, hi) over `n` training vectors (one range when unsharded)."""
    size = search.base_shard_size or max(n, 1)
    return [(lo, min(n, lo + size)) for lo in range(0, n, size)] or [(0, 0)]


# --------------------------------------------------------------------------------------------------------------
# Searching


def map_blocks(
    fn: Callable[..., tuple[np.ndarray, ...]], arrays: Sequence[np.ndarray], block: int | None
) -> tuple[np.ndarray, ...]:
    """Apply `fn(*arrays_block)` to fixed-size row blocks of `arrays` and concatenate its outputs (each with one
    row per input row) along axis `-2` if 3-D (views × rows × k) else axis 0.

    Blocks start at row 0, which the caller anchors at a global multiple of `block`; a short last block is padded to
    `block` rows by repeating its first row (outputs of the padding are dropped), so every row is computed in the
    same context (same matrix shape, same position) whatever range of rows a call covers. `block` None: one call.
    """
    n = len(arrays[0])
    if block is None or n == 0:
        return fn(*arrays)
    outs: list[tuple[np.ndarray, ...]] = []
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        part = [a[lo:hi] for a in arrays]
        if hi - lo < block:
            part = [np.concatenate([p, np.repeat(p[:1], block - (hi - lo), axis=0)]) for p in part]
        res = fn(*part)
        outs.append(tuple(r[..., : hi - lo, :] if r.ndim == 3 else r[: hi - lo] for r in res))
    return tuple(np.concatenate([o[i] for o in outs], axis=-2 if outs[0][i].ndim == 3 else 0)
                 for i in range(len(outs[0])))


def search_index(
    index: Any, views: Sequence[np.ndarray], k: int, *, row_offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Each view's k nearest rows in `index`: distances (V, N, k') float32 and rows (V, N, k') int64, k' = min(k,
    ntotal), rows shifted by `row_offset` (misses: inf and -1), each query's results in canonical order."""
    k = min(k, index.ntotal)
    n = len(views[0]) if views else 0
    if k == 0 or n == 0:
        return np.zeros((len(views), n, 0), np.float32), np.zeros((len(views), n, 0), np.int64)
    dists, rows = [], []
    for v in views:
        sim, idx = index.search(np.ascontiguousarray(v, dtype=np.float32), k)
        dist = to_distance(sim)
        idx = idx.astype(np.int64)
        miss = idx < 0
        dist[miss] = np.inf
        idx = np.where(miss, -1, idx + row_offset)
        dists.append(dist)
        rows.append(idx)
    return merge_topk([(np.stack(dists), np.stack(rows))], k)


def search_base_shard(
    base: np.ndarray,
    row_offset: int,
    views: Sequence[np.ndarray],
    k: int,
    search: SearchConfig,
    *,
    n_total: int | None = None,
    index: Any = None,
    block: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Search one base shard (the training rows `row_offset ..` held in `base`) for each query view's k nearest:
    (V, N, k') distances and global rows, to be merged with the other shards' by `merge_topk`.

    A plain function a worker can run on its own shard file. The index is built with `build_index` (kind chosen
    for `n_total`, the whole training set's size) unless a prebuilt `index` over `base` is given. `block`: search
    the queries in fixed padded blocks (`map_blocks`) for results that do not depend on how queries are split.
    """
    if index is None:
        index, _ = build_index(base, search, n_total=n_total)
    views = [np.ascontiguousarray(v, dtype=np.float32) for v in views]
    return map_blocks(lambda *vs: search_index(index, vs, k, row_offset=row_offset), views, block)


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge partial results `(dist, rows)` (same leading shape, any number of columns each) into the k best per
    query, ordered by distance then row (misses, row -1, last): the global top-k of base-sharded searches."""
    dist = np.concatenate([np.asarray(d, dtype=np.float32) for d, _ in parts], axis=-1)
    rows = np.concatenate([np.asarray(r, dtype=np.int64) for _, r in parts], axis=-1)
    order = np.lexsort((np.where(rows < 0, _NO_ROW, rows), dist), axis=-1)[..., :k]
    return np.take_along_axis(dist, order, -1), np.take_along_axis(rows, order, -1)


def combine_views(dist: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(V, N, k) per-view results → (N, V·k): each query's results over all its views, nearest first (a row may
    repeat when several views find it)."""
    v, n, k = dist.shape
    flat_d = dist.transpose(1, 0, 2).reshape(n, v * k)
    flat_r = rows.transpose(1, 0, 2).reshape(n, v * k)
    return merge_topk([(flat_d, flat_r)], v * k)


def search_views(index: Any, views: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """k nearest training rows of each query over several views of it (e.g. an image and its mirror): the
    views' results merged and sorted by distance (a row may repeat). Misses (-1 from IVF) get distance inf."""
    return combine_views(*search_index(index, views, k))


def exact_nearest(base: np.ndarray, views: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest row (distance, row) over query views (exact inner-product search on the CPU)."""
    dist, idx = search_views(FlatIndex(np.ascontiguousarray(base, dtype=np.float32)), views, 1)
    return dist[:, 0], idx[:, 0]


def brute_force_nearest(base: np.ndarray, queries: np.ndarray, *, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Reference nearest neighbour with numpy (matmul + argmax in chunks): what faiss is checked against."""
    dist = np.empty(len(queries), dtype=np.float32)
    idx = np.empty(len(queries), dtype=np.int64)
    for lo in range(0, len(queries), chunk):
        sim = queries[lo : lo + chunk] @ base.T
        best = sim.argmax(axis=1)
        idx[lo : lo + chunk] = best
        dist[lo : lo + chunk] = to_distance(sim[np.arange(len(best)), best])
    return dist, idx


def recall_at_1(approx_dist: np.ndarray, exact_dist: np.ndarray, *, tol: float = RECALL_TOLERANCE) -> float:
    """Share of queries whose approximate nearest distance equals the exact one (within `tol`)."""
    return float(np.mean(approx_dist <= exact_dist + tol))


def recall_rows(n: int, search: SearchConfig) -> np.ndarray:
    """The (sorted) query rows whose recall@1 is measured: a seeded sample of `recall_sample` of `n` rows."""
    rng = np.random.default_rng(search.seed)
    return np.sort(rng.choice(n, size=min(search.recall_sample, n), replace=False))


def check_dimension(name: str, train_dim: int, arrays: Sequence[np.ndarray]) -> None:
    """Every query array has the training embeddings' dimension."""
    for v in arrays:
        if v.shape[1] != train_dim:
            raise InputError(f"{name} embeddings: dimension {v.shape[1]} differs from training's {train_dim}")
