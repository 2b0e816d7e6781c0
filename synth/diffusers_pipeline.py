"""Class-conditional DDPM sampling with classifier-free guidance, for plain diffusers.

This file is copied verbatim into every synthgate model directory as `pipeline.py`, so the directory loads
without synthgate (diffusers >= 0.42, offline; a local custom pipeline is code, hence `trust_remote_code=True`):

    from diffusers import DiffusionPipeline, UNet2DModel
    unet = UNet2DModel.from_pretrained(model_dir, subfolder="unet_ema", low_cpu_mem_usage=False)  # EMA weights
    pipe = DiffusionPipeline.from_pretrained(model_dir, custom_pipeline=str(model_dir), trust_remote_code=True,
                                             unet=unet, low_cpu_mem_usage=False)
    images = pipe(class_labels=[0, 1], num_inference_steps=50, guidance_scale=1.0,
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images   # PIL images

Without `unet=` the pipeline samples from the raw last-step weights in `unet/`. A latent generator's directory also
holds `vae/` (an `AutoencoderKL`, listed in model_index.json and loaded with the pipeline): the UNet then denoises
latents, which are decoded to pixels at the end, `x = vae.decode(z / scaling_factor + shift_factor)` with the
VAE config's factors; the call and its outputs are the same for both kinds. Class label i is condition index i
of the model card (`model_card.json`: `class_names`, or `conditions` for attribute-conditioned models); the UNet's
last class embedding is the null condition used for guidance.

It imports only torch and diffusers (it must run where synthgate is not installed). synthgate's own pipeline
(`synth.pipeline.ConditionalDiffusionPipeline`) subclasses this class and samples with the same loop, so the same
weights, scheduler, labels and generators give the same pixels in both.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DModel


def to_uint8_tensor(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats → uint8 in 0..255 (same shape): the one rounding every output of this pipeline uses."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class ConditionalDiffusionPipeline(DiffusionPipeline):
    """Class-conditional sampling with classifier-free guidance for a `UNet2DModel` with class embeddings
    (`num_class_embeds` = conditions + 1; the last index is the null condition), in pixel space or, with a `vae`,
    in its latent space."""

    unet: UNet2DModel
    vae: AutoencoderKL | None
    model_cpu_offload_seq = "unet->vae"
    _optional_components: ClassVar[list[str]] = ["vae"]

    def __init__(self, unet: UNet2DModel, scheduler: Any, vae: AutoencoderKL | None = None):
        super().__init__()
        # An optional component: a pixel model's model_index.json lists it as [null, null].
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)

    def _latent_factors(self) -> tuple[float, float]:
        cfg = self.vae.config
        return float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] N×C×H×W images → what the UNet denoises: the scaled latent posterior means for a latent model,
        the images themselves for a pixel model."""
        if self.vae is None:
            return x
        scale, shift = self._latent_factors()
        mean = self.vae.encode(x.to(device=self.device, dtype=self.vae.dtype)).latent_dist.mean
        return (mean - shift) * scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """What the UNet denoises → [-1, 1] images (identity for a pixel model)."""
        if self.vae is None:
            return z
        scale, shift = self._latent_factors()
        return self.vae.decode(z.to(self.vae.dtype) / scale + shift).sample

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images this pipeline returns."""
        if self.vae is None:
            cfg = self.unet.config
            return int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        side = int(self.unet.config.sample_size) * factor
        return int(self.vae.config.out_channels), side, side

    @property
    def null_condition(self) -> int:
        """Class-embedding index of the unconditional ("null") condition."""
        n = self.unet.config.num_class_embeds
        if not n or n < 2:
            raise ValueError(f"UNet has num_class_embeds={n}; a conditional model needs >= 2 (last = null)")
        return int(n) - 1

    def default_steps(self) -> int:
        """Steps when none are given: every training timestep for DDPM, 50 for other schedulers."""
        if type(self.scheduler).__name__ == "DDPMScheduler":
            return int(self.scheduler.config.num_train_timesteps)
        return 50

    def _noise(self, n: int, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
        cfg = self.unet.config
        shape = (n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        # Drawn on the CPU (where the generators live) so a seed gives the same noise on every device.
        if isinstance(generator, list):
            noise = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
        else:
            noise = torch.randn(shape, generator=generator)
        return noise.to(device=self.device, dtype=self.unet.dtype)

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        *,
        guidance_scale: float,
        num_inference_steps: int,
        generator: torch.Generator | list[torch.Generator] | None,
        eta: float,
    ) -> torch.Tensor:
        """The sampling loop: N×C×H×W floats in [-1, 1] for a 1-D long tensor of condition indices (a latent
        model's latents are decoded after the last step).

        Guidance w: `eps = eps_null + w·(eps_cond − eps_null)`; w = 1 skips the null pass, otherwise the conditional
        and null passes run as one batched UNet call. One generator per image makes each image depend only on its
        own generator (and the batch size); the scheduler's `eta` is used when its `step` takes one.
        """
        n = len(labels)
        self.scheduler.set_timesteps(int(num_inference_steps), device=self.device)
        x = self._noise(n, generator) * self.scheduler.init_noise_sigma
        labels = labels.to(self.device)
        guided = float(guidance_scale) != 1.0
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.null_condition)])
        step_params = inspect.signature(self.scheduler.step).parameters
        step_kwargs: dict[str, Any] = {}
        if "generator" in step_params:
            step_kwargs["generator"] = generator
        if "eta" in step_params:
            step_kwargs["eta"] = float(eta)

        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = self.scheduler.scale_model_input(x, t)
            if guided:
                eps_cond, eps_null = self.unet(torch.cat([model_in, model_in]), t, class_labels=labels).sample.chunk(2)
                eps = eps_null + float(guidance_scale) * (eps_cond - eps_null)
            else:
                eps = self.unet(model_in, t, class_labels=labels).sample
            x = self.scheduler.step(eps, t, x, **step_kwargs).prev_sample

        x = self.decode(x)
        self.maybe_free_model_hooks()
        return x.clamp(-1, 1)

    def _labels(self, class_labels: torch.Tensor | Sequence[int] | int) -> torch.Tensor:
        c = torch.as_tensor(class_labels if isinstance(class_labels, (torch.Tensor, int)) else list(class_labels))
        c = c.reshape(1) if c.ndim == 0 else c
        if c.ndim != 1 or c.numel() == 0 or c.dtype.is_floating_point or c.dtype == torch.bool:
            raise ValueError(f"class_labels must be a non-empty 1-D sequence of ints, got {c.dtype} {tuple(c.shape)}")
        null = self.null_condition
        bad = c[(c < 0) | (c > null)]
        if bad.numel():
            raise ValueError(f"class label {int(bad[0])} outside 0..{null} (null condition = {null})")
        return c.to(torch.long)

    def __call__(
        self,
        class_labels: torch.Tensor | Sequence[int] | int,
        num_inference_steps: int | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per class label (condition index).

        `num_inference_steps`: default every training step for the DDPM scheduler, else 50. `guidance_scale`:
        classifier-free guidance weight (1.0 = plain conditional sampling). `generator`: one per image, or one for
        the batch. `output_type`: "pil" (list of PIL images, mode L or RGB), "np" (float32 N×H×W×C in [0, 1]) or
        "pt" (float N×C×H×W in [0, 1]); all are the 8-bit pixels synthgate writes (`np`/`pt` divided by 255).
        """
        labels = self._labels(class_labels)
        if isinstance(generator, list) and len(generator) != len(labels):
            raise ValueError(f"{len(generator)} generators for {len(labels)} class labels; give one per image")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type {output_type!r} is not 'pil', 'np' or 'pt'")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale {guidance_scale} is negative")
        x = self.sample(labels, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps or
                        self.default_steps(), generator=generator, eta=eta)
        pixels = to_uint8_tensor(x).float() / 255.0  # the 8-bit pixels, so every output type shows the same image
        if output_type == "pt":
            images: Any = pixels
        else:
            images = pixels.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)  # (k/255)*255 rounds back to k exactly
        return ImagePipelineOutput(images=images) if return_dict else (images,)
