"""The trainer: objective, EMA, model directory, checkpoints/resume, stopping, conditioning, privacy protocol."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from synth.artifacts import read_header, verify_content
from synth.checkpoint import default_checkpoint_dir, has_checkpoint
from synth.conditioning import ConditionSpace
from synth.data.canonical import load_dataset, write_dataset
from synth.device import resolve_device
from synth.errors import ConfigError, InputError
from synth.model import build_unet, preset
from synth.model_dir import write_model_dir
from synth.train_config import PRESET_DEFAULTS, TrainConfig, load_train_config
from synth.training import (
    PrivacyStrategy,
    derive_seeds,
    learning_rate,
    make_scheduler,
    per_row_loss,
    train,
)

torch.set_num_threads(1)

# 64 train images, batch 16: 4 batches an epoch, so 6 steps cross an epoch boundary.
FAST = {"preset": "tiny", "batch_size": 16, "max_steps": 6, "max_minutes": None, "checkpoint_every": None}


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**FAST, **kw})


def load_unet(path: Path):
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(path, low_cpu_mem_usage=False).eval()


def state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "diffusion_pytorch_model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    for sub in ("unet", "unet_ema"):
        sa, sb = state(a / sub), state(b / sub)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{sub}/{k} differs"


def card(model: Path) -> dict:
    return read_header(model, "model_card.json", kind="model")


@pytest.fixture(scope="module")
def trained(pneumonia_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainConfig]:
    """One tiny model trained for 40 steps, shared by the read-only tests."""
    config = cfg(max_steps=40)
    out = tmp_path_factory.mktemp("trained") / "model"
    return train(pneumonia_slice, out, config, progress=False), config


# -- config --------------------------------------------------------------------------------------------------


def test_config_presets_overrides_and_json_round_trip(tmp_path: Path) -> None:
    tiny = TrainConfig(preset="tiny")
    assert tiny.batch_size == PRESET_DEFAULTS["tiny"]["batch_size"]
    assert TrainConfig().preset == "small" and TrainConfig().max_minutes <= 10
    c = TrainConfig(preset="tiny", max_steps=5, condition_attributes=["sex"])
    assert c.max_steps == 5 and c.lr == tiny.lr and c.condition_attributes == ("sex",)
    again = TrainConfig.from_json(json.loads(json.dumps(c.to_json())))
    assert again == c

    with pytest.raises(ConfigError, match="at least one of epochs, max_steps, max_minutes"):
        TrainConfig.from_json({"preset": "tiny", "max_steps": None, "max_minutes": None})
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig.from_json({"preset": "tiny", "batch_size": 0})

    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("preset: small\nbatch_size: 24\ncondition_attributes: sex\nlr: 0.0005\n")
    c = load_train_config(config_file=yaml_file, overrides={"max_steps": 7, "seed": None})
    assert (c.preset, c.batch_size, c.lr, c.max_steps, c.condition_attributes) == ("small", 24, 5e-4, 7, ("sex",))
    assert c.ema_decay == PRESET_DEFAULTS["small"]["ema_decay"]
    # --preset wins over the file's preset; the file's other keys still apply.
    c = load_train_config(preset="tiny", config_file=yaml_file)
    assert (c.preset, c.batch_size, c.ema_decay) == ("tiny", 24, PRESET_DEFAULTS["tiny"]["ema_decay"])
    yaml_file.write_text("batch_sise: 3\n")
    with pytest.raises(ConfigError, match=r"train\.yaml.*batch_sise"):
        load_train_config(config_file=yaml_file)


def test_learning_rate_warmup_then_cosine() -> None:
    c = TrainConfig(preset="small", lr=1e-3, lr_warmup_steps=10, lr_schedule="cosine", lr_final_ratio=0.1)
    assert learning_rate(c, 1, 110) == pytest.approx(1e-4)
    assert learning_rate(c, 10, 110) == pytest.approx(1e-3)
    assert learning_rate(c, 60, 110) == pytest.approx(0.55e-3)
    assert learning_rate(c, 110, 110) == pytest.approx(1e-4)
    const = TrainConfig(preset="tiny", lr_schedule="constant", lr_warmup_steps=0)
    assert learning_rate(const, 1, 100) == learning_rate(const, 99, 100) == const.lr


def test_resolve_device() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="tpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            resolve_device("cuda")


# -- the objective -------------------------------------------------------------------------------------------


class RecordingUNet(nn.Module):
    """Predicts zeros and records what it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, sample, timestep, class_labels=None):
        self.calls.append((sample.detach().clone(), timestep.clone(), class_labels.clone()))
        return type("Out", (), {"sample": sample * 0 + self.w})()


