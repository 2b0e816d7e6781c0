"""The autoencoder of a latent generator: a small diffusers `AutoencoderKL` trained on site on the train split.

Latent diffusion (Rombach et al. 2022; MAISI for medical images) trains the denoiser on an autoencoder's latents
instead of pixels: at 64-128 px a factor-4 or factor-8 downsampling makes every UNet step several times cheaper
on a CPU. No pretrained weights are used (none reach this machine, and a public VAE would carry no guarantee for
medical images), so the autoencoder is trained here on the same train split as the UNet: non-privately, or in a
DP run with DP-SGD through the run's privacy strategy (`train_vae(privacy=...)`), or it is taken frozen from a
latent model trained on public data (`synth.latent_training`).

Objective: pixel MSE plus a small KL term (weight `kl_weight`, as in Stable Diffusion's 1e-6 regime: the latent
stays close to deterministic; its scale is fixed afterwards). No perceptual or adversarial loss: LPIPS needs
downloaded weights, and a GAN loss doubles the cost for sharper edges the audits do not reward.

Latents are the posterior means (deterministic encoding), shifted by their mean and scaled to unit variance:
`z = (mean(x) - shift) * scale` with `shift` and `scale` measured on the training latents and written into the
VAE's diffusers config (`shift_factor`, `scaling_factor`), the place diffusers' own pipelines read them from.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from synth.autoencoder_config import AutoencoderConfig
from synth.errors import ConfigError


def build_vae(config: AutoencoderConfig, *, channels: int, sample_size: int):  # -> diffusers.AutoencoderKL
    """A fresh `AutoencoderKL` for `channels`-channel images of `sample_size` pixels."""
    from diffusers import AutoencoderKL

    levels = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=channels, out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels, norm_num_groups=config.norm_num_groups,
        sample_size=sample_size, mid_block_add_attention=config.mid_attention,
        # fp32 throughout; set properly by `fit_latent_scale` once trained
        scaling_factor=1.0, shift_factor=0.0, force_upcast=False,
    )


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(127.5).sub(1.0)


def train_vae(
    images: torch.Tensor,
    config: AutoencoderConfig,
    *,
    seed: int,
    device: torch.device,
    say: Callable[[str], None] | None = None,
    privacy: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """Train an autoencoder on uint8 N×C×H×W `images` until `max_steps` or `max_minutes`; return it (CPU, eval)
    with its training record (steps, seconds, final reconstruction MSE, PSNR on the [0, 255] scale).

    With `privacy` (a `synth.privacy_strategy.PrivacyStrategy`, e.g. DP-SGD) it is trained through the strategy:
    Poisson batches, per-example clipped and noised gradients, `max_steps` logical steps planned for its accountant
    (see `_train_private`).

    Seeded: the init and the batch order come from `seed` (their own generators), so the same data and seed give
    the same autoencoder on one machine and thread count."""
    n, channels, size = int(images.shape[0]), int(images.shape[1]), int(images.shape[2])
    torch_state = torch.get_rng_state()
    torch.manual_seed(seed)
    vae = build_vae(config, channels=channels, sample_size=size).to(device)
    torch.set_rng_state(torch_state)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr)
    if privacy is not None:
        # The strategy's noise comes from torch's global RNG: seeded here (and restored after), so a rerun or a
        # resumed run gets the same autoencoder whatever ran before it.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + 3)
            return _train_private(vae, optimizer, images, config, seed=seed, device=device, say=say,
                                  privacy=privacy)
    order_gen = torch.Generator().manual_seed(seed + 1)
    sample_gen = torch.Generator(device=device).manual_seed(seed + 2)
    crop_gen = torch.Generator().manual_seed(seed + 4)
    batch = min(config.batch_size, n)
    started, step, losses = time.monotonic(), 0, []
    limit_s = config.max_minutes * 60 if config.max_minutes is not None else math.inf
    report = _Every(config.max_steps)
    while step < config.max_steps and time.monotonic() - started < limit_s:
        for idx in torch.randperm(n, generator=order_gen).split(batch):
            if len(idx) < batch or step >= config.max_steps or time.monotonic() - started >= limit_s:
                break
            x = _to_float(random_crops(images[idx], config.crop, generator=crop_gen)).to(device)
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=sample_gen,
                                                             device=device)
            mse = (vae.decode(z).sample - x).pow(2).mean()
            loss = mse + config.kl_weight * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            step += 1
            losses.append(float(mse.detach()))
            if say is not None and report.due(step):
                say(f"autoencoder step {step}/{config.max_steps}: reconstruction MSE {losses[-1]:.4f}")
    return vae.to("cpu").eval(), _record(step, losses, time.monotonic() - started, config)


def random_crops(images: torch.Tensor, side: int | None, *, generator: torch.Generator) -> torch.Tensor:
    """One random `side`×`side` crop of each N×C×H×W image (offsets from `generator`); the images themselves when
    `side` is None or not smaller than them."""
    n, _, height, width = images.shape
    if side is None or (side >= height and side >= width):
        return images
    side_h, side_w = min(side, height), min(side, width)
    top = torch.randint(0, height - side_h + 1, (n,), generator=generator).tolist()
    left = torch.randint(0, width - side_w + 1, (n,), generator=generator).tolist()
    pairs = enumerate(zip(top, left, strict=True))
    return torch.stack([images[i, :, t : t + side_h, s : s + side_w] for i, (t, s) in pairs])


def psnr_db(mse: float) -> float:
    """PSNR of an MSE measured on [-1, 1] pixels (the [0, 255] MSE times (2/255)²): 10·log10(4 / mse)."""
    return 10 * math.log10(4 / max(mse, 1e-12))


def heldout_reconstruction(vae: Any, images: torch.Tensor, *, batch: int = 64) -> dict[str, Any]:
    """Reconstruction MSE (on [-1, 1]) and PSNR of whole uint8 N×C×H×W `images` through `vae` (posterior means)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in images.split(batch):
            x = _to_float(chunk)
            total += float((vae.decode(encode_means(vae, chunk)).sample - x).pow(2).sum())
            count += x.numel()
    mse = total / count
    return {"heldout_reconstruction_mse": mse, "heldout_psnr_db": psnr_db(mse),
            "heldout": f"{len(images)} whole val-split images"}


