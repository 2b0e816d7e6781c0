"""Planted-copy harness: the edits themselves, and copies of real training images found among clean real images."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from privacy.embeddings import EncoderConfig, train_encoder
from privacy.memorization_config import MemorizationConfig
from privacy.registration import RegistrationConfig
from synth.data.canonical import load_dataset
from synth.errors import ConfigError, InputError
from tests.conftest import make_slice
from tests.planted import TRANSFORMS, apply_transform, run_planted, shift


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


@pytest.fixture(scope="module")
def real_subset(tmp_path_factory, pneumonia_dataset: Path) -> Path:
    """300 real training images and 150 + 150 holdout images: big enough to calibrate, small enough to be quick."""
    return make_slice(pneumonia_dataset, tmp_path_factory.mktemp("planted") / "ds",
                      {"train": 300, "val": 150, "test": 150}, seed=1)


def test_edits_do_what_they_say():
    rng = np.random.default_rng(0)
    x = (rng.random((6, 28, 28)) * 200 + 20).astype(np.uint8)
    s = shift(x, np.array([1] * 6), np.array([0] * 6))
    np.testing.assert_array_equal(s[:, :, 1:], x[:, :, :-1])
    np.testing.assert_array_equal(s[:, :, 0], x[:, :, 0])  # edge replicated
    np.testing.assert_array_equal(apply_transform(x, "hflip", rng), x[:, :, ::-1])
    np.testing.assert_array_equal(apply_transform(x, "exact", rng), x)
    np.testing.assert_array_equal(apply_transform(x, "brighter", rng), x + 20)
    noisy = apply_transform(x, "noise", rng).astype(float) - x
    assert 3.5 < noisy.std() < 6.5
    for name in ("shift1", "shift2"):
        moved = apply_transform(x, name, rng)
        n = int(name[-1])
        # every image moved by exactly n px in x or y (the other coordinate by at most n)
        assert all(any(np.array_equal(m[n:-n, n:-n], shift(o[None], np.array([dx]), np.array([dy]))[0][n:-n, n:-n])
                       for dx in range(-n, n + 1) for dy in range(-n, n + 1) if max(abs(dx), abs(dy)) == n)
                   for m, o in zip(moved, x, strict=True))
    for name in TRANSFORMS:
        out = apply_transform(x, name, rng)
        assert out.dtype == np.uint8 and out.shape == x.shape
    rgb = (rng.random((2, 28, 28, 3)) * 255).astype(np.uint8)
    assert apply_transform(rgb, "crop_resize", rng).shape == rgb.shape
    with pytest.raises(ConfigError, match="planted transform"):
        apply_transform(x, "blur", rng)


def test_planted_copies_are_found_and_clean_images_left_alone(real_subset):
    train_images = load_dataset(real_subset).split("train")[0]
    # Briefly trained (the default trains 1500 steps on the full set); enough to put edited copies' sources among
    # the candidates that registration verifies.
    encoder = train_encoder(train_images, EncoderConfig(steps=150, batch_size=128))
    config = MemorizationConfig(registration=RegistrationConfig(candidates=10))
    result = run_planted(real_subset, encoder=encoder, config=config, per_transform=20)
    rows = {r["transform"]: r for r in result.rows}
    assert set(rows) == set(TRANSFORMS)
    for name in ("exact", "hflip", "shift1", "shift2", "brighter", "darker", "contrast_up", "contrast_down",
                 "crop_resize"):
        assert rows[name]["recall"] == 1.0, name
        assert rows[name]["source_found"] == 1.0, name
    assert rows["noise"]["recall"] >= 0.95
    assert rows["exact"]["recall_per_space"]["pixel"] == 1.0
    assert rows["shift2"]["recall_per_space"]["registered"] == 1.0
    assert rows["hflip"]["recall_per_space"]["learned"] > 0.9
    # every clean holdout image judged out of sample by thresholds from the other half
    assert result.clean_images == 300
    assert result.false_flag_rate <= 0.03
    folds = result.setup["folds"]
    assert [f["calibration_split"] for f in folds] == ["holdout-A", "holdout-B"]
    assert sum(f["clean_images"] for f in folds) == 300
    table = result.markdown()
    assert table.count("\n") == len(TRANSFORMS) + 2 and "| crop_resize | >= 0.99 | 20 |" in table


def test_planted_needs_its_splits(tmp_path, pneumonia_slice):
    with pytest.raises(InputError, match="'holdout'"):
        run_planted(pneumonia_slice, encoder=None, config=MemorizationConfig(spaces=("pixel",)),
                    folds=[("holdout", "test")], per_transform=2)
