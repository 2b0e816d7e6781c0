"""The latent generator kind: an autoencoder trained on site, the UNet on its scaled latents, both in the model
directory; plain diffusers samples it; DP without a DP or public autoencoder is refused; `auto` picks the kind
from size, device, DP and the starting model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from synth.errors import ConfigError
from synth.generator_kind import LATENT_DP_REFUSAL, resolve_kind
from synth.train_config import TrainConfig

torch.set_num_threads(1)

LABELS = [0, 1, 1, 0]
SEEDS = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def latent_model(tmp_path_factory, pneumonia_slice):
    from synth.training import train

    cfg = TrainConfig(preset="tiny", kind="latent", max_steps=6, batch_size=16, threads=1,
                      autoencoder={"max_steps": 8, "batch_size": 16})
    return train(pneumonia_slice, tmp_path_factory.mktemp("latent") / "model", cfg, progress=False)


def test_auto_kind_follows_size_device_preset_and_dp():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_kind("auto", sample_size=28, device=cpu, preset="small", private=False) == "pixel"
    assert resolve_kind("auto", sample_size=64, device=cpu, preset="small", private=False) == "latent"
    assert resolve_kind("auto", sample_size=128, device=cpu, preset="quality", private=False) == "latent"
    assert resolve_kind("auto", sample_size=128, device=gpu, preset="base", private=False) == "pixel"
    # With DP: latent only when its autoencoder keeps the guarantee (DP-trained or public), else pixel.
    assert resolve_kind("auto", sample_size=128, device=cpu, preset="small", private=True) == "pixel"
    assert resolve_kind("auto", sample_size=128, device=cpu, preset="small", private=True,
                        private_latent_ok=True) == "latent"
    assert resolve_kind("auto", sample_size=28, device=cpu, preset="small", private=True,
                        private_latent_ok=True) == "pixel"
    # Starting from another model: its kind (its UNet only fits there).
    assert resolve_kind("auto", sample_size=64, device=cpu, preset="small", private=False, init_kind="pixel") == "pixel"
    assert resolve_kind("latent", sample_size=28, device=cpu, preset="tiny", private=False) == "latent"


def test_partial_autoencoder_settings_keep_the_presets_other_fields():
    cfg = TrainConfig(preset="small", autoencoder={"max_steps": 7})
    assert cfg.autoencoder.max_steps == 7 and cfg.autoencoder.block_out_channels == (16, 32, 64)
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    # small and quality train the autoencoder on 32-px crops; tiny, and an explicit null, on whole images
    assert cfg.autoencoder.crop == 32 and TrainConfig(preset="quality").autoencoder.crop == 32
    assert TrainConfig(preset="tiny").autoencoder.crop is None
    assert TrainConfig(preset="quality", autoencoder={"crop": None}).autoencoder.crop is None
    with pytest.raises(ConfigError, match="autoencoder block_out_channels"):
        TrainConfig.from_json({"preset": "tiny", "autoencoder": {"block_out_channels": [12, 16]}})


def test_latent_with_dp_is_refused_without_a_dp_or_public_autoencoder(tmp_path, pneumonia_slice):
    """A strategy that cannot train the autoencoder with DP (no `LatentPrivacy`) and no public autoencoder: the
    autoencoder would see the private images without a guarantee, so training is refused in one line."""
    from privacy.dp import build_strategy
    from privacy.dp_config import DPConfig
    from synth.training import train

    class PixelOnly:  # the release's DP strategy without the autoencoder part
        def __init__(self, inner):
            self._inner = inner
            self.noise_multiplicity = inner.noise_multiplicity

        def __getattr__(self, name):
            if name in ("can_train_autoencoder", "autoencoder_strategy"):
                raise AttributeError(name)
            return getattr(self._inner, name)

    strategy = PixelOnly(build_strategy(DPConfig(target_epsilon=8.0), dataset=pneumonia_slice, noise_multiplicity=1))
    with pytest.raises(ConfigError) as err:
        train(pneumonia_slice, tmp_path / "m", TrainConfig(preset="tiny", kind="latent", max_steps=2),
              privacy=strategy, progress=False)
    assert str(err.value) == LATENT_DP_REFUSAL and "\n" not in str(err.value)
    assert not (tmp_path / "m").exists()


def test_model_directory_holds_both_parts_and_records_the_scaling(latent_model, pneumonia_slice):
    from diffusers import AutoencoderKL

    index = json.loads((latent_model / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    card = json.loads((latent_model / "model_card.json").read_text())
    gen = card["generator"]
    assert gen["kind"] == "latent" and gen["vae"] == "vae" and gen["latent_shape"] == [4, 14, 14]
    assert card["image"] == {"height": 28, "width": 28, "channels": 1, "dtype": "uint8"}
    assert "vae/diffusion_pytorch_model.safetensors" in card["files"]
    vae = AutoencoderKL.from_pretrained(latent_model, subfolder="vae", low_cpu_mem_usage=False)
    assert vae.config.scaling_factor == pytest.approx(gen["scaling_factor"]) and gen["scaling_factor"] != 1.0
    unet_cfg = json.loads((latent_model / "unet_ema" / "config.json").read_text())
    assert unet_cfg["in_channels"] == 4 and unet_cfg["sample_size"] == 14
    # The card's held-out PSNR is the val split's whole images through the saved autoencoder (posterior means).
    from synth.autoencoder import heldout_reconstruction
    from synth.train_data import load_split_images

    val = load_split_images(pneumonia_slice, "val", limit=256)
    ae = gen["autoencoder"]
    assert ae["heldout"] == f"{len(val)} whole val-split images"
    assert ae["heldout_psnr_db"] == pytest.approx(heldout_reconstruction(vae.eval(), val)["heldout_psnr_db"], abs=1e-3)
    # Scaled training latents have unit variance: the factor was measured on them, not assumed.
    from synth.autoencoder import encode_means, scale_latents
    from synth.train_data import load_training_data

    data = load_training_data(pneumonia_slice)
    z = scale_latents(vae.eval(), encode_means(vae.eval(), data.images))
    assert float(z.std()) == pytest.approx(1.0, abs=1e-3) and abs(float(z.mean())) < 1e-3


def test_more_latent_channels_reach_the_unet(tmp_path, pneumonia_slice):
    """Any latent channel count the autoencoder config allows (up to 16) trains: the UNet takes that many channels
    (a UNet capped at 4 once failed an 8-channel release after its autoencoder had trained)."""
    from synth.autoencoder_config import AutoencoderConfig
    from synth.training import train

    cfg = TrainConfig(preset="tiny", kind="latent", max_steps=2, batch_size=16, threads=1,
                      autoencoder={"max_steps": 2, "batch_size": 16, "latent_channels": 8})
    model = train(pneumonia_slice, tmp_path / "model", cfg, progress=False)
    unet_cfg = json.loads((model / "unet_ema" / "config.json").read_text())
    assert unet_cfg["in_channels"] == unet_cfg["out_channels"] == 8
    assert AutoencoderConfig.model_fields["latent_channels"].metadata[-1].le == 16  # the bound the UNet must take


def test_plain_diffusers_decodes_the_same_pixels_as_synthgate(latent_model):
    from diffusers import DiffusionPipeline, UNet2DModel

    from synth.pipeline import load_pipeline

    unet = UNet2DModel.from_pretrained(latent_model, subfolder="unet_ema", low_cpu_mem_usage=False)
    plain = DiffusionPipeline.from_pretrained(latent_model, custom_pipeline=str(latent_model),
                                              trust_remote_code=True, low_cpu_mem_usage=False, unet=unet)
    plain.set_progress_bar_config(disable=True)
    images = plain(class_labels=LABELS, num_inference_steps=3, guidance_scale=2.0,
                   generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images
    assert images[0].mode == "L" and images[0].size == (28, 28)
    ours = load_pipeline(latent_model, device="cpu")(LABELS, num_inference_steps=3, guidance_scale=2.0,
                                                     generator=[torch.Generator().manual_seed(s) for s in SEEDS])
    assert ours.shape == (4, 28, 28)
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in images]), ours)


def test_interrupted_latent_run_resumes_on_the_same_autoencoder(latent_model, pneumonia_slice, tmp_path):
    """The autoencoder is kept in the checkpoint directory: the resumed run trains on the very same latents and
    ends with the weights of the uninterrupted run (`latent_model`, same config)."""
    from safetensors.torch import load_file

    from synth.checkpoint import default_checkpoint_dir
    from synth.training import train

    cfg = TrainConfig(preset="tiny", kind="latent", max_steps=6, batch_size=16, threads=1, checkpoint_every=3,
                      autoencoder={"max_steps": 8, "batch_size": 16})
    out = tmp_path / "model"

    def crash(step, loss):
        if step == 4:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        train(pneumonia_slice, out, cfg, progress=False, on_step=crash)
    assert (default_checkpoint_dir(out) / "vae" / "config.json").is_file()
    train(pneumonia_slice, out, cfg, progress=False, resume=True)
    card = json.loads((out / "model_card.json").read_text())
    assert card["resumed_from_step"] == 3 and card["steps"] == 6
    for part in ("vae", "unet", "unet_ema"):
        ours = load_file(str(out / part / "diffusion_pytorch_model.safetensors"))
        theirs = load_file(str(latent_model / part / "diffusion_pytorch_model.safetensors"))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part


def test_rgb_latent_generator_generates_rgb_pixels_of_the_real_size(tmp_path):
    """A 3-channel 32-px dataset: the latent UNet sees 4×16×16 latents, generation writes 32×32×3 uint8 pixels."""
    import pandas as pd

    from synth.data.canonical import load_dataset, write_dataset
    from synth.generate import generate
    from synth.training import train

    rng = np.random.default_rng(0)
    n = 32
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    meta = pd.DataFrame({"image_id": [f"i{i}" for i in range(n)], "split": "train", "label": np.arange(n) % 2})
    ds = write_dataset(tmp_path / "ds", images, meta, class_names=["a", "b"], source={"format": "test"},
                       license="CC0", attribution="test")
    cfg = TrainConfig(preset="tiny", kind="latent", max_steps=2, batch_size=16, threads=1,
                      autoencoder={"max_steps": 2, "batch_size": 16})
    model = train(ds, tmp_path / "model", cfg, progress=False)
    card = json.loads((model / "model_card.json").read_text())
    assert card["generator"]["latent_shape"] == [4, 16, 16] and card["image"]["channels"] == 3
    out = generate(model, tmp_path / "gen", n=4, sampler="ddim-25", steps=2, device="cpu", progress=False)
    assert load_dataset(out).images.shape == (4, 32, 32, 3)


def test_autoencoder_progress_lines_come_every_tenth_or_every_15_seconds(monkeypatch) -> None:
    import synth.autoencoder as autoencoder

    clock = [0.0]
    monkeypatch.setattr(autoencoder.time, "monotonic", lambda: clock[0])
    every = autoencoder._Every(1000)
    due = []
    for step in range(1, 301):
        clock[0] += 0.125 if step < 200 else 1.0  # slow steps after 200: the 15-s rule takes over
        if every.due(step):
            due.append(step)
    assert due == [1, 100, 200, 215, 230, 245, 260, 275, 290, 300]


def test_random_crops_are_slices_of_each_image_at_seeded_offsets() -> None:
    from synth.autoencoder import random_crops

    images = torch.arange(3 * 2 * 16 * 16, dtype=torch.float32).reshape(3, 2, 16, 16)
    crops = random_crops(images, 8, generator=torch.Generator().manual_seed(0))
    again = random_crops(images, 8, generator=torch.Generator().manual_seed(0))
    assert crops.shape == (3, 2, 8, 8) and torch.equal(crops, again)
    offsets = []
    for i in range(3):  # each crop is a contiguous window of its own image, every channel at the same offset
        top, left = divmod(int(crops[i, 0, 0, 0] - images[i, 0, 0, 0]), 16)
        assert torch.equal(crops[i], images[i, :, top : top + 8, left : left + 8])
        offsets.append((top, left))
    assert len(set(offsets)) > 1  # not one offset for the whole batch
    assert random_crops(images, None, generator=torch.Generator()) is images
    assert random_crops(images, 16, generator=torch.Generator()) is images


def test_autoencoder_trained_on_crops_reconstructs_whole_images(monkeypatch) -> None:
    """With `crop`, training sees only crops (checked at the encoder's input), and the trained autoencoder encodes
    and decodes the whole image; the record says what its MSE was measured on."""
    from synth.autoencoder import encode_means, train_vae
    from synth.autoencoder_config import AutoencoderConfig

    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 1, 32, 32), dtype=np.uint8))
    cfg = AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=8, batch_size=4, max_steps=3,
                            max_minutes=None, crop=16)
    seen = []
    from diffusers import AutoencoderKL

    original = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: (seen.append(tuple(x.shape)),
                                                                           original(self, x, *a, **k))[1])
    vae, record = train_vae(images, cfg, seed=0, device=torch.device("cpu"))
    assert seen == [(4, 1, 16, 16)] * 3 and record["measured_on"] == "random 16×16 training crops"
    means = encode_means(vae, images)
    assert means.shape == (8, 4, 16, 16)
    assert vae.decode(means).sample.shape == (8, 1, 32, 32)


def test_autoencoder_crop_must_divide_by_the_downsampling_factor() -> None:
    from synth.autoencoder_config import AutoencoderConfig

    with pytest.raises(ValueError, match="crop 18 is not divisible by its downsampling factor 4"):
        AutoencoderConfig(crop=18)
