"""The canary audit of a DP training run (privacy.dp_audit): an honest run stays within its claim, a run whose noise
was switched off (while the ledger still claims ε) is caught."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from privacy.dp import DPStrategy, make_strategy, resolve_delta
from privacy.dp_audit import read_dp_audit, run_dp_audit
from privacy.dp_audit_config import DPAuditConfig
from privacy.dp_config import DPConfig
from synth.errors import InputError
from synth.train_config import TrainConfig

# Small enough for the suite: every included canary is sampled ~10 times (q = 32/64).
TRAIN = TrainConfig(preset="tiny", batch_size=32, max_steps=20, max_minutes=None, checkpoint_every=None, lr=2e-3)
AUDIT = DPAuditConfig(canaries=200, epsilon=1.0)
DP = DPConfig(epsilon=8.0, delta=1e-6)  # δ well below 1/N: the audit bound pays 2·m·δ


def _add_no_noise(optimizer) -> None:
    # Opacus' DPOptimizer.add_noise without the noise: what a bug in the noise step would do.
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    for p in optimizer.params:
        _check_processed_flag(p.summed_grad)
        p.grad = p.summed_grad.view_as(p).clone()
        _mark_as_processed(p.summed_grad)


class NoiseOff(DPStrategy):
    """A broken DP-SGD: clipping, sampling and accounting as usual (the ledger records σ and claims ε), but the
    noise is never added to the clipped gradients."""

    def attach(self, *args, **kwargs):
        model, optimizer, loader = super().attach(*args, **kwargs)
        optimizer.add_noise = types.MethodType(_add_no_noise, optimizer)
        return model, optimizer, loader


def noise_off(config: DPConfig, *, dataset_size: int, noise_multiplicity: int) -> NoiseOff:
    return NoiseOff(config, dataset_size=dataset_size, target_delta=resolve_delta(config, dataset_size=dataset_size),
                    noise_multiplicity=noise_multiplicity)


@pytest.fixture(scope="module")
def audits(pneumonia_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("dp-audit")
    return {
        "honest": run_dp_audit(pneumonia_slice, base / "honest", train_config=TRAIN, dp_config=DP, config=AUDIT,
                               claimed={"target_epsilon": 8.0}),
        "broken": run_dp_audit(pneumonia_slice, base / "broken", train_config=TRAIN, dp_config=DP, config=AUDIT,
                               strategy_factory=noise_off),
    }


def test_an_honest_dp_run_stays_within_its_claim(audits: dict[str, Path]) -> None:
    h = read_dp_audit(audits["honest"])
    assert h["verdict"] == "consistent" and h["epsilon_lower_bound"] <= h["claimed_epsilon"]
    assert h["claimed_epsilon"] == pytest.approx(1.0, abs=0.05)  # the audit run is calibrated to dp_audit.epsilon
    assert h["noise_multiplier"] > 1  # σ for ε = 1 over this run
    assert h["release_claim"] == {"target_epsilon": 8.0}
    assert 2.5 < h["epsilon_ceiling"] < 3.5  # what 200 canaries can show at most


def test_a_run_without_noise_is_caught(audits: dict[str, Path]) -> None:
    h = read_dp_audit(audits["broken"])
    assert h["noise_multiplier"] > 1  # the strategy calibrated (and the ledger recorded) σ; no noise was added
    assert h["verdict"] == "violated", h["explanation"]
    assert h["epsilon_lower_bound"] > h["claimed_epsilon"]
    assert "does not deliver its claim" in h["explanation"]


def test_the_artifact_holds_scores_not_images(audits: dict[str, Path]) -> None:
    root = audits["broken"]
    assert sorted(p.name for p in root.iterdir()) == ["canary_scores.json", "dp_audit.json"]
    scores = json.loads((root / "canary_scores.json").read_text())
    assert len(scores["score"]) == len(scores["included"]) == AUDIT.canaries
    included = np.array(scores["included"])
    sampled = np.array(scores["times_sampled"])
    assert sampled[~included].sum() == 0 and sampled[included].mean() > 1  # only included canaries are sampled
    score = np.array(scores["score"])
    assert score[included].mean() > score[~included].mean()  # without noise a sampled canary always shows
    h = read_dp_audit(root)
    assert h["best_guess"]["correct"] <= h["best_guess"]["k_in"] + h["best_guess"]["k_out"]
    assert h["target_weight"].endswith("weight")


def test_missing_audit_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"dp_audit\.json"):
        read_dp_audit(tmp_path)


def test_honest_strategy_factory_is_the_release_one() -> None:
    strategy = make_strategy(DP, dataset_size=1000)
    assert type(strategy) is DPStrategy
