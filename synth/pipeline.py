"""Our class-conditional diffusion pipeline: a `DiffusionPipeline` with classifier-free guidance and per-image
random generators.

diffusers' `DDPMPipeline` cannot take class labels, so this pipeline owns the sampling loop. It is saved and loaded
with the standard `save_pretrained` / `from_pretrained` (model_index.json, unet/, scheduler/); a model directory
also holds `unet_ema/` and `model_card.json`, which `load_pipeline` reads to choose weights and sampler.

Determinism: with one `torch.Generator` per image, an image's initial noise and every stochastic step's noise come
from its own generator, and the UNet's per-sample output does not depend on the other samples in a batch of the
same size (checked on CPU), so an image depends only on its seed, its condition and the batch *size*.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DModel

from synth.device import resolve_device
from synth.errors import ConfigError, InputError, where
from synth.layout import EMA_DIR
from synth.model_card import read_model_card as read_model_card  # re-exported: callers load pipeline and card together
from synth.sampling import SamplerConfig, resolve_sampler

Weights = Literal["ema", "raw"]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] N×C×H×W floats → uint8 N×H×W (one channel) or N×H×W×C numpy."""
    img = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    img = img.transpose(0, 2, 3, 1)
    return img[..., 0] if img.shape[-1] == 1 else img


class ConditionalDiffusionPipeline(DiffusionPipeline):
    """Class-conditional sampling with classifier-free guidance (CFG) for a `UNet2DModel` with class embeddings.

    The UNet's last class-embedding index (`num_class_embeds - 1`) is the null condition. Set a sampler with
    `set_sampler`; `__call__` then uses its steps, guidance scale and eta unless given explicitly.
    """

    unet: UNet2DModel
    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: Any):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        # The trained noise schedule: every sampler is built from it, whatever scheduler is active later.
        self.trained_scheduler_config: dict[str, Any] = dict(scheduler.config)
        self.sampler_config: SamplerConfig | None = None

    @property
    def null_condition(self) -> int:
        n = self.unet.config.num_class_embeds
        if not n or n < 2:
            raise ConfigError(f"UNet has num_class_embeds={n}; a conditional model needs >= 2 (last = null)")
        return int(n) - 1

    def set_sampler(self, sampler: str | SamplerConfig) -> SamplerConfig:
        """Swap in the scheduler for `sampler` (built from the trained DDPM config) and return its config."""
        cfg = resolve_sampler(sampler)
        self.scheduler = cfg.build_scheduler(self.trained_scheduler_config)
        self.sampler_config = cfg
        return cfg

    def _default_steps(self) -> int:
        if self.sampler_config is not None:
            return self.sampler_config.steps
        if type(self.scheduler).__name__ == "DDPMScheduler":
            return int(self.scheduler.config.num_train_timesteps)
        return 50

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

    def _noise(self, n: int, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
        cfg = self.unet.config
        shape = (n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        # Drawn on the CPU (where our generators live) so a seed gives the same noise on every device.
        if isinstance(generator, list):
            noise = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
        else:
            noise = torch.randn(shape, generator=generator)
        return noise.to(device=self.device, dtype=self.unet.dtype)

    @torch.no_grad()
    def __call__(
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
        steps = int(num_inference_steps or self._default_steps())
        eta = float(eta if eta is not None else (sampler.eta if sampler else 0.0))
        if w < 0:
            raise ConfigError(f"guidance_scale {w} is negative")

        self.scheduler.set_timesteps(steps, device=self.device)
        x = self._noise(n, generator) * self.scheduler.init_noise_sigma
        cond = cond.to(self.device)
        guided = w != 1.0
        labels = torch.cat([cond, torch.full_like(cond, self.null_condition)]) if guided else cond
        step_params = inspect.signature(self.scheduler.step).parameters
        step_kwargs: dict[str, Any] = {}
        if "generator" in step_params:
            step_kwargs["generator"] = generator
        if "eta" in step_params:
            step_kwargs["eta"] = eta

        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = self.scheduler.scale_model_input(x, t)
            if guided:
                eps_cond, eps_null = self.unet(torch.cat([model_in, model_in]), t, class_labels=labels).sample.chunk(2)
                eps = eps_null + w * (eps_cond - eps_null)
            else:
                eps = self.unet(model_in, t, class_labels=labels).sample
            x = self.scheduler.step(eps, t, x, **step_kwargs).prev_sample

        self.maybe_free_model_hooks()
        if output_type == "pt":
            return x.clamp(-1, 1)
        return to_uint8(x)


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
    """Load a trained model directory as a pipeline with the chosen weights (`unet_ema/` or `unet/`), sampler
    (default: the trained DDPM scheduler) and device, in eval mode, progress bar off."""
    model_dir = Path(model_dir)
    if weights not in ("ema", "raw"):
        raise ConfigError(f"weights {weights!r} is not 'ema' or 'raw'")
    read_model_card(model_dir)
    dev = resolve_device(device)
    ema_dir = model_dir / EMA_DIR
    if weights == "ema" and not ema_dir.is_dir():
        raise InputError(where(model_dir, "has no unet_ema/ (EMA weights); use weights='raw'"))
    with _quiet_loading():
        try:
            pipe = ConditionalDiffusionPipeline.from_pretrained(model_dir, low_cpu_mem_usage=False)
            if weights == "ema":
                pipe.register_modules(unet=UNet2DModel.from_pretrained(ema_dir, low_cpu_mem_usage=False))
        except (OSError, ValueError, KeyError) as e:
            raise InputError(where(model_dir, f"cannot be loaded as a pipeline ({type(e).__name__}: {e})")) from None
    if sampler is not None:
        pipe.set_sampler(sampler)
    pipe.unet.eval()
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    return pipe
