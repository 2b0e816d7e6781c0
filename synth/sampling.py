"""Samplers: typed configs that build a diffusers scheduler from the trained DDPM schedule, and the intensity
statistics that check a sampler's output against the training data.

Every sampler is built from the *trained* `DDPMScheduler` config (betas, prediction type, clip range) with
`from_config`, so a model trained with one noise schedule is never sampled with another.

DPM-Solver++ in pixel space, measured on a tiny UNet trained on PneumoniaMNIST for 600 / 1000 / 2000 steps
(data: intensity std 0.168 in [0, 1]): the ODE solver with diffusers' defaults drifts into saturated noise
(std 0.30-0.43, 16-60% saturated pixels); x0 thresholding (`thresholding=True, sample_max_value=1.0`, i.e.
clipping each x0 prediction to [-1, 1]) helps but is not enough for a briefly trained model (std 0.29 at 600
and 1000 steps, 0.22 at 2000). Solver order, Heun, Karras / log-SNR spacing, `euler_at_final` and
`lambda_min_clipped` changed nothing. Why DDIM does fine: it clips x0 but keeps the *raw* epsilon for the
direction term, whereas DPM-Solver++ (even at order 1) is consistent with the clipped x0, so the model's error
stays in the sample as residual noise. The stochastic variant, SDE-DPM-Solver++ (2M), re-injects noise each step
and matched the data best of all fast samplers (std 0.172 vs DDPM-1000's 0.171, W1 0.008 at 20 steps), so it is
the shipped DPM-Solver++ recipe and the default. `intensity_problems` is the check that catches a sampler that
drifts: tests run it on every shipped config against a briefly trained model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from synth.errors import ConfigError

SamplerName = Literal["ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++"]
SAMPLER_NAMES: tuple[str, ...] = ("ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++")
_NAME_STEPS = re.compile(r"(ddpm|ddim|dpmsolver\+\+|sde-dpmsolver\+\+)(?:-(\d+))?")
Spacing = Literal["leading", "linspace", "trailing"]


class SamplerConfig(BaseModel):
    """One sampling recipe: algorithm, number of steps, guidance and the numerics it needs.

    Fields left `None` take the sampler's default: `timestep_spacing` is the trained config's for DDPM and
    "trailing" for DDIM/DPM-Solver++ (so few-step samplers start at the last training timestep, from pure
    noise); `clip_sample` is the trained config's.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: SamplerName
    steps: int = Field(ge=1, le=10_000)
    # 1.0 = plain conditional sampling (no null-condition pass); >1 = classifier-free guidance.
    guidance_scale: float = Field(1.0, ge=0.0, le=50.0)
    timestep_spacing: Spacing | None = None
    # DDPM / DDIM: clip each x0 prediction to [-1, 1] (None: as the model was trained).
    clip_sample: bool | None = None
    # DDIM: 0 = deterministic DDIM, 1 = DDPM-like ancestral noise.
    eta: float = Field(0.0, ge=0.0, le=1.0)
    # (SDE-)DPM-Solver++: x0 thresholding (with sample_max_value=1.0 it is exactly clipping to [-1, 1]); without
    # it the ODE solver turns briefly trained pixel-space models into saturated noise.
    thresholding: bool = True
    sample_max_value: float = Field(1.0, gt=0.0)
    solver_order: int = Field(2, ge=1, le=3)
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"
    # None = diffusers' default (-inf, no clipping of the log-SNR).
    lambda_min_clipped: float | None = None

    @property
    def label(self) -> str:
        """Short name such as 'ddim-25' (what `SAMPLERS` is keyed by for the shipped configs)."""
        return f"{self.name}-{self.steps}"

    def build_scheduler(self, trained_config: Mapping[str, Any]):  # -> diffusers SchedulerMixin
        """A fresh scheduler for this sampler, built from the trained DDPM scheduler config."""
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

        base = dict(trained_config)
        n_train = int(base.get("num_train_timesteps", 1000))
        if self.steps > n_train:
            raise ConfigError(f"sampler {self.label}: {self.steps} steps > the model's {n_train} training steps")
        clip = base.get("clip_sample", True) if self.clip_sample is None else self.clip_sample
        if self.name == "ddpm":
            extra = {"timestep_spacing": self.timestep_spacing} if self.timestep_spacing else {}
            return DDPMScheduler.from_config(base, clip_sample=clip, **extra)
        spacing = self.timestep_spacing or "trailing"
        if self.name == "ddim":
            return DDIMScheduler.from_config(
                base, clip_sample=clip, timestep_spacing=spacing, set_alpha_to_one=True, thresholding=False
            )
        extra = {} if self.lambda_min_clipped is None else {"lambda_min_clipped": self.lambda_min_clipped}
        return DPMSolverMultistepScheduler.from_config(
            base,
            algorithm_type=self.name,
            solver_order=self.solver_order,
            thresholding=self.thresholding,
            sample_max_value=self.sample_max_value,
            lower_order_final=self.lower_order_final,
            euler_at_final=self.euler_at_final,
            final_sigmas_type=self.final_sigmas_type,
            timestep_spacing=spacing,
            variance_type=None,
            **extra,
        )


