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


def _public(config) -> dict:
    """A scheduler config without diffusers' bookkeeping keys (`_class_name`, `_use_default_values`, ...)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


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


def test_previously_shipped_names_keep_their_exact_numerics():
    # Release configs name these: a new default must not change what they sample.
    old = SAMPLERS["sde-dpmsolver++-20"]
    assert (old.step_schedule, old.solver_type, old.solver_order) == ("timesteps", "midpoint", 2)
    assert old.thresholding is True
    sched = old.build_scheduler(_ddpm_config())
    assert sched.config.use_karras_sigmas is False and sched.config.use_lu_lambdas is False
    assert sched.config.solver_type == "midpoint" and sched.config.timestep_spacing == "trailing"
    sched.set_timesteps(20)
    assert sched.timesteps.tolist() == list(range(999, 0, -50))
    assert resolve_sampler("sde-dpmsolver++") == old  # bare algorithm: its shipped timestep-spaced recipe
    assert resolve_sampler("sde-dpmsolver++-25").model_dump() == {**old.model_dump(), "steps": 25}
    # a dump written before step_schedule / solver_type existed still reads as the same config
    legacy = {k: v for k, v in old.model_dump().items() if k not in ("step_schedule", "solver_type")}
    assert SamplerConfig.model_validate(legacy) == old


def test_default_sampler_is_sde_dpmsolver_with_karras_noise_levels():
    cfg = SAMPLERS[DEFAULT_SAMPLER]
    assert cfg.label == DEFAULT_SAMPLER == "sde-dpmsolver++-karras-12"
    assert (cfg.name, cfg.steps, cfg.step_schedule, cfg.solver_type) == ("sde-dpmsolver++", 12, "karras", "midpoint")
    assert cfg.steps <= 25 and cfg.thresholding is True
    assert resolve_sampler("sde-dpmsolver++-karras") == cfg  # bare algorithm + schedule: the shipped recipe
    assert resolve_sampler("sde-dpmsolver++-karras-20") == cfg.model_copy(update={"steps": 20})


@pytest.mark.parametrize("schedule", ["karras", "lu"])
def test_step_schedule_sets_the_noise_levels(schedule):
    from diffusers import DDPMScheduler

    trained = _ddpm_config()
    cfg = SamplerConfig(name="sde-dpmsolver++", steps=20, step_schedule=schedule)
    assert cfg.label == f"sde-dpmsolver++-{schedule}-20"
    sched = cfg.build_scheduler(trained)
    assert sched.config.use_karras_sigmas is (schedule == "karras")
    assert sched.config.use_lu_lambdas is (schedule == "lu")
    sched.set_timesteps(20)
    ref = DDPMScheduler.from_config(trained).alphas_cumprod
    train_sigmas = ((1 - ref) / ref).sqrt()
    sigmas = sched.sigmas[:-1]
    # from the largest training noise level down to the smallest (timestep spacing stops at t=49 for 20 steps)
    assert sigmas[0] == pytest.approx(float(train_sigmas[-1]), rel=1e-4)
    assert sigmas[-1] == pytest.approx(float(train_sigmas[0]), rel=1e-3)
    assert int(sched.timesteps[0]) == 999 and int(sched.timesteps[-1]) == 0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    default = SamplerConfig(name="sde-dpmsolver++", steps=20).build_scheduler(trained)
    default.set_timesteps(20)
    assert int(default.timesteps[-1]) == 49  # what the schedule changes
    with pytest.raises(ValueError, match="timestep_spacing='linspace' has no effect"):
        SamplerConfig(name="sde-dpmsolver++", steps=20, step_schedule=schedule, timestep_spacing="linspace")


def test_dpm_only_options_are_refused_for_other_samplers():
    with pytest.raises(ValueError, match="step_schedule='karras' applies to dpmsolver"):
        SamplerConfig(name="ddim", steps=20, step_schedule="karras")
    with pytest.raises(ValueError, match="solver_type='heun' applies to dpmsolver"):
        SamplerConfig(name="ddpm", steps=20, solver_type="heun")
    with pytest.raises(ConfigError, match="sampler ddim: step_schedule='lu' applies"):
        resolve_sampler("ddim-lu-20")
    with pytest.raises(ConfigError, match="unknown sampler 'sde-dpmsolver\\+\\+-exp-20'"):
        resolve_sampler("sde-dpmsolver++-exp-20")


def test_solver_type_changes_the_second_order_update():
    # heun and midpoint differ only in the multistep correction term: same first step, different second step
    steps = []
    for solver_type in ("midpoint", "heun"):
        cfg = SamplerConfig(name="dpmsolver++", steps=10, step_schedule="karras", solver_type=solver_type)
        sched = cfg.build_scheduler(_ddpm_config())
        assert sched.config.solver_type == solver_type
        sched.set_timesteps(cfg.steps)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 1, 8, 8, generator=g)
        outs = []
        for t in sched.timesteps[:2]:
            x = sched.step(0.1 * torch.randn(x.shape, generator=g), t, x).prev_sample
            outs.append(x.clone())
        steps.append(outs)
    torch.testing.assert_close(steps[0][0], steps[1][0])
    assert not torch.allclose(steps[0][1], steps[1][1])


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_shipped_sampler_config_round_trips_through_diffusers_config_json(tmp_path, name):
    import diffusers

    cfg = SAMPLERS[name]
    assert SamplerConfig.model_validate_json(cfg.model_dump_json()) == cfg
    sched = cfg.build_scheduler(_ddpm_config())
    sched.save_config(tmp_path)
    loaded = getattr(diffusers, type(sched).__name__).from_pretrained(tmp_path)
    assert _public(loaded.config) == _public(sched.config)
    sched.set_timesteps(cfg.steps)
    loaded.set_timesteps(cfg.steps)
    assert torch.equal(loaded.timesteps, sched.timesteps)
    if hasattr(sched, "sigmas"):
        assert torch.equal(loaded.sigmas, sched.sigmas)


def test_pipeline_with_the_default_sampler_saves_and_reloads_it(tmp_path):
    from diffusers import DDPMScheduler

    from synth.model import build_unet, preset
    from synth.pipeline import ConditionalDiffusionPipeline

    torch.manual_seed(0)
    pipe = ConditionalDiffusionPipeline(
        unet=build_unet(preset("tiny")), scheduler=DDPMScheduler(num_train_timesteps=1000, clip_sample=True)
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.set_sampler(resolve_sampler(DEFAULT_SAMPLER, steps=4))

    def gens():
        return [torch.Generator().manual_seed(s) for s in (1, 2)]

    before = pipe([0, 1], generator=gens())
    pipe.save_pretrained(tmp_path / "p")
    loaded = ConditionalDiffusionPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert _public(loaded.scheduler.config) == _public(pipe.scheduler.config)
    assert loaded.scheduler.config.use_karras_sigmas is True
    np.testing.assert_array_equal(before, loaded([0, 1], num_inference_steps=4, generator=gens()))


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
TRAIN_STEPS = 200


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
    # 1000 ancestral steps cost 40× a 25-step sampler: 8 images (6.3k pixels) still pin its intensity statistics
    n = 8 if sampler.steps >= 1000 else N_SAMPLES
    conds = labels[:n].tolist()
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
