"""Guidance selection on the real validation split: the choice rule, the artifact, and that the test split is never
read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reports.classifier import ClassifierConfig
from reports.guidance import GuidanceSelectionConfig, choose, choose_weights, read_guidance, select_guidance
from synth.data.canonical import Dataset, load_dataset
from synth.errors import InputError
from synth.pipeline import read_model_card
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


def test_a_trts_floor_chooses_among_the_scales_that_reach_it() -> None:
    def t(ba: float, trts: float) -> dict:
        return {**_s(ba, 0.8), "trts_balanced_accuracy": trts}

    scores = {1.0: t(0.86, 0.55), 2.0: t(0.84, 0.72), 3.0: t(0.80, 0.90)}
    assert choose(scores) == 1.0  # TSTR alone
    assert choose(scores, floor=0.7) == 2.0  # the best TSTR of those the real classifier recognises
    assert choose(scores, floor=0.95) == 3.0  # none reaches it: the highest TRTS
    assert choose(scores, floor=0.0) == choose(scores)
    # With a ratio floor too, a candidate must pass both; when none does, the least-failing one (min of the two
    # margins) wins, not simply the highest TRTS.
    both = {1.0: {**t(0.86, 0.55), "tstr_trtr_ratio": 0.95}, 3.0: {**t(0.50, 0.90), "tstr_trtr_ratio": 0.55},
            5.0: {**t(0.45, 0.95), "tstr_trtr_ratio": 0.50}, 2.0: {**t(0.80, 0.66), "tstr_trtr_ratio": 0.88}}
    assert choose(both, floor=0.7, ratio_floor=0.85) == 2.0  # margins 0.79 / 0.65 / 0.59 / 0.94
    assert choose(both, floor=0.7) == 3.0  # without the ratio floor: 3 and 5 pass on TRTS, 3 has the better TSTR
    assert choose({**both, 2.5: {**t(0.78, 0.72), "tstr_trtr_ratio": 0.86}}, floor=0.7, ratio_floor=0.85) == 2.5
    weights = {"ema@400": t(0.90, 0.6), "ema": t(0.85, 0.75)}
    assert choose_weights(weights, {"ema@400": 400, "ema": 800}) == "ema@400"
    assert choose_weights(weights, {"ema@400": 400, "ema": 800}, floor=0.7) == "ema"
    # While the largest scale is the choice (here: the only one near the floor), a larger one is tried.
    cfg = GuidanceSelectionConfig(extend=(5.0,), trts_floor=0.95)
    assert cfg.extension(scores) == 5.0 and GuidanceSelectionConfig(extend=(5.0,)).extension(scores) is None


def test_a_release_aims_the_selection_at_its_policy_trts_floor() -> None:
    from flows.policy import Policy
    from flows.release_config import ReleaseConfig
    from flows.stage_generator import selection_config

    assert selection_config(ReleaseConfig()).trts_floor == Policy().min_trts_balanced_accuracy == 0.7
    assert selection_config(ReleaseConfig()).ratio_floor == Policy().min_tstr_trtr_balanced_accuracy_ratio == 0.85
    assert selection_config(ReleaseConfig(policy={"min_trts_balanced_accuracy": 0.5})).trts_floor == 0.5
    assert selection_config(ReleaseConfig(policy={"min_trts_balanced_accuracy": None})).trts_floor is None
    own = ReleaseConfig(generate={"guidance_selection": {"trts_floor": 0.9}})
    assert selection_config(own).trts_floor == 0.9


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


def test_with_a_trts_floor_a_real_trained_classifier_scores_each_candidate(pneumonia_slice: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The TRTS judge trains on the real train split (never test) and scores every candidate's images; the choice
    follows the floor rule, and the header records the floor."""
    import reports.guidance as guidance

    torch.set_num_threads(1)
    model = make_model_dir(tmp_path / "model", condition_counts=[32, 32])
    read: list[str] = []
    split = Dataset.split
    monkeypatch.setattr(Dataset, "split", lambda self, name: (read.append(name), split(self, name))[1])
    judged: list[int] = []
    real_classifier = guidance._real_classifier

    def spy(*args, **kwargs):
        clf = real_classifier(*args, **kwargs)
        predict = clf.predict_proba
        clf.predict_proba = lambda x: (judged.append(len(x)), predict(x))[1]
        return clf

    monkeypatch.setattr(guidance, "_real_classifier", spy)
    tiny = ClassifierConfig(epochs=1, width=4, batch_size=16, threads=1, min_steps=None)
    cfg = GuidanceSelectionConfig(candidates=(1.0, 2.0), extend=(), per_class=10, classifier=tiny,
                                  real_classifier=tiny, trts_floor=1.0)
    header = read_guidance(select_guidance(pneumonia_slice, model, tmp_path / "g", sampler="ddim-2", config=cfg,
                                           device="cpu"))
    assert "train" in read and "test" not in read
    assert judged == [32, 20, 20]  # real val once (TRTR on val, for the ratios), then each candidate's 2 × 10 images
    scores = {c["guidance_scale"]: c for c in header["candidates"]}
    assert all(0.0 <= c["trts_balanced_accuracy"] <= 1.0 for c in scores.values())
    trtr = header["trtr_val_balanced_accuracy"]
    assert all(c["tstr_trtr_ratio"] == pytest.approx(c["balanced_accuracy"] / trtr) for c in scores.values())
    assert header["trts_floor"] == 1.0 and "TRTS floor" in header["objective"]
    assert header["guidance_scale"] == choose(scores, floor=1.0)


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


