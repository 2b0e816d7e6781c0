"""Embeddings: pixel space invariances, augmentations, the learned encoder's training, determinism and round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from privacy.embeddings import (
    AugmentConfig,
    EncoderConfig,
    PixelSpace,
    augment,
    embed,
    load_encoder,
    nt_xent,
    save_encoder,
    train_encoder,
)
from synth.data.canonical import load_dataset
from synth.errors import ConfigError, InputError, IntegrityError
from tests.privacy_fixtures import TINY_ENCODER


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def slice_train(pneumonia_slice: Path) -> np.ndarray:
    return load_dataset(pneumonia_slice).split("train")[0]


@pytest.fixture(scope="module")
def tiny_encoder(slice_train: np.ndarray):
    torch.set_num_threads(1)
    return train_encoder(slice_train, TINY_ENCODER, data_hash="slice:train")


def test_pixel_space_is_unit_norm_and_blind_to_brightness_and_contrast(slice_train):
    x = slice_train[:16]
    e = embed(x, "pixel")
    assert e.dtype == np.float32 and e.shape == (16, 28 * 28)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    # An affine change of intensities (kept inside 0..255 so nothing clips) maps to the same vector.
    y = np.clip(np.round(x.astype(np.float32) * 0.5 + 40), 0, 255).astype(np.uint8)
    cos = np.sum(e * embed(y, "pixel"), axis=1)
    assert cos.min() > 0.999
    # ...but a shifted image does not.
    assert np.sum(e * embed(np.roll(x, 2, axis=2), "pixel"), axis=1).mean() < 0.99


def test_pixel_space_maps_a_constant_image_to_zero_and_rejects_non_uint8():
    e = PixelSpace().embed(np.full((2, 28, 28), 77, np.uint8))
    assert np.all(e == 0)
    with pytest.raises(InputError, match="uint8"):
        embed(np.zeros((2, 28, 28), np.float32), "pixel")
    with pytest.raises(ConfigError, match="embedding space"):
        embed(np.zeros((2, 28, 28), np.uint8), "clip")


def test_augment_is_seeded_bounded_and_changes_images(slice_train):
    x = torch.from_numpy(slice_train[:8]).float().div(255).unsqueeze(1)
    a = augment(x, AugmentConfig(), torch.Generator().manual_seed(3))
    b = augment(x, AugmentConfig(), torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert (a - x).abs().mean() > 0.01
    # 8-bit quantised, as a saved copy would be
    assert torch.allclose(a * 255, (a * 255).round(), atol=1e-3)


def test_nt_xent_prefers_matching_views():
    z = torch.nn.functional.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    other = torch.nn.functional.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    assert nt_xent(z, z, 0.1) < nt_xent(z, other, 0.1)


def test_encoder_is_deterministic_normalised_and_round_trips(tmp_path, slice_train, tiny_encoder):
    again = train_encoder(slice_train, TINY_ENCODER, data_hash="slice:train")
    e1, e2 = tiny_encoder.embed(slice_train), again.embed(slice_train)
    assert e1.dtype == np.float32 and e1.shape == (len(slice_train), TINY_ENCODER.dim)
    np.testing.assert_allclose(np.linalg.norm(e1, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(e1, e2)
    assert torch.get_num_threads() == 1  # restored after training

    path = save_encoder(tiny_encoder, tmp_path / "enc")
    header = json.loads((path / "encoder.json").read_text())
    assert header["kind"] == "embedding_encoder" and header["inputs"]["training_data"] == "slice:train"
    assert header["config"]["steps"] == TINY_ENCODER.steps
    loaded = load_encoder(path)
    np.testing.assert_array_equal(loaded.embed(slice_train), e1)
    assert loaded.meta["trained_on"]["images"] == len(slice_train)


def test_fused_inference_matches_the_trained_network(slice_train, tiny_encoder):
    with torch.inference_mode():
        x = torch.from_numpy(slice_train).float().div(255).unsqueeze(1)
        np.testing.assert_allclose(tiny_encoder.embed(slice_train), tiny_encoder.net(x).numpy(), atol=1e-5)


def test_load_encoder_detects_changed_weights(tmp_path, tiny_encoder):
    path = save_encoder(tiny_encoder, tmp_path / "enc")
    weights = path / "encoder.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        load_encoder(path)


def test_encoder_refuses_images_of_another_size(tiny_encoder):
    with pytest.raises(InputError, match="trained on"):
        tiny_encoder.embed(np.zeros((2, 32, 32), np.uint8))


def test_training_pulls_edited_copies_towards_their_source(slice_train):
    # Edited copies retrieve their source more often after a little contrastive training than before it.
    x = torch.from_numpy(slice_train).float().div(255).unsqueeze(1)
    edited = (augment(x, AugmentConfig(), torch.Generator().manual_seed(9))[:, 0] * 255).round().byte().numpy()

    def retrieval(steps: int) -> tuple[float, float]:
        enc = train_encoder(slice_train, EncoderConfig(steps=steps, batch_size=64, widths=(8, 16, 32), hidden=64,
                                                       dim=32))
        sim = enc.embed(edited) @ enc.embed(slice_train).T
        own = np.diag(sim)
        gap = own.mean() - ((sim.sum(axis=1) - own) / (len(sim) - 1)).mean()
        return float((sim.argmax(axis=1) == np.arange(len(sim))).mean()), float(gap)

    top1_before, gap_before = retrieval(1)
    top1_after, gap_after = retrieval(40)
    assert top1_after >= top1_before + 0.15
    assert gap_after > gap_before + 0.2
