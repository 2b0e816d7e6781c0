"""Samplers: typed configs that build a diffusers scheduler from the trained DDPM schedule, and the intensity
statistics that check a sampler's output against the training data.

Every sampler is built from the *trained* `DDPMScheduler` config (betas, prediction type, clip range) with
`from_config`, so a model trained with one noise schedule is never sampled with another.

Measured on the demo model (`small` preset, 400 steps, PneumoniaMNIST 28x28; 600 images per sampler with the same
seeds; FID in the utility audit's classifier space; `benchmarks/bench_sampler_fid.py`):

- Deterministic (ODE) samplers fail on a briefly trained pixel-space model whatever the solver: in the previous
  audit's feature space DPM-Solver++ of order 1, 2 or 3, UniPC and DEIS all gave FID ~39 with x0 thresholding
  and ~300 without (DDIM-50: 4.28), and so did DDIM *without* x0 clipping (~340). The fault is the model's
  probability-flow ODE, not the discretisation: at high noise the model's epsilon error is amplified by
  sigma/alpha into x0 (88% of the x0 pixels lie outside [-1, 1] at t = 999) and the ODE carries it along as
  signal. DDIM survives because it clips x0 but keeps the *raw* epsilon for its direction term (it is then no
  longer an ODE solver); DPM-Solver++ stays consistent with the clipped x0 and keeps the error. Scheduler options
  do not fix it: `euler_at_final` and `lower_order_final` change nothing here (a "zero" final sigma already forces
  a first-order last step; `lower_order_final` acts below 15 steps only), timestep or log-SNR spacing change
  little, `final_sigmas_type="sigma_min"` is worse. The best ODE config, Karras noise levels with dynamic
  thresholding (`sample_max_value=5`), ranged from 0.6x to 2.8x DDIM-50's FID across feature spaces, with TRTS
  0.74 and precision 0.64-0.73.
- SDE-DPM-Solver++ (2M) keeps only part of its state at each step and adds fresh noise, so it does not drift. With
  Karras noise levels (`step_schedule="karras"`: dense at low noise and ending at the smallest training noise
  level, where timestep spacing stops at t = 49 for 20 steps) it beats DDIM-50: at 12 steps its FID was
  0.86-0.89x DDIM-50's in the current audit space (two generation seeds), 0.48-0.64x in the previous one, at most
  0.8x in two more classifier spaces and the copy-detection encoder's, and 0.06x on a model trained 3x longer;
  the previous default (`sde-dpmsolver++-20`, timestep spacing) was 1.5-1.9x. Twelve steps is the fewest that
  also kept TRTS >= 0.9, precision and the intensity check below with margin (at 10 steps the tests' tiny model
  sits at the check's std limit; at 8 TRTS fell to 0.80), hence the default. FID in the 64-d classifier space is
  fragile: the same 600 images scored 3.7 to 6.8 under different classifier trainings (seed, thread count,
  code), so compare samplers within one run only.

`intensity_problems` is the check that catches a sampler that drifts: tests run it on every shipped config against
a briefly trained model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from synth.errors import ConfigError

SamplerName = Literal["ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++"]
SAMPLER_NAMES: tuple[str, ...] = ("ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++")
StepSchedule = Literal["timesteps", "karras", "lu"]
STEP_SCHEDULES: tuple[str, ...] = ("timesteps", "karras", "lu")
# ALGORITHM[-SCHEDULE][-STEPS], e.g. 'ddim', 'ddim-10', 'sde-dpmsolver++-karras-20'
_NAME_STEPS = re.compile(r"(ddpm|ddim|dpmsolver\+\+|sde-dpmsolver\+\+)(?:-(karras|lu))?(?:-(\d+))?")
_DPM = ("dpmsolver++", "sde-dpmsolver++")
Spacing = Literal["leading", "linspace", "trailing"]


class SamplerConfig(BaseModel):
    """One sampling recipe: algorithm, number of steps, guidance and the numerics it needs.

    Fields left `None` take the sampler's default: `timestep_spacing` is the trained config's for DDPM and
    "trailing" for DDIM/DPM-Solver++ (so few-step samplers start at the last training timestep, from pure
    noise); `clip_sample` is the trained config's. `step_schedule` picks the noise levels DPM-Solver++ steps
    through: "timesteps" (training timesteps with `timestep_spacing`), "karras" (Karras et al. 2022, rho = 7: dense
    at low noise, down to the smallest training noise level) or "lu" (uniform in log-SNR, Lu et al. 2022).
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
    # (SDE-)DPM-Solver++ only: the noise levels stepped through, and the second-order update's form.
    step_schedule: StepSchedule = "timesteps"
    solver_type: Literal["midpoint", "heun"] = "midpoint"

    @model_validator(mode="after")
    def _dpm_only_options(self) -> SamplerConfig:
        if self.name not in _DPM:
            for field, default in (("step_schedule", "timesteps"), ("solver_type", "midpoint")):
                if getattr(self, field) != default:
                    raise ValueError(f"{field}={getattr(self, field)!r} applies to dpmsolver++ and "
                                     f"sde-dpmsolver++ only, not {self.name}")
        elif self.step_schedule != "timesteps" and self.timestep_spacing is not None:
            # diffusers derives the timesteps from the Karras / log-SNR noise levels and ignores the spacing
            raise ValueError(f"timestep_spacing={self.timestep_spacing!r} has no effect with "
                             f"step_schedule={self.step_schedule!r}; leave it unset")
        return self

    @property
    def label(self) -> str:
        """Short name such as 'ddim-25' or 'sde-dpmsolver++-karras-20' (what `SAMPLERS` is keyed by)."""
        schedule = "" if self.step_schedule == "timesteps" else f"-{self.step_schedule}"
        return f"{self.name}{schedule}-{self.steps}"

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
            solver_type=self.solver_type,
            # A model trained without x0 clipping (a latent generator: unit-variance latents, not [-1, 1] pixels)
            # has no range to threshold to.
            thresholding=self.thresholding and bool(base.get("clip_sample", True)),
            sample_max_value=self.sample_max_value,
            lower_order_final=self.lower_order_final,
            euler_at_final=self.euler_at_final,
            final_sigmas_type=self.final_sigmas_type,
            timestep_spacing=spacing,
            use_karras_sigmas=self.step_schedule == "karras",
            use_lu_lambdas=self.step_schedule == "lu",
            variance_type=None,
            **extra,
        )


