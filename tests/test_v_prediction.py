"""v prediction (`train.prediction_type: v_prediction`): the loss's target, the Min-SNR weight, and every consumer
of the model's output (samplers, membership attacks) checked against an epsilon model that predicts the same
thing in the other parametrisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers.models.unets.unet_2d import UNet2DOutput

from privacy.membership_attacks import loss_errors, pia_distances
from synth.diffusion_loss import make_scheduler, noise_estimate, per_row_loss
from synth.model import build_unet, preset
from synth.pipeline import ConditionalDiffusionPipeline
from synth.train_config import TrainConfig
from synth.training import train
from tests.test_training import RecordingUNet

V = TrainConfig(preset="tiny", prediction_type="v_prediction")


def test_v_loss_targets_the_velocity_and_min_snr_weighs_its_x0_error() -> None:
    sched = make_scheduler(V)
    assert sched.config.prediction_type == "v_prediction"
    assert make_scheduler(TrainConfig(preset="tiny")).config.prediction_type == "epsilon"  # the default
    images = torch.rand(64, 1, 4, 4) * 2 - 1
    conditions = torch.zeros(64, dtype=torch.long)
    unet = RecordingUNet()  # predicts zeros: a row's loss is the mean square of its target
    rows = per_row_loss(unet, sched, images, conditions, null_condition=1, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (64,), generator=g)
    noise = torch.randn((64, 1, 4, 4), generator=g)
    a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    velocity = a.sqrt() * noise - (1 - a).sqrt() * images
    torch.testing.assert_close(rows, velocity.pow(2).flatten(1).mean(1))

    weighted = per_row_loss(RecordingUNet(), sched, images, conditions, null_condition=1,
                            generator=torch.Generator().manual_seed(3), min_snr_gamma=5.0)
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    torch.testing.assert_close(weighted, rows * torch.clamp(snr, max=5.0) / (snr + 1))


def test_noise_estimate_inverts_the_velocity() -> None:
    sched = make_scheduler(V)
    x0, eps = torch.rand(5, 3, 6, 6) * 2 - 1, torch.randn(5, 3, 6, 6)
    t = torch.tensor([0, 10, 400, 800, 999])
    xt, v = sched.add_noise(x0, eps, t), sched.get_velocity(x0, eps, t)
    torch.testing.assert_close(noise_estimate(v, xt, sched.alphas_cumprod[t], "v_prediction"), eps,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(noise_estimate(eps, xt, sched.alphas_cumprod[t], "epsilon"), eps)


def _as_velocity_model(unet, alphas_cumprod: torch.Tensor):
    """Make an epsilon UNet answer in v: v = √ᾱ·ε̂ − √(1−ᾱ)·x̂0 with x̂0 from ε̂, the same prediction in the other
    parametrisation. Returns the hook handle (remove it to get the epsilon model back)."""

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        a = alphas_cumprod[torch.as_tensor(t).long()].reshape(-1, 1, 1, 1).to(x.dtype)
        eps = output.sample
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return UNet2DOutput(sample=a.sqrt() * eps - (1 - a).sqrt() * x0)

    return unet.register_forward_hook(hook, with_kwargs=True)


def test_samplers_and_membership_attacks_read_a_v_model_as_its_epsilon_twin() -> None:
    torch.manual_seed(0)
    unet = build_unet(preset("tiny", sample_size=28, channels=1, num_conditions=2)).eval()
    eps_sched, v_sched = make_scheduler(TrainConfig(preset="tiny")), make_scheduler(V)
    labels = torch.tensor([0, 1, 2, 0])
    x0 = torch.rand(4, 1, 28, 28) * 2 - 1
    noise = torch.randn(2, 1, 28, 28)

    def run(scheduler):
        pipe = ConditionalDiffusionPipeline(unet, scheduler)
        out = {}
        # Timestep spacing: at integer timesteps the sampler's noise levels are the training schedule's, which is
        # what the test's v twin is built from (Karras levels fall between them).
        for sampler in ("sde-dpmsolver++-10", "ddim-10", "ddpm-10"):
            pipe.set_sampler(sampler)
            gens = [torch.Generator().manual_seed(i) for i in range(4)]
            out[sampler] = pipe.sample(labels, guidance_scale=2.0, num_inference_steps=pipe.default_steps(),
                                       generator=gens, eta=0.0)
        alphas = scheduler.alphas_cumprod.float()
        kind = scheduler.config.prediction_type
        out["loss"] = torch.from_numpy(loss_errors(unet, alphas, x0, labels, timesteps=[50, 300], noise=noise,
                                                   batch_size=4, prediction_type=kind))
        out["pia"] = torch.from_numpy(pia_distances(unet, alphas, x0, labels, timestep=200, p=2.0, batch_size=4,
                                                    prediction_type=kind))
        return out

    with torch.no_grad():
        as_eps = run(eps_sched)
        handle = _as_velocity_model(unet, eps_sched.alphas_cumprod)
        try:
            as_v = run(v_sched)
            # Read as epsilon, the v answers differ: the prediction type is what makes them agree.
            wrong = torch.from_numpy(loss_errors(unet, eps_sched.alphas_cumprod.float(), x0, labels,
                                                 timesteps=[50, 300], noise=noise, batch_size=4))
        finally:
            handle.remove()
    for key in as_eps:
        torch.testing.assert_close(as_v[key], as_eps[key], atol=5e-4, rtol=1e-3, msg=key)
    assert not torch.allclose(wrong, as_eps["loss"], atol=1e-2)


def test_a_v_model_trains_saves_and_generates(pneumonia_slice: Path, tmp_path: Path) -> None:
    from synth.generate import generate

    model = train(pneumonia_slice, tmp_path / "model", V.model_copy(update={"max_steps": 4}), progress=False)
    saved = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"
    card = json.loads((model / "model_card.json").read_text())
    assert card["config"]["train"]["prediction_type"] == "v_prediction"
    syn = generate(model, tmp_path / "syn", n=4, seed=0, progress=False)
    images = np.load(syn / "images.npy")
    assert images.shape == (4, 28, 28) and images.std() > 0
