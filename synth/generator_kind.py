"""Which generator a run trains (pixel or latent diffusion) and the UNet it gets, from intent, image size, device
and DP: the `kind` a `TrainConfig` names, resolved once the data and device are known.

Why these rules (measured on the 2 shared cores, benchmarks/README.md "Latent diffusion"): the `small` pixel UNet
runs ~0.5 s a step at 28 px but ~10 s at 64 px, so past 32 px a CPU release trains an autoencoder and denoises
its 4-channel latents (factor 4: 16×16 at 64 px, 32×32 at 128 px) instead. A GPU runs the `base` preset in pixel
space at any of these sizes. DP keeps pixel space: the autoencoder would see the private images without a
privacy guarantee, so `latent` with DP is refused (`check_kind_with_dp`) and `auto` picks pixel.
"""

from __future__ import annotations

from typing import Literal

import torch

from synth.errors import ConfigError

Kind = Literal["pixel", "latent"]
PIXEL_MAX_CPU_SIZE = 32  # largest image side a CPU trains in pixel space under `auto`

LATENT_DP_REFUSAL = (
    "train.kind 'latent' cannot be combined with DP yet: its autoencoder would be trained on the private images "
    "without DP; use kind 'pixel' (or 'auto') with dp.enabled"
)


def resolve_kind(kind: str, *, sample_size: int, device: torch.device, preset: str, private: bool) -> Kind:
    """The generator kind to train: `kind` itself unless it is "auto" (see the module docstring)."""
    if kind in ("pixel", "latent"):
        return kind  # type: ignore[return-value]
    if kind != "auto":
        raise ConfigError(f"train.kind {kind!r} is not one of auto, pixel, latent")
    if private or sample_size <= PIXEL_MAX_CPU_SIZE or (device.type == "cuda" and preset == "base"):
        return "pixel"
    return "latent"


def check_kind_with_dp(kind: str, *, private: bool) -> None:
    """Refuse a latent generator with DP (one ConfigError line)."""
    if private and kind == "latent":
        raise ConfigError(LATENT_DP_REFUSAL)
