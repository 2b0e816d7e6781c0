"""A DP run's planned steps fitted to its time cap before σ is calibrated (synth/step_fit.py): the rule, the real
probe, the fitted run's σ and weights, resume under the recorded fit, and the one-line error when nothing fits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flows.cli import run
from privacy.dp import calibrate_noise_multiplier, make_strategy
from privacy.dp_config import DPConfig
from privacy.ledger import PrivacyLedger
from synth.errors import ConfigError
from synth.step_fit import PROBE_MIN_STEPS, TIME_MARGIN, fitted_steps
from synth.train_config import TrainConfig
from synth.training import train

torch.set_num_threads(1)

EPS = 8.0
# 64 train images, batch 16; 12 planned steps, one minute of training.
FAST = {"preset": "tiny", "batch_size": 16, "max_steps": 12, "max_minutes": 1.0, "checkpoint_every": None}


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**FAST, **kw})


def strategy():
    return make_strategy(DPConfig(target_epsilon=EPS, accountant="rdp"), dataset_size=64)


def read(model: Path, name: str) -> dict:
    return json.loads((model / name).read_text())


def weights(model: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {sub: load_file(str(model / sub / "diffusion_pytorch_model.safetensors")) for sub in ("unet", "unet_ema")}


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return all(torch.equal(wa[s][k], wb[s][k]) for s in wa for k in wa[s])


def slow_machine(monkeypatch: pytest.MonkeyPatch, seconds_per_step: float) -> None:
    """Make the probe report `seconds_per_step` (the steps it ran were real; only their timing is replaced)."""
    import synth.training as training

    real = training.time_real_steps

    def timed(step, is_real, batches, **kw):
        steps, _ = real(step, is_real, batches, **kw)
        return steps, steps * seconds_per_step

    monkeypatch.setattr(training, "time_real_steps", timed)


def test_the_rule_plans_what_fits_the_margin_and_never_more_than_requested():
    assert fitted_steps(1600, seconds_per_step=3.0, budget_seconds=3480) == int(TIME_MARGIN * 3480 / 3.0)
    assert fitted_steps(1600, seconds_per_step=1.0, budget_seconds=3480) == 1600
    assert fitted_steps(1600, seconds_per_step=1.0, budget_seconds=-5) == 0
    with pytest.raises(ValueError, match="seconds_per_step"):
        fitted_steps(10, seconds_per_step=0.0, budget_seconds=60)


def test_the_probe_times_real_dp_steps_and_keeps_a_plan_that_fits(pneumonia_slice, tmp_path, caplog):
    with caplog.at_level("INFO", logger="synthgate.progress"):
        out = train(pneumonia_slice, tmp_path / "model", cfg(max_steps=6, max_minutes=20.0), privacy=strategy(),
                    progress=False)
    # Only the real run reports progress: the probe's steps are not announced as a training run of their own.
    assert [r.getMessage() for r in caplog.records if "started" in r.getMessage()] == ["train (DP): started (6 steps)"]
    card, ledger = read(out, "model_card.json"), read(out, "privacy_ledger.json")
    fit = card["step_fit"]
    assert fit["requested_steps"] == fit["steps"] == card["planned_steps"] == card["steps"] == 6
    assert fit["probe_steps"] >= PROBE_MIN_STEPS and fit["seconds_per_step"] > 0
    assert 0 < fit["budget_seconds"] < 20 * 60 and fit["margin"] == TIME_MARGIN
    assert ledger["step_fit"] == fit
    assert PrivacyLedger.from_dict(ledger).step_fit == fit  # the ledger still reads back
    # The probe's own strategy was thrown away: only the run's 6 steps are accounted.
    assert ledger["steps"] == 6


def test_the_probe_copy_has_the_settings_and_none_of_the_spend():
    release = make_strategy(DPConfig(target_epsilon=EPS, max_grad_norm=0.5, max_physical_batch_size=8), dataset_size=64,
                            noise_multiplicity=2)
    probe = release.probe_copy()
    assert probe is not release and not probe.accountant.history
    assert (probe.config.max_grad_norm, probe.config.max_physical_batch_size, probe.noise_multiplicity,
            probe.target_delta, probe.dataset_size) == (0.5, 8, 2, release.target_delta, 64)
    assert probe.config.accountant == "rdp"  # its σ only has to exist: calibrate it in milliseconds


def test_without_dp_or_with_the_fit_off_nothing_is_probed(pneumonia_slice, tmp_path, monkeypatch):
    def no_probe(*_, **__):
        raise AssertionError("probed")

    import synth.training as training

    monkeypatch.setattr(training, "time_real_steps", no_probe)
    plain = train(pneumonia_slice, tmp_path / "plain", cfg(max_steps=2), progress=False)
    off = train(pneumonia_slice, tmp_path / "off", cfg(max_steps=2, fit_dp_steps=False), privacy=strategy(),
                progress=False)
    assert read(plain, "model_card.json")["step_fit"] is None and read(off, "model_card.json")["step_fit"] is None


@pytest.mark.slow
def test_a_slow_machine_plans_fewer_steps_calibrates_for_them_and_resumes_under_the_recorded_fit(
    pneumonia_slice, tmp_path, monkeypatch, capsys
):
    # A probe saying ~57 s per step leaves room for 4 of the 12 requested steps in a five-minute budget (4.5 less
    # the probe's and setup's real seconds); the real steps take well under a second, so the cap never bites.
    slow_machine(monkeypatch, 300 * TIME_MARGIN / 4.5)
    fitted = train(pneumonia_slice, tmp_path / "fitted", cfg(max_minutes=5.0), privacy=strategy(), progress=False)
    err = capsys.readouterr().err
    card, ledger = read(fitted, "model_card.json"), read(fitted, "privacy_ledger.json")
    assert card["step_fit"]["requested_steps"] == 12 and card["step_fit"]["steps"] == 4
    assert (card["planned_steps"], card["steps"], card["stopped_by"]) == (4, 4, "max_steps")
    assert "4 of the 12 planned fit" in err and "train.max_steps 4" in err
    # σ is calibrated for the 4 steps that run, so the whole ε is spent (the cap cut nothing).
    (event,) = ledger["events"]
    assert event["steps"] == 4
    assert event["noise_multiplier"] == calibrate_noise_multiplier(
        target_epsilon=EPS, target_delta=ledger["delta"], sample_rate=event["sample_rate"], steps=4, accountant="rdp")
    assert EPS - 0.05 <= ledger["epsilon"] <= EPS + 1e-6

    # What the steward is told to pin reproduces the weights on any machine.
    pinned = train(pneumonia_slice, tmp_path / "pinned", cfg(max_steps=4, max_minutes=5.0, fit_dp_steps=False),
                   privacy=strategy(), progress=False)
    assert same_weights(fitted, pinned)

    # Interrupted after 2 steps, then resumed on a machine whose probe would fit all 12: the recorded fit holds.
    out = tmp_path / "resumed"

    def stop_at_2(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(pneumonia_slice, out, cfg(max_minutes=5.0), privacy=strategy(), progress=False, on_step=stop_at_2)
    slow_machine(monkeypatch, 1e-3)
    train(pneumonia_slice, out, cfg(max_minutes=5.0), privacy=strategy(), progress=False, resume=True)
    assert read(out, "model_card.json")["planned_steps"] == 4
    assert same_weights(out, fitted)


def test_a_cap_with_no_time_for_one_step_is_a_one_line_error(pneumonia_slice, tmp_path, capsys):
    out = tmp_path / "model"
    with pytest.raises(ConfigError, match=r"max_minutes 1e-09 leaves no time for a DP step on this machine"):
        train(pneumonia_slice, out, cfg(max_minutes=1e-9), privacy=strategy(), progress=False)
    assert not out.exists()
    code = run(["train", str(pneumonia_slice), "--out", str(out), "--preset", "tiny", "--max-steps", "6",
                "--max-minutes", "1e-9", "--dp", "--epsilon", "8", "--accountant", "rdp", "--no-progress",
                "--device", "cpu"])
    err = capsys.readouterr().err
    assert code != 0 and "leaves no time for a DP step" in err and "Traceback" not in err
    assert not out.exists()
