"""The privacy audit's memorization search as shards: reference → shards → merge gives byte-identical files to a
single-process audit (any shard order), and mismatched, missing or repeated shards are refused."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
import torch

from privacy.audit import NULL_TABLE, PLOTS, TABLE, audit_privacy, read_privacy_audit
from privacy.audit_config import PrivacyAuditConfig
from privacy.audit_sharding import prepare_privacy_reference, privacy_audit_shard_count, search_synthetic_shard
from privacy.image_set import ImageSet
from privacy.memorization import merge_shards
from privacy.memorization_artifacts import read_shard, write_shard_files
from privacy.memorization_config import MemorizationConfig
from privacy.memorization_reference import prepare_reference
from privacy.memorization_shards import search_shard, shard_rows
from privacy.search import SearchConfig
from synth.artifacts import read_header
from synth.data.canonical import load_dataset
from synth.errors import ConfigError, InputError
from tests.planted import apply_transform
from tests.privacy_fixtures import TINY_ENCODER, write_synthetic

# 200 synthetic rows in blocks of 64: four blocks, the last one padded (8 → 64 rows). On this scale BLAS already
# gives a row's 784-d dot products last-bit differences when the query matrix' shape changes (checked: searching the
# 200 rows at once vs in thirds), which the fixed blocks absorb.
BLOCK = 64
N_SYNTHETIC = 200
CONFIG = PrivacyAuditConfig(memorization=MemorizationConfig(block_size=BLOCK), encoder=TINY_ENCODER, membership=None)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, pneumonia_dataset: Path, pneumonia_slice: Path) -> Path:
    """194 real test images outside the slice, with copies of 6 of the slice's training images at rows 100-105."""
    full, sl = load_dataset(pneumonia_dataset), load_dataset(pneumonia_slice)
    test_images, test_meta = full.split("test")
    unused = ~test_meta["image_id"].isin(set(sl.metadata["image_id"])).to_numpy()
    train = sl.split("train")[0]
    rng = np.random.default_rng(0)
    copies = np.concatenate([apply_transform(train[:3], "brighter", rng), apply_transform(train[3:6], "hflip", rng)])
    images = np.concatenate([test_images[unused][:100], copies, test_images[unused][100:194]])
    test_labels = test_meta["label"].to_numpy()[unused]
    labels = np.r_[test_labels[:100], np.zeros(6, int), test_labels[100:194]]
    return write_synthetic(tmp_path_factory.mktemp("syn") / "syn", images, labels)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, pneumonia_slice: Path, synthetic: Path) -> dict:
    """A reference and its 3 shards under the default (exact) search."""
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    root = tmp_path_factory.mktemp("sharded")
    ref = prepare_privacy_reference(pneumonia_slice, root / "ref", config=CONFIG)
    shards = [search_synthetic_shard(ref, synthetic, root / f"shard-{i}", shard_index=i, shard_count=3)
              for i in range(3)]
    return {"root": root, "ref": ref, "shards": shards}


def _without_timings(header: dict) -> dict:
    mem = dict(header["memorization"])
    mem.pop("timings")
    return {"findings": header["findings"], "passed": header["passed"], "counts": header["counts"],
            "memorization": mem}


def _assert_identical(a: Path, b: Path) -> None:
    for name in (TABLE, NULL_TABLE, PLOTS):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert _without_timings(read_privacy_audit(a)) == _without_timings(read_privacy_audit(b))


