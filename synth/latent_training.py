"""The latent generator's first half, inside a training run: train (or, on resume, reload) the autoencoder on the
train split (with DP in a DP run), or take a public model's frozen one; encode the split to scaled latents and
hand the trainer latent data and a UNet config for them.

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

from synth.autoencoder import encode_means, fit_latent_scale, heldout_reconstruction, scale_latents, train_vae
from synth.errors import ConfigError, InputError, where
from synth.generator_kind import LATENT_DP_REFUSAL
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
    data: TrainingData, config: TrainConfig, *, device: torch.device, ckpt_dir: Path, where_: Path, say: Any = None,
    privacy: Any = None, heldout: torch.Tensor | None = None,
) -> tuple[TrainingData, ModelConfig, LatentParts]:
    """Autoencoder for the run, the train split as scaled latents, and the UNet config for them (the preset's
    network for the latent size class). The autoencoder is, in this order: the frozen one of a latent
    `config.init_from` model (public pretraining; never retrained here), one trained on the train split with DP
    (`privacy`, a `LatentPrivacy` strategy: its autoencoder strategy does the DP-SGD), or, without DP, one trained
    on the train split; trained ones are kept in (and on resume reloaded from) `ckpt_dir/vae`. `heldout`: whole
    uint8 images outside the train split (the val split) on which a non-private autoencoder's reconstruction PSNR
    is measured for the card (the training figure is on crops, and on images it has seen)."""
    side = int(data.image["height"])
    if side != int(data.image["width"]):
        raise InputError(where(where_, f"images are {data.image['height']}×{data.image['width']}; the latent "
                                       "generator needs square images"))
    public = public_vae_dir(config)
    if public is not None:
        vae, record = _load_public(public, data, where_)
    else:
        vae, record = _trained_vae(data, config, side, device=device, ckpt_dir=ckpt_dir, where_=where_, say=say,
                                   privacy=privacy)
        if privacy is None and heldout is not None and "heldout_psnr_db" not in record:
            record.update(heldout_reconstruction(vae, heldout))
    # Post-processing: the latents are the (DP-trained or public) encoder applied to each private image, one image
    # to one latent, and the UNet's own DP-SGD then covers them like pixels: no more than the encoder's guarantee
    # (and the UNet's) leaks through them.
    latents = scale_latents(vae, encode_means(vae, data.images)).contiguous()
    shape = (int(latents.shape[1]), int(latents.shape[2]), int(latents.shape[3]))
    try:
        model_cfg = model_preset(config.preset, sample_size=shape[1], channels=shape[0],
                                 num_conditions=data.space.num_conditions)
    except (ConfigError, ValueError) as e:
        raise ConfigError(where(where_, f"latent UNet: {str(e).splitlines()[0]}")) from None
    return replace(data, images=latents), model_cfg, LatentParts(vae=vae, record=record, latent_shape=shape)


def public_vae_dir(config: TrainConfig) -> Path | None:
    """The `vae/` of the latent model training starts from (`train.init_from`), or None (no such model, or a
    pixel one)."""
    if config.init_from is None:
        return None
    vae = Path(config.init_from) / VAE_DIR
    return vae if (vae / "config.json").is_file() else None


def _load_public(vae_dir: Path, data: TrainingData, where_: Path) -> tuple[Any, dict[str, Any]]:
    """The public model's autoencoder, frozen, with its own latent scaling (no statistic of the private images is
    fitted); the record names the public model (the UNet's `init_from` record holds its hash and licence)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir, low_cpu_mem_usage=False).eval().requires_grad_(False)
    if int(vae.config.in_channels) != int(data.image["channels"]):
        raise InputError(where(vae_dir, f"autoencoder takes {vae.config.in_channels}-channel images, the dataset "
                                        f"has {data.image['channels']}"))
    return vae, {"trained_on": "public", "source": str(vae_dir.parent), "frozen": True,
                 "latent_scale": "the public model's (no statistic of the private images is fitted)"}


def _trained_vae(data: TrainingData, config: TrainConfig, side: int, *, device: torch.device, ckpt_dir: Path,
                 where_: Path, say: Any, privacy: Any) -> tuple[Any, dict[str, Any]]:
    """An autoencoder trained on the train split (with DP when `privacy` is given), or reloaded on resume."""
    ae = config.autoencoder
    try:
        ae.latent_size(side)
    except ConfigError as e:
        raise ConfigError(where(where_, str(e))) from None
    ae_privacy = None
    if privacy is not None:
        if not getattr(privacy, "can_train_autoencoder", False):  # never a silently non-private autoencoder
            raise ConfigError(LATENT_DP_REFUSAL)
        ae_privacy = privacy.autoencoder_strategy()
    run_id = {"autoencoder": ae.model_dump(mode="json"), "dataset": data.dataset_hash, "seed": config.seed,
              "dp": ae_privacy is not None}
    saved = Path(ckpt_dir) / VAE_DIR
    vae, record, privacy_state = _reload(saved, run_id)
    if vae is not None:
        if ae_privacy is not None:
            ae_privacy.load_state_dict(privacy_state)  # its spend goes into the one ledger again
        return vae, record
    vae, record = train_vae(data.images, ae, seed=config.seed + 17, device=device, say=say, privacy=ae_privacy)
    if ae_privacy is None:
        record["shift_factor"], record["scaling_factor"] = fit_latent_scale(vae, encode_means(vae, data.images))
        record["trained_on"] = "train split (on site, non-private)"
    else:
        # Fitting shift and scale to the private latents would publish two statistics outside DP-SGD: the DP
        # encoder was trained to give zero-mean, unit-second-moment latents instead (`train_vae`), scale 1.
        record.update(shift_factor=0.0, scaling_factor=1.0, trained_on="train split, with DP-SGD",
                      latent_scale="fixed (shift 0, scale 1): the DP encoder is trained towards unit-moment latents")
        # The reconstruction error is measured on private images outside DP-SGD: not published.
        record.pop("reconstruction_mse", None)
        record.pop("psnr_db", None)
    _save(vae, record, run_id, saved, ae_privacy.state_dict() if ae_privacy is not None else None)
    return vae, record


def _reload(saved: Path, run_id: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    meta = saved / _VAE_RUN
    if not meta.is_file():
        return None, {}, None
    try:
        stored = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None, {}, None
    if stored.get("run") != run_id or (run_id.get("dp") and not stored.get("privacy")):
        return None, {}, None
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(saved, low_cpu_mem_usage=False).eval()
    return vae, dict(stored.get("record") or {}), stored.get("privacy")


def _save(vae: Any, record: dict[str, Any], run_id: dict[str, Any], saved: Path,
          privacy_state: dict[str, Any] | None) -> None:
    from synth.artifacts import atomic_dir

    with atomic_dir(saved, overwrite=True) as tmp:
        vae.save_pretrained(tmp)
        (tmp / _VAE_RUN).write_text(json.dumps({"run": run_id, "record": record, "privacy": privacy_state},
                                               indent=1))


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
        "autoencoder": {"trained_on": "train split (on site, non-private)", **parts.record,
                        "parameters": int(sum(p.numel() for p in parts.vae.parameters()))},
    }
