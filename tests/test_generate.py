"""generate / merge_shards / `synthgate generate`: counts, seeds, determinism, shards, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flows.cli import run
from synth.artifacts import sha256_file
from synth.conditioning import ConditionSpace
from synth.data.canonical import load_dataset
from synth.errors import ConfigError, InputError
from synth.generate import (
    generate,
    image_seed,
    largest_remainder,
    merge_shards,
    plan_generation,
    shard_indices,
)
from synth.sampling import SamplerConfig
from tests.model_fixtures import make_model_dir

torch.set_num_threads(1)

FAST = SamplerConfig(name="ddim", steps=2)
STOCHASTIC = SamplerConfig(name="ddpm", steps=3)  # per-step noise: exercises the per-image generators


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("gen") / "model", condition_counts=[1214, 3494])


@pytest.fixture(scope="module")
def attr_model_dir(tmp_path_factory):
    space = ConditionSpace(class_names=("normal", "pneumonia"), attributes=(("sex", ("F", "M")),))
    # conditions: normal/F, normal/M, pneumonia/F, pneumonia/M
    return make_model_dir(tmp_path_factory.mktemp("gen_attr") / "model", space=space, condition_counts=[10, 30, 20, 20])


def _gen(model_dir, out, **kw):
    kw.setdefault("sampler", FAST)
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    return generate(model_dir, out, **kw)


def _files_equal(a, b):
    return all(sha256_file(a / f) == sha256_file(b / f) for f in ("images.npy", "metadata.parquet"))


# --- the plan: counts and seeds -----------------------------------------------------------------------------


def test_largest_remainder_is_exact_and_deterministic():
    assert largest_remainder(10, [1, 1, 1]) == [4, 3, 3]  # tie goes to the lower index
    assert largest_remainder(7, [1214, 3494]) == [2, 5]  # 1.80 / 5.20
    assert largest_remainder(100, [1214, 3494]) == [26, 74]
    assert largest_remainder(5, [0, 3, 0]) == [0, 5, 0]
    assert largest_remainder(3, [0, 0]) == [2, 1]  # all-zero weights: uniform
    assert largest_remainder(10, [0.5, 0.25, 0.25]) == [5, 3, 2]
    for total in range(0, 50):
        parts = largest_remainder(total, [3, 5, 11])
        assert sum(parts) == total
        assert all(abs(p - total * w / 19) < 1 for p, w in zip(parts, [3, 5, 11], strict=True))
    with pytest.raises(ConfigError):
        largest_remainder(3, [1, -1])


def test_n_is_split_like_the_training_conditions(model_dir):
    from synth.pipeline import read_model_card

    plan = plan_generation(read_model_card(model_dir), n=100, seed=0)
    assert plan.counts == (26, 74) and plan.per_class() == {"normal": 26, "pneumonia": 74}
    assert plan.conditions.tolist() == [0] * 26 + [1] * 74
    assert len(set(plan.seeds.tolist())) == 100
    assert plan.seeds.tolist() == [image_seed(0, i) for i in range(100)]
    assert image_seed(0, 5) == image_seed(0, 5) != image_seed(1, 5)
    assert all(0 <= image_seed(s, i) < 2**63 for s in (0, 2**40) for i in (0, 10**7))


def test_condition_counts_as_dict_and_bad_cards():
    names = {"class_names": ["normal", "pneumonia"]}
    by_index = plan_generation({**names, "condition_counts": {"0": 1, "1": 3}}, n=8)
    by_name = plan_generation({**names, "condition_counts": {"normal": 1, "pneumonia": 3}}, n=8)
    assert by_index.counts == by_name.counts == (2, 6)
    with pytest.raises(InputError, match="unknown key 'covid'"):
        plan_generation({**names, "condition_counts": {"covid": 1}}, n=8)
    with pytest.raises(InputError, match="1 condition_counts for 2 conditions"):
        plan_generation({**names, "condition_counts": [5]}, n=8)
    with pytest.raises(InputError, match="all zero"):
        plan_generation({**names, "condition_counts": [0, 0]}, n=8)
    assert plan_generation({**names, "condition_counts": [0, 0]}, per_class={"normal": 2}).counts == (2, 0)


def test_attributes_follow_the_joint_training_distribution(attr_model_dir):
    from synth.pipeline import read_model_card

    card = read_model_card(attr_model_dir)
    plan = plan_generation(card, n=16, seed=0)
    assert plan.counts == (2, 6, 4, 4)  # 16 × (10, 30, 20, 20) / 80
    per_class = plan_generation(card, per_class={"normal": 8, "pneumonia": 3}, seed=0)
    assert per_class.counts == (2, 6, 2, 1)  # normal split 1:3, pneumonia 1:1 (tie → F)
    assert per_class.per_class() == {"normal": 8, "pneumonia": 3}


def test_attribute_model_writes_attribute_columns(attr_model_dir, tmp_path):
    ds = load_dataset(_gen(attr_model_dir, tmp_path / "out", n=8))
    meta = ds.metadata
    assert ds.header["attributes"] == ["sex"]
    assert ds.header["generation_columns"] == ["condition", "seed", "sampler", "steps", "guidance_scale"]
    assert (meta.groupby(["label", "sex"]).size().to_dict()) == {(0, "F"): 1, (0, "M"): 3, (1, "F"): 2, (1, "M"): 2}
    space = ConditionSpace.from_json(ds.header["generation"]["conditions"])
    for row in meta.itertuples():
        assert space.encode(row.label, {"sex": row.sex}) == row.condition


def test_per_class_counts_are_respected_and_metadata_recorded(model_dir, tmp_path):
    out = _gen(model_dir, tmp_path / "out", per_class={"normal": 3, "pneumonia": 2}, seed=4, guidance_scale=2.0)
    ds = load_dataset(out, verify=True)
    meta = ds.metadata
    assert ds.images.shape == (5, 28, 28) and ds.images.dtype == np.uint8
    assert meta["label"].tolist() == [0, 0, 0, 1, 1]
    assert meta["split"].unique().tolist() == ["synthetic"]
    assert meta["image_id"].tolist() == [f"syn-{i:06d}" for i in range(5)]
    assert meta["seed"].tolist() == [image_seed(4, i) for i in range(5)]
    assert meta["condition"].tolist() == [0, 0, 0, 1, 1]
    assert set(meta["sampler"]) == {"ddim-2"} and set(meta["steps"]) == {2} and set(meta["guidance_scale"]) == {2.0}
    h = ds.header
    from synth.pipeline import read_model_card

    assert h["inputs"] == {"model": read_model_card(model_dir)["content_hash"]}
    assert h["config"]["seed"] == 4 and h["config"]["sampler"]["guidance_scale"] == 2.0
    assert h["counts"]["per_class"]["synthetic"] == {"normal": 3, "pneumonia": 2}


# --- determinism, batching, shards --------------------------------------------------------------------------


def test_generation_is_deterministic_per_seed(model_dir, tmp_path):
    a = _gen(model_dir, tmp_path / "a", n=6, seed=1, sampler=STOCHASTIC)
    b = _gen(model_dir, tmp_path / "b", n=6, seed=1, sampler=STOCHASTIC)
    c = _gen(model_dir, tmp_path / "c", n=6, seed=2, sampler=STOCHASTIC)
    assert _files_equal(a, b)
    assert load_dataset(a).content_hash == load_dataset(b).content_hash
    assert not np.array_equal(load_dataset(a).images, load_dataset(c).images)


def test_shards_merge_byte_identical_to_a_single_run(model_dir, tmp_path):
    kw = {"n": 11, "seed": 3, "sampler": STOCHASTIC, "batch_size": 4}
    single = _gen(model_dir, tmp_path / "single", **kw)
    shards = [_gen(model_dir, tmp_path / f"shard{k}", shard_index=k, shard_count=3, **kw) for k in range(3)]
    first = load_dataset(shards[0])
    assert first.metadata["image_id"].tolist() == [f"syn-{i:06d}" for i in range(0, 11, 3)]
    assert sum(len(load_dataset(s).images) for s in shards) == 11
    merged = merge_shards(list(reversed(shards)), tmp_path / "merged")
    assert _files_equal(single, merged)
    assert load_dataset(merged).content_hash == load_dataset(single).content_hash
    assert load_dataset(merged).header["config"]["merged_from_shards"] == 3


def test_more_shards_than_images_leaves_empty_shards_that_still_merge(model_dir, tmp_path):
    kw = {"n": 2, "seed": 0, "guidance_scale": 2.0}
    single = _gen(model_dir, tmp_path / "single", **kw)
    shards = [_gen(model_dir, tmp_path / f"s{k}", shard_index=k, shard_count=3, **kw) for k in range(3)]
    assert len(load_dataset(shards[2]).images) == 0
    assert _files_equal(single, merge_shards(shards, tmp_path / "merged"))


def test_batch_size_does_not_change_images(model_dir, tmp_path):
    # Exact across shards; across batch sizes the batched kernels may reassociate float sums (~1e-6), which can
    # flip a rare pixel by one grey level. On this CPU build it has been exact; allow ±1 to stay portable.
    a = load_dataset(_gen(model_dir, tmp_path / "b3", n=10, seed=5, sampler=STOCHASTIC, batch_size=3)).images
    b = load_dataset(_gen(model_dir, tmp_path / "b10", n=10, seed=5, sampler=STOCHASTIC, batch_size=10)).images
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_merge_rejects_incomplete_or_mixed_shards(model_dir, tmp_path):
    kw = {"n": 4, "seed": 0, "shard_count": 2}
    s0 = _gen(model_dir, tmp_path / "s0", shard_index=0, **kw)
    s1 = _gen(model_dir, tmp_path / "s1", shard_index=1, **kw)
    other = _gen(model_dir, tmp_path / "other", shard_index=1, **{**kw, "seed": 9})
    with pytest.raises(InputError, match=r"missing shard\(s\) \[1\] of 2"):
        merge_shards([s0], tmp_path / "m1")
    with pytest.raises(InputError, match=r"differs .* in seed"):
        merge_shards([s0, other], tmp_path / "m2")
    with pytest.raises(InputError, match="shard 0 given twice"):
        merge_shards([s0, s0, s1], tmp_path / "m3")
    with pytest.raises(InputError, match="already exists"):
        merge_shards([s0, s1], s1)
    assert not (tmp_path / "m1").exists()


def test_shard_indices():
    assert shard_indices(10, 1, 3).tolist() == [1, 4, 7]
    assert shard_indices(2, 2, 3).tolist() == []
    with pytest.raises(ConfigError, match=r"shard_index 3 outside 0\.\.2"):
        shard_indices(10, 3, 3)
    with pytest.raises(ConfigError):
        shard_indices(10, 0, 0)


# --- bad inputs ---------------------------------------------------------------------------------------------


def test_generate_rejects_bad_input(model_dir, tmp_path):
    with pytest.raises(InputError, match="unknown class 'covid'; the model knows: normal, pneumonia"):
        _gen(model_dir, tmp_path / "x", per_class={"covid": 3})
    with pytest.raises(InputError, match="positive integer, got 0"):
        _gen(model_dir, tmp_path / "x", n=0)
    with pytest.raises(InputError, match="give the number of images"):
        _gen(model_dir, tmp_path / "x")
    with pytest.raises(InputError, match="n=4 but per-class counts add up to 3"):
        _gen(model_dir, tmp_path / "x", n=4, per_class={"normal": 3})
    with pytest.raises(InputError, match=r"shard_index 2 outside 0\.\.1"):
        _gen(model_dir, tmp_path / "x", n=4, shard_index=2, shard_count=2)
    with pytest.raises(InputError, match="not a synthgate artifact"):
        _gen(tmp_path, tmp_path / "x", n=4)
    (tmp_path / "exists").mkdir()
    with pytest.raises(InputError, match="already exists"):
        _gen(model_dir, tmp_path / "exists", n=4)
    with pytest.raises(ConfigError, match="unknown sampler"):
        _gen(model_dir, tmp_path / "x", n=4, sampler="euler")
    assert not (tmp_path / "x").exists()


# --- CLI ----------------------------------------------------------------------------------------------------


def test_cli_generate_and_merge(model_dir, tmp_path, capsys):
    common = [str(model_dir), "--n", "5", "--sampler", "ddim", "--steps", "2", "--batch-size", "2", "--seed", "7",
              "--device", "cpu", "--no-progress"]
    assert run(["generate", *common, "--out", str(tmp_path / "all")]) == 0
    for k in range(2):
        argv = ["generate", *common, "--out", str(tmp_path / f"s{k}"), "--shard-index", str(k), "--shard-count", "2"]
        assert run(argv) == 0
    assert run(["generate-merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")]) == 0
    assert _files_equal(tmp_path / "all", tmp_path / "m")
    assert run(["generate", str(model_dir), "--per-class", "normal=1,pneumonia=2", "--sampler", "ddim",
                "--steps", "2", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "pc")]) == 0
    assert load_dataset(tmp_path / "pc").metadata["label"].tolist() == [0, 1, 1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--per-class", "covid=3"], "unknown class 'covid'"),
        (["--per-class", "normal:3"], "is not NAME=COUNT"),
        (["--per-class", "normal=x"], "is not an integer"),
        (["--per-class", "normal=-1"], "negative"),
        (["--n", "0"], "--n must be a positive integer"),
        (["--n", "-3"], "--n must be a positive integer"),
        (["--n", "3", "--shard-index", "2", "--shard-count", "2"], "--shard-index 2 is outside 0..1"),
        (["--n", "3", "--sampler", "euler"], "unknown sampler"),
        (["--n", "3", "--weights", "best"], "--weights must be ema, raw or ema@STEP"),
        ([], "give --n N or --per-class"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(model_dir, tmp_path, capsys, extra, message):
    code = run(["generate", str(model_dir), "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu",
                *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_cli_rejects_non_model_and_existing_out(model_dir, tmp_path, capsys):
    assert run(["generate", str(tmp_path), "--n", "2", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "not a synthgate artifact" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert run(["generate", str(model_dir), "--n", "2", "--out", str(tmp_path / "taken"), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_uniform_balance_gives_every_class_the_same_count(model_dir, attr_model_dir):
    from synth.pipeline import read_model_card

    card = read_model_card(model_dir)  # trained on 1214 normal / 3494 pneumonia
    assert plan_generation(card, n=600).per_class() == {"normal": 155, "pneumonia": 445}
    assert plan_generation(card, n=600, balance="prior").per_class() == {"normal": 155, "pneumonia": 445}
    assert plan_generation(card, n=601, balance="uniform").per_class() == {"normal": 301, "pneumonia": 300}
    # With attributes, each class's share is split over its attribute combinations like the training counts
    # (normal: F 10 / M 30; pneumonia: F 20 / M 20).
    plan = plan_generation(read_model_card(attr_model_dir), n=400, balance="uniform")
    assert plan.per_class() == {"normal": 200, "pneumonia": 200}
    assert list(plan.counts) == [50, 150, 100, 100]
    with pytest.raises(InputError, match="class balance 'flat' is not one of prior, uniform"):
        plan_generation(card, n=10, balance="flat")


def test_balance_is_recorded_and_the_cli_defaults_to_uniform(model_dir, tmp_path, capsys):
    assert run(["generate", str(model_dir), "--out", str(tmp_path / "u"), "--n", "10", "--sampler", "ddim-2",
                "--no-progress"]) == 0
    ds = load_dataset(tmp_path / "u")
    assert ds.header["config"]["balance"] == "uniform"
    assert ds.header["counts"]["per_class"]["synthetic"] == {"normal": 5, "pneumonia": 5}
    assert run(["generate", str(model_dir), "--out", str(tmp_path / "p"), "--n", "10", "--balance", "prior",
                "--sampler", "ddim-2", "--no-progress"]) == 0
    assert load_dataset(tmp_path / "p").header["counts"]["per_class"]["synthetic"] == {"normal": 3, "pneumonia": 7}
    capsys.readouterr()
    assert run(["generate", str(model_dir), "--out", str(tmp_path / "x"), "--n", "10", "--balance", "even"]) == 2
    assert capsys.readouterr().err.strip().endswith("--balance must be uniform or prior, got 'even'")
    assert not (tmp_path / "x").exists()