def test_per_row_loss_repeats_each_example_k_times_with_its_own_noise() -> None:
    sched = make_scheduler(TrainConfig(preset="tiny"))
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    conditions = torch.tensor([0, 1])
    unet = RecordingUNet()
    rows = per_row_loss(unet, sched, images, conditions, null_condition=2,
                        generator=torch.Generator().manual_seed(5), noise_multiplicity=3)
    assert rows.shape == (6,)
    noisy, t, labels = unet.calls[0]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]  # repeat_interleave, no dropout
    # Replaying the generator gives each row's timestep and noise; with a zero prediction the row loss is the
    # mean squared noise of that row, and the noisy input is built from the row's own example.
    g = torch.Generator().manual_seed(5)
    t_expect = torch.randint(0, 1000, (6,), generator=g)
    noise = torch.randn((6, 1, 8, 8), generator=g)
    assert torch.equal(t, t_expect)
    assert len(set(t.tolist())) > 1
    torch.testing.assert_close(rows, noise.pow(2).flatten(1).mean(1))
    x0 = images.repeat_interleave(3, dim=0)
    torch.testing.assert_close(noisy, sched.add_noise(x0, noise, t_expect))


def test_min_snr_weighting_scales_each_row_by_its_timestep() -> None:
    sched = make_scheduler(TrainConfig(preset="tiny"))
    images = torch.rand(64, 1, 4, 4) * 2 - 1
    conditions = torch.zeros(64, dtype=torch.long)
    plain = per_row_loss(RecordingUNet(), sched, images, conditions, null_condition=1,
                         generator=torch.Generator().manual_seed(3))
    unet = RecordingUNet()
    weighted = per_row_loss(unet, sched, images, conditions, null_condition=1,
                            generator=torch.Generator().manual_seed(3), min_snr_gamma=5.0)
    t = unet.calls[0][1]
    alpha_bar = sched.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    torch.testing.assert_close(weighted, plain * torch.clamp(snr, max=5.0) / snr)
    low_noise = snr > 5
    assert low_noise.any() and (~low_noise).any()  # both regimes drawn
    assert (weighted[low_noise] < plain[low_noise]).all()
    torch.testing.assert_close(weighted[~low_noise], plain[~low_noise])
    assert TrainConfig(preset="small").min_snr_gamma is None


def test_cfg_dropout_feeds_the_null_condition() -> None:
    sched = make_scheduler(TrainConfig(preset="tiny"))
    images, conditions = torch.zeros(400, 1, 4, 4), torch.ones(400, dtype=torch.long)
    unet = RecordingUNet()
    per_row_loss(unet, sched, images, conditions, null_condition=7, generator=torch.Generator().manual_seed(0),
                 cfg_dropout=0.25)
    labels = unet.calls[0][2]
    assert set(labels.tolist()) == {1, 7}
    assert 0.15 < (labels == 7).float().mean() < 0.35
    per_row_loss(unet, sched, images, conditions, null_condition=7, generator=torch.Generator().manual_seed(0))
    assert (unet.calls[1][2] == 1).all()


# -- a trained model -----------------------------------------------------------------------------------------


def test_training_reduces_the_loss_on_a_fixed_batch(trained, pneumonia_slice: Path) -> None:
    out, config = trained
    ds = load_dataset(pneumonia_slice)
    images, meta = ds.split("train")
    x = torch.from_numpy(np.asarray(images)).float().div(127.5).sub(1).unsqueeze(1)
    y = torch.from_numpy(meta["label"].to_numpy().astype(np.int64))
    model_cfg = preset("tiny", num_conditions=2)
    torch.manual_seed(derive_seeds(config.seed)["init"])
    initial = build_unet(model_cfg).eval()  # exactly the step-0 weights of the run
    sched = make_scheduler(config)

    def loss(unet) -> float:
        with torch.no_grad():
            return float(per_row_loss(unet, sched, x, y, null_condition=2, noise_multiplicity=4,
                                      generator=torch.Generator().manual_seed(123)).mean())

    before, after, ema = loss(initial), loss(load_unet(out / "unet")), loss(load_unet(out / "unet_ema"))
    assert after < 0.25 * before, (before, after)  # measured: 0.87 → 0.09
    assert ema < 0.25 * before, (before, ema)


