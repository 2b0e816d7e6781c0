from __future__ import annotations

import pandas as pd
import pytest

from synth.conditioning import ConditionSpace
from synth.config import build
from synth.errors import ConfigError
from synth.model import ModelConfig, build_unet, preset


@pytest.mark.parametrize("name", ["tiny", "small", "quality", "base"])
@pytest.mark.parametrize("size", [28, 64])
def test_presets_are_valid_and_round_trip(name, size):
    cfg = preset(name, sample_size=size, channels=3, num_conditions=4)
    assert ModelConfig.model_validate_json(cfg.model_dump_json()) == cfg
    kwargs = cfg.unet_kwargs()
    assert kwargs["num_class_embeds"] == 5 and kwargs["in_channels"] == 3
    assert len(kwargs["down_block_types"]) == len(cfg.block_out_channels)


def test_tiny_unet_runs_conditioned():
    import torch

    unet = build_unet(preset("tiny", num_conditions=2))
    x = torch.randn(2, 1, 28, 28)
    out = unet(x, torch.tensor([10, 500]), class_labels=torch.tensor([0, 2])).sample  # 2 = null condition
    assert out.shape == x.shape


def test_bad_model_configs():
    with pytest.raises(ConfigError, match="no model preset 'huge'"):
        preset("huge")
    with pytest.raises(ConfigError, match="not divisible by 4"):
        build(ModelConfig, {"sample_size": 30, "block_out_channels": (8, 8, 8), "attention_levels": (False,) * 3})
    with pytest.raises(ConfigError, match=r"model\.yaml: .*attention_levels has 1 entries"):
        build(ModelConfig, {"block_out_channels": (8, 8), "attention_levels": (False,)}, source="model.yaml")
    with pytest.raises(ConfigError, match=r"layers_per_block: .*\(got 0\)"):
        build(ModelConfig, {"layers_per_block": 0})


def test_condition_space_encodes_joint_attributes():
    meta = pd.DataFrame({"label": [0, 1, 1, 0], "sex": ["F", "M", "F", "M"]})
    space = ConditionSpace.from_metadata(meta, ["normal", "pneumonia"], ["sex"])
    assert space.num_conditions == 4
    codes = space.encode_frame(meta)
    assert codes.tolist() == [0, 3, 2, 1]
    assert [space.decode(c) for c in codes] == [(0, {"sex": "F"}), (1, {"sex": "M"}), (1, {"sex": "F"}),
                                               (0, {"sex": "M"})]
    assert space.labels_of(codes).tolist() == [0, 1, 1, 0]
    assert ConditionSpace.from_json(space.to_json()) == space
    with pytest.raises(ConfigError, match="'X'"):
        space.encode(0, {"sex": "X"})
    with pytest.raises(ConfigError, match="no attribute column"):
        ConditionSpace.from_metadata(meta, ["a", "b"], ["age"])
