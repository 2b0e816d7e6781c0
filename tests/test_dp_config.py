"""One DP config (privacy.dp_config.DPConfig) behind the CLI, the release config and the trainer; one ingest
config behind `synthgate ingest` and `source:`; the release config's renamed sections."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from flows.release_config import DPSettings, LaunchSettings, ReleaseConfig, SourceSettings
from privacy.dp_config import DPConfig
from synth.data.ingest_config import IngestConfig
from synth.errors import ConfigError


def _release(tmp_path: Path, text: str) -> ReleaseConfig:
    path = tmp_path / "release.yaml"
    path.write_text(text)
    return ReleaseConfig.from_yaml(path)


def test_epsilon_and_delta_are_aliases_of_the_targets():
    assert DPConfig(epsilon=3.0, delta=1e-6) == DPConfig(target_epsilon=3.0, target_delta=1e-6)
    assert DPConfig.from_dict({"epsilon": 3}).target_epsilon == 3.0
    assert DPSettings(enabled=True, epsilon=3.0).config() == DPConfig(target_epsilon=3.0)


@pytest.mark.parametrize("key", ["epsilon", "target_epsilon"])
def test_release_dp_section_is_the_trainers_config(tmp_path: Path, key: str):
    cfg = _release(tmp_path, f"dp:\n  enabled: true\n  {key}: 3.5\n  accountant: rdp\n  delta: 1.0e-6\n")
    assert isinstance(cfg.dp, DPConfig)
    assert cfg.dp.config() == DPConfig(target_epsilon=3.5, target_delta=1e-6, accountant="rdp")


def test_release_dp_errors_are_one_line(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"release\.yaml: dp\.epsilon: target_epsilon 0 must be a finite number"):
        _release(tmp_path, "dp:\n  epsilon: 0\n")
    with pytest.raises(ConfigError, match=r"dp\.poisson_sampling: poisson_sampling False"):
        _release(tmp_path, "dp:\n  poisson_sampling: false\n")


def test_noise_multiplicity_lives_in_train(tmp_path: Path):
    with pytest.raises(ConfigError, match="noise_multiplicity 2 is a training setting"):
        DPConfig(target_epsilon=8.0, noise_multiplicity=2)
    with pytest.warns(FutureWarning, match=r"dp\.noise_multiplicity` is now `train\.noise_multiplicity"):
        cfg = _release(tmp_path, "train:\n  preset: tiny\ndp:\n  enabled: true\n  noise_multiplicity: 3\n")
    assert cfg.train.noise_multiplicity == 3 and cfg.train.preset == "tiny"
    assert "noise_multiplicity" not in cfg.dp.model_dump()
    with pytest.warns(FutureWarning):
        same = _release(tmp_path, "train:\n  noise_multiplicity: 2\ndp:\n  noise_multiplicity: 2\n")
    assert same.train.noise_multiplicity == 2
    with pytest.raises(ConfigError, match=r"differs from train\.noise_multiplicity 1"):
        _release(tmp_path, "train:\n  noise_multiplicity: 1\ndp:\n  noise_multiplicity: 2\n")


def test_training_section_is_now_launch(tmp_path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _release(tmp_path, "launch:\n  nproc: 2\n").launch == LaunchSettings(nproc=2)
    with pytest.warns(FutureWarning, match="`training:` is now `launch:`"):
        cfg = _release(tmp_path, "training:\n  nproc: 3\n  backend: gloo\n")
    assert cfg.launch == LaunchSettings(nproc=3, backend="gloo")
    with pytest.raises(ConfigError, match="launch:"):
        _release(tmp_path, "training:\n  nproc: 3\nlaunch:\n  nproc: 2\n")


def test_source_section_is_the_ingest_config_with_its_window(tmp_path: Path):
    cfg = _release(tmp_path, "source:\n  path: scans\n  csv: scans.csv\n  format: dicom\n  window: [40, 400]\n")
    assert isinstance(cfg.source, IngestConfig) and cfg.source.window == (40.0, 400.0)
    ingest_fields = set(IngestConfig.model_fields)
    assert set(SourceSettings.model_fields) - ingest_fields == {"min_per_class"}
    with pytest.raises(ConfigError, match=r"source\.window"):
        _release(tmp_path, "source:\n  window: [40]\n")


def test_the_examples_release_config_loads_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = ReleaseConfig.from_yaml(Path(__file__).parents[1] / "examples" / "release.yaml")
    assert cfg.launch.nproc == 1


def test_ledger_target_is_the_release_configs_epsilon(tmp_path: Path, pneumonia_slice: Path):
    """dp.epsilon in the YAML reaches the trainer's strategy and the ledger's ε target unchanged."""
    from flows.stages import train_stage

    (tmp_path / "work").mkdir()
    cfg = _release(tmp_path, f"workdir: {tmp_path / 'work'}\ndevice: cpu\n"
                             "train:\n  preset: tiny\n  batch_size: 16\n  max_steps: 2\n  noise_multiplicity: 2\n"
                             "dp:\n  enabled: true\n  epsilon: 7.5\n  accountant: rdp\n")
    model = train_stage(cfg, pneumonia_slice)
    ledger = json.loads((model / "privacy_ledger.json").read_text())
    assert ledger["target_epsilon"] == 7.5 and ledger["noise_multiplicity"] == 2 and ledger["dataset_size"] == 64