def test_model_directory_layout_and_header(trained, pneumonia_slice: Path) -> None:
    out, config = trained
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [
        "model_card.json",
        "model_index.json",
        "pipeline.py",  # the standalone pipeline for plain diffusers (tests/test_pipeline_diffusers.py)
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet_ema/config.json",
        "unet_ema/diffusion_pytorch_model.safetensors",
    ]
    header = card(out)
    verify_content(out, header)
    assert header["schema_version"] == 1
    assert header["files"] == files[1:]
    assert header["inputs"] == {"dataset": load_dataset(pneumonia_slice).content_hash}
    assert TrainConfig.from_json(header["config"]["train"]) == config
    assert header["config"]["model"] == preset("tiny", num_conditions=2).model_dump(mode="json")
    assert ConditionSpace.from_json(header["conditions"]).class_names == ("normal", "pneumonia")
    assert header["class_names"] == ["normal", "pneumonia"]
    assert header["image"] == {"height": 28, "width": 28, "channels": 1, "dtype": "uint8"}
    assert header["condition_counts"] == [32, 32]  # the slice's train split, class-balanced; val/test ignored
    assert header["steps"] == 40 and header["stopped_by"] == "max_steps"
    assert header["epochs"] == pytest.approx(10.0)
    assert header["seeds"]["seed"] == 0 and header["privacy"] is None
    source = load_dataset(pneumonia_slice).header
    assert (header["license"], header["attribution"]) == (source["license"], source["attribution"])
    assert header["train_images"] == 64
    assert header["device"].startswith("cpu") and header["training_seconds"] > 0
    assert np.isfinite(header["final_loss"]) and header["loss_curve"][-1]["step"] == 40
    assert header["ema"]["updates"] == 40
    sched = json.loads((out / "scheduler/scheduler_config.json").read_text())
    assert (sched["_class_name"], sched["num_train_timesteps"], sched["beta_schedule"]) == (
        "DDPMScheduler", 1000, "linear")
    assert sched["prediction_type"] == "epsilon" and sched["clip_sample"] is True
    assert not default_checkpoint_dir(out).exists()  # removed once the model is written
    # The EMA weights were updated (differ from init) and differ from the raw weights.
    raw, ema = state(out / "unet"), state(out / "unet_ema")
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


def test_model_directory_loads_as_the_sampling_pipeline(trained) -> None:
    from synth.pipeline import load_pipeline

    out, _ = trained
    pipe = load_pipeline(out, weights="ema", sampler="ddim", device="cpu")
    images = pipe([0, 1], num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 28, 28) and images.dtype == np.uint8
    ema = load_unet(out / "unet_ema")
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), ema.parameters(), strict=True))


def test_saved_weights_reproduce_the_in_memory_models(tmp_path: Path) -> None:
    from diffusers import DDPMScheduler

    space = ConditionSpace(class_names=("a", "b"), attributes=(("sex", ("F", "M")),))
    model_cfg = preset("tiny", num_conditions=space.num_conditions)
    torch.manual_seed(0)
    unet, ema_unet = build_unet(model_cfg).eval(), build_unet(model_cfg).eval()
    out = write_model_dir(
        tmp_path / "model", unet=unet, ema_unet=ema_unet, scheduler=DDPMScheduler(), model_config=model_cfg,
        train_config=TrainConfig(preset="tiny").to_json(), space=space, dataset_hash="0" * 64,
        image={"height": 28, "width": 28, "channels": 1}, condition_counts=[1, 2, 3, 4],
    )
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 4])
    with torch.no_grad():
        for memory, sub in ((unet, "unet"), (ema_unet, "unet_ema")):
            loaded = load_unet(out / sub)
            assert loaded.config.num_class_embeds == 5
            assert torch.equal(loaded(x, t, class_labels=y).sample, memory(x, t, class_labels=y).sample)
    assert card(out)["condition_counts"] == [1, 2, 3, 4]


# -- checkpoints and resume ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(pneumonia_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(pneumonia_slice, tmp_path_factory.mktemp("full") / "model", cfg(), progress=False)


def _stop_at(step: int, how: str):
    def on_step(s: int, loss: float) -> None:
        if s == step:
            if how == "ctrl-c":
                raise KeyboardInterrupt
            if how in ("sigterm", "sigint"):  # the handler defers them to this step boundary
                os.kill(os.getpid(), signal.SIGTERM if how == "sigterm" else signal.SIGINT)
            if how == "crash":
                raise RuntimeError("simulated crash")

    return on_step


