"""`synthgate train` through `flows.cli.run`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from flows.cli import run
from synth.artifacts import read_header

torch.set_num_threads(1)

FAST = ["--preset", "tiny", "--batch-size", "16", "--max-steps", "2", "--no-progress"]


def card(model: Path) -> dict:
    return read_header(model, "model_card.json", kind="model")


def test_train_writes_a_model(pneumonia_slice: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "model"
    assert run(["train", str(pneumonia_slice), "--out", str(out), *FAST, "--seed", "3"]) == 0
    header = card(out)
    assert header["steps"] == 2 and header["seeds"]["seed"] == 3
    assert header["config"]["train"]["preset"] == "tiny" and header["config"]["train"]["batch_size"] == 16
    assert "wrote" in capsys.readouterr().out


def test_yaml_config_overrides_the_preset_and_flags_override_the_yaml(pneumonia_slice: Path, tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("preset: tiny\nbatch_size: 8\nmax_steps: 5\nlr: 0.001\ncfg_dropout: 0.2\n")
    out = tmp_path / "model"
    assert run(["train", str(pneumonia_slice), "--out", str(out), "--config", str(config), "--max-steps", "1",
                "--no-progress"]) == 0
    train_cfg = card(out)["config"]["train"]
    assert (train_cfg["batch_size"], train_cfg["lr"], train_cfg["cfg_dropout"]) == (8, 0.001, 0.2)
    assert card(out)["steps"] == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dp", "--epsilon", "0"], "--epsilon 0.0 must be a finite number > 0"),
        (["--dp", "--epsilon", "-1"], "must be a finite number > 0"),
        (["--dp"], "--dp needs --epsilon"),
        (["--epsilon", "8"], "--epsilon only apply with --dp"),
        (["--dp", "--epsilon", "8", "--delta", "2"], "--delta 2.0 must be in (0, 1)"),
        (["--device", "tpu"], "device 'tpu'"),
        (["--preset", "huge"], "preset"),
        (["--batch-size", "0"], "batch_size"),
        (["--attribute", "age"], "no attribute column 'age'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    pneumonia_slice: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    out = tmp_path / "model"
    assert run(["train", str(pneumonia_slice), "--out", str(out), *FAST, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_existing_output_and_non_datasets_exit_2(
    pneumonia_slice: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "model").mkdir()
    assert run(["train", str(pneumonia_slice), "--out", str(tmp_path / "model"), *FAST]) == 2
    assert "already exists" in capsys.readouterr().err
    assert run(["train", str(tmp_path), "--out", str(tmp_path / "m2"), *FAST]) == 2
    assert "not a synthgate artifact" in capsys.readouterr().err
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("learning_rate: 0.1\n")
    assert run(["train", str(pneumonia_slice), "--out", str(tmp_path / "m3"), "--config", str(bad_yaml)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "learning_rate" in err


def test_interrupted_run_resumes_from_the_cli(pneumonia_slice: Path, tmp_path: Path, monkeypatch) -> None:
    import synth.training as training

    out = tmp_path / "model"
    real_train = training.train

    def interrupted(*args, **kwargs):
        def stop(step: int, loss: float) -> None:
            if step == 1:
                raise KeyboardInterrupt

        return real_train(*args, **kwargs, on_step=stop)

    monkeypatch.setattr(training, "train", interrupted)
    assert run(["train", str(pneumonia_slice), "--out", str(out), *FAST]) == 130
    assert (tmp_path / "model.ckpt" / "checkpoint.pt").is_file() and not out.exists()
    monkeypatch.setattr(training, "train", real_train)
    assert run(["train", str(pneumonia_slice), "--out", str(out), *FAST]) == 2  # must say --resume
    assert run(["train", str(pneumonia_slice), "--out", str(out), *FAST, "--resume"]) == 0
    assert card(out)["resumed_from_step"] == 1 and card(out)["steps"] == 2
    assert not (tmp_path / "model.ckpt").exists()


@pytest.mark.skipif(importlib.util.find_spec("privacy.dp") is None, reason="privacy.dp not present")
def test_dp_training_from_the_cli(pneumonia_slice: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    args = ["--dp", "--epsilon", "10", "--noise-multiplicity", "2", "--max-grad-norm", "0.5", "--accountant", "rdp"]
    assert run(["train", str(pneumonia_slice), "--out", str(out), *FAST, *args]) == 0
    privacy = card(out)["privacy"]
    assert privacy["noise_multiplicity"] == 2 and privacy["max_grad_norm"] == 0.5 and privacy["accountant"] == "rdp"
    assert 0 < privacy["epsilon"] <= 10 + 1e-6 and privacy["delta"] < 1 / 64
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    assert ledger["noise_multiplicity"] == 2 and ledger["steps"] == 2
    assert ledger["target_epsilon"] == 10.0  # the --epsilon given, through the one DPConfig
