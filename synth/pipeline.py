"""Our class-conditional diffusion pipeline: a `DiffusionPipeline` with classifier-free guidance, per-image random
generators and synthgate's samplers.

diffusers' `DDPMPipeline` cannot take class labels, so the sampling loop lives in `synth.diffusers_pipeline`, a
standalone file (torch + diffusers only) that every model directory carries as `pipeline.py` so plain diffusers can
load it; the class here subclasses it. It is saved and loaded with the standard `save_pretrained` /
`from_pretrained` (model_index.json, unet/, scheduler/, and vae/ for a latent generator); a model directory also
holds `unet_ema/` and `model_card.json`, which `load_pipeline` reads to choose weights and sampler.

Determinism: with one `torch.Generator` per image, an image's initial noise and every stochastic step's noise come
from its own generator, and the UNet's per-sample output does not depend on the other samples in a batch of the
same size (checked on CPU), so an image depends only on its seed, its condition and the batch *size*.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import UNet2DModel

from synth.device import resolve_device
from synth.diffusers_pipeline import ConditionalDiffusionPipeline as StandalonePipeline
from synth.diffusers_pipeline import to_uint8_tensor
from synth.errors import ConfigError, InputError, where
from synth.layout import EMA_DIR
from synth.model_card import read_model_card as read_model_card  # re-exported: callers load pipeline and card together
from synth.sampling import SamplerConfig, resolve_sampler

# "ema" (the final EMA weights, the default), "raw" (the last step's weights) or "ema@STEP" (the EMA weights kept
# after STEP steps: `train.snapshot_every`, model dir `unet_ema_snapshots/`).
Weights = str


def snapshot_step(weights: str) -> int | None:
    """STEP of an "ema@STEP" weights name; None for "ema" and "raw". ConfigError for anything else."""
    if weights in ("ema", "raw"):
        return None
    head, _, step = str(weights).partition("@")
    if head != "ema" or not step.isdigit() or int(step) < 1:
        raise ConfigError(f"weights {weights!r} is not 'ema', 'raw' or 'ema@STEP' (a kept snapshot's step)")
    return int(step)


def snapshot_weights(card: dict[str, Any]) -> list[str]:
    """The "ema@STEP" names of the snapshots a model card lists, by step."""
    snaps = (card.get("weights") or {}).get("snapshots") or {}
    return [f"ema@{s}" for s in sorted(int(k) for k in snaps)]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] N×C×H×W floats → uint8 N×H×W (one channel) or N×H×W×C numpy."""
    img = to_uint8_tensor(x).cpu().numpy().transpose(0, 2, 3, 1)
    return img[..., 0] if img.shape[-1] == 1 else img


