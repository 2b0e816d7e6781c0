"""Long CLI commands show progress: a bar when stderr is a terminal, throttled lines on stderr when it is not,
nothing with --no-progress (flows/cli_progress.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from flows import cli_progress
from flows.cli import run
from synth.progress import LOGGER, phase
from tests.model_fixtures import make_model_dir

torch.set_num_threads(1)

TRAIN = ["--preset", "tiny", "--batch-size", "16", "--max-steps", "2"]
BAR = "%|"  # tqdm's bar: "50%|█████     | 1/2 [...]"


@pytest.fixture(autouse=True)
def no_lines_routed_yet(monkeypatch):
    """As in a fresh process: no handler left on the progress logger by an earlier test (a release flow's
    `log_to_stderr` stays for the process)."""
    progress_log = logging.getLogger(LOGGER)
    monkeypatch.setattr(progress_log, "handlers", [])
    monkeypatch.setattr(progress_log, "level", logging.NOTSET)


@pytest.fixture
def terminal(monkeypatch):
    monkeypatch.setattr(cli_progress, "stderr_is_terminal", lambda: True)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("cliprog") / "model", condition_counts=[5, 5])


def _generate(model: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", str(model), "--out", str(out), "--n", "4", "--sampler", "ddim-2", "--batch-size", "2",
            "--device", "cpu", *extra]


def test_train_without_a_terminal_prints_throttled_lines_not_a_bar(pneumonia_slice, tmp_path, capsys):
    assert run(["train", str(pneumonia_slice), "--out", str(tmp_path / "m"), *TRAIN]) == 0
    err = capsys.readouterr().err
    assert "train: started (2 steps)" in err and "train: done, 2 steps in " in err
    assert BAR not in err


def test_train_on_a_terminal_draws_the_bar_only(pneumonia_slice, tmp_path, capsys, terminal):
    assert run(["train", str(pneumonia_slice), "--out", str(tmp_path / "m"), *TRAIN]) == 0
    err = capsys.readouterr().err
    assert BAR in err and "2/2" in err
    assert "train: started" not in err


def test_generate_lines_bar_or_nothing(model, tmp_path, capsys, monkeypatch):
    assert run(_generate(model, tmp_path / "a")) == 0
    err = capsys.readouterr().err
    assert "started (4 images)" in err and "done, 4 images" in err and BAR not in err

    assert run(_generate(model, tmp_path / "b", "--no-progress")) == 0
    err = capsys.readouterr().err
    assert "images" not in err and BAR not in err

    monkeypatch.setattr(cli_progress, "stderr_is_terminal", lambda: True)
    assert run(_generate(model, tmp_path / "c")) == 0
    err = capsys.readouterr().err
    assert BAR in err and "4/4" in err and "started (4 images)" not in err


class FakeStatus:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def update(self, text: str) -> None:
        self.texts.append(text)


def test_a_spinner_shows_the_lines_on_a_terminal_and_is_let_go_after(terminal, capsys):
    status = FakeStatus()
    level = logging.getLogger(LOGGER).level
    with cli_progress.cli_progress(status=status) as bar:
        assert bar is True
        phase("privacy audit", "membership inference: started")
    phase("privacy audit", "after the command")
    assert status.texts == ["privacy audit: membership inference: started"]
    assert capsys.readouterr().err == ""
    assert logging.getLogger(LOGGER).level == level


def test_without_a_terminal_lines_go_to_stderr_only_inside_the_command(capsys):
    with cli_progress.cli_progress(status=FakeStatus()) as bar:
        assert bar is False
        phase("utility audit", "TRTS: scoring")
    phase("utility audit", "after the command")
    err = capsys.readouterr().err
    assert "utility audit: TRTS: scoring" in err and "after the command" not in err
