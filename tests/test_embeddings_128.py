"""The learned encoder at 128 px: deployed embeddings (`Encoder.embed`, the batch-norm-fused path) must see the
same 32-px pooled view the network was trained on. Real Kermany chest X-rays, a 200-image slice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privacy.embeddings import _to_tensor, input_pool, load_encoder, save_encoder, train_encoder
from tests.privacy_fixtures import TINY_ENCODER


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def kermany(kermany_128):
    return kermany_128[0]


@pytest.fixture(scope="module")
def encoder_128(kermany):
    torch.set_num_threads(1)
    return train_encoder(kermany, TINY_ENCODER, data_hash="kermany-slice:train")


def test_deployed_embedding_is_the_trained_network_on_the_pooled_view(kermany, encoder_128, tmp_path):
    # Before the fix the fused path ran the convolutions on the full 128-px image (a 16×16 map pooled to 4×4),
    # not on the 32-px view the network was trained on: crop-resized copies then missed their source.
    assert input_pool(128) == 4
    with torch.inference_mode():
        trained = encoder_128.net(_to_tensor(kermany[:64])).numpy()
    np.testing.assert_allclose(encoder_128.embed(kermany[:64]), trained, atol=1e-5)
    loaded = load_encoder(save_encoder(encoder_128, tmp_path / "enc"))
    np.testing.assert_allclose(loaded.embed(kermany[:64]), trained, atol=1e-5)
