"""Throttled stage progress (synth.progress): log lines by time and by percent, and the stages that emit them."""

from __future__ import annotations

import logging

import pytest

from synth import progress as progress_mod
from synth.progress import LOGGER, Progress


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    return lambda: [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_lines_every_n_percent_and_at_start_and_end(lines):
    with Progress("generate ddim", total=100, unit="image", bar=False, every_s=float("inf"), every_pct=25) as p:
        for _ in range(100):
            p.update(1, loss="0.1")
    got = lines()
    assert got[0] == "generate ddim: started (100 images)"
    assert [m.split(",")[0] for m in got[1:-1]] == [f"generate ddim: {n}/100 images ({n}%)" for n in (25, 50, 75, 100)]
    assert "loss 0.1" in got[1] and got[-1].startswith("generate ddim: done, 100 images in ")


def test_lines_at_most_every_s_seconds(lines, monkeypatch):
    clock = {"t": 1000.0}
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock["t"])
    p = Progress("train", total=None, unit="step", bar=False, every_s=15.0)
    for _ in range(60):  # one step per second: a line at 15, 30, 45, 60 s
        clock["t"] += 1.0
        p.update(1)
    p.close()
    got = lines()
    assert got[0] == "train: started (steps until a limit is reached)"
    assert [m.split(",")[0] for m in got[1:-1]] == [f"train: {n} steps" for n in (15, 30, 45, 60)]
    assert "1 steps/s" in got[1] and got[-1] == "train: done, 60 steps in 1 min 00 s"


def test_time_left_and_resume(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock["t"])
    p = Progress("train", total=400, unit="step", bar=False, initial=100)
    clock["t"] = 100.0
    p.update(100)  # 100 steps in 100 s; 200 left
    assert p.line() == "train: 200/400 steps (50%), 1 steps/s, ~3 min 20 s left"


def test_training_logs_progress_without_a_bar(lines, pneumonia_slice, tmp_path):
    from synth.training import train
    from tests.test_training import cfg

    train(pneumonia_slice, tmp_path / "model", cfg(max_steps=4), progress=False)
    got = lines()
    assert got[0] == "train: started (4 steps)" and got[-1].startswith("train: done, 4 steps in ")


def test_generation_logs_progress(lines, tmp_path):
    from synth.generate import generate
    from synth.sampling import SamplerConfig
    from tests.model_fixtures import make_model_dir

    model = make_model_dir(tmp_path / "model", condition_counts=[5, 5])
    generate(model, tmp_path / "syn", n=4, sampler=SamplerConfig(name="ddim", steps=2), progress=False,
             device="cpu", batch_size=2)
    got = lines()
    assert got[0].startswith("generate ") and got[0].endswith("started (4 images)")
    assert any("4/4 images (100%)" in m for m in got) and "done, 4 images" in got[-1]
