"""DP-SGD settings derived from the budget (`dp.plan: auto`): batch size, steps, clipping norm, learning rate,
noise multiplicity K and physical batch, chosen from ε, δ, N and the compute budget by one documented rule.

The compute budget is what the train config would process: E = max_steps × batch_size × K example-draws (the
preset's or as set; `max_minutes` still caps the wall clock). Noise std on a step's mean gradient is σ·C/B, and
after T steps the summed updates carry a signal ∝ T against noise ∝ √T·σ·C/B, so a run's signal-to-noise is
S(B) = √T·B/σ(q = 1/⌊N/B⌋, T) with T = E/(B·K). At a fixed T, σ grows linearly with B once B is past a knee
(σ/B then stays put: benchmarks/README.md "DP settings from ε"), so beyond the knee a bigger batch only buys fewer
steps. The rule: among batches b0·2^i (b0 the config's batch) with at least `MIN_STEPS` steps and B ≤ N/2, take
the smallest whose S is within `KNEE` of the best: most steps for (almost) the least noise; when no batch gives
`MIN_STEPS` steps, the config's batch (measured: too few steps cost more than the noise they save). σ comes from
Opacus' accountant (`privacy.dp.calibrate_noise_multiplier`, the same call the strategy makes), never from a
formula here.

Each chosen value keeps its reason, and a value the user set is kept and marked overridden: a train field counts as
set when it differs from its preset's default (`batch_size`, `lr`, `noise_multiplicity`), a DP field when it was
given (`max_grad_norm`, `max_physical_batch_size`). `max_steps` sets the budget; to fix the number of steps, fix
`batch_size` too (then T = max_steps). The record (`DPPlan.record`) travels inside the planned `DPConfig`
(`plan_record`) to the privacy ledger and the model card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from privacy.dp_config import DPConfig
from synth.errors import ConfigError, where
from synth.train_config import PRESET_DEFAULTS, TrainConfig

# Measured (benchmarks/README.md "DP settings from ε"): at one budget, 50 steps of batch 256 lost to 200 steps of
# batch 64 at ε = 1 and at ε = 10 (val loss +27% and +30%) although σ/B was 2.4-3.3× lower: below ~200 steps the
# optimizer, not the noise, limits a briefly trained DDPM.
MIN_STEPS = 200
KNEE = 0.9  # smallest batch whose signal-to-noise is at least this fraction of the best candidate's
_CFG = "DP plan"


@dataclass(frozen=True)
class DPPlan:
    """The planned configs and the record of what was chosen and why."""

    train: TrainConfig
    dp: DPConfig
    record: dict[str, Any]


def plan_dp(dp: DPConfig, train: TrainConfig, *, dataset_size: int, delta: float) -> DPPlan:
    """Choose the DP settings for training on `dataset_size` examples at (dp.target_epsilon, `delta`) within the
    compute budget of `train` (see the module docstring). Returns the configs to train with."""
    if train.max_steps is None:
        raise ConfigError(where(_CFG, "dp.plan auto needs train.max_steps (the compute budget), not only epochs"))
    preset = PRESET_DEFAULTS[train.preset]
    given_train = {k for k in ("batch_size", "lr", "noise_multiplicity") if getattr(train, k) != preset[k]}
    given_dp = {k for k in ("max_grad_norm", "max_physical_batch_size") if k in dp.model_fields_set}
    k = train.noise_multiplicity
    budget = train.max_steps * train.batch_size * k
    b0 = preset["batch_size"]
    candidates = _candidates(dp, dataset_size=dataset_size, delta=delta, budget=budget, k=k, b0=b0)
    reasons: dict[str, str] = {}
    if "batch_size" in given_train:
        batch, steps = train.batch_size, train.max_steps
        reasons["batch_size"] = "set by the user"
        reasons["max_steps"] = "set by the user (with batch_size)"
    else:
        if candidates:
            best = max(c["snr"] for c in candidates)
            pick = next(c for c in candidates if c["snr"] >= KNEE * best)
            batch, steps = pick["batch_size"], pick["steps"]
            reasons["batch_size"] = (f"smallest batch whose signal-to-noise √T·B/σ ({pick['snr']:.0f}) is within "
                                     f"{KNEE:.0%} of the best candidate's ({best:.0f}) at this budget")
        else:  # a budget too small for MIN_STEPS steps even at the config's batch: the steps matter most
            batch = min(train.batch_size, dataset_size)
            steps = max(1, budget // (batch * k))
            reasons["batch_size"] = (f"the config's: the budget gives fewer than {MIN_STEPS} steps at any batch, "
                                     "and below that the number of steps limits training more than the noise")
        reasons["max_steps"] = f"the budget of {budget} example-draws spent at this batch and K={k}"
    warmup = min(preset["lr_warmup_steps"], max(1, steps // 10))
    lr = train.lr
    reasons["lr"] = ("set by the user" if "lr" in given_train else
                     "the preset's: AdamW's update does not scale with the gradient, and DP's noisy mean gradient "
                     "does not change that; warmup shortened to a tenth of the steps")
    reasons["noise_multiplicity"] = ("set by the user" if "noise_multiplicity" in given_train else
                                     "1: K multiplies the cost of an example; at a fixed budget it is spent on a "
                                     "larger batch instead, which lowers σ/B")
    clip = dp.max_grad_norm
    reasons["max_grad_norm"] = ("set by the user" if "max_grad_norm" in given_dp else
                                "1.0: per-example gradients of the diffusion loss measured 3.1-5.5 at initialisation, "
                                "so all are clipped to the same norm and AdamW makes C a pure scale "
                                "(benchmarks/README.md)")
    physical = dp.max_physical_batch_size if "max_physical_batch_size" in given_dp else min(batch, b0)
    reasons["max_physical_batch_size"] = ("set by the user" if "max_physical_batch_size" in given_dp else
                                          "the preset's batch: the fastest per example on this hardware, and memory "
                                          "stays that of the non-private run")
    planned_train = train.model_copy(update={"batch_size": batch, "max_steps": steps, "epochs": None,
                                             "lr_warmup_steps": warmup})
    chosen = {"batch_size": batch, "max_steps": steps, "lr": lr, "lr_warmup_steps": warmup,
              "noise_multiplicity": k, "max_grad_norm": clip, "max_physical_batch_size": physical}
    record = {
        "rule": f"privacy/dp_plan.py: smallest batch within {KNEE:.0%} of the best √T·B/σ at a fixed budget, "
                f"at least {MIN_STEPS} steps",
        "inputs": {"target_epsilon": dp.target_epsilon, "delta": delta, "dataset_size": dataset_size,
                   "accountant": dp.accountant, "budget_example_draws": budget, "preset": train.preset,
                   "max_minutes": train.max_minutes},
        "chosen": chosen,
        "reasons": reasons,
        "overridden": sorted(given_train | given_dp | ({"max_steps"} if "batch_size" in given_train else set())),
        "candidates": candidates,
        "sigma_estimate": next((c["sigma"] for c in candidates if c["batch_size"] == batch), None),
    }
    planned_dp = DPConfig(**{**dp.to_dict(), "max_physical_batch_size": physical, "plan": "auto",
                             "plan_record": record})
    return DPPlan(train=planned_train, dp=planned_dp, record=record)


def _candidates(dp: DPConfig, *, dataset_size: int, delta: float, budget: int, k: int, b0: int) -> list[dict]:
    """Every batch b0·2^i (≤ N/2, ≥ MIN_STEPS steps) with its steps, σ and signal-to-noise, smallest first."""
    from privacy.dp import calibrate_noise_multiplier

    out = []
    batch = b0
    while batch <= dataset_size // 2:
        steps = budget // (batch * k)
        if steps < MIN_STEPS:
            break
        q = 1 / (dataset_size // batch)  # what the trainer's loader (drop_last) gives Opacus
        try:
            sigma = calibrate_noise_multiplier(target_epsilon=dp.target_epsilon, target_delta=delta, sample_rate=q,
                                               steps=steps, accountant=dp.accountant)
        except ValueError:
            batch *= 2
            continue
        out.append({"batch_size": batch, "steps": steps, "sample_rate": q, "sigma": round(sigma, 4),
                    "noise_per_mean": round(sigma / batch, 6), "snr": round(math.sqrt(steps) * batch / sigma, 1)})
        batch *= 2
    return out


def apply_plan(dp: DPConfig, train: TrainConfig, *, dataset) -> tuple[TrainConfig, DPConfig]:
    """The (train, DP) configs to train on the canonical dataset at `dataset` with: planned when `dp.plan` is
    "auto" (and not planned yet), else as given. The one call the CLI and the release flow make before training."""
    if dp.plan != "auto" or dp.plan_record is not None:
        return train, dp
    from privacy.dp import resolve_delta, train_split_size

    n = train_split_size(dataset)
    plan = plan_dp(dp, train, dataset_size=n, delta=resolve_delta(dp, dataset_size=n))
    return plan.train, plan.dp
