"""Build model directories for the generator's tests with the trainer's own writer, without running the trainer.

The pipeline, samplers and generation are tested against `synth.model_dir.write_model_dir` (what `synth.training`
calls), with random or briefly trained weights from the minimal loop below, so they do not depend on the trainer.

    model_index.json, unet/, scheduler/   ConditionalDiffusionPipeline.save_pretrained
    unet_ema/                             UNet2DModel.save_pretrained
    model_card.json                       artifact header (kind "model") with conditions, class_names, counts...
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synth.conditioning import ConditionSpace
from synth.model import ModelConfig, build_unet, preset


def make_model_dir(
    out: Path,
    *,
    space: ConditionSpace | None = None,
    condition_counts: Sequence[int] | None = None,
    model_config: ModelConfig | None = None,
    unet: Any = None,
    ema_unet: Any = None,
    beta_schedule: str = "linear",
    seed: int = 0,
    privacy: Mapping[str, Any] | None = None,
) -> Path:
    """Write a model directory with the trainer's own writer (`synth.model_dir.write_model_dir`), so the layout
    the generator is tested against is the one training produces. Without `unet`, a randomly initialised one
    (fixed seed) is used; without `ema_unet`, the EMA weights are a perturbed copy so 'ema' and 'raw' differ."""
    from diffusers import DDPMScheduler

    from synth.model_dir import write_model_dir

    space = space or ConditionSpace(class_names=("normal", "pneumonia"))
    cfg = model_config or preset("tiny", num_conditions=space.num_conditions)
    if unet is None:
        torch.manual_seed(seed)
        unet = build_unet(cfg)
    if ema_unet is None:
        ema_unet = copy.deepcopy(unet)
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed + 1)
            for p in ema_unet.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    if condition_counts is None:
        condition_counts = [10 * (i + 1) for i in range(space.num_conditions)]
    return write_model_dir(
        Path(out),
        unet=unet,
        ema_unet=ema_unet,
        scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, clip_sample=True),
        model_config=cfg,
        train_config={"test_fixture": True},
        space=space,
        dataset_hash="0" * 64,
        image={"height": cfg.sample_size, "width": cfg.sample_size, "channels": cfg.channels},
        condition_counts=list(condition_counts),
        privacy=privacy,
    )


def real_train_images(data_dir: Path, n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """PneumoniaMNIST train images (uint8 N×28×28) and labels; a fixed random subset of `n` when given."""
    d = np.load(Path(data_dir) / "pneumoniamnist.npz")
    x, y = d["train_images"], d["train_labels"].reshape(-1).astype(np.int64)
    if n is not None:
        idx = np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))
        x, y = x[idx], y[idx]
    return x, y


def train_briefly(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int,
    model_config: ModelConfig | None = None,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    null_prob: float = 0.1,
) -> tuple[Any, Any]:
    """A minimal DDPM training loop (epsilon MSE, AdamW, linear betas, EMA, condition dropout for CFG) used only
    to give the sampler-statistics tests a model that has learnt the data's intensity distribution.

    Deliberately not the package trainer (that is synth/training.py): the tests must not depend on it.
    Returns (unet, ema_unet).
    """
    from diffusers import DDPMScheduler

    cfg = model_config or preset("tiny")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    unet = build_unet(cfg)
    ema = copy.deepcopy(unet).requires_grad_(False)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    x_all = torch.from_numpy(np.asarray(images)).float().div(127.5).sub(1).unsqueeze(1)
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.integers(0, len(x_all), batch_size))
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(batch_size) < null_prob] = cfg.null_condition
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch_size,))
        loss = torch.nn.functional.mse_loss(unet(sched.add_noise(x0, noise, t), t, class_labels=y).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
    return unet.eval(), ema.eval()
