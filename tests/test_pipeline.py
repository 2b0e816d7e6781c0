"""ConditionalDiffusionPipeline: save/load, conditioning, classifier-free guidance, per-image generators."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from synth.errors import ConfigError, InputError
from synth.pipeline import ConditionalDiffusionPipeline, load_pipeline
from synth.sampling import SamplerConfig
from tests.model_fixtures import make_model_dir

torch.set_num_threads(1)

FAST = SamplerConfig(name="ddim", steps=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("pipe") / "model")


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


class UNetCalls:
    """Records every UNet forward call's class labels and output."""

    def __init__(self, unet):
        self.labels: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.handle = unet.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        self.labels.append(kwargs["class_labels"].clone())
        self.outputs.append(output.sample.clone())

    def close(self):
        self.handle.remove()


def test_save_load_round_trip_gives_the_same_images(tmp_path):
    from diffusers import DDPMScheduler

    from synth.model import build_unet, preset

    torch.manual_seed(0)
    pipe = ConditionalDiffusionPipeline(
        unet=build_unet(preset("tiny")), scheduler=DDPMScheduler(num_train_timesteps=1000, clip_sample=True)
    )
    pipe.set_progress_bar_config(disable=True)
    before = pipe([0, 1], num_inference_steps=4, generator=_gens([1, 2]))
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["_class_name"] == "ConditionalDiffusionPipeline"
    loaded = ConditionalDiffusionPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.unet.config.num_class_embeds == 3
    after = loaded([0, 1], num_inference_steps=4, generator=_gens([1, 2]))
    assert before.dtype == np.uint8 and before.shape == (2, 28, 28)
    np.testing.assert_array_equal(before, after)


def test_model_dir_with_unet_ema_loads_and_weights_choice_matters(model_dir):
    from diffusers import UNet2DModel

    plain = ConditionalDiffusionPipeline.from_pretrained(model_dir)  # unet_ema/ beside unet/ does not break it
    raw = load_pipeline(model_dir, weights="raw", sampler=FAST, device="cpu")
    ema = load_pipeline(model_dir, weights="ema", sampler=FAST, device="cpu")
    ema_ref = UNet2DModel.from_pretrained(model_dir / "unet_ema")
    for a, b in zip(raw.unet.parameters(), plain.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ema.unet.parameters(), ema_ref.parameters(), strict=True):
        assert torch.equal(a, b)
    assert type(ema.scheduler).__name__ == "DDIMScheduler" and ema.sampler_config == FAST
    out_raw = raw([0, 1], generator=_gens([5, 6]), output_type="pt")
    out_ema = ema([0, 1], generator=_gens([5, 6]), output_type="pt")
    assert not torch.equal(out_raw, out_ema)


def test_load_pipeline_rejects_what_is_not_a_model(tmp_path, model_dir):
    with pytest.raises(InputError, match="not a synthgate artifact"):
        load_pipeline(tmp_path, device="cpu")
    with pytest.raises(InputError, match="is not a directory"):
        load_pipeline(tmp_path / "missing", device="cpu")
    (tmp_path / "model_card.json").write_text(json.dumps({"kind": "dataset"}))
    with pytest.raises(InputError):
        load_pipeline(tmp_path, device="cpu")
    with pytest.raises(ConfigError, match="weights 'best'"):
        load_pipeline(model_dir, weights="best", device="cpu")  # type: ignore[arg-type]
    no_ema = make_model_dir(tmp_path / "no_ema")
    import shutil

    shutil.rmtree(no_ema / "unet_ema")
    with pytest.raises(InputError, match="no unet_ema"):
        load_pipeline(no_ema, weights="ema", device="cpu")
    assert load_pipeline(no_ema, weights="raw", device="cpu") is not None


def test_different_conditions_give_different_images_from_the_same_seed(model_dir):
    pipe = load_pipeline(model_dir, sampler=FAST, device="cpu")
    out = pipe([0, 1], generator=_gens([7, 7]), output_type="pt")
    assert not torch.allclose(out[0], out[1])
    again = pipe([0, 0], generator=_gens([7, 7]), output_type="pt")
    assert torch.equal(again[0], again[1])  # same condition and seed: same image


