"""Which generator a run trains (pixel or latent diffusion) and the UNet it gets, from intent, image size, device
and DP: the `kind` a `TrainConfig` names, resolved once the data and device are known.

Why these rules (measured on the 2 shared cores, benchmarks/README.md "Latent diffusion"): the `small` pixel UNet
runs ~0.5 s a step at 28 px but ~10 s at 64 px, so past 32 px a CPU release trains an autoencoder and denoises
its 4-channel latents (factor 4: 16×16 at 64 px, 32×32 at 128 px) instead. A GPU runs the `base` preset in pixel
space at any of these sizes.

With DP, the autoencoder must not see the private images without a guarantee. A latent generator is then trained
one of two ways: (a) its autoencoder is DP-trained too, with a share of ε (`dp.autoencoder_share`; the strategy
composes both parts into one ledger: `synth.privacy_strategy.LatentPrivacy`), or (b) it reuses, frozen, the
autoencoder of a latent model trained on public data (`train.init_from`, e.g. the `public_pretraining:` stage),
which the ledger names. `auto` with DP picks latent above 32 px on a CPU only when one of the two is available
(`private_latent_ok`), else pixel; `latent` with DP and neither is refused (`check_kind_with_dp`). Whenever
training starts from another model (`train.init_from`), `auto` takes that model's kind: its UNet only fits there.
"""

from __future__ import annotations

from typing import Literal

import torch

from synth.errors import ConfigError

Kind = Literal["pixel", "latent"]
PIXEL_MAX_CPU_SIZE = 32  # largest image side a CPU trains in pixel space under `auto`

LATENT_DP_REFUSAL = (
    "train.kind 'latent' with DP needs an autoencoder that keeps the guarantee: give it a share of ε "
    "(dp.autoencoder_share > 0, the default) or start from a latent model trained on public data "
    "(train.init_from / public_pretraining:); or use kind 'pixel'"
)


def resolve_kind(kind: str, *, sample_size: int, device: torch.device, preset: str, private: bool,
                 private_latent_ok: bool = False, init_kind: str | None = None) -> Kind:
    """The generator kind to train: `kind` itself unless it is "auto" (see the module docstring).
    `private_latent_ok`: a DP run can train a latent generator (a DP or a public autoencoder); `init_kind`: the
    kind of the `train.init_from` model, if any."""
    if kind in ("pixel", "latent"):
        return kind  # type: ignore[return-value]
    if kind != "auto":
        raise ConfigError(f"train.kind {kind!r} is not one of auto, pixel, latent")
    if init_kind in ("pixel", "latent"):
        return init_kind  # type: ignore[return-value]
    if sample_size <= PIXEL_MAX_CPU_SIZE or (device.type == "cuda" and preset == "base"):
        return "pixel"
    if private and not private_latent_ok:
        return "pixel"
    return "latent"


def check_kind_with_dp(kind: str, *, private: bool, private_latent_ok: bool = False) -> None:
    """Refuse a latent generator with DP when its autoencoder could be neither DP-trained nor public (one line)."""
    if private and kind == "latent" and not private_latent_ok:
        raise ConfigError(LATENT_DP_REFUSAL)