# The shipped recipes. Each one's intensity statistics are checked against real data in tests/test_sampling.py.
SAMPLERS: dict[str, SamplerConfig] = {
    cfg.label: cfg
    for cfg in (
        SamplerConfig(name="ddpm", steps=1000),
        SamplerConfig(name="ddim", steps=50),
        SamplerConfig(name="ddim", steps=25),
        SamplerConfig(name="sde-dpmsolver++", steps=20),
    )
}
# Fastest shipped config (20 network evaluations per image) that matched the training data's intensity statistics
# at <= 25 steps; it also matched them best (see the module docstring).
DEFAULT_SAMPLER = "sde-dpmsolver++-20"


def resolve_sampler(
    sampler: str | SamplerConfig, *, steps: int | None = None, guidance_scale: float | None = None
) -> SamplerConfig:
    """A `SamplerConfig` from a shipped name ('ddim-25'), an algorithm with steps ('dpmsolver++-20'), a bare
    algorithm ('ddim': its shipped steps) or a config; `steps` / `guidance_scale` override. Unknown names and
    out-of-range values raise ConfigError."""
    if isinstance(sampler, SamplerConfig):
        fields = sampler.model_dump()
    elif sampler in SAMPLERS:
        fields = SAMPLERS[sampler].model_dump()
    elif (m := _NAME_STEPS.fullmatch(str(sampler))) is not None:
        # 'ddim' or 'ddim-10': the shipped numerics for that algorithm, with these steps
        algo, n_steps = m.group(1), m.group(2)
        shipped = [c for c in SAMPLERS.values() if c.name == algo]
        fields = shipped[0].model_dump() if shipped else {"name": algo, "steps": 20}
        if n_steps is not None:
            fields["steps"] = int(n_steps)
    else:
        known = [*SAMPLERS, *SAMPLER_NAMES]
        raise ConfigError(
            f"unknown sampler {sampler!r}; known: {', '.join(known)} (or ALGORITHM-STEPS, e.g. ddim-10)"
        )
    if steps is not None:
        fields["steps"] = steps
    if guidance_scale is not None:
        fields["guidance_scale"] = guidance_scale
    try:
        return SamplerConfig.model_validate(fields)
    except ValidationError as e:  # one line naming the field and its bad value
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"sampler {field}={fields.get(field)!r}: {first['msg']}") from None


# --- intensity statistics -----------------------------------------------------------------------------------


def intensity_stats(images: np.ndarray) -> dict[str, float]:
    """Mean, std (in [0, 1] units) and the fraction of saturated pixels (exactly 0 or 255) of uint8 images."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise ConfigError(f"intensity statistics need uint8 images, got {x.dtype}")
    f = x.astype(np.float64) / 255.0
    return {
        "mean": float(f.mean()),
        "std": float(f.std()),
        "saturated": float(((x == 0) | (x == 255)).mean()),
    }


def _histogram(images: np.ndarray) -> np.ndarray:
    h = np.bincount(np.asarray(images, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    return h / h.sum()


def compare_intensity(samples: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Statistics of `samples` and `reference` (uint8) and their distances.

    `w1` is the 1-Wasserstein distance between the two pixel-intensity distributions in [0, 1] units (the mean
    absolute difference of their CDFs): 0 for identical histograms, ~0.5 for black vs mid-grey images.
    """
    s, r = intensity_stats(samples), intensity_stats(reference)
    cdf_gap = np.abs(np.cumsum(_histogram(samples)) - np.cumsum(_histogram(reference)))
    return {
        "mean": s["mean"],
        "std": s["std"],
        "saturated": s["saturated"],
        "ref_mean": r["mean"],
        "ref_std": r["std"],
        "ref_saturated": r["saturated"],
        "mean_diff": abs(s["mean"] - r["mean"]),
        "std_ratio": s["std"] / r["std"] if r["std"] > 0 else math.inf,
        "w1": float(cdf_gap.sum() / 255.0),
    }


class IntensityTolerance(BaseModel):
    """How far a sampler's output may drift from the data's intensity statistics and still count as 'good'.

    Loose on purpose: it must pass a briefly trained CPU model sampled well and fail saturated noise (std ratio
    ~2-3, a large saturated fraction) from a mis-configured sampler.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_mean_diff: float = 0.1
    min_std_ratio: float = 0.5
    max_std_ratio: float = 1.5
    max_saturated: float = 0.05
    max_w1: float = 0.1


def intensity_problems(cmp: Mapping[str, float], tol: IntensityTolerance | None = None) -> list[str]:
    """What is wrong with a `compare_intensity` result (empty when within tolerance)."""
    tol = tol or IntensityTolerance()
    problems = []
    if cmp["mean_diff"] > tol.max_mean_diff:
        problems.append(f"mean {cmp['mean']:.3f} vs data {cmp['ref_mean']:.3f}")
    if not tol.min_std_ratio <= cmp["std_ratio"] <= tol.max_std_ratio:
        problems.append(f"std {cmp['std']:.3f} vs data {cmp['ref_std']:.3f} (ratio {cmp['std_ratio']:.2f})")
    if cmp["saturated"] > max(tol.max_saturated, cmp["ref_saturated"]):
        problems.append(f"{cmp['saturated']:.1%} saturated pixels (data {cmp['ref_saturated']:.1%})")
    if cmp["w1"] > tol.max_w1:
        problems.append(f"intensity histogram W1 distance {cmp['w1']:.3f} > {tol.max_w1}")
    return problems