class ConditionalDiffusionPipeline(StandalonePipeline):
    """Class-conditional sampling with classifier-free guidance (CFG) for a `UNet2DModel` with class embeddings.

    The sampling loop is the standalone pipeline's (`synth.diffusers_pipeline`, the `pipeline.py` of every model
    directory), so plain diffusers and synthgate draw the same pixels. This subclass adds samplers: set one with
    `set_sampler`; `__call__` then uses its steps, guidance scale and eta unless given explicitly. It keeps the
    class name the model directory's `model_index.json` records.
    """

    def __init__(self, unet: UNet2DModel, scheduler: Any, vae: Any = None):
        super().__init__(unet=unet, scheduler=scheduler, vae=vae)
        # The trained noise schedule: every sampler is built from it, whatever scheduler is active later.
        self.trained_scheduler_config: dict[str, Any] = dict(scheduler.config)
        self.sampler_config: SamplerConfig | None = None

    @property
    def null_condition(self) -> int:
        try:
            return super().null_condition
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def set_sampler(self, sampler: str | SamplerConfig) -> SamplerConfig:
        """Swap in the scheduler for `sampler` (built from the trained DDPM config) and return its config."""
        cfg = resolve_sampler(sampler)
        self.scheduler = cfg.build_scheduler(self.trained_scheduler_config)
        self.sampler_config = cfg
        return cfg

    def default_steps(self) -> int:
        """The sampler's steps when one is set, else the standalone default (DDPM: every training step; 50)."""
        if self.sampler_config is not None:
            return self.sampler_config.steps
        return super().default_steps()

    def _conditions(self, conditions: torch.Tensor | Sequence[int]) -> torch.Tensor:
        c = torch.as_tensor(conditions if isinstance(conditions, torch.Tensor) else list(conditions))
        if c.ndim != 1 or c.numel() == 0 or c.dtype.is_floating_point or c.dtype == torch.bool:
            raise ConfigError(
                f"conditions must be a non-empty 1-D sequence of ints, got {c.dtype} {tuple(c.shape)}"
            )
        c = c.to(torch.long)
        bad = c[(c < 0) | (c > self.null_condition)]
        if bad.numel():
            null = self.null_condition
            raise ConfigError(f"condition {int(bad[0])} outside 0..{null} (null condition = {null})")
        return c

    @torch.no_grad()
    def __call__(  # type: ignore[override]  # synthgate's calling convention: uint8 arrays, sampler defaults
        self,
        conditions: torch.Tensor | Sequence[int],
        *,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float | None = None,
        output_type: Literal["np", "pt"] = "np",
    ) -> np.ndarray | torch.Tensor:
        """Sample one image per condition index.

        `guidance_scale` w: `eps = eps_null + w·(eps_cond − eps_null)`; 1.0 is plain conditional sampling and skips
        the null pass, otherwise the conditional and null passes run as one batched UNet call. `generator`: one
        per image (each image then depends only on its own generator) or one for the batch. Defaults come from
        the sampler set with `set_sampler` (steps of the scheduler otherwise, guidance 1.0, eta 0).
        Returns uint8 N×H×W[×C] numpy (`output_type="np"`) or an N×C×H×W float tensor in [-1, 1] ("pt").
        """
        cond = self._conditions(conditions)
        n = len(cond)
        if isinstance(generator, list) and len(generator) != n:
            raise ConfigError(f"{len(generator)} generators for {n} conditions; give one per image")
        if output_type not in ("np", "pt"):
            raise ConfigError(f"output_type {output_type!r} is not 'np' or 'pt'")
        sampler = self.sampler_config
        w = float(guidance_scale if guidance_scale is not None else (sampler.guidance_scale if sampler else 1.0))
        steps = int(num_inference_steps or self.default_steps())
        eta = float(eta if eta is not None else (sampler.eta if sampler else 0.0))
        if w < 0:
            raise ConfigError(f"guidance_scale {w} is negative")
        x = self.sample(cond, guidance_scale=w, num_inference_steps=steps, generator=generator, eta=eta)
        return x if output_type == "pt" else to_uint8(x)


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    # diffusers shows a "Loading pipeline components" bar per load; hide it (and restore the global setting).
    from diffusers.utils import logging as dlogging

    was_enabled = dlogging.is_progress_bar_enabled()
    dlogging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            dlogging.enable_progress_bar()


def load_pipeline(
    model_dir: Path,
    *,
    weights: Weights = "ema",
    sampler: str | SamplerConfig | None = None,
    device: str | torch.device = "auto",
) -> ConditionalDiffusionPipeline:
    """Load a trained model directory as a pipeline with the chosen weights (`unet_ema/`, `unet/` or a kept
    snapshot: see `Weights`), sampler (default: the trained DDPM scheduler) and device, in eval mode, progress bar
    off."""
    model_dir = Path(model_dir)
    step = snapshot_step(weights)
    card = read_model_card(model_dir)
    dev = resolve_device(device)
    ema_dir = model_dir / EMA_DIR
    if step is not None:
        folder = ((card.get("weights") or {}).get("snapshots") or {}).get(str(step))
        if folder is None:
            kept = ", ".join(snapshot_weights(card)) or "none"
            raise InputError(where(model_dir, f"keeps no EMA snapshot at step {step} (kept: {kept})"))
        ema_dir = model_dir / folder
    if weights != "raw" and not ema_dir.is_dir():
        raise InputError(where(model_dir, f"has no {ema_dir.relative_to(model_dir)}/ (EMA weights); use "
                                          "weights='raw'"))
    with _quiet_loading():
        try:
            pipe = ConditionalDiffusionPipeline.from_pretrained(model_dir, low_cpu_mem_usage=False)
            if weights != "raw":
                pipe.register_modules(unet=UNet2DModel.from_pretrained(ema_dir, low_cpu_mem_usage=False))
        except (OSError, ValueError, KeyError) as e:
            raise InputError(where(model_dir, f"cannot be loaded as a pipeline ({type(e).__name__}: {e})")) from None
    if sampler is not None:
        pipe.set_sampler(sampler)
    pipe.unet.eval()
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    return pipe