def test_three_shards_merge_to_the_single_process_audit(tmp_path, pneumonia_slice, synthetic, sharded):
    single = audit_privacy(pneumonia_slice, synthetic, tmp_path / "single", config=CONFIG)
    # shard i holds whole blocks of 64 rows: 4 blocks over 3 shards
    rows = [read_header(s, "shard.json", kind="memorization_shard")["rows"] for s in sharded["shards"]]
    assert rows == [[0, 64], [64, 128], [128, 200]]
    given = [sharded["shards"][i] for i in (2, 0, 1)]  # any order
    merged = audit_privacy(pneumonia_slice, synthetic, tmp_path / "merged", config=CONFIG,
                           reference=sharded["ref"], shards=given)
    _assert_identical(single, merged)
    header = read_privacy_audit(merged)
    assert header["memorization_sharding"]["shard_count"] == 3
    assert header["memorization_sharding"]["rows"] == rows
    assert set(header["inputs"]) >= {"real", "synthetic", "privacy_reference", "memorization_shard_0",
                                     "memorization_shard_2"}
    assert len(header["memorization"]["timings"]["shards"]) == 3
    # the reference is reproducible: prepared again, it has the same content hash (a cache key of every shard)
    again = prepare_privacy_reference(pneumonia_slice, tmp_path / "ref-again", config=CONFIG)
    assert (read_header(again, "reference.json", kind="privacy_reference")["content_hash"]
            == read_header(sharded["ref"], "reference.json")["content_hash"])
    # the check found the planted copies (rows 100-105, in the middle shard), so the identity is not vacuous
    table = pd.read_parquet(merged / TABLE)
    assert table["image_id"].tolist() == [f"syn-{i:05d}" for i in range(N_SYNTHETIC)]
    assert table["flagged"].iloc[100:106].all()
    top = json.loads((merged / PLOTS).read_text())["top_pairs"]["registered"]
    assert {p["synthetic_id"] for p in top[:6]} == {f"syn-{i:05d}" for i in range(100, 106)}


def test_approximate_base_sharded_search_merges_identically(tmp_path, pneumonia_slice, synthetic):
    # IVF over 4 base shards of the 64 training images: prebuilt indexes travel in the reference, and the recall
    # sample's exact distances are computed per shard and merged.
    cfg = CONFIG.model_copy(update={"memorization": MemorizationConfig(
        block_size=BLOCK, spaces=("pixel", "registered"),
        search=SearchConfig(index="ivf", base_shard_size=20, nprobe=1, recall_sample=40))})
    single = audit_privacy(pneumonia_slice, synthetic, tmp_path / "single", config=cfg)
    ref = prepare_privacy_reference(pneumonia_slice, tmp_path / "ref", config=cfg)
    assert sorted(p.name for p in (ref / "pixel").glob("index-*.faiss")) == [f"index-{j:04d}.faiss" for j in range(4)]
    shards = [search_synthetic_shard(ref, synthetic, tmp_path / f"s{i}", shard_index=i, shard_count=2)
              for i in (1, 0)]
    merged = audit_privacy(pneumonia_slice, synthetic, tmp_path / "merged", config=cfg, reference=ref, shards=shards)
    _assert_identical(single, merged)
    search = read_privacy_audit(merged)["memorization"]["per_space"]["pixel"]["search"]
    assert search["index"] == "ivf" and search["recall_sample"] == 40 and 0.0 <= search["recall_at_1"] <= 1.0
    assert [s["rows"] for s in search["base_shards"]] == [[0, 20], [20, 40], [40, 60], [60, 64]]