def _record(step: int, losses: list[float], seconds: float, config: AutoencoderConfig) -> dict[str, Any]:
    if step == 0:
        raise ConfigError("autoencoder training stopped before its first step (max_minutes too small?)")
    tail = [x for x in losses if math.isfinite(x)][-20:] or [math.nan]
    mse = sum(tail) / len(tail)
    record = {"steps": step, "seconds": round(seconds, 2), "stopped_by": "max_steps" if step >= config.max_steps
              else "max_minutes", "reconstruction_mse": mse, "psnr_db": psnr_db(mse)}
    if config.crop is not None:
        record["measured_on"] = f"random {config.crop}×{config.crop} training crops"
    return record


# Weight of the per-example latent-moment term of DP training: with DP the latent shift and scale cannot be fitted
# to the private latents afterwards (two statistics released outside DP-SGD), so the encoder is pulled towards
# zero-mean, unit-second-moment latents and the UNet uses them at shift 0, scale 1. The decoder can absorb any
# latent scale, so the term costs reconstruction little; 0.1 brought the latent std to ~1 within the budget.
LATENT_MOMENT_WEIGHT = 0.1


def _train_private(vae: Any, optimizer: Any, images: torch.Tensor, config: AutoencoderConfig, *, seed: int,
                   device: torch.device, say: Callable[[str], None] | None, privacy: Any) -> tuple[Any, dict]:
    """`train_vae` through a privacy strategy, following the trainer's step contract (`PrivacyStrategy`): every
    loss term is per example (reconstruction MSE, KL, latent moments), so each example's gradient is its own
    and the strategy clips and noises it; an empty Poisson batch still takes its noise-only step."""
    from torch.utils.data import DataLoader, TensorDataset

    n = int(images.shape[0])
    batch = min(config.batch_size, n)
    loader = DataLoader(TensorDataset(images), batch_size=batch, drop_last=True,
                        generator=torch.Generator().manual_seed(seed + 1))
    model, optimizer, loader = privacy.attach(vae, optimizer, loader, epochs=None, steps=config.max_steps)
    model.train()
    inner = privacy.unwrap(model)  # encode/decode are its methods; the strategy's hooks sit on its layers
    sample_gen = torch.Generator(device=device).manual_seed(seed + 2)
    crop_gen = torch.Generator().manual_seed(seed + 4)
    started, step, losses = time.monotonic(), 0, []
    limit_s = config.max_minutes * 60 if config.max_minutes is not None else math.inf
    report = _Every(config.max_steps)
    while step < config.max_steps and time.monotonic() - started < limit_s:
        for (x,) in loader:
            b = int(x.shape[0])
            mse = math.nan
            if b:
                # a crop is a per-example transform: each example's clipped gradient is still its own
                x = _to_float(random_crops(x, config.crop, generator=crop_gen)).to(device)
                posterior = inner.encode(x).latent_dist
                z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=sample_gen,
                                                                 device=device)
                per_mse = (inner.decode(z).sample - x).pow(2).mean(dim=(1, 2, 3))
                m = posterior.mean.flatten(1)
                moments = m.mean(1).pow(2) + (m.pow(2).mean(1) - 1).pow(2)
                loss = per_mse + config.kl_weight * posterior.kl() + LATENT_MOMENT_WEIGHT * moments
                loss.mean().backward()
                mse = float(per_mse.detach().mean())
            privacy.after_backward(model, b)
            optimizer.step()
            real = privacy.is_real_step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            if b:
                losses.append(mse)
            if not real:
                continue
            step += 1
            if say is not None and report.due(step):
                say(f"autoencoder step {step}/{config.max_steps} (DP): reconstruction MSE {mse:.4f}")
            if step >= config.max_steps or time.monotonic() - started >= limit_s:
                break
    plain = privacy.unwrap(model)
    fresh = build_vae_like(plain)
    return fresh.eval(), _record(step, losses, time.monotonic() - started, config)


