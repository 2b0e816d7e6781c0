"""The latent generator's first half, inside a training run: train (or, on resume, reload) the autoencoder on the
train split, encode the split to scaled latents and hand the trainer latent data and a UNet config for them.

The UNet part of the run is then the ordinary trainer (same loop, EMA, checkpoints, seeds) on `TrainingData`
whose `images` are float latents; `synth.training._finish` writes the VAE beside the UNet (`vae/`) and the card's
`generator` entry (`generator_entry`). The autoencoder is kept in the checkpoint directory (`vae/` with the run it
belongs to), so a resumed run continues on the very latents it started with instead of retraining them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from synth.autoencoder import encode_means, fit_latent_scale, scale_latents, train_vae
from synth.errors import ConfigError, InputError, where
from synth.model import ModelConfig
from synth.model import preset as model_preset
from synth.train_config import TrainConfig
from synth.train_data import TrainingData

VAE_DIR = "vae"
_VAE_RUN = "vae_run.json"  # in the checkpoint's vae/: what the saved autoencoder was trained from


@dataclass(frozen=True)
class LatentParts:
    """The trained autoencoder and what the model card says about it."""

    vae: Any  # diffusers AutoencoderKL (CPU, eval), scaling/shift factors in its config
    record: dict[str, Any]  # training steps, seconds, reconstruction MSE, PSNR
    latent_shape: tuple[int, int, int]  # C, H, W


def prepare_latent(
    data: TrainingData, config: TrainConfig, *, device: torch.device, ckpt_dir: Path, where_: Path, say: Any = None
) -> tuple[TrainingData, ModelConfig, LatentParts]:
    """Autoencoder for the run (trained, or reloaded from `ckpt_dir/vae`), the train split as scaled latents, and
    the UNet config for them (the preset's network for the latent size class)."""
    ae = config.autoencoder
    side = int(data.image["height"])
    if side != int(data.image["width"]):
        raise InputError(where(where_, f"images are {data.image['height']}×{data.image['width']}; the latent "
                                       "generator needs square images"))
    try:
        latent_side = ae.latent_size(side)
    except ConfigError as e:
        raise ConfigError(where(where_, str(e))) from None
    run_id = {"autoencoder": ae.model_dump(mode="json"), "dataset": data.dataset_hash, "seed": config.seed}
    saved = Path(ckpt_dir) / VAE_DIR
    vae, record = _reload(saved, run_id)
    if vae is None:
        vae, record = train_vae(data.images, ae, seed=config.seed + 17, device=device, say=say)
        means = encode_means(vae, data.images)
        record["shift_factor"], record["scaling_factor"] = fit_latent_scale(vae, means)
        _save(vae, record, run_id, saved)
    else:
        means = encode_means(vae, data.images)
    latents = scale_latents(vae, means).contiguous()
    shape = (int(latents.shape[1]), int(latents.shape[2]), int(latents.shape[3]))
    if shape[1] != latent_side:
        raise ConfigError(where(where_, f"autoencoder gave {shape[1]}-px latents, expected {latent_side}"))
    try:
        model_cfg = model_preset(config.preset, sample_size=latent_side, channels=shape[0],
                                 num_conditions=data.space.num_conditions)
    except (ConfigError, ValueError) as e:
        raise ConfigError(where(where_, f"latent UNet: {str(e).splitlines()[0]}")) from None
    return replace(data, images=latents), model_cfg, LatentParts(vae=vae, record=record, latent_shape=shape)


def _reload(saved: Path, run_id: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    meta = saved / _VAE_RUN
    if not meta.is_file():
        return None, {}
    try:
        stored = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None, {}
    if stored.get("run") != run_id:
        return None, {}
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(saved, low_cpu_mem_usage=False).eval(), dict(stored.get("record") or {})


def _save(vae: Any, record: dict[str, Any], run_id: dict[str, Any], saved: Path) -> None:
    from synth.artifacts import atomic_dir

    with atomic_dir(saved, overwrite=True) as tmp:
        vae.save_pretrained(tmp)
        (tmp / _VAE_RUN).write_text(json.dumps({"run": run_id, "record": record}, indent=1))


def generator_entry(parts: LatentParts | None) -> dict[str, Any]:
    """The model card's `generator` entry: the kind, and for a latent generator where its autoencoder is, the
    latent shape, the scaling the UNet was trained at and how well the autoencoder reconstructs."""
    if parts is None:
        return {"kind": "pixel"}
    cfg = parts.vae.config
    return {
        "kind": "latent",
        "vae": VAE_DIR,
        "latent_shape": list(parts.latent_shape),
        "downsampling_factor": 2 ** (len(cfg.block_out_channels) - 1),
        "scaling_factor": float(cfg.scaling_factor),
        "shift_factor": float(cfg.shift_factor or 0.0),
        "autoencoder": {**parts.record, "parameters": int(sum(p.numel() for p in parts.vae.parameters())),
                        "trained_on": "train split (on site, non-private)"},
    }
