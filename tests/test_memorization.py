"""Memorization check: faiss search vs brute force, approximate-index recall, registration, calibration (quantile
semantics, duplicate exclusion), planted copies found / clean images not flagged, filtering, bad inputs."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from privacy.calibration import allowed_flags, calibrate, threshold_at
from privacy.embeddings import embed
from privacy.filtering import filter_flagged
from privacy.image_set import ImageSet
from privacy.memorization import check_memorization
from privacy.memorization_config import MemorizationConfig
from privacy.registration import RegistrationConfig, registered_distances
from privacy.search import (
    SearchConfig,
    brute_force_nearest,
    build_index,
    exact_nearest,
    search_views,
    to_distance,
)
from privacy.space_search import space_distances
from synth.data.canonical import load_dataset, pixel_sha256
from synth.errors import InputError
from tests.planted import apply_transform
from tests.privacy_fixtures import write_synthetic

FAST = MemorizationConfig(spaces=("pixel", "registered"))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


@pytest.fixture(scope="module")
def real(pneumonia_dataset: Path):
    ds = load_dataset(pneumonia_dataset)
    return {s: ImageSet.from_frame(*ds.split(s), name=s) for s in ("train", "val", "test")}


def _set(images: np.ndarray, prefix: str, labels=None) -> ImageSet:
    return ImageSet(images=images, ids=np.array([f"{prefix}-{i}" for i in range(len(images))], dtype=object),
                    sha256=np.asarray(pixel_sha256(images)), labels=labels, name=prefix)


# --- search -----------------------------------------------------------------------------------------------------


def test_exact_search_matches_numpy_brute_force(real):
    rng = np.random.default_rng(0)
    base = embed(real["train"].images[:1500], "pixel")
    queries = embed(real["test"].images[:300], "pixel")
    d_ref, i_ref = brute_force_nearest(base, queries)
    d, i = exact_nearest(base, [queries])
    np.testing.assert_allclose(d, d_ref, atol=2e-3)
    # Where the neighbour differs it must be a tie (same distance), as faiss' own tests allow.
    differ = i != i_ref
    np.testing.assert_allclose(d[differ], to_distance(np.sum(queries[differ] * base[i_ref[differ]], axis=1)),
                               atol=2e-3)
    assert differ.mean() < 0.01
    # random unit vectors, k = 5: same sets of neighbours
    b = rng.standard_normal((2000, 32)).astype(np.float32)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    q = b[:100] + 0.1 * rng.standard_normal((100, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    index, _ = build_index(b, SearchConfig())
    _, idx = search_views(index, [q], 5)
    ref = np.argsort(-(q @ b.T), axis=1)[:, :5]
    assert all(set(a) == set(r) for a, r in zip(idx, ref, strict=True))


def test_exact_duplicates_come_back_near_zero_not_zero(real):
    x = real["train"].images[:200]
    d, i = exact_nearest(embed(x, "pixel"), [embed(x.copy(), "pixel")])
    assert (d < 5e-3).all()
    assert (real["train"].sha256[i] == real["train"].sha256[:200]).all()  # itself or a pixel-identical copy


def test_search_views_takes_the_nearer_view():
    base = np.eye(4, dtype=np.float32)
    q1 = np.array([[1, 0, 0, 0]], np.float32) * 0.6 + np.array([[0, 1, 0, 0]], np.float32) * 0.8
    q2 = np.array([[0, 0, 1, 0]], np.float32)
    index, _ = build_index(base, SearchConfig())
    d, i = search_views(index, [q1, q2], 1)
    assert i[0, 0] == 2 and d[0, 0] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_records_recall_against_exact(real, kind):
    train = embed(real["train"].images, "pixel")
    synth = embed(real["test"].images, "pixel")
    hold = embed(real["val"].images[:50], "pixel")
    loose = SearchConfig(index=kind, nprobe=1, ef_search=1, recall_sample=300)
    res = space_distances("pixel", train, hold, synth, search=loose)
    info = res.search
    assert info["index"] == kind and info["recall_sample"] == 300
    exact_d, _ = exact_nearest(train, [synth])
    rng_rows = np.sort(np.random.default_rng(loose.seed).choice(len(synth), 300, replace=False))
    expected = float(np.mean(res.synth_dist[rng_rows] <= exact_d[rng_rows] + 1e-4))
    assert info["recall_at_1"] == pytest.approx(expected)
    assert info["recall_at_1"] < 1.0  # one probe / ef 1 misses some neighbours...
    tight = SearchConfig(index=kind, nprobe=10_000, ef_search=512, recall_sample=300)
    assert space_distances("pixel", train, hold, synth, search=tight).search["recall_at_1"] >= 0.99  # ...exhaustive


# --- registration -----------------------------------------------------------------------------------------------


def test_registration_undoes_shifts_flips_and_crops(real):
    train = real["train"].images
    rng = np.random.default_rng(1)
    src = rng.choice(len(train), 40, replace=False)
    cands = np.stack([src, rng.choice(len(train), 40), rng.choice(len(train), 40)], axis=1)
    cands = rng.permuted(cands, axis=1)
    cfg = RegistrationConfig()
    # integer shifts and mirrors are undone exactly; a 24→28 crop-resize up to interpolation and the zoom grid
    for name, bound in (("exact", 0.02), ("hflip", 0.02), ("shift2", 0.02), ("crop_resize", 0.15)):
        q = apply_transform(train[src], name, rng)
        d, row = registered_distances(q, train, cands, cfg)
        assert (train[row] == train[src]).all(axis=(1, 2)).mean() == 1.0, name
        assert d.max() < bound, name
    # different images stay farther apart than any of those copies
    d, _ = registered_distances(real["test"].images[:40], train, cands, cfg)
    assert d.min() > 0.15


# --- calibration ------------------------------------------------------------------------------------------------


def test_quantile_semantics_single_space():
    null = np.arange(100) / 100  # 0.00 .. 0.99
    # floor(0.05 · 101) − 1 = 4 null images may fall below; the threshold is the 5th smallest, flagging strict.
    assert allowed_flags(100, 0.05) == 4
    t = threshold_at(null, 0.05)
    assert t == pytest.approx(0.04)
    assert (null < t).sum() == 4
    cal = calibrate({"a": null}, quantile=0.05)
    assert cal["thresholds"]["a"] == pytest.approx(0.04)
    assert cal["expected_false_flag_rate"] == pytest.approx(5 / 101)
    assert cal["null_flagged_fraction"]["a"] == pytest.approx(0.04)
    # ties: never more than the allowed count below the threshold
    tied = np.array([0.1] * 10 + [0.5] * 90)
    assert (tied < threshold_at(tied, 0.05)).sum() <= 4
    # a null too small to resolve q: the threshold is the smallest distance, and that is recorded
    small = calibrate({"a": np.array([0.3, 0.2, 0.4])}, quantile=0.01)
    assert small["thresholds"]["a"] == pytest.approx(0.2) and small["quantile_below_resolution"]


def test_joint_calibration_bounds_the_any_space_rate():
    rng = np.random.default_rng(0)
    null = {"a": rng.random(1000), "b": rng.random(1000), "c": rng.random(1000)}  # independent spaces
    joint = calibrate(null, quantile=0.03)
    per = calibrate(null, quantile=0.03, joint=False)
    allowed = allowed_flags(1000, 0.03)
    any_joint = np.any([null[s] < joint["thresholds"][s] for s in null], axis=0).sum()
    any_per = np.any([null[s] < per["thresholds"][s] for s in null], axis=0).sum()
    assert any_joint <= allowed < any_per
    assert joint["null_flagged_fraction_any"] == pytest.approx(any_joint / 1000)
    assert all(joint["thresholds"][s] < per["thresholds"][s] for s in null)


def test_duplicates_of_training_images_are_excluded_from_calibration(real):
    train, val = real["train"], real["val"]
    rng = np.random.default_rng(0)
    # A holdout that holds 3 exact training images and 3 near-duplicates (1-grey-level noise) besides 200 real ones.
    exact = train.images[:3]
    near = apply_transform(train.images[3:6], "noise", rng)  # σ = 5 is beyond "near"; use a milder copy below
    near = np.clip(train.images[3:6].astype(np.int16) + rng.integers(-1, 2, train.images[3:6].shape), 0, 255)
    near = near.astype(np.uint8)
    hold_images = np.concatenate([val.images[:200], exact, near])
    holdout = _set(hold_images, "hold")
    synthetic = _set(real["test"].images[:50], "syn")
    res = check_memorization(train, holdout, synthetic, config=FAST)
    null = res.summary["null"]
    assert null["excluded_exact_duplicates"] == 3 and null["excluded_near_duplicates"] == 3
    assert null["size"] == 200
    excluded = res.null_table["excluded"].tolist()
    assert excluded[-6:] == ["exact_duplicate"] * 3 + ["near_duplicate"] * 3
    # Without the exclusion the duplicates (distance ~0) would set the threshold and blind the check.
    clean = check_memorization(train, _set(val.images[:200], "h2"), synthetic, config=FAST)
    assert res.summary["thresholds"] == clean.summary["thresholds"]
    assert min(res.summary["thresholds"].values()) > 0.1


# --- the check --------------------------------------------------------------------------------------------------


def test_planted_copies_are_flagged_and_clean_images_are_not(real):
    train, val, test = real["train"], real["val"], real["test"]
    rng = np.random.default_rng(0)
    src = rng.choice(len(train), 64, replace=False)
    # Edits whose source is among the nearest raw-pixel candidates: without the learned space (tested with the
    # planted-copy harness) 2-px shifts, crops and mirror images get no candidate to register against.
    edits = ["exact", "shift1", "brighter", "darker", "contrast_up", "contrast_down", "noise", "noise"]
    copies = np.concatenate([apply_transform(train.images[src[i::8]], e, rng) for i, e in enumerate(edits)])
    clean = test.images
    synth = _set(np.concatenate([clean, copies]), "syn", labels=np.zeros(len(clean) + len(copies), int))
    res = check_memorization(train, val, synth, config=FAST)
    table = res.table
    planted, clean_rows = table.iloc[len(clean):], table.iloc[: len(clean)]
    assert planted["flagged"].all()
    assert planted["exact_copy"].sum() == 8
    assert clean_rows["flagged"].mean() <= 0.02
    # per-image table: ids, neighbours and distances per space, flags per space and overall
    for col in ("image_id", "label", "exact_copy", "pixel_distance", "pixel_neighbour_id", "pixel_flagged",
                "pixel_holdout_distance", "registered_distance", "registered_neighbour_id", "registered_flagged",
                "flagged"):
        assert col in table.columns
    assert set(planted["registered_neighbour_id"]) <= set(train.ids)
    s = res.summary
    assert s["flagged"] == int(table["flagged"].sum())
    assert s["flagged_fraction"] == pytest.approx(s["flagged"] / len(table))
    assert s["null"]["size"] == len(val)
    assert 0.0 <= s["per_space"]["pixel"]["closer_to_train"]["share"] <= 1.0
    assert set(s["per_space"]["pixel"]["dcr_synthetic"]) == {"q01", "q05", "q10", "q50"}
    # closest pairs: ids and distances only, nearest first; histograms with thresholds
    top = res.top_pairs["registered"]
    assert len(top) == FAST.top_k and set(top[0]) == {"synthetic_id", "train_id", "distance", "flagged"}
    assert [p["distance"] for p in top] == sorted(p["distance"] for p in top)
    h = res.histograms["pixel"]
    assert sum(h["synthetic_to_train"]) == len(table) and sum(h["holdout_to_train"]) == len(val)
    assert h["threshold"] == s["thresholds"]["pixel"]


def test_closer_to_train_share_is_high_for_copies_and_near_its_baseline_for_unseen_images(real):
    train, val, test = real["train"], real["val"], real["test"]
    cfg = MemorizationConfig(spaces=("pixel",))
    unseen = check_memorization(train, val, _set(test.images, "syn"), config=cfg)
    c = unseen.summary["per_space"]["pixel"]["closer_to_train"]
    assert c["expected_if_not_memorising"] == pytest.approx(len(train) / (len(train) + len(val)))
    assert abs(c["excess"]) < 0.25
    copies = check_memorization(train, val, _set(apply_transform(train.images[:300], "noise",
                                                                 np.random.default_rng(0)), "syn"), config=cfg)
    c = copies.summary["per_space"]["pixel"]["closer_to_train"]
    assert c["share"] > 0.97 and c["excess"] > 0.8


def test_real_holdout_images_in_a_synthetic_set_are_flagged(real):
    val, test = real["val"], real["test"]
    synth = _set(np.concatenate([test.images[:20], val.images[:3]]), "syn")
    res = check_memorization(real["train"], val, synth, config=MemorizationConfig(spaces=("pixel",)))
    assert res.table["holdout_copy"].tolist() == [False] * 20 + [True] * 3
    assert res.table["flagged"].iloc[20:].all() and not res.table["exact_copy"].any()
    assert res.summary["holdout_copies"] == 3


def test_filter_writes_the_synthetic_set_without_flagged_images(tmp_path, real):
    train, val = real["train"], real["val"]
    images = np.concatenate([real["test"].images[:30], apply_transform(train.images[:5], "brighter",
                                                                       np.random.default_rng(0))])
    labels = np.r_[np.zeros(30, int), np.ones(5, int)]
    syn_dir = write_synthetic(tmp_path / "syn", images, labels)
    ds = load_dataset(syn_dir)
    res = check_memorization(train, val, ImageSet.from_frame(np.asarray(ds.images), ds.metadata, name="syn"),
                             config=FAST)
    flagged = set(res.flagged_ids)
    assert {f"syn-{i:05d}" for i in range(30, 35)} <= flagged
    out = filter_flagged(syn_dir, res, tmp_path / "filtered")
    kept = load_dataset(out)
    assert len(kept.metadata) == 35 - len(flagged)
    assert not set(kept.metadata["image_id"]) & flagged
    assert kept.header["filtered"]["removed_memorized"] == len(flagged)
    assert kept.header["inputs"]["synthetic"] == ds.content_hash
    # a result computed on another dataset is refused
    other = write_synthetic(tmp_path / "other", images[:10], labels[:10])
    with pytest.raises(InputError, match="different dataset"):
        filter_flagged(other, res, tmp_path / "filtered2")


def test_bad_inputs_are_refused(real):
    train, val = real["train"], real["val"]
    syn = _set(real["test"].images[:10], "syn")
    with pytest.raises(InputError, match="32×32"):
        check_memorization(train, val, _set(np.zeros((3, 32, 32), np.uint8), "syn"), config=FAST)
    with pytest.raises(InputError, match="no images"):
        check_memorization(train, val, _set(np.zeros((0, 28, 28), np.uint8), "syn"), config=FAST)
    # NaN in provided embeddings
    t, h, s = (embed(x.images, "pixel") for x in (train, val, syn))
    s[3, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        check_memorization(train, val, syn, config=MemorizationConfig(spaces=("pixel",)),
                           embeddings={"pixel": {"train": t, "holdout": h, "synthetic": s}})
    with pytest.raises(InputError, match="dimension"):
        space_distances("pixel", t, h, t[:, :10][:10], search=SearchConfig())
    with pytest.raises(Exception, match="learned space needs"):
        check_memorization(train, val, syn, config=MemorizationConfig(spaces=("learned",)))


def test_index_is_chosen_by_training_set_size_and_recorded():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(2000, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    small = SearchConfig(exact_max=5000)
    assert small.kind_for(2000) == "exact" and small.kind_for(5001) == "ivf"
    _, info = build_index(base, small)
    assert info["index"] == "exact" and info["chosen_by"] == "size"
    index, info = build_index(base, SearchConfig(exact_max=1000))
    assert info["index"] == "ivf" and info["nlist"] >= 1 and index.ntotal == 2000
    assert build_index(base, SearchConfig(index="hnsw"))[1]["chosen_by"] == "config"