def test_kept_snapshots_are_compared_first_and_the_grid_runs_on_the_winner(pneumonia_slice: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """With EMA snapshots each weights is scored once at `snapshot_scale`; the scale grid then runs on the best one
    only, that is what generation gets, and near-ties go to the later step."""
    import copy

    import reports.guidance as guidance
    import synth.generate
    from reports.guidance import choose_weights
    from synth.model import build_unet, preset

    torch.set_num_threads(1)
    base = build_unet(preset("tiny", num_conditions=2))
    folders = {}
    for step in (2, 4):
        snap = copy.deepcopy(base)
        with torch.no_grad():
            for p in snap.parameters():
                p.add_(0.001 * step)
        snap.save_pretrained(tmp_path / f"snap{step}")
        folders[step] = tmp_path / f"snap{step}"
    plain = make_model_dir(tmp_path / "model", condition_counts=[32, 32], unet=base)
    assert "snapshots" not in read_model_card(plain)["weights"]
    model = _with_snapshots(plain, tmp_path / "model-snaps", folders)

    val_score = {"ema@2": 0.70, "ema@4": 0.80, "ema": 0.805}  # ema@4 and the final ema tie: the later step wins
    generated: list[tuple[str, float]] = []
    real_generate = synth.generate.generate

    def spy_generate(*args, weights: str = "ema", guidance_scale: float | None = None, **kw):
        generated.append((weights, guidance_scale))
        return real_generate(*args, weights=weights, guidance_scale=guidance_scale, **kw)

    def fake(images, labels, *_args):
        w, g = generated[-1]
        ba = val_score[w] + (0.05 if g == 3.0 else 0.0)
        return {**_s(ba, ba - 0.1), "worst_class": "normal", "auroc": ba}

    monkeypatch.setattr(synth.generate, "generate", spy_generate)
    monkeypatch.setattr(guidance, "_score", fake)
    cfg = GuidanceSelectionConfig(candidates=(1.0, 2.0, 3.0), extend=(), per_class=10, snapshot_scale=2.0)
    header = read_guidance(select_guidance(pneumonia_slice, model, tmp_path / "g", sampler="ddim-2", config=cfg,
                                           device="cpu"))
    assert generated == [("ema@2", 2.0), ("ema@4", 2.0), ("ema", 2.0), ("ema", 1.0), ("ema", 3.0)]
    assert header["weights"] == "ema" and header["weights_step"] == 6 and header["guidance_scale"] == 3.0
    assert [(c["weights"], c["step"]) for c in header["weights_candidates"]] == [("ema@2", 2), ("ema@4", 4),
                                                                                ("ema", 6)]
    assert choose_weights({"ema@4": _s(0.803, 0.7), "ema": _s(0.80, 0.7)}, {"ema@4": 4, "ema": 6}) == "ema"
    assert choose_weights({"ema@4": _s(0.85, 0.7), "ema": _s(0.80, 0.7)}, {"ema@4": 4, "ema": 6}) == "ema@4"

    val_score["ema@2"] = 0.95  # now the early snapshot wins, and the grid runs on it
    generated.clear()
    header = read_guidance(select_guidance(pneumonia_slice, model, tmp_path / "g2", sampler="ddim-2", config=cfg,
                                           device="cpu"))
    assert header["weights"] == "ema@2" and header["weights_step"] == 2
    assert generated[3:] == [("ema@2", 1.0), ("ema@2", 3.0)]
    generated.clear()  # pinned weights: only the scale is chosen
    header = read_guidance(select_guidance(pneumonia_slice, model, tmp_path / "g3", sampler="ddim-2", config=cfg,
                                           device="cpu", weights=["ema@4"]))
    assert [w for w, _ in generated] == ["ema@4"] * 3 and header["weights_candidates"] == []


def _with_snapshots(model: Path, out: Path, folders: dict) -> Path:
    """`model` rewritten by the trainer's writer with `folders` as its kept EMA snapshots and 6 training steps."""
    from diffusers import DDPMScheduler, UNet2DModel

    from synth.conditioning import ConditionSpace
    from synth.model import preset
    from synth.model_dir import write_model_dir

    unet = UNet2DModel.from_pretrained(model / "unet", low_cpu_mem_usage=False)
    ema = UNet2DModel.from_pretrained(model / "unet_ema", low_cpu_mem_usage=False)
    cfg = preset("tiny", num_conditions=2)
    return write_model_dir(out, unet=unet, ema_unet=ema, scheduler=DDPMScheduler(num_train_timesteps=1000),
                           model_config=cfg, train_config={"test_fixture": True},
                           space=ConditionSpace(class_names=("normal", "pneumonia")), dataset_hash="0" * 64,
                           image={"height": 28, "width": 28, "channels": 1}, condition_counts=[32, 32],
                           snapshots=folders, extra={"steps": 6})


def test_the_chosen_weights_reach_generation_and_the_membership_attack(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from flows.release_config import ReleaseConfig
    from flows.stage_audits import _privacy_audit_config, attacking_generation_weights
    from flows.stage_generator import generate_stage, guidance_stage
    from synth.errors import ConfigError

    chosen = ReleaseConfig.model_validate({"generate": {"guidance_scale": 2.0, "weights": "ema@400"}})
    assert attacking_generation_weights(_privacy_audit_config(chosen), chosen).membership.weights == "ema@400"
    default = ReleaseConfig.model_validate({"generate": {"guidance_scale": 2.0}})
    assert default.generate.weights == "auto"
    with pytest.raises(ConfigError, match=r"generate\.weights is 'auto'"):
        generate_stage(default, tmp_path / "model")
    fixed = guidance_stage(default, tmp_path / "dataset", tmp_path / "model")  # a given scale: final EMA weights
    assert fixed.generate.weights == "ema"
    assert attacking_generation_weights(_privacy_audit_config(fixed), fixed).membership.weights == "ema"
    for bad in ("best", "ema@0", "ema@"):
        with pytest.raises(ValidationError, match="weights"):
            ReleaseConfig.model_validate({"generate": {"weights": bad}})
