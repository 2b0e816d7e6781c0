"""Registration at 128 px: a 24/28 crop-resize moves a 128-px image's content by up to 9 px, beyond the 3 px a
28-px-sized shift search reaches; the registration view (pooled to ~32 px, every pooling phase searched) must undo
it, and still align a 2-px shift to the full-resolution pixel. Real Kermany chest X-rays, a 200-image slice."""

from __future__ import annotations

import numpy as np
import pytest

from privacy.embeddings import PixelSpace
from privacy.registration import RegistrationConfig, registered_distances
from tests.planted import apply_transform


@pytest.fixture(scope="module")
def kermany(kermany_128):
    return kermany_128


def _nearest(queries: np.ndarray, train: np.ndarray, k: int) -> np.ndarray:
    """The k pixel-nearest training rows of each query (the candidates the pixel space would hand over)."""
    px = PixelSpace()
    return np.argsort(-(px.embed(queries) @ px.embed(train).T), axis=1)[:, :k]


def test_pool_factor_keeps_28_px_as_is_and_pools_larger_images_to_about_32():
    cfg = RegistrationConfig()
    assert [cfg.pool_factor(s, s) for s in (28, 32, 63, 64, 128, 256)] == [1, 1, 1, 2, 4, 8]
    assert cfg.pool_factor(128, 64) == 2


def test_crop_resized_and_shifted_copies_found_at_128_px(kermany):
    train, clean = kermany
    rng = np.random.default_rng(0)
    cfg = RegistrationConfig()
    worst = 0.0
    for name, bound in (("crop_resize", 0.25), ("shift2", 0.02)):
        src = rng.choice(len(train), 16, replace=False)
        copies = apply_transform(train[src], name, rng)
        cands = np.concatenate([src[:, None], _nearest(copies, train, 2)], axis=1)
        d, row = registered_distances(copies, train, rng.permuted(cands, axis=1), cfg)
        assert (row == src).all(), name
        assert d.max() < bound, (name, d)
        worst = max(worst, float(d.max()))
    # real images that are not copies stay farther from their nearest training images than any copy
    d, _ = registered_distances(clean, train, _nearest(clean, train, 3), cfg)
    assert d.min() > worst
