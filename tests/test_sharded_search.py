"""faiss at scale: base-sharded search against numpy brute force (ties and k > 1 included), fixed query blocks,
the base-sharded memorization check, and the GPU decision (no GPU here: faiss' GPU calls are monkeypatched)."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from privacy.image_set import ImageSet
from privacy.memorization import check_memorization
from privacy.memorization_config import MemorizationConfig
from privacy.search import (
    SearchConfig,
    base_ranges,
    build_index,
    map_blocks,
    merge_topk,
    search_base_shard,
    search_index,
    to_distance,
    use_gpu,
)
from synth.data.canonical import load_dataset
from synth.errors import ConfigError


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


def _brute_force_knn(base: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every base row per query, ordered by (distance, row): numpy in float64."""
    dist = to_distance(queries.astype(np.float64) @ base.astype(np.float64).T)
    rows = np.broadcast_to(np.arange(len(base)), dist.shape)
    order = np.lexsort((rows, dist), axis=-1)
    return np.take_along_axis(dist, order, -1), np.take_along_axis(rows, order, -1)


def _assert_knn_equal(dist, rows, ref_dist, ref_rows, k: int, atol: float) -> None:
    """faiss-contrib style: distances equal to tolerance; rows equal up to the order of ties, and at the k-th
    distance (where only some of the tied rows fit) a subset of the tied rows."""
    np.testing.assert_allclose(dist, ref_dist[:, :k], atol=atol)
    for q in range(len(dist)):
        if np.array_equal(rows[q], ref_rows[q, :k]):
            continue
        kth = ref_dist[q, k - 1]
        inner = ref_dist[q, :k] < kth - atol
        assert set(rows[q][inner]) == set(ref_rows[q, :k][inner]), q
        tied = set(ref_rows[q][np.abs(ref_dist[q] - kth) <= atol])
        assert set(rows[q][~inner]) <= tied, q