@pytest.mark.parametrize(
    ("how", "stop", "every", "expected", "raised"),
    [
        ("ctrl-c", 3, None, 3, KeyboardInterrupt),  # mid-epoch: resume replays the epoch's order
        ("sigterm", 2, None, 2, SystemExit),
        ("sigint", 5, 2, 5, KeyboardInterrupt),  # a signal saves even between periodic checkpoints
        ("crash", 5, 2, 4, RuntimeError),  # no save on a crash: the periodic one (at an epoch end) is used
    ],
)
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(
    pneumonia_slice: Path, uninterrupted: Path, tmp_path: Path, how, stop, every, expected, raised
) -> None:
    out = tmp_path / "model"
    config = cfg(checkpoint_every=every)
    with pytest.raises(raised) as info:
        train(pneumonia_slice, out, config, progress=False, on_step=_stop_at(stop, how))
    if raised is SystemExit:
        assert info.value.code == 128 + signal.SIGTERM
    assert not out.exists() and has_checkpoint(default_checkpoint_dir(out))
    summary = json.loads((default_checkpoint_dir(out) / "checkpoint.json").read_text())
    assert summary["step"] == expected

    with pytest.raises(InputError, match="--resume"):
        train(pneumonia_slice, out, config, progress=False)
    with pytest.raises(ConfigError, match="another config"):
        train(pneumonia_slice, out, cfg(checkpoint_every=every, lr=1e-4), progress=False, resume=True)

    train(pneumonia_slice, out, config, progress=False, resume=True)
    assert card(out)["resumed_from_step"] == expected and card(out)["steps"] == 6
    assert_same_weights(out, uninterrupted)
    assert not default_checkpoint_dir(out).exists()


def test_resume_without_a_checkpoint_starts_fresh(pneumonia_slice: Path, uninterrupted: Path, tmp_path: Path) -> None:
    out = train(pneumonia_slice, tmp_path / "model", cfg(), progress=False, resume=True)
    assert card(out)["resumed_from_step"] is None
    assert_same_weights(out, uninterrupted)  # and a rerun with the same seed is reproducible


