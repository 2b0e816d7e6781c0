"""Membership inference: ROC/AUC helpers against brute force, member/non-member selection, input errors, and the
attacks on a deliberately overfitted model (they must separate) and a DP-trained one (it must read near chance)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from privacy.membership import membership_audit, membership_summary
from privacy.membership_config import MembershipConfig
from privacy.membership_sets import select_sets
from privacy.roc import bootstrap_metrics, downsample_roc, roc_auc, roc_curve, tpr_at_fpr
from synth.conditioning import ConditionSpace
from synth.data.canonical import load_dataset, write_dataset
from synth.errors import ConfigError, InputError

torch.set_num_threads(1)

# -- ROC / AUC against brute force ---------------------------------------------------------------------------


def brute_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def brute_roc(pos: np.ndarray, neg: np.ndarray) -> list[tuple[float, float]]:
    """(fpr, tpr) of "member iff score >= thr" for every threshold, plus the all-negative point."""
    points = {(0.0, 0.0)}
    for thr in np.unique(np.concatenate([pos, neg])):
        points.add((float((neg >= thr).mean()), float((pos >= thr).mean())))
    return sorted(points)


def brute_tpr(pos: np.ndarray, neg: np.ndarray, fpr: float) -> float:
    return max(t for f, t in brute_roc(pos, neg) if f <= fpr + 1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_tpr_and_roc_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Integer scores: plenty of ties, within and across the two groups.
    pos = rng.integers(0, 12, size=37).astype(float) + (seed == 2) * 3
    neg = rng.integers(0, 12, size=150).astype(float)
    assert roc_auc(pos, neg) == pytest.approx(brute_auc(pos, neg), abs=1e-12)
    for alpha in (0.0, 0.001, 0.01, 0.05, 0.2, 0.5, 1.0):
        assert tpr_at_fpr(pos, neg, alpha) == pytest.approx(brute_tpr(pos, neg, alpha), abs=1e-12), alpha
    fpr, tpr = roc_curve(pos, neg)
    expected = np.array(brute_roc(pos, neg))
    np.testing.assert_allclose(np.c_[fpr, tpr], expected, atol=1e-12)
    # Trapezoids under the ROC vertices are the AUC (ties give the diagonal segments that count ½).
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(pos, neg), abs=1e-12)


def test_auc_extremes_and_bad_scores() -> None:
    assert roc_auc([2, 3, 4], [0, 1]) == 1.0
    assert roc_auc([0, 1], [2, 3, 4]) == 0.0
    assert roc_auc([1, 1], [1, 1, 1]) == 0.5
    assert tpr_at_fpr([2, 3, 4], [0, 1], 0.0) == 1.0
    with pytest.raises(ConfigError, match="non-finite"):
        roc_auc([1.0, float("nan")], [0.0])
    with pytest.raises(ConfigError, match="empty"):
        roc_auc([], [0.0])


def test_downsampled_roc_keeps_true_vertices_and_endpoints() -> None:
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(0.5, 1, 2000), rng.normal(0, 1, 2000)
    fpr, tpr = roc_curve(pos, neg)
    small = downsample_roc(fpr, tpr, 50, min_fpr=1 / neg.size)
    assert len(small["fpr"]) <= 50
    assert (small["fpr"][0], small["tpr"][0]) == (0.0, 0.0) and (small["fpr"][-1], small["tpr"][-1]) == (1.0, 1.0)
    vertices = set(zip(np.round(fpr, 6).tolist(), np.round(tpr, 6).tolist(), strict=True))
    assert all(p in vertices for p in zip(small["fpr"], small["tpr"], strict=True))
    assert sum(f <= 0.01 for f in small["fpr"]) >= 10  # dense where a log-scale plot needs it
    assert np.all(np.diff(small["fpr"]) >= 0) and np.all(np.diff(small["tpr"]) >= 0)


def test_bootstrap_is_seeded_and_covers_the_estimate() -> None:
    rng = np.random.default_rng(3)
    pos, neg = rng.normal(0.8, 1, 200), rng.normal(0, 1, 200)
    a = bootstrap_metrics(pos, neg, resamples=300, level=0.95, seed=7)
    assert a == bootstrap_metrics(pos, neg, resamples=300, level=0.95, seed=7)
    assert a != bootstrap_metrics(pos, neg, resamples=300, level=0.95, seed=8)
    low, high = a["auc"]
    assert low < roc_auc(pos, neg) < high
    assert 0.05 < high - low < 0.2  # ~±1.96·SE, SE ≈ 0.025 for 200 vs 200 at AUC ≈ 0.7
    assert set(a) == {"auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr"}


# -- selection and input errors (no training) ----------------------------------------------------------------


def _dataset(out: Path, splits: dict[str, list[int]], *, seed: int = 0, duplicate_first: int = 0) -> Path:
    """A canonical dataset of random 28×28 images; `splits` gives each split's labels. The first
    `duplicate_first` holdout images copy train images pixel for pixel."""
    rng = np.random.default_rng(seed)
    labels = [(s, lab) for s, labs in splits.items() for lab in labs]
    images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
    split = np.array([s for s, _ in labels])
    train, hold = np.flatnonzero(split == "train"), np.flatnonzero(split != "train")
    for i in range(duplicate_first):
        images[hold[i]] = images[train[i]]
    meta = pd.DataFrame({"image_id": [f"img{i}" for i in range(len(labels))], "split": split,
                         "label": [lab for _, lab in labels]})
    return write_dataset(out, images, meta, class_names=["normal", "pneumonia"], source={"kind": "test"})


def _random_model(out: Path, dataset: Path, *, diverged: bool = False) -> Path:
    """An untrained tiny model directory whose card says it was trained on `dataset` (NaN weights if `diverged`)."""
    from synth.model import build_unet, preset
    from synth.model_dir import write_model_dir
    from synth.train_config import TrainConfig
    from synth.training import make_scheduler

    ds = load_dataset(dataset)
    space = ConditionSpace(class_names=tuple(ds.class_names))
    cfg = preset("tiny", num_conditions=space.num_conditions)
    torch.manual_seed(0)
    unet, ema = build_unet(cfg), build_unet(cfg)
    if diverged:
        with torch.no_grad():
            next(ema.parameters()).fill_(float("nan"))
    train = TrainConfig(preset="tiny")
    return write_model_dir(
        out, unet=unet, ema_unet=ema, scheduler=make_scheduler(train), model_config=cfg,
        train_config=train.to_json(), space=space, dataset_hash=ds.content_hash,
        image={"height": 28, "width": 28, "channels": 1}, condition_counts=[1, 1],
    )


def test_selection_is_stratified_seeded_and_drops_duplicates(tmp_path: Path) -> None:
    # Train is 3:1 normal, holdout 1:3: unstratified sampling would hand the attack a class-mix difference.
    root = _dataset(tmp_path / "d", {"train": [0] * 60 + [1] * 20, "val": [0] * 10 + [1] * 30,
                                     "test": [0] * 5 + [1] * 15}, duplicate_first=4)
    ds = load_dataset(root)
    space = ConditionSpace(class_names=("normal", "pneumonia"))
    sets = select_sets(ds, space.encode_frame, MembershipConfig(n=40, seed=1), where_=root)
    assert sets.excluded_duplicates == 4
    # Equal per-condition counts cap each condition at min(train, holdout): normal 11 (15 - 4 duplicates),
    # pneumonia 20; so 31 of the 40 asked.
    assert sets.n_members == sets.n_nonmembers == 31
    members, non = sets.conditions[sets.is_member], sets.conditions[~sets.is_member]
    assert np.bincount(members, minlength=2).tolist() == np.bincount(non, minlength=2).tolist() == [11, 20]
    balanced = select_sets(ds, space.encode_frame, MembershipConfig(n=20, seed=1), where_=root)
    # Within the caps the split follows the holdout's class mix (11:45 → about 4:16).
    assert np.bincount(balanced.conditions[balanced.is_member]).tolist() == [4, 16]
    assert set(sets.splits[sets.is_member]) == {"train"} and set(sets.splits[~sets.is_member]) <= {"val", "test"}
    meta = ds.metadata
    train_hashes = set(meta.loc[meta["split"] == "train", "sha256"])
    chosen = meta.set_index("image_id").loc[sets.image_ids[~sets.is_member], "sha256"]
    assert not set(chosen) & train_hashes
    again = select_sets(ds, space.encode_frame, MembershipConfig(n=40, seed=1), where_=root)
    assert again.image_ids.tolist() == sets.image_ids.tolist()
    other = select_sets(ds, space.encode_frame, MembershipConfig(n=40, seed=2), where_=root)
    assert other.image_ids.tolist() != sets.image_ids.tolist()
    # More asked than there is: as many as both sides can give, still equal.
    flat = select_sets(ds, space.encode_frame, MembershipConfig(n=500, stratify=False), where_=root)
    assert flat.n_members == flat.n_nonmembers == 56


def test_input_errors(tmp_path: Path) -> None:
    a = _dataset(tmp_path / "a", {"train": [0, 1] * 10, "val": [0, 1] * 10})
    b = _dataset(tmp_path / "b", {"train": [0, 1] * 10, "val": [0, 1] * 10}, seed=1)
    no_holdout = _dataset(tmp_path / "c", {"train": [0, 1] * 20})
    tiny = _dataset(tmp_path / "e", {"train": [0, 1] * 10, "test": [0, 1] * 3})
    quick = MembershipConfig(n=10, bootstrap=0, device="cpu")

    model_a = _random_model(tmp_path / "model_a", a)
    with pytest.raises(InputError, match=r"trained on .*own training data") as err:
        membership_audit(model_a, b, config=quick)
    assert str(b) in str(err.value)
    with pytest.raises(InputError, match="no holdout images"):
        membership_audit(_random_model(tmp_path / "model_c", no_holdout), no_holdout, config=quick)
    with pytest.raises(InputError, match="only 6 members/non-members"):
        membership_audit(_random_model(tmp_path / "model_e", tiny), tiny, config=quick)
    with pytest.raises(InputError, match="NaN/inf"):
        membership_audit(_random_model(tmp_path / "model_nan", a, diverged=True), a, config=quick)
    with pytest.raises(ConfigError, match="timestep 1000 outside"):
        membership_audit(model_a, a, config=quick.model_copy(update={"pia_timestep": 1000}))
    with pytest.raises(InputError, match=r"not a directory|not a synthgate artifact"):
        membership_audit(tmp_path / "nowhere", a, config=quick)
    with pytest.raises(ValueError, match="attacks"):
        MembershipConfig(attacks=())


# -- the attacks on trained models ---------------------------------------------------------------------------

# A deliberately overfitted model: 16 real images (8 per class), batch 8, 800 steps = 400 passes over each image.
# The cosine schedule (a shipped TrainConfig option) memorises faster per step than the linear default at the
# probed timesteps: in a scratch loop 800 steps gave loss-attack AUC 0.91 (cosine) vs 0.80 (linear) against 64
# non-members. Measured with this exact recipe (training seeds 0/1 × audit seeds 0/1): loss AUC 0.84–0.93, CI lows
# 0.68–0.83; DP (ε=1) 0.41–0.54 with every CI containing 0.5.
RECIPE = {"preset": "tiny", "batch_size": 8, "lr": 3e-3, "ema_decay": 0.9, "beta_schedule": "squaredcos_cap_v2",
          "max_minutes": None, "checkpoint_every": None, "seed": 0}
OVERFIT_STEPS = 800
DP_STEPS = 100  # σ ≈ 13 for ε=1 at q=0.5: the model cannot learn any image; longer runs would only cost time
AUDIT = MembershipConfig(n=64, bootstrap=500, device="cpu")


@pytest.fixture(scope="module")
def trained(pneumonia_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """16 train / 16 val / 16 test real images; a model overfitted on the 16, and a DP (ε=1) one on the same."""
    from privacy.dp import DPConfig, make_strategy
    from synth.train_config import TrainConfig
    from synth.training import train
    from tests.conftest import make_slice

    root = tmp_path_factory.mktemp("membership")
    data = make_slice(pneumonia_dataset, root / "data", {"train": 16, "val": 16, "test": 16})
    overfit = train(data, root / "overfit", TrainConfig(**RECIPE, max_steps=OVERFIT_STEPS), progress=False)
    dp = train(data, root / "dp", TrainConfig(**RECIPE, max_steps=DP_STEPS), progress=False,
               privacy=make_strategy(DPConfig(target_epsilon=1.0), dataset_size=16))
    return {"data": data, "overfit": overfit, "dp": dp}


@pytest.mark.slow
def test_attacks_separate_an_overfitted_model(trained: dict[str, Path]) -> None:
    result = membership_audit(trained["overfit"], trained["data"], config=AUDIT)
    assert result.n_members == result.n_nonmembers == 16  # all of the train split, stratified 8 + 8
    assert result.condition_counts == {0: 8, 1: 8}
    loss = result.attacks["loss"]
    assert loss.auc > 0.75, loss.to_json()
    assert loss.ci["auc"][0] > 0.5  # the whole CI is above chance
    assert result.auc == max(a.auc for a in result.attacks.values()) >= loss.auc
    # PIA is computed but runs the *other* way on these briefly trained models (members' t=0 predictions are less
    # self-consistent): it must not be mistaken for the headline, which only counts the published direction.
    pia = result.attacks["pia"]
    assert pia.timesteps == [0, 200] and pia.auc < 0.5 and result.strongest == "loss"
    assert pia.diagnostics["reversed"] is (pia.ci["auc"][1] < 0.5)

    record = result.to_json()
    json.dumps(record)  # JSON-ready
    assert record["auc"] == loss.auc and record["auc_attack"] == "loss"
    flipped = [1 - a.auc for a in result.attacks.values() if a.diagnostics["reversed"]]
    assert record["auc_any_direction"] == max([loss.auc, *flipped])
    assert record["tpr_at_1pct_fpr"] == max(a.tpr["tpr_at_1pct_fpr"] for a in result.attacks.values())
    assert set(record["attacks"]) == {"loss", "pia"}
    assert record["timesteps"] == {"loss": [50, 100, 200], "pia": [0, 200]} and record["weights"] == "ema"
    assert "zero FPR" in record["note"] and "16 non-members" in record["note"]  # TPR@0.1%FPR is flagged
    roc = record["attacks"]["loss"]["roc"]
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0

    summary = membership_summary(result)
    json.dumps(summary)
    assert summary["auc"] == record["auc"] and summary["tpr_at_1pct_fpr"] == record["tpr_at_1pct_fpr"]
    assert summary["status"] == "measured" and summary["n_nonmembers"] == 16
    assert set(summary["attacks"]["loss"]) >= {"auc", "auc_ci", "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_ci", "roc"}


@pytest.mark.slow
def test_dp_model_reads_chance_reproducibly(trained: dict[str, Path]) -> None:
    """ε=1 DP-SGD on the same 16 images: every attack's 95% CI contains 0.5, and the same seed gives the same
    numbers."""
    result = membership_audit(trained["dp"], trained["data"], config=AUDIT)
    overfit = membership_audit(trained["overfit"], trained["data"], config=AUDIT)
    for name, a in result.attacks.items():
        low, high = a.ci["auc"]
        assert low < 0.5 < high, (name, a.auc, a.ci)
        assert abs(a.auc - 0.5) < 0.2, (name, a.auc)  # 2 SD of a chance AUC with 16 vs 16
    assert result.auc < overfit.auc - 0.2
    assert result.auc_any_direction == result.auc  # nothing reliably reversed either
    again = membership_audit(trained["dp"], trained["data"], config=AUDIT).to_json()
    first = result.to_json()
    for record in (first, again):
        record.pop("seconds")
        for a in record["attacks"].values():
            a.pop("seconds")
    assert first == again
