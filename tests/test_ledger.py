"""Privacy ledger: Opacus' published ε vectors, JSON round trip, and a real DP training cross-checked with
Google's dp-accounting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from privacy.dp import DPConfig, make_strategy
from privacy.ledger import (
    DPSGDEvent,
    PrivacyLedger,
    build_ledger,
    epsilon_dp_accounting,
    epsilon_from_ledger,
    events_from_history,
    history_from_events,
    load_ledger,
)
from synth.errors import InputError
from synth.model import build_unet, preset


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _ledger(events, *, delta=1e-5, accountant="prv", **kw) -> PrivacyLedger:
    base = dict(max_grad_norm=1.0, noise_multiplicity=1, dataset_size=100_000, epsilon=0.0)
    return PrivacyLedger(events=tuple(events), delta=delta, accountant=accountant, **{**base, **kw})


# Opacus' own tests (opacus/tests/accountants_test.py): σ=1.5, q=0.04, δ=1e-5. Note the step counts: the RDP
# test runs int(90 / 0.04) = 2250 steps, the PRV test int(90 // 0.04) = 2249 (float floor division); the PRV
# value is for 2249 steps (2250 steps gives 6.77913…).
def test_reproduces_opacus_rdp_vector():
    ledger = _ledger([DPSGDEvent(noise_multiplier=1.5, sample_rate=0.04, steps=2250)], accountant="rdp")
    assert epsilon_from_ledger(ledger) == pytest.approx(7.32911117143, rel=1e-10)
    # Independent: dp-accounting's RDP at Opacus' orders (its RDP→DP conversion differs slightly).
    assert epsilon_dp_accounting(ledger) == pytest.approx(7.32911117143, rel=1e-4)


def test_reproduces_opacus_prv_vector():
    ledger = _ledger([DPSGDEvent(noise_multiplier=1.5, sample_rate=0.04, steps=2249)])
    assert epsilon_from_ledger(ledger) == pytest.approx(6.777395712150674, rel=1e-9)
    assert epsilon_dp_accounting(ledger, "pld") == pytest.approx(6.777395712150674, rel=0.01)
    assert epsilon_from_ledger(ledger, "rdp") > epsilon_from_ledger(ledger)  # RDP is the looser bound


def test_split_events_compose_like_one():
    one = _ledger([DPSGDEvent(noise_multiplier=1.5, sample_rate=0.04, steps=300)], accountant="rdp")
    two = _ledger([DPSGDEvent(noise_multiplier=1.5, sample_rate=0.04, steps=s) for s in (100, 200)], accountant="rdp")
    assert epsilon_from_ledger(two) == pytest.approx(epsilon_from_ledger(one), rel=1e-12)
    assert epsilon_dp_accounting(two) == pytest.approx(epsilon_dp_accounting(one), rel=1e-9)


def test_history_round_trip_and_event_validation():
    history = [(1.1, 0.01, 10), (0.9, 0.02, 3)]
    assert history_from_events(events_from_history(history)) == history
    with pytest.raises(InputError, match="steps 0"):
        DPSGDEvent(noise_multiplier=1.0, sample_rate=0.1, steps=0)
    with pytest.raises(InputError, match=r"sample_rate 1\.5"):
        DPSGDEvent(noise_multiplier=1.0, sample_rate=1.5, steps=1)
    with pytest.raises(InputError, match="noise_multiplier -1"):
        DPSGDEvent(noise_multiplier=-1.0, sample_rate=0.1, steps=1)


def test_json_round_trip(tmp_path):
    ledger = build_ledger(
        [(1.2, 0.0135, 74), (1.2, 0.0135, 10)],
        delta=1e-5,
        accountant="prv",
        max_grad_norm=1.0,
        noise_multiplicity=4,
        dataset_size=4708,
        target_epsilon=10.0,
        batch_size=64,
        grad_sample_mode="hooks",
    )
    again = PrivacyLedger.from_json(ledger.to_json())
    assert again == ledger
    assert again.steps == 84 and again.secure_rng is False and "torchcsprng" in again.secure_rng_reason
    path = tmp_path / "privacy_ledger.json"
    path.write_text(ledger.to_json())
    assert load_ledger(path) == ledger

    bad = json.loads(ledger.to_json())
    bad["events"][0]["steps"] = -3
    path.write_text(json.dumps(bad))
    with pytest.raises(InputError, match=r"privacy_ledger\.json: DPSGDEvent: steps -3"):
        load_ledger(path)
    bad = json.loads(ledger.to_json())
    del bad["delta"]
    with pytest.raises(InputError, match="malformed privacy ledger"):
        PrivacyLedger.from_dict(bad, source=path)
    with pytest.raises(InputError, match="not valid JSON"):
        PrivacyLedger.from_json("{", source=path)


# --------------------------------------------------------------------------------- a real DP training run


def _real_images(data_dir, n: int):
    """The first n PneumoniaMNIST training images in [-1, 1] with their labels."""
    with np.load(data_dir / "pneumoniamnist.npz") as npz:
        images = torch.from_numpy(npz["train_images"][:n].astype(np.float32) / 127.5 - 1).unsqueeze(1)
        labels = torch.from_numpy(npz["train_labels"][:n].reshape(-1).astype(np.int64))
    return TensorDataset(images, labels)


def _train(strategy, dataset, *, batch: int, epochs: int, k: int, seed: int = 0):
    """A minimal loop following the trainer's step contract (synth.training does the same)."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    unet = build_unet(preset("tiny")).train()
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-3)
    loader = DataLoader(dataset, batch_size=batch, generator=torch.Generator().manual_seed(seed))
    model, optimizer, loader = strategy.attach(unet, optimizer, loader, epochs=epochs)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    real_steps = 0
    for _ in range(epochs):
        for images, labels in loader:
            b = images.shape[0]
            if b:  # an empty Poisson batch still takes its (noise-only) step
                x, y = images.repeat_interleave(k, 0), labels.repeat_interleave(k)
                noise = torch.randn_like(x)
                t = torch.randint(0, 1000, (b * k,))
                pred = model(scheduler.add_noise(x, noise, t), t, class_labels=y).sample
                ((pred - noise) ** 2).mean(dim=(1, 2, 3)).mean().backward()
            strategy.after_backward(model, b)
            optimizer.step()
            real_steps += strategy.is_real_step(optimizer)
            optimizer.zero_grad()
    return real_steps


