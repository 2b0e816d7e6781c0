"""The release flow: ingest → validate → train → generate → privacy audit → utility audit → gate → report →
approval → bundle → publish. Each task is a thin wrapper over a stage function in `flows/stages.py`.

Tasks pass paths, never arrays (Prefect may persist results as pickles). Caching is by content hash at the
artifact level (`flows.stages.run_stage`), not by Prefect's result cache: an artifact directory is the single
source of truth, so a rerun after a crash skips finished stages even when Prefect's storage was wiped, and never
trusts a cached path whose directory is gone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows import stages
from flows.approval import auto_approval, request_approval
from flows.policy import Verdict
from flows.release_config import ReleaseConfig
from synth.errors import PolicyBlocked


class ReleaseResult(BaseModel):
    """What a release run ended with (small: paths and a status, never data)."""

    status: Literal["published", "rejected"]
    release_id: str
    bundle: Path | None = None
    report: Path
    reasons: list[str] = []


def _task(name: str, retries: int = 0):
    return task(name=name, retries=retries, retry_delay_seconds=5, cache_policy=NO_CACHE, log_prints=True)


@_task("ingest", retries=2)  # a download can fail transiently
def ingest_task(cfg: ReleaseConfig) -> Path:
    return stages.ingest_stage(cfg)


@_task("validate")
def validate_task(cfg: ReleaseConfig, dataset: Path) -> Path:
    return stages.validate_stage(cfg, dataset)


@_task("train")
def train_task(cfg: ReleaseConfig, dataset: Path) -> Path:
    return stages.train_stage(cfg, dataset)


@_task("generate")
def generate_task(cfg: ReleaseConfig, model: Path) -> Path:
    return stages.generate_stage(cfg, model)


@_task("privacy-audit")
def privacy_audit_task(cfg: ReleaseConfig, dataset: Path, synthetic: Path, model: Path) -> tuple[Path, Path]:
    return stages.privacy_audit_stage(cfg, dataset, synthetic, model)


@_task("utility-audit")
def utility_audit_task(cfg: ReleaseConfig, dataset: Path, released: Path) -> Path:
    return stages.utility_audit_stage(cfg, dataset, released)


@_task("gate")
def gate_task(cfg: ReleaseConfig, privacy_dir: Path, utility_dir: Path, model: Path, released: Path) -> Verdict:
    return stages.gate_stage(cfg, privacy_dir, utility_dir, model, released)


@_task("report")
def report_task(cfg: ReleaseConfig, **paths: Path | Verdict | None) -> Path:
    return stages.report_stage(cfg, public=False, **paths)  # type: ignore[arg-type]


@_task("bundle")
def bundle_task(cfg: ReleaseConfig, **kwargs: object) -> Path:
    return stages.bundle_stage(cfg, **kwargs)  # type: ignore[arg-type]


@_task("publish")
def publish_task(cfg: ReleaseConfig, bundle: Path, release_id: str) -> Path:
    return stages.publish_stage(cfg, bundle, release_id)


def _summary_markdown(release_id: str, verdict: Verdict, report: Path) -> str:
    rows = "\n".join(f"| {'✅' if c.passed else '❌'} | {c.rule} | {c.message} |" for c in verdict.checks)
    return (
        f"# Release `{release_id}`: gate **{verdict.decision.upper()}**\n\n"
        f"Steward's report (stays on site): `{report.resolve() / 'report.html'}`\n\n"
        f"| | rule | result |\n|---|---|---|\n{rows}\n"
    )


@flow(name="release", log_prints=True)
def release(config: ReleaseConfig) -> ReleaseResult:
    """Turn a real image set into a signed, documented synthetic release, or a blocked run with every reason."""
    log = get_run_logger()
    cfg = config
    dataset = ingest_task(cfg)
    validate_task(cfg, dataset)
    model = train_task(cfg, dataset)
    synthetic = generate_task(cfg, model)
    privacy_dir, released = privacy_audit_task(cfg, dataset, synthetic, model)
    utility_dir = utility_audit_task(cfg, dataset, released)
    verdict = gate_task(cfg, privacy_dir, utility_dir, model, released)
    paths = {"dataset": dataset, "model": model, "released": released, "privacy_dir": privacy_dir,
             "utility_dir": utility_dir}
    report = report_task(cfg, verdict=verdict, **paths)
    release_id = stages.release_id_for(cfg, released)

    create_markdown_artifact(key="release-summary", markdown=_summary_markdown(release_id, verdict, report),
                             description="gate verdict")
    create_table_artifact(key="gate-checks", table=[
        {"rule": c.rule, "passed": c.passed, "value": str(c.value), "threshold": str(c.threshold)}
        for c in verdict.checks], description="every gate check (numbers only)")
    if not verdict.passed:
        log.error("release blocked: %s", "; ".join(verdict.reasons))
        raise PolicyBlocked(f"release {release_id} blocked by the gate: " + "; ".join(verdict.reasons))

    if cfg.approval.auto_approve:
        approval = auto_approval()
    else:
        approval = request_approval(report, _summary_markdown(release_id, verdict, report),
                                    timeout_s=cfg.approval.timeout_s)
    if approval.decision != "approved":
        log.warning("release %s rejected by %s: %s", release_id, approval.reviewer, approval.comment)
        return ReleaseResult(status="rejected", release_id=release_id, report=report,
                             reasons=[f"rejected by {approval.reviewer}: {approval.comment}"])

    bundle = bundle_task(cfg, release_id=release_id, synthetic=synthetic, verdict=verdict, approval=approval,
                         **paths)
    published = publish_task(cfg, bundle, release_id)
    log.info("published %s", published)
    return ReleaseResult(status="published", release_id=release_id, bundle=published, report=report)
