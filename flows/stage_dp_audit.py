"""The empirical check of a DP release's claim (`privacy.dp_audit`): one canary training run with the release's
DP code and settings, beside the generator's training. Only for DP releases with `dp_audit.enabled`."""

from __future__ import annotations

from pathlib import Path

from flows.release_config import ReleaseConfig
from flows.stage_runner import artifact_hash, run_stage

DP_AUDIT = "dp-audit"


def dp_audit_stage(cfg: ReleaseConfig, dataset: Path) -> Path | None:
    """The canary audit's directory, or None when the release is not DP or the audit is off."""
    if not (cfg.dp.enabled and cfg.dp_audit.enabled):
        return None
    from privacy.dp_audit import run_dp_audit
    from privacy.dp_plan import apply_plan

    # The same settings the release's DP training runs with (dp.plan auto: chosen from the budget, as there).
    train_cfg, dp = apply_plan(cfg.dp.config(), cfg.train.model_copy(update={"device": cfg.device}), dataset=dataset)
    audit = cfg.dp_audit.config()
    return run_stage(
        cfg.workdir, DP_AUDIT, inputs={"dataset": artifact_hash(dataset)},
        config={"audit": audit.model_dump(mode="json"), "train": train_cfg.model_dump(mode="json"),
                "dp": dp.to_dict()},
        build=lambda out: run_dp_audit(dataset, out, train_config=train_cfg, dp_config=dp, config=audit,
                                       claimed={"target_epsilon": dp.target_epsilon}),
    )