def _unit(rng, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("shard_size", [None, 1, 7, 250, 999])
def test_base_sharded_exact_search_equals_brute_force(shard_size):
    rng = np.random.default_rng(0)
    base = _unit(rng, 1000, 24)
    queries = np.concatenate([base[:30] + 0.05 * _unit(rng, 30, 24), _unit(rng, 70, 24)])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ref_d, ref_r = _brute_force_knn(base, queries)
    search = SearchConfig(index="exact", base_shard_size=shard_size)
    for k in (1, 5, 12):
        parts = [search_base_shard(base[lo:hi], lo, [queries], k, search, n_total=len(base))
                 for lo, hi in base_ranges(len(base), search)]
        dist, rows = merge_topk(parts, k)
        assert dist.shape == rows.shape == (1, len(queries), k)
        # no ties among random vectors: the very same rows, in order
        np.testing.assert_array_equal(rows[0], ref_r[:, :k])
        np.testing.assert_allclose(dist[0], ref_d[:, :k], atol=1e-5)


@pytest.mark.parametrize("shard_size", [None, 3, 16, 64])
def test_base_sharded_exact_search_with_ties(shard_size):
    # Unit vectors with four entries of ±0.5: every inner product is an exact multiple of 0.25 in float32, so equal
    # distances are exact ties, many of them, and repeated base rows tie too.
    rng = np.random.default_rng(1)
    d = 8

    def tie_vectors(n: int) -> np.ndarray:
        x = np.zeros((n, d), np.float32)
        for i in range(n):
            x[i, rng.choice(d, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
        return x

    base = np.concatenate([tie_vectors(150), tie_vectors(5).repeat(4, axis=0)])  # 170 rows, duplicates included
    queries = np.concatenate([tie_vectors(60), base[150:170:4]])
    ref_d, ref_r = _brute_force_knn(base, queries)
    search = SearchConfig(index="exact", base_shard_size=shard_size)
    single, _ = build_index(base, SearchConfig(index="exact"))
    for k in (1, 4, 10):
        parts = [search_base_shard(base[lo:hi], lo, [queries], k, search, n_total=len(base))
                 for lo, hi in base_ranges(len(base), search)]
        dist, rows = merge_topk(parts, k)
        _assert_knn_equal(dist[0], rows[0], ref_d, ref_r, k, atol=1e-6)
        s_dist, s_rows = search_index(single, [queries], k)
        _assert_knn_equal(s_dist[0], s_rows[0], ref_d, ref_r, k, atol=1e-6)
        # results come in canonical order: by distance, then row
        assert (np.diff(dist[0], axis=1) >= 0).all()
        same = np.diff(dist[0], axis=1) == 0
        assert (np.diff(rows[0], axis=1)[same] > 0).all()
    # a query that is a base row (repeated 4 times) finds all 4 copies at distance 0
    d0, r0 = merge_topk([search_base_shard(base[lo:hi], lo, [base[150:151]], 4, search, n_total=len(base))
                         for lo, hi in base_ranges(len(base), search)], 4)
    assert r0[0, 0].tolist() == [150, 151, 152, 153] and np.allclose(d0, 0, atol=1e-3)


def test_merge_topk_handles_short_shards_and_misses():
    d1, r1 = np.array([[[0.1, 0.4]]], np.float32), np.array([[[3, 7]]])
    d2, r2 = np.array([[[0.2, np.inf]]], np.float32), np.array([[[12, -1]]])  # an IVF miss
    d3, r3 = np.array([[[0.1]]], np.float32), np.array([[[1]]])  # a shard smaller than k, tied with row 3
    dist, rows = merge_topk([(d1, r1), (d2, r2), (d3, r3)], 4)
    assert rows.tolist() == [[[1, 3, 12, 7]]] and dist[0, 0, 3] == np.float32(0.4)
    dist, rows = merge_topk([(d2, r2)], 2)
    assert rows.tolist() == [[[12, -1]]] and np.isinf(dist[0, 0, 1])


def test_fixed_query_blocks_make_results_independent_of_the_split():
    rng = np.random.default_rng(2)
    base = _unit(rng, 3000, 784)
    queries = _unit(rng, 300, 784)
    index, _ = build_index(base, SearchConfig(index="exact"))
    block = 64
    whole = search_base_shard(base, 0, [queries], 3, SearchConfig(), index=index, block=block)
    for lo, hi in ((0, 128), (128, 192), (192, 300)):  # shards of whole blocks
        part = search_base_shard(base, 0, [queries[lo:hi]], 3, SearchConfig(), index=index, block=block)
        np.testing.assert_array_equal(part[0], whole[0][:, lo:hi])  # bit for bit
        np.testing.assert_array_equal(part[1], whole[1][:, lo:hi])
    # map_blocks pads a short last block with its first row and drops the padding's outputs
    calls = []
    out = map_blocks(lambda x: (calls.append(len(x)) or x * 2,), [np.arange(10.0)], 4)[0]
    assert calls == [4, 4, 4] and out.tolist() == (np.arange(10.0) * 2).tolist()


def test_base_sharded_memorization_check_matches_one_index(pneumonia_slice: Path, pneumonia_dataset: Path):
    sl, full = load_dataset(pneumonia_slice), load_dataset(pneumonia_dataset)
    train = ImageSet.from_frame(*full.split("train"), name="train")
    holdout = ImageSet.from_frame(*sl.split("val"), name="val")
    synth = ImageSet.from_frame(*sl.split("test"), name="syn")
    cfg = MemorizationConfig(spaces=("pixel", "registered"))
    one = check_memorization(train, holdout, synth, config=cfg)
    sharded = check_memorization(train, holdout, synth, config=cfg.model_copy(
        update={"search": SearchConfig(base_shard_size=1000)}))
    for table in ("table", "null_table"):
        a, b = getattr(one, table), getattr(sharded, table)
        for space in ("pixel", "registered"):
            np.testing.assert_allclose(a[f"{space}_distance"], b[f"{space}_distance"], atol=1e-5)
            assert (a[f"{space}_neighbour_id"] == b[f"{space}_neighbour_id"]).mean() > 0.97  # the rest: ties
    info = sharded.summary["per_space"]["pixel"]["search"]
    assert [s["rows"] for s in info["base_shards"]] == [[lo, min(lo + 1000, len(train))]
                                                        for lo in range(0, len(train), 1000)]
    assert info["index"] == "exact" and "base_shards" not in one.summary["per_space"]["pixel"]["search"]


class _FakeGpu:
    """Stands in for faiss' GPU functions: counts GPUs and records clones (the 'GPU' index is the CPU one)."""

    def __init__(self, monkeypatch, gpus: int):
        self.cloned: list[str] = []
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: gpus)
        monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", self._clone)
        monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda index: index, raising=False)  # faiss-gpu only

    def _clone(self, index, *args, **kwargs):
        self.cloned.append(type(index).__name__)
        return index


def test_gpu_is_used_when_faiss_sees_one(monkeypatch):
    rng = np.random.default_rng(3)
    base, q = _unit(rng, 500, 16), _unit(rng, 40, 16)
    gpu = _FakeGpu(monkeypatch, gpus=2)
    assert use_gpu(SearchConfig(), "exact") and use_gpu(SearchConfig(gpu="always"), "ivf")
    assert not use_gpu(SearchConfig(), "hnsw")  # faiss has no GPU HNSW: auto stays on the CPU
    with pytest.raises(ConfigError, match="no GPU HNSW"):
        use_gpu(SearchConfig(gpu="always"), "hnsw")
    index, info = build_index(base, SearchConfig())
    assert info["gpu"] is True and gpu.cloned == ["IndexFlatIP"]
    cpu_d, cpu_r = search_index(build_index(base, SearchConfig(gpu="never"))[0], [q], 3)
    gpu_d, gpu_r = search_index(index, [q], 3)
    np.testing.assert_allclose(gpu_d, cpu_d, atol=1e-5)
    assert (gpu_r == cpu_r).all()
    assert gpu.cloned == ["IndexFlatIP"]  # "never" cloned nothing
    _, info = build_index(base, SearchConfig(index="ivf", nlist=4))
    assert info["gpu"] is True and gpu.cloned[-1] == "IndexIVFFlat"
    # the whole check records it
    imgs = (rng.random((30, 28, 28)) * 255).astype(np.uint8)
    sets = [ImageSet(images=imgs[i::3], ids=np.array([f"{n}{j}" for j in range(10)]),
                     sha256=np.array([f"{n}{j}" for j in range(10)]), name=n) for i, n in enumerate("ths")]
    res = check_memorization(*sets, config=MemorizationConfig(spaces=("pixel",)))
    assert res.summary["per_space"]["pixel"]["search"]["gpu"] is True


def test_gpu_decision_without_a_gpu(monkeypatch):
    gpu = _FakeGpu(monkeypatch, gpus=0)
    base = _unit(np.random.default_rng(4), 100, 8)
    for kind in ("exact", "ivf", "hnsw"):
        assert not use_gpu(SearchConfig(), kind) and not use_gpu(SearchConfig(gpu="never"), kind)
    with pytest.raises(ConfigError, match="gpu 'always': faiss sees no GPU") as err:
        build_index(base, SearchConfig(gpu="always"))
    assert "\n" not in str(err.value)
    _, info = build_index(base, SearchConfig())
    assert info["gpu"] is False and gpu.cloned == []
    # faiss-cpu without the GPU functions at all
    monkeypatch.delattr(faiss, "get_num_gpus")
    assert not use_gpu(SearchConfig(), "exact")