def test_a_failed_model_write_keeps_the_finished_run(
    pneumonia_slice: Path, uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import synth.training as training

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    out = tmp_path / "model"
    with monkeypatch.context() as m:
        m.setattr(training, "write_model_dir", full_disk)
        with pytest.raises(OSError):
            train(pneumonia_slice, out, cfg(), progress=False)
    assert json.loads((default_checkpoint_dir(out) / "checkpoint.json").read_text())["step"] == 6
    train(pneumonia_slice, out, cfg(), progress=False, resume=True)  # nothing left to train: just writes
    assert card(out)["resumed_from_step"] == 6 and card(out)["steps"] == 6
    assert_same_weights(out, uninterrupted)


# -- stopping ------------------------------------------------------------------------------------------------


def test_stops_after_epochs_or_time_budget(pneumonia_slice: Path, tmp_path: Path) -> None:
    out = train(pneumonia_slice, tmp_path / "e", cfg(max_steps=None, epochs=2), progress=False)
    assert (card(out)["steps"], card(out)["stopped_by"], card(out)["epochs"]) == (8, "epochs", 2.0)
    # A budget far below one step's duration stops after the first step (no wall-clock assertion).
    out = train(pneumonia_slice, tmp_path / "m", cfg(max_steps=None, max_minutes=1e-9), progress=False)
    assert (card(out)["steps"], card(out)["stopped_by"]) == (1, "max_minutes")


# -- conditioning on attributes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slice_with_sex(pneumonia_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds = load_dataset(pneumonia_slice)
    meta = ds.metadata.drop(columns="sha256").copy()
    meta["sex"] = np.where(np.arange(len(meta)) % 3 == 0, "F", "M")
    return write_dataset(tmp_path_factory.mktemp("sex") / "dataset", np.asarray(ds.images), meta,
                         class_names=ds.class_names, source={"name": "slice with sex"})


def test_conditioning_on_an_attribute(slice_with_sex: Path, tmp_path: Path) -> None:
    out = train(slice_with_sex, tmp_path / "model", cfg(max_steps=2, condition_attributes=["sex"]), progress=False)
    header = card(out)
    space = ConditionSpace.from_json(header["conditions"])
    assert space.attributes == (("sex", ("F", "M")),) and space.num_conditions == 4
    _, meta = load_dataset(slice_with_sex).split("train")
    expected = np.bincount(space.encode_frame(meta), minlength=4).tolist()
    assert header["condition_counts"] == expected and sum(expected) == 64 and min(expected) > 0
    assert load_unet(out / "unet").config.num_class_embeds == 5  # 4 conditions + null

    with pytest.raises(ConfigError, match="'age'"):
        train(slice_with_sex, tmp_path / "bad", cfg(condition_attributes=["age"]), progress=False)


# -- the privacy-strategy protocol ---------------------------------------------------------------------------


class Recorder(nn.Module):
    def __init__(self, inner: nn.Module, rows: list[int], labels: list[torch.Tensor]) -> None:
        super().__init__()
        self.inner, self.rows, self.labels = inner, rows, labels

    def forward(self, sample, timestep, class_labels=None):
        self.rows.append(int(sample.shape[0]))
        self.labels.append(class_labels.detach().clone())
        return self.inner(sample, timestep, class_labels=class_labels)


class FakeStrategy:
    """Implements PrivacyStrategy; records calls. `real_every=2`: every second optimizer step is 'accumulating'."""

    def __init__(self, k: int = 1, real_every: int = 1, batches: list | None = None) -> None:
        self.noise_multiplicity = k
        self.real_every = real_every
        self.batches = batches
        self.rows: list[int] = []
        self.labels: list[torch.Tensor] = []
        self.after: list[int] = []
        self.step_calls = 0
        self.attached: dict = {}

    def attach(self, model, optimizer, data_loader, *, epochs, steps):
        self.attached = {"epochs": epochs, "steps": steps, "loader": data_loader}
        loader = self.batches if self.batches is not None else data_loader
        return Recorder(model, self.rows, self.labels), optimizer, loader

    def after_backward(self, model, batch_size):
        self.after.append(batch_size)

    def is_real_step(self, optimizer):
        self.step_calls += 1
        return self.step_calls % self.real_every == 0

    def epsilon(self):
        return 2.5

    def ledger(self):
        return {"delta": 1e-5, "accountant": "fake", "max_grad_norm": 1.0, "steps": self.step_calls}

    def unwrap(self, model):
        return model.inner

    def state_dict(self):
        return {"step_calls": self.step_calls}

    def load_state_dict(self, state):
        self.step_calls = state["step_calls"]


def test_noise_multiplicity_through_a_privacy_strategy(pneumonia_slice: Path, tmp_path: Path) -> None:
    fake = FakeStrategy(k=3)
    assert isinstance(fake, PrivacyStrategy)
    out = train(pneumonia_slice, tmp_path / "model", cfg(max_steps=3, noise_multiplicity=3, cfg_dropout=0.3),
                privacy=fake, progress=False)
    assert fake.attached["steps"] == 3 and fake.attached["epochs"] is None
    assert fake.rows == [48, 48, 48]  # B·K rows reach the model
    assert fake.after == [16, 16, 16]  # ...and the strategy folds them back to B examples
    labels = torch.cat(fake.labels)
    assert set(labels.tolist()) == {0, 1, 2}  # the trainer's condition dropout feeds the null condition (2)
    assert 0.15 < (labels == 2).float().mean() < 0.45
    header = card(out)
    assert header["privacy"]["epsilon"] == 2.5 and header["privacy"]["delta"] == 1e-5
    assert header["privacy"]["noise_multiplicity"] == 3 and "ε" in header["privacy"]["explanation"]
    assert json.loads((out / "privacy_ledger.json").read_text())["accountant"] == "fake"
    assert "privacy_ledger.json" in header["files"]

    with pytest.raises(ConfigError, match="noise_multiplicity"):
        train(pneumonia_slice, tmp_path / "k", cfg(noise_multiplicity=2), privacy=FakeStrategy(k=3), progress=False)
    with pytest.raises(ConfigError, match="epochs or max_steps"):
        train(pneumonia_slice, tmp_path / "t", cfg(max_steps=None, max_minutes=1.0), privacy=FakeStrategy(),
              progress=False)


def test_ema_and_steps_follow_only_real_optimizer_steps(pneumonia_slice: Path, tmp_path: Path) -> None:
    fake = FakeStrategy(real_every=2)
    out = train(pneumonia_slice, tmp_path / "model", cfg(max_steps=3, epochs=None), privacy=fake, progress=False)
    header = card(out)
    assert fake.step_calls == 6  # six optimizer.step() calls...
    assert header["steps"] == 3 and header["ema"]["updates"] == 3  # ...three of them real
    assert header["examples_seen"] == 6 * 16


def test_empty_poisson_batch_is_a_step_without_forward(pneumonia_slice: Path, tmp_path: Path) -> None:
    x, y = torch.rand(5, 1, 28, 28) * 2 - 1, torch.tensor([0, 1, 0, 1, 1])
    batches = [(x[:0], y[:0]), (x, y), (x[:2], y[:2])]
    fake = FakeStrategy(batches=batches)
    out = train(pneumonia_slice, tmp_path / "model", cfg(max_steps=3), privacy=fake, progress=False)
    assert fake.after == [0, 5, 2] and fake.rows == [5, 2]
    header = card(out)
    assert header["steps"] == 3
    # The loss is a statistic of the private images outside DP-SGD: a private model's card does not publish it.
    assert "final_loss" not in header and "loss_curve" not in header and "DP-SGD" in header["withheld"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "physical",
    [
        None,
        8,  # physical batches: privacy.dp sends one optimizer signal per step, so a fast-forward stays aligned
    ],
)
def test_dp_training_resumes_exactly(pneumonia_slice: Path, tmp_path: Path, physical: int | None) -> None:
    dp = pytest.importorskip("privacy.dp")

    def strategy():
        # rdp: the fastest accountant to calibrate; the trainer does not care which one is used
        config = dp.DPConfig(target_epsilon=10.0, max_physical_batch_size=physical, accountant="rdp")
        return dp.make_strategy(config, dataset_size=64, noise_multiplicity=2)

    config = cfg(noise_multiplicity=2)
    full = train(pneumonia_slice, tmp_path / "full", config, privacy=strategy(), progress=False)
    header = card(full)
    assert 0 < header["privacy"]["epsilon"] <= 10.0 + 1e-6 and header["privacy"]["noise_multiplicity"] == 2
    ledger = json.loads((full / "privacy_ledger.json").read_text())
    assert ledger["steps"] == 6 and ledger["delta"] == header["privacy"]["delta"]

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(pneumonia_slice, out, config, privacy=strategy(), progress=False, on_step=_stop_at(3, "ctrl-c"))
    train(pneumonia_slice, out, config, privacy=strategy(), progress=False, resume=True)
    assert card(out)["privacy"]["epsilon"] == header["privacy"]["epsilon"]  # the accountant history carried over
    assert card(out)["examples_seen"] == header["examples_seen"]
    assert_same_weights(out, full)


# -- bad input -----------------------------------------------------------------------------------------------


def test_bad_inputs_are_one_line_errors(pneumonia_slice: Path, tmp_path: Path) -> None:
    not_a_dataset = tmp_path / "folder"
    not_a_dataset.mkdir()
    with pytest.raises(InputError, match="not a synthgate artifact"):
        train(not_a_dataset, tmp_path / "m1", cfg(), progress=False)
    with pytest.raises(InputError, match=r"dataset.*64 images, fewer than batch_size 128"):
        train(pneumonia_slice, tmp_path / "m2", cfg(batch_size=128), progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(InputError, match="already exists"):
        train(pneumonia_slice, tmp_path / "exists", cfg(), progress=False)
    with pytest.raises(InputError, match="parent directory"):
        train(pneumonia_slice, tmp_path / "no" / "model", cfg(), progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            train(pneumonia_slice, tmp_path / "m3", cfg(device="cuda"), progress=False)
    # a dataset without a train split
    ds = load_dataset(pneumonia_slice)
    meta = ds.metadata.drop(columns="sha256")
    val = (meta["split"] != "train").to_numpy()
    only_val = write_dataset(tmp_path / "val_only", np.asarray(ds.images)[val], meta[val].reset_index(drop=True),
                             class_names=ds.class_names, source={"name": "no train"})
    with pytest.raises(InputError, match="no 'train' split"):
        train(only_val, tmp_path / "m4", cfg(), progress=False)
    for m in ("m1", "m2", "m3", "m4"):
        assert not (tmp_path / m).exists()


def test_training_data_with_missing_attribute_values_is_refused(slice_with_sex: Path, tmp_path: Path) -> None:
    ds = load_dataset(slice_with_sex)
    meta = ds.metadata.drop(columns="sha256").copy()
    meta["sex"] = pd.Series(meta["sex"], dtype=object)
    meta.loc[meta.index[meta["split"] == "train"][0], "sex"] = None
    bad = write_dataset(tmp_path / "ds", np.asarray(ds.images), meta, class_names=ds.class_names,
                        source={"name": "missing"})
    with pytest.raises(ConfigError, match="'sex' is missing for 1"):
        train(bad, tmp_path / "m", cfg(condition_attributes=["sex"]), progress=False)


def test_attributes_condition_by_default_when_the_dataset_has_them(slice_with_sex: Path, tmp_path: Path) -> None:
    """The default ("auto") conditions on every usable attribute; () trains on labels alone."""
    out = train(slice_with_sex, tmp_path / "auto", cfg(max_steps=1), progress=False)
    assert ConditionSpace.from_json(card(out)["conditions"]).attributes == (("sex", ("F", "M")),)
    plain = train(slice_with_sex, tmp_path / "plain", cfg(max_steps=1, condition_attributes=[]), progress=False)
    assert ConditionSpace.from_json(card(plain)["conditions"]).num_conditions == 2


def test_auto_attributes_skip_unusable_columns() -> None:
    from synth.training import auto_attributes

    meta = pd.DataFrame({"label": [0, 1] * 50, "sex": ["F", "M"] * 50, "site": ["A"] * 100,
                         "age": [str(i) for i in range(100)], "view": ["PA", None] * 50})
    # constant, too many values, and gaps are all left out
    assert auto_attributes(meta, ["sex", "site", "age", "view"]) == ("sex",)


def test_training_sets_its_own_thread_count(pneumonia_slice: Path, tmp_path: Path) -> None:
    """torch starts a new thread at the count any thread set last: training must not inherit another task's."""
    import threading

    from synth.training import cpu_threads, train

    seen: list[int] = []
    cfg = TrainConfig(preset="tiny", max_steps=1, checkpoint_every=None, device="cpu", threads=2)

    def run() -> None:
        train(pneumonia_slice, tmp_path / "model", cfg, progress=False, on_step=lambda *_: seen.append(
            torch.get_num_threads()))

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # what the privacy reference's encoder does in its own thread
    try:
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
    finally:
        torch.set_num_threads(before)
    assert seen == [2]
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert card["device"] == "cpu (2 threads)"
    assert cpu_threads(TrainConfig(preset="tiny")) >= 1


def test_thread_default_follows_omp_num_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes sharing the cores (test workers, a batch scheduler) say so with OMP_NUM_THREADS; training then
    must not take every core (two 2-thread torch jobs on 2 cores ran 20-60x slower)."""
    from synth.training import cpu_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads(TrainConfig(preset="tiny")) == 1
    assert cpu_threads(TrainConfig(preset="tiny", threads=3)) == 3  # an explicit count wins
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads(TrainConfig(preset="tiny")) == len(os.sched_getaffinity(0))


# -- class-balanced batches ----------------------------------------------------------------------------------


def test_class_balanced_loader_draws_every_class_equally_often() -> None:
    from synth.training import TrainingData, make_loader

    # 3 classes at 80/15/5 crossed with an attribute: balance is by class label, not by joint condition.
    space = ConditionSpace(class_names=("a", "b", "c"), attributes=(("sex", ("F", "M")),))
    labels = np.repeat([0, 1, 2], [80, 15, 5])
    conditions = labels * 2 + np.random.default_rng(0).integers(0, 2, len(labels))
    data = TrainingData(
        images=torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8), conditions=torch.from_numpy(conditions),
        space=space, dataset_hash="x", image={"height": 4, "width": 4, "channels": 1},
        condition_counts=np.bincount(conditions, minlength=6).tolist(),
    )
    prior = np.bincount(labels) / len(labels)

    def drawn(balance: float, epochs: int) -> np.ndarray:
        loader = make_loader(data, cfg(class_balance=balance, batch_size=20), torch.Generator().manual_seed(0))
        seen = torch.cat([y for _ in range(epochs) for _, y in loader]).numpy()
        return np.bincount(space.labels_of(seen), minlength=3) / len(seen)

    assert np.allclose(drawn(0.0, 1), prior)  # shuffled without replacement: exactly the data's prior
    assert np.allclose(drawn(1.0, 60), 1 / 3, atol=0.03)  # 6,000 draws: every class about a third
    sqrt = drawn(0.5, 60)  # weights n_c^-0.5: in between
    assert np.allclose(sqrt, np.sqrt([80, 15, 5]) / np.sqrt([80, 15, 5]).sum(), atol=0.03)
    first = [y.tolist() for _, y in make_loader(data, cfg(class_balance=1.0), torch.Generator().manual_seed(0))]
    again = [y.tolist() for _, y in make_loader(data, cfg(class_balance=1.0), torch.Generator().manual_seed(0))]
    assert first == again  # the order is a function of the seed: resumable and reproducible


def test_class_balanced_training_resumes_exactly_and_refuses_dp(pneumonia_slice: Path, tmp_path: Path) -> None:
    config = cfg(class_balance=1.0, checkpoint_every=2)
    full = train(pneumonia_slice, tmp_path / "full", config, progress=False)
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        train(pneumonia_slice, out, config, progress=False, on_step=_stop_at(3, "ctrl-c"))
    train(pneumonia_slice, out, config, progress=False, resume=True)
    assert card(out)["config"]["train"]["class_balance"] == 1.0
    assert_same_weights(out, full)
    with pytest.raises(ConfigError, match=r"class_balance 1\.0 needs non-private"):
        train(pneumonia_slice, tmp_path / "dp", cfg(class_balance=1.0), privacy=FakeStrategy(), progress=False)


def test_class_balance_auto_is_one_without_dp_and_zero_with_it(pneumonia_slice: Path, tmp_path: Path) -> None:
    from synth.train_config import resolve_class_balance

    # The CPU presets balance by default (measured: benchmarks/README.md); tiny keeps the data's order for tests.
    assert TrainConfig(preset="small").class_balance == "auto" and TrainConfig(preset="tiny").class_balance == 0
    small = TrainConfig(preset="small")
    assert resolve_class_balance(small, private=False).class_balance == 1.0
    assert resolve_class_balance(small, private=True).class_balance == 0.0
    assert resolve_class_balance(cfg(class_balance=0.5), private=False).class_balance == 0.5
    with pytest.raises(ValueError, match="class_balance"):
        TrainConfig(preset="small", class_balance="sometimes")
    # The model card records what was used: "auto" with a DP strategy trains unbalanced, without it balanced.
    dp = train(pneumonia_slice, tmp_path / "dp", cfg(class_balance="auto"), privacy=FakeStrategy(), progress=False)
    assert card(dp)["config"]["train"]["class_balance"] == 0.0
    plain = train(pneumonia_slice, tmp_path / "plain", cfg(class_balance="auto"), progress=False)
    assert card(plain)["config"]["train"]["class_balance"] == 1.0


def test_ema_snapshots_equal_the_ema_of_a_run_stopped_there_and_survive_a_resume(pneumonia_slice: Path,
                                                                                 tmp_path: Path) -> None:
    """`snapshot_every` keeps the EMA weights every N steps (the tiny preset's LR is constant after warmup, so a run
    stopped at step N has exactly those EMA weights); an interrupted run keeps the snapshots it took."""
    from synth.pipeline import load_pipeline

    out = tmp_path / "model"
    config = cfg(snapshot_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(pneumonia_slice, out, config, progress=False, on_step=_stop_at(3, "ctrl-c"))
    train(pneumonia_slice, out, config, progress=False, resume=True)
    weights = card(out)["weights"]
    assert weights["snapshots"] == {"2": "unet_ema_snapshots/step-000002", "4": "unet_ema_snapshots/step-000004"}
    for step in (2, 4):
        stopped = train(pneumonia_slice, tmp_path / f"stopped{step}", cfg(max_steps=step), progress=False)
        kept, ema = state(out / weights["snapshots"][str(step)]), state(stopped / "unet_ema")
        assert kept.keys() == ema.keys() and all(torch.equal(kept[k], ema[k]) for k in kept)
    pipe = load_pipeline(out, weights="ema@4", device="cpu")
    assert all(torch.equal(p, state(out / weights["snapshots"]["4"])[k]) for k, p in pipe.unet.state_dict().items())
    with pytest.raises(InputError, match=r"no EMA snapshot at step 3 \(kept: ema@2, ema@4\)"):
        load_pipeline(out, weights="ema@3", device="cpu")
    with pytest.raises(ConfigError, match="ema@STEP"):
        load_pipeline(out, weights="best", device="cpu")