# The shipped recipes. Each one's intensity statistics are checked against real data in tests/test_sampling.py.
# Names already shipped keep their exact numerics: release configs name them.
SAMPLERS: dict[str, SamplerConfig] = {
    cfg.label: cfg
    for cfg in (
        SamplerConfig(name="ddpm", steps=1000),
        SamplerConfig(name="ddim", steps=50),
        SamplerConfig(name="ddim", steps=25),
        SamplerConfig(name="sde-dpmsolver++", steps=20),
        SamplerConfig(name="sde-dpmsolver++", steps=12, step_schedule="karras"),
    )
}
# The fastest shipped config that measured as good as DDIM-50 (module docstring; benchmarks/bench_sampler_fid.py).
DEFAULT_SAMPLER = "sde-dpmsolver++-karras-12"


def resolve_sampler(
    sampler: str | SamplerConfig, *, steps: int | None = None, guidance_scale: float | None = None
) -> SamplerConfig:
    """A `SamplerConfig` from a shipped name ('ddim-25'), an algorithm with an optional step schedule and steps
    ('dpmsolver++-20', 'sde-dpmsolver++-karras-15': the shipped numerics of that algorithm and schedule, if any),
    a bare algorithm ('ddim': its shipped steps) or a config; `steps` / `guidance_scale` override. Unknown names
    and out-of-range values raise ConfigError."""
    if isinstance(sampler, SamplerConfig):
        fields = sampler.model_dump()
    elif sampler in SAMPLERS:
        fields = SAMPLERS[sampler].model_dump()
    elif (m := _NAME_STEPS.fullmatch(str(sampler))) is not None:
        algo, schedule, n_steps = m.group(1), m.group(2) or "timesteps", m.group(3)
        shipped = [c for c in SAMPLERS.values() if c.name == algo and c.step_schedule == schedule]
        fields = shipped[0].model_dump() if shipped else {"name": algo, "steps": 20, "step_schedule": schedule}
        if n_steps is not None:
            fields["steps"] = int(n_steps)
    else:
        known = [*SAMPLERS, *SAMPLER_NAMES]
        raise ConfigError(
            f"unknown sampler {sampler!r}; known: {', '.join(known)} "
            "(or ALGORITHM[-karras|-lu][-STEPS], e.g. ddim-10)"
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
        if not field:  # a check across fields: its message names them
            raise ConfigError(f"sampler {fields.get('name')}: {first['msg'].removeprefix('Value error, ')}") from None
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
