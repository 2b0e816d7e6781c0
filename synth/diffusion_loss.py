"""The diffusion objective: the training noise schedule, the per-row denoising loss (epsilon or v prediction), the
conversion of a model's output to its noise estimate, the learning-rate schedule and the run's derived seeds (all
pure functions of their inputs)."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from synth.train_config import TrainConfig


def make_scheduler(config: TrainConfig, *, latent: bool = False):  # -> diffusers.DDPMScheduler
    """The training noise schedule, with the config's prediction type (x0 clipped to [-1, 1] when sampling pixels,
    not latents, whose unit-variance values lie well outside that range)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        clip_sample=not latent,
    )


def per_row_loss(
    unet: nn.Module,
    scheduler: Any,
    images: torch.Tensor,
    conditions: torch.Tensor,
    *,
    null_condition: int,
    generator: torch.Generator,
    noise_multiplicity: int = 1,
    cfg_dropout: float = 0.0,
    amp: contextlib.AbstractContextManager[Any] | None = None,
    part: tuple[int, int] | None = None,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """Denoising MSE of each of the B·K rows (example i owns rows i·K … i·K+K-1), fp32, shape (B·K,), against the
    scheduler's prediction type: the noise ε, or the velocity v = √ᾱ_t·ε − √(1−ᾱ_t)·x0.

    With `min_snr_gamma` γ a row at timestep t is weighted min(SNR(t), γ) / SNR(t) (Min-SNR-γ, Hang et al. 2023):
    the nearly noise-free steps, whose epsilon targets are hard and matter little to samples, stop dominating. In
    x0-error terms the ε loss is SNR·‖x̂0 − x0‖² and the v loss (SNR + 1)·‖x̂0 − x0‖², so the v loss is weighted
    min(SNR(t), γ) / (SNR(t) + 1): the same weighting of the x0 error.

    Timesteps, noise and condition dropout come from `generator` (on the images' device), in that order, always
    drawn for the whole batch. `part=(lo, hi)` then runs the model on examples lo … hi-1 only and returns their
    (hi-lo)·K rows: a rank of a multi-process run computes its slice with exactly the draws a single process would
    give those rows, and leaves the generator where every other rank leaves it (an empty slice skips the model).
    """
    k = int(noise_multiplicity)
    b = int(images.shape[0])
    lo, hi = part if part is not None else (0, b)
    if not 0 <= lo <= hi <= b:
        raise ValueError(f"part {part} is not a slice of a batch of {b}")
    cond = conditions.repeat_interleave(k, dim=0) if k > 1 else conditions
    rows, device = b * k, images.device
    t = torch.randint(0, scheduler.config.num_train_timesteps, (rows,), generator=generator, device=device)
    noise = torch.randn((rows, *images.shape[1:]), generator=generator, device=device, dtype=images.dtype)
    if cfg_dropout > 0:
        drop = torch.rand(rows, generator=generator, device=device) < cfg_dropout
        cond = torch.where(drop, torch.full_like(cond, null_condition), cond)
    if part is not None:
        images = images[lo:hi]
        t, noise, cond = t[lo * k : hi * k], noise[lo * k : hi * k], cond[lo * k : hi * k]
        if hi == lo:
            return torch.zeros(0, device=device)
    x0 = images.repeat_interleave(k, dim=0) if k > 1 else images
    noisy = scheduler.add_noise(x0, noise, t)
    with amp if amp is not None else contextlib.nullcontext():
        pred = unet(noisy, t, class_labels=cond).sample
    velocity = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(x0, noise, t) if velocity else noise
    rows_loss = (pred.float() - target).pow(2).flatten(1).mean(dim=1)
    if min_snr_gamma is not None:
        alpha_bar = scheduler.alphas_cumprod.to(device)[t].float()
        snr = alpha_bar / (1 - alpha_bar)
        rows_loss = rows_loss * torch.clamp(snr, max=min_snr_gamma) / (snr + 1 if velocity else snr)
    return rows_loss


def noise_estimate(output: torch.Tensor, noisy: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str
                   ) -> torch.Tensor:
    """The model's estimate of ε from its output at noisy input x_t with ᾱ_t = `alpha_bar` (a scalar or one value
    per row): the output itself for epsilon prediction; √(1−ᾱ)·x_t + √ᾱ·v for v prediction (x_t = √ᾱ·x0 + √(1−ᾱ)·ε
    and v = √ᾱ·ε − √(1−ᾱ)·x0 give ε back exactly). Callers that score noise estimates (the membership attacks)
    then work for either kind."""
    if prediction_type == "epsilon":
        return output
    if prediction_type != "v_prediction":
        raise ValueError(f"prediction_type {prediction_type!r} is not epsilon or v_prediction")
    a = alpha_bar.to(output.dtype).reshape(-1, *([1] * (output.ndim - 1))) if alpha_bar.ndim else alpha_bar
    return (1 - a).sqrt() * noisy + a.sqrt() * output


def learning_rate(config: TrainConfig, step: int, total_steps: int | None) -> float:
    """LR for optimizer update number `step` (1-based): linear warmup, then constant or cosine to
    `lr_final_ratio`·lr at `total_steps`. A pure function of the step, so there is no scheduler state."""
    warm = min(1.0, step / config.lr_warmup_steps) if config.lr_warmup_steps else 1.0
    factor = 1.0
    if config.lr_schedule == "cosine" and total_steps:
        span = max(1, total_steps - config.lr_warmup_steps)
        progress = min(1.0, max(0.0, (step - config.lr_warmup_steps) / span))
        factor = config.lr_final_ratio + (1 - config.lr_final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * warm * factor


def derive_seeds(seed: int) -> dict[str, int]:
    """Independent seeds for the UNet init, the data order and the noise stream, from one run seed."""
    children = np.random.SeedSequence(seed).spawn(3)
    init, data, noise = (int(c.generate_state(1, dtype=np.uint64)[0] >> 1) for c in children)
    return {"seed": seed, "init": init, "data_order": data, "noise": noise}