def test_mismatched_missing_and_repeated_shards_are_refused(tmp_path, pneumonia_dataset, pneumonia_slice, synthetic,
                                                            sharded):
    ref, (s0, s1, s2) = sharded["ref"], sharded["shards"]
    other_count = search_synthetic_shard(ref, synthetic, tmp_path / "of2", shard_index=0, shard_count=2)
    other_syn = write_synthetic(tmp_path / "syn2", load_dataset(synthetic).images[:30], np.zeros(30, int))
    other_syn_shard = search_synthetic_shard(ref, other_syn, tmp_path / "syn2-0", shard_index=0, shard_count=1)
    # a reference prepared with another quantile (the same encoder, loaded)
    cfg_b = CONFIG.model_copy(update={"memorization": MemorizationConfig(block_size=BLOCK, quantile=0.05),
                                      "encoder_dir": ref / "encoder"})
    ref_b = prepare_privacy_reference(pneumonia_slice, tmp_path / "ref-b", config=cfg_b)
    cases = [
        (dict(reference=ref, shards=[s0, s2]), f"{s0.parent}: memorization shard(s) [1] of 3 missing"),
        (dict(reference=ref, shards=[s0, s1, s1, s2]), f"{s1}: repeats shard 1 of 3"),
        (dict(reference=ref, shards=[s0, s1, s2, other_count]), f"{other_count}: is shard 0 of 2"),
        (dict(reference=ref, shards=[other_syn_shard]), f"{other_syn_shard}: was searched on synthetic dataset"),
        (dict(reference=ref, shards=[]), "shards is empty"),
        (dict(reference=ref), f"{ref}: a privacy reference and its memorization shards go together"),
        (dict(reference=ref_b, shards=[s0, s1, s2]), f"{ref_b}: was prepared with another config "
                                                     "(memorization.quantile: 0.05 here vs 0.01"),
    ]
    for i, (kwargs, message) in enumerate(cases):
        out = tmp_path / f"audit-{i}"
        with pytest.raises(InputError) as err:
            audit_privacy(pneumonia_slice, synthetic, out, config=CONFIG, **kwargs)
        assert message in str(err.value) and "\n" not in str(err.value), (message, str(err.value))
        assert not out.exists()
    # shards of one reference against another (with that reference's own config)
    with pytest.raises(InputError, match=f"{s0}: was searched against privacy reference"):
        audit_privacy(pneumonia_slice, synthetic, tmp_path / "x", config=cfg_b, reference=ref_b, shards=[s0, s1, s2])
    # the reference of another real dataset
    with pytest.raises(InputError, match=f"{ref}: was prepared from real dataset"):
        audit_privacy(pneumonia_dataset, synthetic, tmp_path / "y", config=CONFIG, reference=ref, shards=[s0, s1, s2])
    big = write_synthetic(tmp_path / "big", np.zeros((5, 32, 32), np.uint8), np.zeros(5, int))
    with pytest.raises(InputError, match=f"{big}: synthetic images are 32×32×1"):
        search_synthetic_shard(ref, big, tmp_path / "bad", shard_index=0, shard_count=1)
    with pytest.raises(ConfigError, match=r"shard_index must be in \[0, 2\], got 3"):
        search_synthetic_shard(ref, synthetic, tmp_path / "bad", shard_index=3, shard_count=3)
    assert not (tmp_path / "bad").exists()


def test_shard_rows_are_whole_blocks_and_cover_every_row_once():
    for n, block, count in ((66, 24, 3), (1000, 64, 7), (10, 24, 4), (5000, 1024, 2)):
        ranges = [shard_rows(n, i, count, block) for i in range(count)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        assert all(lo % block == 0 for lo, _ in ranges)
    assert [shard_rows(10, i, 4, 24) for i in range(4)] == [(0, 0), (0, 0), (0, 0), (0, 10)]  # one block
    assert privacy_audit_shard_count(10_000) == 2 and privacy_audit_shard_count(100) == 1
    assert privacy_audit_shard_count(100_000, max_shards=4) == 4
    assert privacy_audit_shard_count(100_000, block=50_000) == 2


def test_more_shards_than_blocks_leaves_empty_shards_that_merge_too(tmp_path, pneumonia_slice):
    ds = load_dataset(pneumonia_slice)
    train, hold, syn = (ImageSet.from_frame(*ds.split(s), name=s) for s in ("train", "val", "test"))
    cfg = MemorizationConfig(spaces=("pixel", "registered"), block_size=16)
    ref = prepare_reference(train, hold, config=cfg)
    single = merge_shards(ref, syn, [search_shard(ref, syn.images)])
    parts = [search_shard(ref, syn.images, shard_index=i, shard_count=5) for i in range(5)]
    assert [(p.lo, p.hi) for p in parts] == [(0, 0), (0, 0), (0, 16), (16, 16), (16, 32)]
    # an empty shard survives its artifact round trip
    write_shard_files(parts[0], tmp_path)
    empty = read_shard(tmp_path, {"rows": [0, 0], "synthetic_images": 32})
    assert set(empty.distance) == {"pixel", "registered"} and len(empty.distance["pixel"]) == 0
    merged = merge_shards(ref, syn, [parts[4], parts[0], parts[3], parts[2], empty])  # empty stands for parts[1]
    pd.testing.assert_frame_equal(single.table, merged.table)
    pd.testing.assert_frame_equal(single.null_table, merged.null_table)
    assert {**single.summary, "timings": None} == {**merged.summary, "timings": None}
    with pytest.raises(InputError, match=r"rows \[16, 32\) are missing"):
        merge_shards(ref, syn, parts[:3])
    with pytest.raises(InputError, match=r"rows \[0, 16\) are repeated"):
        merge_shards(ref, syn, [*parts, parts[2]])