@pytest.mark.parametrize(
    ("accountant", "method"), [pytest.param("prv", "pld", id="prv-vs-pld"), pytest.param("rdp", "rdp", id="rdp")]
)
def test_real_dp_training_ledger_agrees_with_dp_accounting(data_dir, accountant, method):
    dataset = _real_images(data_dir, 64)
    config = DPConfig(target_epsilon=8.0, accountant=accountant, max_physical_batch_size=8)
    strategy = make_strategy(config, dataset_size=len(dataset), noise_multiplicity=2)
    real_steps = _train(strategy, dataset, batch=16, epochs=2, k=2)
    assert real_steps == 8  # 2 epochs × 64/16 logical batches, split into physical batches of <= 8

    ledger = PrivacyLedger.from_dict(json.loads(json.dumps(strategy.ledger())))
    assert ledger.steps == 8
    assert ledger.events == (DPSGDEvent(noise_multiplier=strategy.noise_multiplier, sample_rate=0.25, steps=8),)
    assert ledger.delta == 1e-3 and ledger.dataset_size == 64 and ledger.batch_size == 16
    assert ledger.noise_multiplicity == 2 and ledger.accountant == accountant
    assert ledger.sample_rate_source == "1/len(loader)" and ledger.opacus_version
    assert ledger.epsilon == pytest.approx(strategy.epsilon(), rel=1e-12)
    assert 7.9 < ledger.epsilon <= 8.0 + 1e-9  # calibrated to the target for the planned 8 steps

    independent = epsilon_dp_accounting(ledger, method)
    assert independent == pytest.approx(ledger.epsilon, rel=0.01)
    assert ledger.epsilon_check["epsilon"] == pytest.approx(independent, rel=1e-9)
    assert ledger.epsilon_check["method"] == method
