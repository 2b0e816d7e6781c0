"""Sampler configs: built from the trained schedule, and checked against real data's intensity statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synth.errors import ConfigError
from synth.sampling import (
    DEFAULT_SAMPLER,
    SAMPLERS,
    IntensityTolerance,
    SamplerConfig,
    compare_intensity,
    intensity_problems,
    intensity_stats,
    resolve_sampler,
)
from tests.model_fixtures import make_model_dir, real_train_images, train_briefly

torch.set_num_threads(1)


def _ddpm_config(**kw):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, clip_sample=True, **kw).config


# --- building schedulers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_shipped_samplers_build_from_the_trained_schedule(name):
    trained = _ddpm_config(beta_schedule="squaredcos_cap_v2")
    cfg = SAMPLERS[name]
    sched = cfg.build_scheduler(trained)
    expected = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler"}.get(cfg.name, "DPMSolverMultistepScheduler")
    assert type(sched).__name__ == expected
    # the noise schedule and parameterisation are the trained ones, not the scheduler class's defaults
    assert sched.config.beta_schedule == "squaredcos_cap_v2"
    assert sched.config.prediction_type == "epsilon"
    from diffusers import DDPMScheduler

    ref = DDPMScheduler.from_config(trained)
    assert torch.allclose(sched.alphas_cumprod, ref.alphas_cumprod)
    sched.set_timesteps(cfg.steps)
    assert len(sched.timesteps) == cfg.steps


def test_dpmsolver_is_configured_with_x0_thresholding():
    for cfg in SAMPLERS.values():
        if "dpmsolver" in cfg.name:
            sched = cfg.build_scheduler(_ddpm_config())
            assert sched.config.algorithm_type == cfg.name
            assert sched.config.thresholding is True
            assert sched.config.sample_max_value == 1.0
            # few-step samplers start from the last training timestep (pure noise)
            sched.set_timesteps(cfg.steps)
            assert int(sched.timesteps[0]) == 999


def test_ddim_clipping_follows_the_trained_config():
    assert SamplerConfig(name="ddim", steps=10).build_scheduler(_ddpm_config()).config.clip_sample is True
    from diffusers import DDPMScheduler

    no_clip = DDPMScheduler(num_train_timesteps=1000, clip_sample=False).config
    assert SamplerConfig(name="ddim", steps=10).build_scheduler(no_clip).config.clip_sample is False
    forced = SamplerConfig(name="ddim", steps=10, clip_sample=True).build_scheduler(no_clip)
    assert forced.config.clip_sample is True


def test_resolve_sampler_names_overrides_and_errors():
    assert DEFAULT_SAMPLER in SAMPLERS
    assert resolve_sampler("ddim-25") == SAMPLERS["ddim-25"]
    assert resolve_sampler("ddim", steps=7).steps == 7
    assert resolve_sampler("dpmsolver++").name == "dpmsolver++"
    got = resolve_sampler(SAMPLERS["ddim-50"], guidance_scale=2.5)
    assert (got.name, got.steps, got.guidance_scale) == ("ddim", 50, 2.5)
    assert got.label == "ddim-50"
    with pytest.raises(ConfigError, match=r"unknown sampler 'euler'.*ddim-25"):
        resolve_sampler("euler")
    with pytest.raises(ConfigError, match="steps=0"):
        resolve_sampler("ddim", steps=0)
    with pytest.raises(ConfigError, match="guidance_scale=-1"):
        resolve_sampler("ddim-25", guidance_scale=-1.0)
    with pytest.raises(ConfigError, match="2000 steps > the model's 1000"):
        SamplerConfig(name="ddpm", steps=2000).build_scheduler(_ddpm_config())


# --- intensity statistics -----------------------------------------------------------------------------------


def test_intensity_statistics_and_problems():
    rng = np.random.default_rng(0)
    data = np.clip(rng.normal(140, 40, (64, 28, 28)), 0, 255).astype(np.uint8)
    same = compare_intensity(data, data)
    assert same["w1"] == 0 and same["mean_diff"] == 0 and same["std_ratio"] == 1
    assert intensity_problems(same) == []
    similar = np.clip(rng.normal(140, 40, (64, 28, 28)), 0, 255).astype(np.uint8)
    assert intensity_problems(compare_intensity(similar, data)) == []
    noise = np.where(rng.random((64, 28, 28)) < 0.5, 0, 255).astype(np.uint8)  # saturated ±1 noise
    problems = intensity_problems(compare_intensity(noise, data))
    assert any("saturated" in p for p in problems) and any("std" in p for p in problems)
    dark = (data // 3).astype(np.uint8)
    assert any("mean" in p for p in intensity_problems(compare_intensity(dark, data)))
    s = intensity_stats(np.array([[[0, 255], [51, 51]]], dtype=np.uint8))
    assert s["saturated"] == 0.5 and s["mean"] == pytest.approx((255 + 102) / 4 / 255)
    with pytest.raises(ConfigError):
        intensity_stats(np.zeros((1, 2, 2), dtype=np.float32))


# --- shipped samplers against real data, on a briefly trained model -----------------------------------------

N_SAMPLES = 48
TRAIN_STEPS = 300


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, data_dir):
    """A tiny UNet trained for TRAIN_STEPS steps on 1024 real PneumoniaMNIST train images (~40 s on one core).

    Briefly trained is the point: it is the regime where a sampler's numerics decide whether samples look like the
    data (DPM-Solver++ without x0 thresholding drifts into saturated noise), as for CPU-budget models."""
    images, labels = real_train_images(data_dir, n=1024, seed=0)
    unet, ema = train_briefly(images, labels, steps=TRAIN_STEPS, batch_size=32, seed=0)
    root = tmp_path_factory.mktemp("trained") / "model"
    counts = np.bincount(labels, minlength=2).tolist()
    return make_model_dir(root, unet=unet, ema_unet=ema, condition_counts=counts), images, labels


def _sample(model_dir, labels, sampler, weights="ema"):
    from synth.pipeline import load_pipeline

    pipe = load_pipeline(model_dir, weights=weights, sampler=sampler, device="cpu")
    conds = labels[:N_SAMPLES].tolist()
    gens = [torch.Generator().manual_seed(100 + i) for i in range(len(conds))]
    return pipe(conds, generator=gens)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_shipped_sampler_matches_the_data_intensity_statistics(trained_model, name):
    model_dir, images, labels = trained_model
    samples = _sample(model_dir, labels, SAMPLERS[name])
    cmp = compare_intensity(samples, images)
    assert intensity_problems(cmp) == [], f"{name}: {cmp}"


@pytest.mark.slow
def test_misconfigured_dpmsolver_is_caught_by_the_statistics_check(trained_model):
    model_dir, images, labels = trained_model
    bad = SamplerConfig(name="dpmsolver++", steps=20, thresholding=False)  # diffusers' defaults
    problems = intensity_problems(compare_intensity(_sample(model_dir, labels, bad), images))
    assert problems, "unthresholded DPM-Solver++ should drift into saturated noise on a briefly trained model"
    assert any("saturated" in p or "std" in p for p in problems)


@pytest.mark.slow
def test_untrained_model_fails_the_statistics_check(trained_model, tmp_path):
    # The check is not vacuous: the same sampler on an untrained UNet does not look like the data.
    _, images, labels = trained_model
    untrained = make_model_dir(tmp_path / "untrained")
    samples = _sample(untrained, labels, SAMPLERS[DEFAULT_SAMPLER], weights="raw")
    assert intensity_problems(compare_intensity(samples, images), IntensityTolerance())
