"""The release pipeline's stages as plain functions over artifact directories, with content-hash caching.

Each stage writes one directory under the release's work dir. A stamp (`.stages/<name>.json`) records the hash
of the stage's inputs (their content hashes) and config; a rerun with the same key reuses the directory, so a
release that crashed resumes after the last finished stage (and training resumes from its last checkpoint).
Prefect tasks in `flows/release.py` are thin wrappers over these; tests call them without Prefect.

This module is the pipeline's index: each stage lives in a module named for what it does and is re-exported here,
in pipeline order: `stage_runner` (caching, stage names), `stage_data` (ingest, validate), `stage_generator`
(train, guidance, generate), `stage_dp_audit` (the canary check of a DP
run), `stage_audits` (privacy, utility), `stage_gate` (gate inputs, verdict, report),
`stage_release` (facts, bundle, publish).
"""

from __future__ import annotations

from pathlib import Path

from flows.release_config import ReleaseConfig
from flows.stage_audits import (
    memorization_shard_stage,
    privacy_audit_stage,
    privacy_reference_stage,
    utility_audit_stage,
    utility_job_stage,
    utility_jobs,
)
from flows.stage_data import ingest_stage, validate_stage
from flows.stage_dp_audit import DP_AUDIT, dp_audit_stage
from flows.stage_gate import gate_inputs, gate_stage, report_stage, utility_gate_fields, utility_markdown
from flows.stage_generator import generate_stage, guidance_facts, guidance_stage, merge_synthetic_stage, train_stage
from flows.stage_release import (
    bundle_stage,
    provenance_predicate,
    publish_stage,
    published_stage,
    release_facts,
    release_id_for,
)
from flows.stage_runner import (
    BUNDLE,
    DATASET,
    GUIDANCE,
    MODEL,
    PRIVACY,
    PRIVACY_REFERENCE,
    PUBLIC_REPORT,
    RELEASED,
    REPORT,
    STAMPS,
    SYNTHETIC,
    UTILITY,
    VALIDATION,
    VERDICT,
    artifact_hash,
    build_config,
    run_stage,
    shard_name,
    stage_key,
)

__all__ = [
    "BUNDLE", "DATASET", "DP_AUDIT", "GUIDANCE", "MODEL", "PRIVACY", "PRIVACY_REFERENCE", "PUBLIC_REPORT", "RELEASED",
    "REPORT", "STAMPS", "SYNTHETIC", "UTILITY", "VALIDATION", "VERDICT", "artifact_hash", "build_config",
    "bundle_stage", "dp_audit_stage", "gate_inputs", "gate_stage", "generate_stage", "guidance_facts",
    "guidance_stage", "ingest_stage", "memorization_shard_stage", "merge_synthetic_stage", "privacy_audit_stage",
    "privacy_reference_stage", "provenance_predicate", "publish_stage", "published_stage", "release_facts",
    "release_id_for", "report_stage", "run_stage", "shard_name", "stage_key", "train_stage", "utility_audit_stage",
    "utility_gate_fields", "utility_job_stage", "utility_jobs", "utility_markdown", "validate_stage",
    "with_absolute_paths",
]


def with_absolute_paths(cfg: ReleaseConfig) -> ReleaseConfig:
    """The config with its paths made absolute: tasks may run in worker processes on other machines that share
    the work directory but not the flow's working directory."""
    return cfg.model_copy(update={
        "workdir": Path(cfg.workdir).absolute(),
        "releases_dir": Path(cfg.releases_dir).absolute(),
        "private_key": Path(cfg.private_key).absolute(),
    })
