"""Guidance selection on the real validation split: the choice rule, the artifact, and that the test split is never
read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reports.classifier import ClassifierConfig
from reports.guidance import GuidanceSelectionConfig, choose, read_guidance, select_guidance
from synth.data.canonical import Dataset, load_dataset
from synth.errors import InputError
from tests.model_fixtures import make_model_dir


def _s(ba: float, worst: float) -> dict:
    return {"balanced_accuracy": ba, "worst_class_sensitivity": worst}


def test_choose_prefers_balanced_accuracy_then_the_worst_class_then_less_guidance() -> None:
    assert choose({1.0: _s(0.80, 0.70), 2.0: _s(0.86, 0.80), 3.0: _s(0.84, 0.82)}) == 2.0
    # Within the tie margin the worst class decides ...
    assert choose({1.0: _s(0.860, 0.60), 2.0: _s(0.862, 0.80)}) == 2.0
    assert choose({1.0: _s(0.862, 0.60), 2.0: _s(0.860, 0.80)}) == 2.0
    # ... and when that ties too, the smaller scale (more diverse images) wins.
    assert choose({1.5: _s(0.85, 0.80), 1.0: _s(0.852, 0.801), 3.0: _s(0.70, 0.9)}) == 1.0


def test_config_rejects_bad_candidates() -> None:
    with pytest.raises(ValueError, match="guidance scales must be in"):
        GuidanceSelectionConfig(candidates=(1.0, -2.0))
    assert GuidanceSelectionConfig(candidates=(3.0, 1.0, 3.0)).candidates == (1.0, 3.0)


def test_selection_scores_every_candidate_on_val_never_test(pneumonia_slice: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    model = make_model_dir(tmp_path / "model", condition_counts=[32, 32])
    read: list[str] = []
    split = Dataset.split

    def spy(self: Dataset, name: str):
        read.append(name)
        return split(self, name)

    monkeypatch.setattr(Dataset, "split", spy)
    cfg = GuidanceSelectionConfig(candidates=(1.0, 2.0), extend=(), per_class=10,
                                  classifier=ClassifierConfig(epochs=1, width=4, batch_size=16, threads=1,
                                                               min_steps=None))
    out = select_guidance(pneumonia_slice, model, tmp_path / "guidance", sampler="ddim-2", config=cfg,
                          device="cpu")
    header = read_guidance(out)
    assert "test" not in read and "val" in read
    scores = {c["guidance_scale"]: c for c in header["candidates"]}
    assert set(scores) == {1.0, 2.0}
    assert header["guidance_scale"] == choose(scores)
    assert header["inputs"]["dataset"] == load_dataset(pneumonia_slice).content_hash
    assert header["real_val_images"] == 32
    for c in scores.values():
        assert 0.0 <= c["balanced_accuracy"] <= 1.0 and c["worst_class"] in ("normal", "pneumonia")
    with pytest.raises(InputError, match="already exists"):
        select_guidance(pneumonia_slice, model, out, sampler="ddim-2", config=cfg, device="cpu")


def test_release_config_takes_auto_or_a_scale_in_range() -> None:
    from pydantic import ValidationError

    from flows.release_config import ReleaseConfig

    assert ReleaseConfig().generate.guidance_scale == "auto"
    assert ReleaseConfig.model_validate({"generate": {"guidance_scale": 2}}).generate.guidance_scale == 2.0
    for bad in (-1, 60, "sometimes"):
        with pytest.raises(ValidationError, match="guidance_scale"):
            ReleaseConfig.model_validate({"generate": {"guidance_scale": bad}})
    with pytest.raises(ValidationError, match="guidance scales must be in"):
        ReleaseConfig.model_validate({"generate": {"guidance_selection": {"candidates": [1, 99]}}})


def test_larger_scales_are_tried_only_while_the_largest_wins(pneumonia_slice: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose validation score still rises at the grid's edge gets the next `extend` scale; one whose best
    scale is inside the grid costs no extra candidate."""
    import reports.guidance as guidance

    torch.set_num_threads(1)
    model = make_model_dir(tmp_path / "model", condition_counts=[32, 32])
    cfg = GuidanceSelectionConfig(candidates=(1.0, 2.0), extend=(3.0, 5.0), per_class=10)
    assert cfg.extension({1.0: _s(0.6, 0.5), 2.0: _s(0.7, 0.6)}) == 3.0
    assert cfg.extension({1.0: _s(0.7, 0.6), 2.0: _s(0.6, 0.5)}) is None
    assert cfg.extension({1.0: _s(0.6, 0.5), 2.0: _s(0.7, 0.6), 3.0: _s(0.8, 0.7), 5.0: _s(0.9, 0.8)}) is None

    def run(rising: bool, out: Path) -> dict:
        calls: list[int] = []

        def fake(images, labels, *_args):  # the score rises (or falls) with each candidate tried, in order
            calls.append(len(images))
            ba = 0.5 + 0.1 * len(calls) if rising else 0.9 - 0.1 * len(calls)
            return {**_s(ba, ba - 0.1), "worst_class": "normal", "auroc": ba}

        monkeypatch.setattr(guidance, "_score", fake)
        return read_guidance(select_guidance(pneumonia_slice, model, out, sampler="ddim-2", config=cfg,
                                             device="cpu"))

    rising = run(True, tmp_path / "rising")
    assert [c["guidance_scale"] for c in rising["candidates"]] == [1.0, 2.0, 3.0, 5.0]
    assert rising["guidance_scale"] == 5.0 and rising["config"]["extend"] == [3.0, 5.0]
    falling = run(False, tmp_path / "falling")
    assert [c["guidance_scale"] for c in falling["candidates"]] == [1.0, 2.0]
    assert falling["guidance_scale"] == 1.0
