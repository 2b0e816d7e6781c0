"""The audit stages: privacy (reference, memorization shards, the merged audit that also filters the released set)
and utility (classifier jobs and their merge)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flows.release_config import ReleaseConfig
from flows.stage_runner import (
    PRIVACY,
    PRIVACY_REFERENCE,
    RELEASED,
    UTILITY,
    artifact_hash,
    build_config,
    run_stage,
    shard_name,
)
from synth.errors import PolicyBlocked, where


def _privacy_audit_config(cfg: ReleaseConfig) -> Any:
    from privacy.audit_config import PrivacyAuditConfig

    return build_config(PrivacyAuditConfig, cfg.privacy_audit, "privacy_audit")


def privacy_reference_stage(cfg: ReleaseConfig, dataset: Path) -> Path:
    """What every memorization shard compares against: the copy-detection encoder, the real embeddings and the
    thresholds calibrated on real holdout images. Needs only the real data: runs beside the generator's training."""
    from privacy.audit_sharding import prepare_privacy_reference

    audit_cfg = _privacy_audit_config(cfg)
    return run_stage(
        cfg.workdir, PRIVACY_REFERENCE, inputs={"dataset": artifact_hash(dataset)},
        config=audit_cfg.model_dump(mode="json"),
        build=lambda out: prepare_privacy_reference(dataset, out, config=audit_cfg),
    )


def memorization_shard_stage(cfg: ReleaseConfig, reference: Path, synthetic: Path, shard_index: int,
                             shard_count: int) -> Path:
    """Nearest training images of one shard of the synthetic set, in every space."""
    from privacy.audit_sharding import search_synthetic_shard

    return run_stage(
        cfg.workdir, shard_name(PRIVACY, shard_index, shard_count),
        inputs={"reference": artifact_hash(reference), "synthetic": artifact_hash(synthetic)},
        config={"shard_index": shard_index, "shard_count": shard_count},
        build=lambda out: search_synthetic_shard(reference, synthetic, out, shard_index=shard_index,
                                                 shard_count=shard_count),
    )


def attacking_generation_weights(audit_cfg: Any, cfg: ReleaseConfig) -> Any:
    """`audit_cfg` with membership inference aimed at the weights that generated the release (`generate.weights`
    as chosen by `guidance_stage`: an EMA snapshot, say), not at the final ones."""
    if audit_cfg.membership is None or cfg.generate.weights in ("auto", "ema"):
        return audit_cfg
    membership = audit_cfg.membership.model_copy(update={"weights": cfg.generate.weights})
    return audit_cfg.model_copy(update={"membership": membership})


def privacy_audit_stage(cfg: ReleaseConfig, dataset: Path, synthetic: Path, model: Path, *,
                        reference: Path | None = None, shards: Sequence[Path] | None = None) -> tuple[Path, Path]:
    """Memorization (merged from its shards when given), disclosure, the DP ledger check and membership
    inference; returns (audit dir, the set to release: the synthetic set without flagged images and with
    k-anonymity suppression when `filter_flagged`)."""
    from privacy.audit import audit_privacy

    audit_cfg = attacking_generation_weights(_privacy_audit_config(cfg), cfg)
    released = cfg.workdir / RELEASED
    inputs = {"dataset": artifact_hash(dataset), "synthetic": artifact_hash(synthetic), "model": artifact_hash(model)}
    if reference is not None:
        inputs["reference"] = artifact_hash(reference)
    for i, shard in enumerate(shards or ()):
        inputs[f"shard{i}"] = artifact_hash(shard)
    audit = run_stage(
        cfg.workdir, PRIVACY, inputs=inputs,
        config={"audit": audit_cfg.model_dump(mode="json"), "filter": cfg.filter_flagged},
        build=lambda out: audit_privacy(dataset, synthetic, out, model_dir=model, config=audit_cfg,
                                        filter_out=released if cfg.filter_flagged else None,
                                        reference=reference, shards=list(shards) if shards else None),
        extra_outputs=(released,) if cfg.filter_flagged else (),
    )
    if not cfg.filter_flagged:
        return audit, synthetic
    if not released.exists():
        raise PolicyBlocked(where(audit, "every synthetic image was flagged as a copy: nothing left to release"))
    return audit, released


def _utility_config(cfg: ReleaseConfig) -> Any:
    from reports.utility import UtilityConfig

    return build_config(UtilityConfig, cfg.utility_audit, "utility_audit")


def utility_jobs(cfg: ReleaseConfig, dataset: Path, released: Path) -> list[str]:
    """The utility audit's independent classifier trainings (TRTR, TSTR, one per augmentation ratio)."""
    from reports.utility import plan_classifier_jobs

    return plan_classifier_jobs(dataset, released, config=_utility_config(cfg))


def utility_job_stage(cfg: ReleaseConfig, dataset: Path, released: Path, name: str) -> Path:
    """One classifier of the utility audit, trained and scored."""
    from reports.utility import run_classifier_job

    util_cfg = _utility_config(cfg)
    return run_stage(
        cfg.workdir, f"{UTILITY}-job-{name}",
        inputs={"dataset": artifact_hash(dataset), "released": artifact_hash(released)},
        config=util_cfg.model_dump(mode="json"),
        build=lambda out: run_classifier_job(dataset, released, name, out, config=util_cfg),
    )


def utility_audit_stage(cfg: ReleaseConfig, dataset: Path, released: Path,
                        jobs: Mapping[str, Path] | None = None) -> Path:
    """TRTR/TRTS/TSTR/augmentation and fidelity of the set to be released (from its classifier jobs when given)."""
    from reports.utility import audit_utility

    util_cfg = _utility_config(cfg)
    inputs = {"dataset": artifact_hash(dataset), "released": artifact_hash(released)}
    inputs.update({f"job-{name}": artifact_hash(path) for name, path in (jobs or {}).items()})
    return run_stage(
        cfg.workdir, UTILITY, inputs=inputs, config=util_cfg.model_dump(mode="json"),
        build=lambda out: audit_utility(dataset, released, out, config=util_cfg, jobs=jobs),
    )
