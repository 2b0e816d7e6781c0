"""The autoencoder's typed config and its presets (pydantic only: imported with `TrainConfig`, without torch).

See `synth.autoencoder` for what the autoencoder is for and how it is trained.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from synth.errors import ConfigError


class AutoencoderConfig(BaseModel):
    """Architecture and training budget of the autoencoder. Frozen; round-trips through JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # One entry per level; every level after the first halves the resolution (factor 2^(levels-1)).
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = Field(4, ge=1, le=16)
    layers_per_block: int = Field(1, ge=1)
    norm_num_groups: int = Field(16, ge=1)
    # Mid-block attention over (H/f)² tokens: off on a CPU (costs more than it returns at these sizes).
    mid_attention: bool = False
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    kl_weight: float = Field(1e-6, ge=0)
    max_steps: int = Field(300, ge=1)
    max_minutes: float | None = Field(4.0, gt=0)
    # Train on random square crops of this side (None: whole images). The network is convolutional (no attention
    # unless `mid_attention`), so weights learnt on crops apply to the whole image, and a crop of a quarter of the
    # pixels costs about a quarter per example: more examples within `max_minutes` (benchmarks/README.md
    # "Autoencoder crops"). Images no larger than the crop are used whole.
    crop: int | None = Field(None, ge=8)

    @model_validator(mode="after")
    def _check(self) -> AutoencoderConfig:
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"autoencoder block_out_channels {bad} not divisible by norm_num_groups "
                             f"{self.norm_num_groups}")
        if self.crop is not None and self.crop % self.factor:
            raise ValueError(f"autoencoder crop {self.crop} is not divisible by its downsampling factor "
                             f"{self.factor}")
        return self

    @property
    def factor(self) -> int:
        """Downsampling factor from pixels to latents."""
        return 2 ** (len(self.block_out_channels) - 1)

    def latent_size(self, sample_size: int) -> int:
        """Latent side length for square images of `sample_size` pixels (ConfigError when it does not divide)."""
        if sample_size % self.factor:
            raise ConfigError(f"image size {sample_size} is not divisible by the autoencoder's downsampling "
                              f"factor {self.factor} ({len(self.block_out_channels)} levels)")
        return sample_size // self.factor


# Per training preset; a factor 8 at 128 px is chosen by `synth.generator_kind` (an extra level), not here.
AUTOENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"block_out_channels": (8, 16), "norm_num_groups": 8, "batch_size": 16, "max_steps": 20,
             "max_minutes": 1.0},
    # 32×32 crops: at 64 px 3.7× the steps of whole images in the same 5 minutes, +0.8 dB PSNR on whole held-out
    # images (benchmarks/README.md "Autoencoder crops"); at 128 px a crop is a sixteenth of the image.
    "small": {"block_out_channels": (16, 32, 64), "batch_size": 32, "max_steps": 300, "max_minutes": 4.0,
              "crop": 32},
    "quality": {"block_out_channels": (16, 32, 64), "batch_size": 32, "max_steps": 1500, "max_minutes": 15.0,
                "crop": 32},
    "base": {"block_out_channels": (64, 128, 256), "norm_num_groups": 32, "layers_per_block": 2,
             "mid_attention": True, "batch_size": 64, "lr": 2e-4, "max_steps": 20_000, "max_minutes": None},
}
