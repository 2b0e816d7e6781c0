"""The class-conditional UNet: a typed config with presets named by intent.

Presets: `tiny` (tests, seconds on a CPU), `small` (the CPU demo), `base` (a GPU). Each exists for three size
classes, up to 32 px (28×28 images, or the 14-32 px latents of a latent generator), up to 64 px and up to 128 px,
for any channel count; a size within a class uses that class's network (`preset`).
Conditioning uses diffusers' class embedding; index `num_conditions` is the null
condition used for classifier-free guidance, so the UNet has `num_conditions + 1` class embeddings.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from synth.errors import ConfigError

PresetName = Literal["tiny", "small", "quality", "base"]


class ModelConfig(BaseModel):
    """Architecture of the denoiser. Round-trips through JSON (stored in the model card)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sample_size: int = Field(28, ge=8)
    # Pixel channels (1 or 3), or a latent generator's latent channels (its autoencoder allows up to 16).
    channels: int = Field(1, ge=1, le=16)
    num_conditions: int = Field(2, ge=1)
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = Field(1, ge=1)
    # Which levels (from the top) use self-attention. Every UNet2DModel also has a mid-block attention, whose
    # channels_last output makes Opacus' per-sample conv gradients wrong without a fix (privacy/grad_sample.py).
    attention_levels: tuple[bool, ...] = (False, False, True)
    norm_num_groups: int = Field(8, ge=1)
    attention_head_dim: int = Field(8, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        levels = len(self.block_out_channels)
        if len(self.attention_levels) != levels:
            raise ConfigError(
                f"attention_levels has {len(self.attention_levels)} entries, block_out_channels {levels}"
            )
        factor = 2 ** (levels - 1)
        if self.sample_size % factor:
            raise ConfigError(f"sample_size {self.sample_size} is not divisible by {factor} ({levels} levels)")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(f"block_out_channels {bad} not divisible by norm_num_groups {self.norm_num_groups}")
        return self

    @property
    def null_condition(self) -> int:
        """Class-embedding index of the unconditional ("null") condition used for CFG."""
        return self.num_conditions

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `diffusers.UNet2DModel`."""
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in self.attention_levels)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention_levels))
        return {
            "sample_size": self.sample_size,
            "in_channels": self.channels,
            "out_channels": self.channels,
            "block_out_channels": tuple(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "down_block_types": down,
            "up_block_types": up,
            "norm_num_groups": self.norm_num_groups,
            "attention_head_dim": self.attention_head_dim,
            "num_class_embeds": self.num_conditions + 1,
            "dropout": self.dropout,
        }


_PRESETS: dict[tuple[str, int], dict[str, Any]] = {
    ("tiny", 28): {"block_out_channels": (16, 32), "attention_levels": (False, False)},
    ("small", 28): {"block_out_channels": (32, 64, 64), "attention_levels": (False, False, True)},
    # `quality` keeps `small`'s network and trains it 6x longer: on 2 cores a wider UNet costs more per step than
    # it returns within an hour.
    ("quality", 28): {"block_out_channels": (32, 64, 64), "attention_levels": (False, False, True)},
    ("base", 28): {
        "block_out_channels": (64, 128, 256),
        "layers_per_block": 2,
        "attention_levels": (False, True, True),
        "norm_num_groups": 32,
        "attention_head_dim": 32,
        "dropout": 0.1,
    },
    ("tiny", 64): {"block_out_channels": (16, 32, 32), "attention_levels": (False, False, False)},
    ("small", 64): {"block_out_channels": (32, 64, 64, 128), "attention_levels": (False, False, False, True)},
    ("quality", 64): {"block_out_channels": (32, 64, 64, 128), "attention_levels": (False, False, False, True)},
    ("base", 64): {
        "block_out_channels": (64, 128, 256, 256),
        "layers_per_block": 2,
        "attention_levels": (False, False, True, True),
        "norm_num_groups": 32,
        "attention_head_dim": 32,
        "dropout": 0.1,
    },
    # 128 px in pixel space: the GPU's `base` (a CPU trains a latent generator there: synth.generator_kind).
    ("tiny", 128): {"block_out_channels": (16, 32, 32, 32), "attention_levels": (False, False, False, False)},
    ("small", 128): {"block_out_channels": (32, 64, 64, 128, 128),
                     "attention_levels": (False, False, False, False, True)},
    ("quality", 128): {"block_out_channels": (32, 64, 64, 128, 128),
                       "attention_levels": (False, False, False, False, True)},
    ("base", 128): {
        "block_out_channels": (64, 128, 128, 256, 256),
        "layers_per_block": 2,
        "attention_levels": (False, False, False, True, True),
        "norm_num_groups": 32,
        "attention_head_dim": 32,
        "dropout": 0.1,
    },
}


def size_class(sample_size: int) -> int:
    """The preset table's size class for a square side: 28 (≤ 32), 64 (≤ 64) or 128 (≤ 128); 0 beyond."""
    for bound, cls in ((32, 28), (64, 64), (128, 128)):
        if sample_size <= bound:
            return cls
    return 0


def preset(name: str, *, sample_size: int = 28, channels: int = 1, num_conditions: int = 2) -> ModelConfig:
    """A named preset for a given image size (its size class's network), channel count and number of
    conditions."""
    key = (name, size_class(sample_size))
    if key not in _PRESETS:
        known = sorted({f"{n}@{s}" for n, s in _PRESETS})
        raise ConfigError(f"no model preset {name!r} for {sample_size}×{sample_size}; known (up to): "
                          f"{', '.join(known)}")
    return ModelConfig(
        sample_size=sample_size, channels=channels, num_conditions=num_conditions, **_PRESETS[key]
    )


def build_unet(config: ModelConfig):  # -> diffusers.UNet2DModel (imported lazily: diffusers is slow to import)
    """Instantiate the diffusers UNet for `config`."""
    from diffusers import UNet2DModel

    return UNet2DModel(**config.unet_kwargs())


# Every diffusers name synthgate imports, resolved by `resolve_diffusers_names`.
DIFFUSERS_NAMES = ("AutoencoderKL", "DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler",
                   "DiffusionPipeline", "ImagePipelineOutput", "UNet2DModel")


def resolve_diffusers_names() -> None:
    """Resolve every diffusers name synthgate uses, once, in the calling thread.

    diffusers serves its classes through a lazy module, and two threads resolving a name for the first time at once
    can find it half-built: a DP release's training and canary-audit tasks start together on the thread runner and
    one failed with `ImportError: cannot import name 'UNet2DModel' from 'diffusers'` (a known lazy-import race).
    The release flow calls this before it submits concurrent tasks."""
    import diffusers
    from diffusers.training_utils import EMAModel  # noqa: F401

    for name in DIFFUSERS_NAMES:
        getattr(diffusers, name)