def build_vae_like(vae: Any) -> Any:
    """A clean CPU copy of `vae` (no per-sample-gradient hooks or attributes left by a privacy strategy)."""
    from diffusers import AutoencoderKL

    fresh = AutoencoderKL.from_config(vae.config)
    fresh.load_state_dict({k: v.detach().to("cpu") for k, v in vae.state_dict().items()})
    return fresh


@torch.no_grad()
def encode_means(vae: Any, images: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """Unscaled posterior means of uint8 (or [-1, 1] float) N×C×H×W images, float32 on the CPU."""
    device = next(vae.parameters()).device
    out = []
    for start in range(0, int(images.shape[0]), batch_size):
        x = images[start : start + batch_size]
        x = _to_float(x) if x.dtype == torch.uint8 else x.float()
        out.append(vae.encode(x.to(device)).latent_dist.mean.float().cpu())
    return torch.cat(out)


def fit_latent_scale(vae: Any, means: torch.Tensor) -> tuple[float, float]:
    """Set the VAE config's `shift_factor` (mean) and `scaling_factor` (1/std) from the training latents' unscaled
    means, so `(z - shift) * scale` has zero mean and unit variance; return (shift, scale)."""
    shift = float(means.mean())
    std = float(means.std())
    if not math.isfinite(std) or std <= 0:
        raise ConfigError(f"autoencoder latents have standard deviation {std}; cannot scale them")
    scale = 1.0 / std
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    return shift, scale


def scale_latents(vae: Any, means: torch.Tensor) -> torch.Tensor:
    """Unscaled latents → the UNet's space, with the VAE config's shift and scale."""
    return (means - float(vae.config.shift_factor or 0.0)) * float(vae.config.scaling_factor)


class _Every:
    """When to print a progress line: the first step, then every 10% of the steps or 15 s, whichever comes first
    (every 50 steps was 2 minutes apart at 128 px on a busy core)."""

    def __init__(self, total: int, seconds: float = 15.0):
        self.every, self.seconds, self.last = max(1, total // 10), seconds, time.monotonic()

    def due(self, step: int) -> bool:
        now = time.monotonic()
        if step == 1 or step % self.every == 0 or now - self.last >= self.seconds:
            self.last = now
            return True
        return False


def stderr_say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
