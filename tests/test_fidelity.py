"""FID, KID and precision/recall on toy Gaussians with known answers, sanity on real data, Inception loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reports.fidelity import (
    FidelityConfig,
    fid,
    fidelity_by_class,
    fidelity_metrics,
    frechet_distance,
    inception_features,
    kid,
    knn_radii,
    mmd2_unbiased,
    precision_recall,
)
from synth.errors import InputError


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_frechet_distance_closed_forms() -> None:
    d = 6
    mu = np.arange(d) / 3.0
    assert frechet_distance(np.zeros(d), np.eye(d), mu, np.eye(d)) == pytest.approx(mu @ mu, abs=1e-9)
    # N(0, I) vs N(0, 4I): d · (1 + 4 − 2·2) = d
    assert frechet_distance(np.zeros(d), np.eye(d), np.zeros(d), 4 * np.eye(d)) == pytest.approx(d, abs=1e-9)
    # Diagonal covariances: Σ (√a − √b)²
    a, b = np.linspace(0.5, 3, d), np.linspace(2, 0.1, d)
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(np.zeros(d), np.diag(a), np.zeros(d), np.diag(b)) == pytest.approx(expected, abs=1e-9)
    # Rotating both Gaussians does not change the distance.
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(d, d)))
    rotated = frechet_distance(q @ np.zeros(d), q @ np.diag(a) @ q.T, q @ mu, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected + mu @ mu, abs=1e-7)


def test_fid_from_samples_of_shifted_gaussians_is_squared_shift() -> None:
    rng = np.random.default_rng(0)
    mu = np.array([1.0, -1.0, 0.5, 0.0])
    a = rng.normal(size=(20000, 4))
    b = rng.normal(size=(20000, 4)) + mu
    assert fid(a, b) == pytest.approx(mu @ mu, abs=0.03)
    assert fid(a, rng.normal(size=(20000, 4))) < 0.01


def test_fid_with_fewer_images_than_dimensions_stays_finite() -> None:
    rng = np.random.default_rng(1)
    value = fid(rng.normal(size=(8, 32)), rng.normal(size=(8, 32)) + 1.0)
    assert np.isfinite(value) and value > 0


def test_fid_with_dead_features_is_right_at_any_scale() -> None:
    """Constant (dead ReLU) feature columns make Σ singular; the ridge must not bias FID, whatever the scale."""
    rng = np.random.default_rng(7)
    mu = np.array([1.0, -1.0, 0.5, 0.0])
    dead = np.zeros((20000, 3))
    a = np.hstack([rng.normal(size=(20000, 4)), dead])
    b = np.hstack([rng.normal(size=(20000, 4)) + mu, dead])
    assert fid(a, b) == pytest.approx(mu @ mu, abs=0.03)
    for scale in (1e-4, 1e3):
        assert fid(a * scale, b * scale) == pytest.approx(fid(a, b) * scale**2, rel=1e-3)


def test_unbiased_mmd_matches_double_loop() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3)) + 0.5

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / 35
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_shift() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(size=(2000, 8))
    same = kid(a, rng.normal(size=(2000, 8)), subset_size=500, subsets=20)
    small = kid(a, rng.normal(size=(2000, 8)) + 0.25, subset_size=500, subsets=20)
    large = kid(a, rng.normal(size=(2000, 8)) + 1.0, subset_size=500, subsets=20)
    assert abs(same["value"]) < 3 * same["std"] + 1e-3  # unbiased: centred on zero
    assert 0 < small["value"] < large["value"]
    assert small["value"] > 3 * small["std"]
    assert same["subset_size"] == 500 and same["subsets"] == 20


def test_knn_radii_match_sorting() -> None:
    x = np.random.default_rng(4).normal(size=(50, 3))
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    expected = np.sort(d2, axis=1)[:, 3]  # column 0 is the point itself
    assert knn_radii(x, 3) == pytest.approx(expected, abs=1e-9)


def test_precision_recall_on_toy_manifolds() -> None:
    rng = np.random.default_rng(5)
    real = rng.normal(size=(1000, 2))
    same = precision_recall(real, rng.normal(size=(1000, 2)))
    assert same["precision"] > 0.85 and same["recall"] > 0.85
    far = precision_recall(real, rng.normal(size=(1000, 2)) + 20)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    # Mode dropping: real has two well-separated modes, synthetic covers only one.
    two = np.concatenate([rng.normal(size=(500, 2)) - 10, rng.normal(size=(500, 2)) + 10])
    one = rng.normal(size=(1000, 2)) - 10
    dropped = precision_recall(two, one)
    assert dropped["precision"] > 0.85 and 0.35 < dropped["recall"] < 0.55
    # Mode collapse inside the data: every synthetic point is realistic, little variety is covered.
    collapsed = precision_recall(real, rng.normal(size=(1000, 2)) * 0.05)
    assert collapsed["precision"] > 0.95 and collapsed["recall"] < 0.2


def test_fidelity_by_class_splits_by_label_and_skips_tiny_classes() -> None:
    rng = np.random.default_rng(6)
    real = rng.normal(size=(200, 4))
    yr = np.r_[np.zeros(195, int), np.ones(5, int)]
    syn = rng.normal(size=(100, 4)) + 3 * np.r_[np.zeros(50), np.ones(50)][:, None]
    ys = np.r_[np.zeros(50, int), np.ones(50, int)]
    cfg = FidelityConfig(kid_subset_size=50, kid_subsets=5)
    out = fidelity_by_class(real, yr, syn, ys, class_names=["a", "b"], config=cfg)
    assert out["overall"]["n_real"] == 200 and out["overall"]["n_synthetic"] == 100
    assert out["per_class"]["a"]["fid"] < out["overall"]["fid"]  # class b's shifted images only hurt overall
    assert out["per_class"]["b"] == {"n_real": 5, "n_synthetic": 50, "skipped": "fewer than 10 images on one side"}


def test_real_data_halves_are_close_and_noise_is_far(data_dir: Path) -> None:
    """Sanity in the domain feature space: two halves of real train ≈ 0, real vs noise large."""
    from reports.classifier import ClassifierConfig, train_classifier

    d = np.load(data_dir / "pneumoniamnist.npz")
    x, y = d["train_images"], d["train_labels"].ravel()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    clf = train_classifier(x[idx[:256]], y[idx[:256]], d["val_images"][:128], d["val_labels"].ravel()[:128],
                           config=ClassifierConfig(epochs=1, width=8, min_steps=None))
    half_a, half_b = clf.features(x[idx[256:1256]]), clf.features(x[idx[1256:2256]])
    noise = clf.features(rng.integers(0, 256, size=(1000, 28, 28), dtype=np.uint8))
    cfg = FidelityConfig(kid_subset_size=500, kid_subsets=10)
    halves, vs_noise = fidelity_metrics(half_a, half_b, config=cfg), fidelity_metrics(half_a, noise, config=cfg)
    assert halves["fid"] < 0.02 * vs_noise["fid"]
    assert halves["kid"]["value"] < 0.02 * vs_noise["kid"]["value"]
    assert halves["precision"] > 0.7 and halves["recall"] > 0.7
    # The noise images' features are tightly clustered, so a few real outliers fall in their balls (and noise
    # in a few large real balls): low, not zero, in this briefly trained 1-epoch feature space.
    assert vs_noise["precision"] < 0.25 and vs_noise["recall"] < 0.25


class _TinyInception(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)  # (N, 12)
        return pooled if return_features else pooled[:, :2]


def test_inception_from_torchscript_and_refusals(tmp_path: Path) -> None:
    scripted = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(_TinyInception()), str(scripted))
    fn = inception_features(scripted)
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    feats = fn(images)
    assert feats.shape == (5, 12)  # return_features=True was passed; grayscale repeated to 3 channels
    assert np.allclose(feats[:, 0:4], feats[:, 4:8])  # channels 0 and 1 hold the same (repeated) image
    assert feats.min() >= 0 and feats.max() <= 255

    state = tmp_path / "state.pt"
    torch.save({"conv.weight": torch.zeros(2, 2)}, str(state))
    with pytest.raises(InputError, match=r"state dict.*torchvision.*TorchScript"):
        inception_features(state)
    with pytest.raises(InputError, match="not found"):
        inception_features(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a TorchScript module"):
        inception_features(junk)