def test_guidance_scale_one_skips_the_null_pass(model_dir):
    pipe = load_pipeline(model_dir, sampler=FAST, device="cpu")
    calls = UNetCalls(pipe.unet)
    try:
        pipe([0, 1, 1], guidance_scale=1.0, generator=_gens([1, 2, 3]))
    finally:
        calls.close()
    assert len(calls.labels) == FAST.steps
    for labels in calls.labels:
        assert labels.tolist() == [0, 1, 1]  # no null-condition rows


def test_classifier_free_guidance_batches_null_pass_and_combines_eps(model_dir):
    pipe = load_pipeline(model_dir, sampler=FAST, device="cpu")
    w = 3.0
    calls = UNetCalls(pipe.unet)
    seen_eps: list[torch.Tensor] = []
    step = pipe.scheduler.step

    def recording_step(model_output, *args, **kwargs):
        seen_eps.append(model_output.clone())
        return step(model_output, *args, **kwargs)

    pipe.scheduler.step = recording_step
    try:
        guided = pipe([0, 1], guidance_scale=w, generator=_gens([1, 2]), output_type="pt")
    finally:
        calls.close()
    null = pipe.null_condition
    assert null == 2
    assert len(calls.labels) == FAST.steps  # one UNet call per step: cond and null batched together
    for labels, out, eps in zip(calls.labels, calls.outputs, seen_eps, strict=True):
        assert labels.tolist() == [0, 1, null, null]
        eps_cond, eps_null = out[:2], out[2:]
        torch.testing.assert_close(eps, eps_null + w * (eps_cond - eps_null))
    plain = load_pipeline(model_dir, sampler=FAST, device="cpu")([0, 1], generator=_gens([1, 2]), output_type="pt")
    assert not torch.allclose(guided, plain)


def test_each_image_depends_only_on_its_own_generator(model_dir):
    pipe = load_pipeline(model_dir, sampler=SamplerConfig(name="ddpm", steps=5), device="cpu")  # stochastic steps
    a = pipe([0, 1, 0, 1], generator=_gens([11, 12, 13, 14]), output_type="pt")
    b = pipe([1, 1, 0, 0], generator=_gens([99, 12, 98, 97]), output_type="pt")
    # same batch size, different neighbours: bitwise identical
    assert torch.equal(a[1], b[1])
    # different batch size: equal up to float reassociation in batched kernels
    alone = pipe([1], generator=_gens([12]), output_type="pt")
    torch.testing.assert_close(alone[0], a[1], atol=1e-4, rtol=0)
    # a single generator for the batch also works and is reproducible
    c1 = pipe([0, 1], generator=torch.Generator().manual_seed(3))
    c2 = pipe([0, 1], generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(c1, c2)


def test_output_types_and_bad_arguments(model_dir):
    pipe = load_pipeline(model_dir, sampler=FAST, device="cpu")
    pt = pipe(torch.tensor([0, 1]), generator=_gens([1, 2]), output_type="pt")
    assert pt.shape == (2, 1, 28, 28) and pt.min() >= -1 and pt.max() <= 1
    np_out = pipe([0, 1], generator=_gens([1, 2]))
    expected = ((pt.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    np.testing.assert_array_equal(np_out, expected)
    with pytest.raises(ConfigError, match="condition 5 outside"):
        pipe([0, 5])
    with pytest.raises(ConfigError, match="non-empty"):
        pipe([])
    with pytest.raises(ConfigError, match="2 generators for 3"):
        pipe([0, 1, 0], generator=_gens([1, 2]))
    with pytest.raises(ConfigError, match="output_type"):
        pipe([0], output_type="pil")  # type: ignore[arg-type]


def test_rgb_model_returns_channels_last(tmp_path):
    from synth.model import preset

    rgb = make_model_dir(tmp_path / "rgb", model_config=preset("tiny", channels=3))
    out = load_pipeline(rgb, sampler=FAST, device="cpu")([0, 1], generator=_gens([1, 2]))
    assert out.shape == (2, 28, 28, 3) and out.dtype == np.uint8
