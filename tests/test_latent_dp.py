"""DP for the latent generator's autoencoder: trained with DP-SGD at a share of ε and composed into the one ledger
(checked against an independent dp_accounting recomputation of both mechanisms), or reused frozen from a latent
model trained on public data (named in the ledger); anything else with DP is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from privacy.dp import build_strategy
from privacy.dp_config import DPConfig
from privacy.ledger import epsilon_dp_accounting, read_model_ledger
from synth.errors import ConfigError
from synth.train_config import TrainConfig

torch.set_num_threads(1)

TINY = {"preset": "tiny", "kind": "latent", "max_steps": 4, "batch_size": 16, "threads": 1,
        "autoencoder": {"max_steps": 6, "batch_size": 16}}


@pytest.fixture(scope="module")
def dp_latent_model(tmp_path_factory, pneumonia_slice):
    from synth.training import train

    strategy = build_strategy(DPConfig(target_epsilon=8.0, accountant="rdp"), dataset=pneumonia_slice,
                              noise_multiplicity=1)
    out = tmp_path_factory.mktemp("dp-latent") / "model"
    return train(pneumonia_slice, out, TrainConfig(**TINY), privacy=strategy, progress=False), strategy


def test_dp_autoencoder_spend_is_composed_into_one_ledger(dp_latent_model):
    model, _ = dp_latent_model
    ledger = read_model_ledger(model)
    ae = ledger.autoencoder
    assert ae["trained_with"] == "dp" and ae["share"] == pytest.approx(0.2)
    # The autoencoder's 6 DP-SGD steps come first, then the UNet's 4: one history, one ε.
    assert [e.steps for e in ledger.events] == [6, 4] and ledger.steps == 10
    assert [e["steps"] for e in ae["events"]] == [6]
    assert ae["epsilon_alone"] <= 0.2 * 8.0 + 1e-9
    # Composed ε reaches (not exceeds) the target, and an independent accountant agrees on the composition.
    assert 7.9 < ledger.epsilon <= 8.0 + 1e-9
    independent = epsilon_dp_accounting(ledger, "rdp")
    assert independent == pytest.approx(ledger.epsilon, rel=0.01)
    assert ledger.epsilon_check["epsilon"] == pytest.approx(independent, rel=1e-9)
    # Without the autoencoder's events the UNet alone would claim less: its σ was calibrated to the composition.
    from privacy.ledger import epsilon_for_events

    assert epsilon_for_events(ledger.events[1:], delta=ledger.delta, accountant="rdp") < ledger.epsilon


def test_dp_autoencoder_is_recorded_in_the_card_with_a_fixed_latent_scale(dp_latent_model):
    from diffusers import AutoencoderKL

    model, _ = dp_latent_model
    card = json.loads((model / "model_card.json").read_text())
    entry = card["generator"]["autoencoder"]
    assert entry["trained_on"] == "train split, with DP-SGD" and entry["steps"] == 6
    # No statistic of the private latents is fitted outside DP-SGD: shift 0, scale 1.
    vae = AutoencoderKL.from_pretrained(model / "vae")
    assert vae.config.shift_factor == 0.0 and vae.config.scaling_factor == 1.0
    assert card["generator"]["scaling_factor"] == 1.0
    # Nor is the reconstruction error or the loss, measured on private images: the card withholds them.
    assert "reconstruction_mse" not in entry and "psnr_db" not in entry and "final_loss" not in card


def test_latent_dp_without_a_private_or_public_autoencoder_is_refused_in_one_line(tmp_path, pneumonia_slice):
    from flows.release_config import ReleaseConfig
    from synth.config import build
    from synth.training import train

    with pytest.raises(ConfigError) as err:
        build(ReleaseConfig, {"train": {"preset": "tiny", "kind": "latent"},
                              "dp": {"enabled": True, "autoencoder_share": 0}}, source="release.yaml")
    assert "needs an autoencoder that keeps the guarantee" in str(err.value) and "\n" not in str(err.value)
    strategy = build_strategy(DPConfig(target_epsilon=8.0, autoencoder_share=0), dataset=pneumonia_slice,
                              noise_multiplicity=1)
    with pytest.raises(ConfigError, match="needs an autoencoder that keeps the guarantee") as err:
        train(pneumonia_slice, tmp_path / "m", TrainConfig(**TINY), privacy=strategy, progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "m").exists()
    with pytest.raises(ConfigError, match=r"autoencoder_share 1\.5 must be a number in \[0, 1\)"):
        DPConfig(target_epsilon=8.0, autoencoder_share=1.5)


def test_public_autoencoder_is_reused_frozen_and_named_in_the_ledger(tmp_path, pneumonia_slice, data_dir):
    from diffusers import AutoencoderKL

    from synth.data.ingest import ingest
    from synth.model_card import load_model_card
    from synth.training import train
    from tests.conftest import make_slice

    public_ds = make_slice(ingest(data_dir / "covid_cxr_128.npz", tmp_path / "full", size=28), tmp_path / "pub",
                           {"train": 32, "val": 8, "test": 8})
    public = train(public_ds, tmp_path / "public", TrainConfig(**TINY), progress=False)
    strategy = build_strategy(DPConfig(target_epsilon=8.0, accountant="rdp", autoencoder_share=0),
                              dataset=pneumonia_slice, noise_multiplicity=1)
    cfg = TrainConfig(**{**TINY, "kind": "auto", "init_from": str(public)})  # auto follows the public model
    model = train(pneumonia_slice, tmp_path / "model", cfg, privacy=strategy, progress=False)
    ledger = read_model_ledger(model)
    public_hash = load_model_card(public).content_hash
    assert ledger.autoencoder == {"trained_with": "public", "frozen": True, "model": public_hash,
                                  "covered_by_epsilon": False}
    assert ledger.public_pretraining["content_hash"] == public_hash
    assert [e.steps for e in ledger.events] == [4]  # no autoencoder spend: only the UNet's steps
    ours, theirs = (AutoencoderKL.from_pretrained(p / "vae") for p in (model, public))
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(),
                                                strict=True))
    assert json.loads((model / "model_card.json").read_text())["generator"]["autoencoder"]["trained_on"] == "public"


def test_autoencoder_per_example_gradients_match_autograd():
    """The DP strategy's per-example gradients of the autoencoder's loss (the hooks it installs on an
    AutoencoderKL) equal autograd's, example by example, so each image's clipped contribution is its own."""
    import copy

    from torch.utils.data import DataLoader, TensorDataset

    from privacy.dp import make_strategy
    from synth.autoencoder import build_vae
    from synth.autoencoder_config import AUTOENCODER_PRESETS, AutoencoderConfig

    torch.manual_seed(0)
    vae = build_vae(AutoencoderConfig(**AUTOENCODER_PRESETS["tiny"]), channels=1, sample_size=16).train()
    reference = copy.deepcopy(vae)
    x = torch.rand(4, 1, 16, 16) * 2 - 1

    def per_example(m, xs):
        post = m.encode(xs).latent_dist
        means = post.mean.flatten(1)
        return ((m.decode(post.mean).sample - xs).pow(2).mean(dim=(1, 2, 3)) + 1e-6 * post.kl()
                + 0.1 * (means.mean(1).pow(2) + (means.pow(2).mean(1) - 1).pow(2)))

    strategy = make_strategy(DPConfig(target_epsilon=8.0, accountant="rdp"), dataset_size=4)
    model, _, _ = strategy.attach(vae, torch.optim.SGD(vae.parameters(), lr=0.1),
                                  DataLoader(TensorDataset(x), batch_size=4), steps=1)
    inner = strategy.unwrap(model)
    per_example(inner, x).mean().backward()
    strategy.after_backward(model, 4)
    for i in range(4):
        reference.zero_grad()
        per_example(reference, x[i : i + 1]).sum().backward()
        want = dict(reference.named_parameters())
        diff = sum(float((p.grad_sample[i] - want[n].grad).norm() ** 2) for n, p in inner.named_parameters())
        total = sum(float(p.grad.norm() ** 2) for p in want.values())
        assert diff**0.5 < 1e-4 * total**0.5  # (biases in front of a one-channel GroupNorm: exactly 0 both ways)


def test_interrupted_dp_latent_run_resumes_with_the_autoencoder_spend(dp_latent_model, pneumonia_slice, tmp_path):
    """On resume the DP autoencoder is reloaded from the checkpoint, not retrained, and its spend is restored into
    the one ledger: the resumed run's ledger and autoencoder equal the uninterrupted run's."""
    from safetensors.torch import load_file

    from synth.training import train

    done, _ = dp_latent_model
    out = tmp_path / "model"

    def crash(step, loss):
        if step == 3:
            raise RuntimeError("simulated crash")

    def strategy():
        return build_strategy(DPConfig(target_epsilon=8.0, accountant="rdp"), dataset=pneumonia_slice,
                              noise_multiplicity=1)

    cfg = TrainConfig(**{**TINY, "checkpoint_every": 2})
    with pytest.raises(RuntimeError):
        train(pneumonia_slice, out, cfg, privacy=strategy(), progress=False, on_step=crash)
    train(pneumonia_slice, out, cfg, privacy=strategy(), progress=False, resume=True)
    ours, theirs = read_model_ledger(out), read_model_ledger(done)
    assert ours.events == theirs.events and ours.epsilon == theirs.epsilon
    assert ours.autoencoder["events"] == theirs.autoencoder["events"]
    assert ours.autoencoder["batch_size"] == theirs.autoencoder["batch_size"] is not None  # was lost on resume
    a, b = (load_file(str(p / "vae" / "diffusion_pytorch_model.safetensors")) for p in (out, done))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dp_autoencoder_trains_on_crops_when_asked(monkeypatch):
    """`autoencoder.crop` with DP: every Poisson batch reaches the encoder as crops (a per-example transform), and
    the strategy still counts its planned steps."""
    import numpy as np
    from diffusers import AutoencoderKL

    from privacy.dp import make_strategy
    from synth.autoencoder import train_vae
    from synth.autoencoder_config import AUTOENCODER_PRESETS, AutoencoderConfig

    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (16, 1, 16, 16), dtype=np.uint8))
    cfg = AutoencoderConfig(**{**AUTOENCODER_PRESETS["tiny"], "batch_size": 4, "max_steps": 3, "max_minutes": None,
                               "crop": 8})
    seen = []
    original = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: (seen.append(tuple(x.shape[1:])),
                                                                           original(self, x, *a, **k))[1])
    strategy = make_strategy(DPConfig(target_epsilon=8.0, accountant="rdp"), dataset_size=16)
    _, record = train_vae(images, cfg, seed=0, device=torch.device("cpu"), privacy=strategy)
    assert seen and set(seen) == {(1, 8, 8)}
    assert record["steps"] == 3 and sum(n for _, _, n in strategy.accountant.history) == 3
