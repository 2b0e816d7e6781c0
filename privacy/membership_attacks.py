"""The membership attacks' queries of the noise predictor ε̂(x_t, t, y): the denoising loss per image, timestep and
noise draw (`loss`), and PIA's distance R_{t,p} (`pia`; see `privacy.membership` for both). Torch is imported
lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def to_model_input(images: np.ndarray) -> Any:
    """uint8 N×H×W[×C] → float32 N×C×H×W in [-1, 1] (the training transform)."""
    import torch

    a = np.ascontiguousarray(images)
    t = torch.from_numpy(a).unsqueeze(1) if a.ndim == 3 else torch.from_numpy(a).permute(0, 3, 1, 2)
    return t.float().div(127.5).sub(1.0).contiguous()


def _predict(unet: Any, alphas_cumprod: Any, x: Any, t: int, y: Any, prediction_type: str) -> Any:
    """ε̂(x_t, t, y): the UNet's noise estimate, whatever it was trained to predict (synth.diffusion_loss)."""
    import torch

    from synth.diffusion_loss import noise_estimate

    steps = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    out = unet(x, steps, class_labels=y).sample.float()
    return noise_estimate(out, x.float(), alphas_cumprod[int(t)].to(x.device), prediction_type)


def loss_errors(
    unet: Any, alphas_cumprod: Any, x0: Any, y: Any, *, timesteps: Sequence[int], noise: Any, batch_size: int,
    prediction_type: str = "epsilon",
) -> np.ndarray:
    """Denoising error per image, timestep and noise draw: N×len(timesteps)×K (mean squared error over pixels of
    the noise estimate, for a model of either `prediction_type`).

    `noise` (K×C×H×W) is shared by every image. Runs on the UNet's device; `x0`, `y` on the CPU.
    """
    import torch

    device = next(unet.parameters()).device
    k = noise.shape[0]
    noise = noise.to(device)
    out = np.empty((x0.shape[0], len(timesteps), k), dtype=np.float64)
    per = max(1, batch_size // k)  # images per forward pass: each brings its K draws
    with torch.inference_mode():
        for start in range(0, x0.shape[0], per):
            xb = x0[start : start + per].to(device)
            yb = y[start : start + per].to(device).repeat_interleave(k)
            b = xb.shape[0]
            eps = noise.repeat(b, 1, 1, 1)  # row i·K + j: image i, draw j
            xr = xb.repeat_interleave(k, dim=0)
            for j, t in enumerate(timesteps):
                a = alphas_cumprod[int(t)].to(device)
                xt = a.sqrt() * xr + (1 - a).sqrt() * eps
                err = (_predict(unet, alphas_cumprod, xt, t, yb, prediction_type) - eps).pow(2).flatten(1).mean(1)
                out[start : start + b, j, :] = err.reshape(b, k).double().cpu().numpy()
    return out


def pia_distances(
    unet: Any, alphas_cumprod: Any, x0: Any, y: Any, *, timestep: int, p: float, batch_size: int,
    prediction_type: str = "epsilon",
) -> np.ndarray:
    """PIA's R_{t,p} per image: (mean over pixels |ε̂(x_t, t, y) − ε₀|^p)^(1/p), ε₀ = ε̂(x₀, 0, y) and
    x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε₀ (Kong et al., ICLR 2024)."""
    import torch

    device = next(unet.parameters()).device
    a = alphas_cumprod[int(timestep)].to(device)
    out = np.empty(x0.shape[0], dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, x0.shape[0], batch_size):
            xb = x0[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            eps0 = _predict(unet, alphas_cumprod, xb, 0, yb, prediction_type)
            xt = a.sqrt() * xb + (1 - a).sqrt() * eps0
            diff = (_predict(unet, alphas_cumprod, xt, timestep, yb, prediction_type) - eps0).abs().flatten(1)
            out[start : start + xb.shape[0]] = diff.pow(p).mean(1).pow(1 / p).double().cpu().numpy()
    return out
