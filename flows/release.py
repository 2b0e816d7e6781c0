"""The release flow: ingest → validate → train → generate → privacy audit → utility audit → gate → report →
approval → bundle → publish. Each task is a thin wrapper over a stage function in `flows/stages.py`.

The compute (everything up to the steward's report) runs in the subflow `release-pipeline` on the task runner the
release config names (`runner`: Prefect's thread pool, a Dask cluster, Ray); generation, the memorization search
and the utility classifiers are mapped over shards there. Approval, signing and publishing stay in the flow's own
process, where the steward's key is.

Tasks pass paths, never arrays (Prefect may persist results as pickles). Caching is by content hash at the
artifact level (`flows.stages.run_stage`), not by Prefect's result cache: an artifact directory is the single
source of truth, so a rerun after a crash skips finished stages even when Prefect's storage was wiped, and never
trusts a cached path whose directory is gone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import State
from pydantic import BaseModel

from flows import runners, stages
from flows.approval import auto_approval, request_approval
from flows.policy import Verdict
from flows.preflight import check_release_config
from flows.release_config import ReleaseConfig
from flows.runners import task_threads
from synth.errors import PolicyBlocked, SynthgateError


class ReleaseResult(BaseModel):
    """What a release run ended with (small: paths and a status, never data)."""

    status: Literal["published", "rejected"]
    release_id: str
    bundle: Path | None = None
    report: Path
    reasons: list[str] = []


def _retry_unless_user_error(task: object, task_run: object, state: State) -> bool:
    # Retries are for lost workers and flaky downloads: a bad input or a blocked check fails the same way again.
    error = state.result(raise_on_failure=False)
    return not isinstance(error, SynthgateError)


def _task(name: str, retries: int = 0):
    return task(name=name, retries=retries, retry_delay_seconds=5, cache_policy=NO_CACHE, log_prints=True,
                retry_condition_fn=_retry_unless_user_error)


@_task("ingest", retries=2)  # a download can fail transiently
def ingest_task(cfg: ReleaseConfig) -> Path:
    return stages.ingest_stage(cfg)


@_task("validate")
def validate_task(cfg: ReleaseConfig, dataset: Path) -> Path:
    return stages.validate_stage(cfg, dataset)


@_task("public-pretraining")
def public_pretraining_task(cfg: ReleaseConfig, dataset: Path) -> Path | None:
    from flows.stage_public import public_pretraining_stage

    return public_pretraining_stage(cfg, dataset)


@_task("train")
def train_task(cfg: ReleaseConfig, dataset: Path) -> Path:
    return stages.train_stage(cfg, dataset)


@_task("dp-audit")
def dp_audit_task(cfg: ReleaseConfig, dataset: Path) -> Path | None:
    return stages.dp_audit_stage(cfg, dataset)


@_task("guidance-selection")
def guidance_task(cfg: ReleaseConfig, dataset: Path, model: Path) -> ReleaseConfig:
    return stages.guidance_stage(cfg, dataset, model)


# Mapped tasks may land on another worker process or machine; one retry covers a lost worker.
@_task("generate-shard", retries=1)
def generate_shard_task(cfg: ReleaseConfig, model: Path, shard_index: int, shard_count: int) -> Path:
    with task_threads(cfg.runner):
        return stages.generate_stage(cfg, model, shard_index=shard_index, shard_count=shard_count)


@_task("merge-synthetic")
def merge_synthetic_task(cfg: ReleaseConfig, model: Path, shards: list[Path]) -> Path:
    return stages.merge_synthetic_stage(cfg, model, shards)


@_task("privacy-reference", retries=1)
def privacy_reference_task(cfg: ReleaseConfig, dataset: Path) -> Path:
    with task_threads(cfg.runner):
        return stages.privacy_reference_stage(cfg, dataset)


@_task("memorization-shard", retries=1)
def memorization_shard_task(cfg: ReleaseConfig, reference: Path, synthetic: Path, shard_index: int,
                            shard_count: int) -> Path:
    with task_threads(cfg.runner):
        return stages.memorization_shard_stage(cfg, reference, synthetic, shard_index, shard_count)


@_task("privacy-audit")
def privacy_audit_task(cfg: ReleaseConfig, dataset: Path, synthetic: Path, model: Path, reference: Path,
                       shards: list[Path]) -> tuple[Path, Path]:
    return stages.privacy_audit_stage(cfg, dataset, synthetic, model, reference=reference, shards=shards)


@_task("utility-classifier", retries=1)
def utility_job_task(cfg: ReleaseConfig, dataset: Path, released: Path, name: str) -> Path:
    with task_threads(cfg.runner):
        return stages.utility_job_stage(cfg, dataset, released, name)


@_task("utility-audit")
def utility_audit_task(cfg: ReleaseConfig, dataset: Path, released: Path, jobs: dict[str, Path]) -> Path:
    return stages.utility_audit_stage(cfg, dataset, released, jobs)


@_task("gate")
def gate_task(cfg: ReleaseConfig, privacy_dir: Path, utility_dir: Path, model: Path, released: Path,
              dp_audit: Path | None) -> Verdict:
    return stages.gate_stage(cfg, privacy_dir, utility_dir, model, released, dp_audit)


@_task("report")
def report_task(cfg: ReleaseConfig, **paths: Path | Verdict | None) -> Path:
    return stages.report_stage(cfg, public=False, **paths)  # type: ignore[arg-type]


@_task("bundle")
def bundle_task(cfg: ReleaseConfig, **kwargs: object) -> Path:
    return stages.bundle_stage(cfg, **kwargs)  # type: ignore[arg-type]


@_task("already-published")
def published_task(cfg: ReleaseConfig, release_id: str) -> Path | None:
    return stages.published_stage(cfg, release_id)


@_task("publish")
def publish_task(cfg: ReleaseConfig, bundle: Path, release_id: str) -> Path:
    return stages.publish_stage(cfg, bundle, release_id)


class AuditedRun(BaseModel):
    """The artifacts of a run up to the gate (paths and the verdict, never data)."""

    dataset: Path
    model: Path
    synthetic: Path
    released: Path
    privacy_dir: Path
    utility_dir: Path
    report: Path
    verdict: Verdict

    def paths(self) -> dict[str, Path]:
        return {"dataset": self.dataset, "model": self.model, "released": self.released,
                "privacy_dir": self.privacy_dir, "utility_dir": self.utility_dir}


@flow(name="release-pipeline", log_prints=True)
def release_pipeline(cfg: ReleaseConfig) -> AuditedRun:
    """Ingest → validate → train (and, for DP, the canary audit) → generate (mapped over shards) → privacy audit
    (memorization search mapped over shards) → utility audit (classifiers mapped) → gate → steward's report, on the
    task runner `cfg.runner`."""
    from synth.model import resolve_diffusers_names

    resolve_diffusers_names()  # before tasks run side by side: diffusers' lazy names are not thread-safe
    shards = cfg.runner.shard_count()
    dataset = ingest_task(cfg)
    validate_task(cfg, dataset)
    # The copy-detection reference needs only the real data: it trains beside the generator.
    reference = privacy_reference_task.submit(cfg, dataset)
    from flows.stage_public import with_init_from

    public_model = public_pretraining_task(cfg, dataset)  # None without `public_pretraining:`
    # The canary check of a DP release's implementation (None otherwise): its own DP run, beside the generator's.
    dp_audit = dp_audit_task.submit(cfg, dataset)
    model = train_task(with_init_from(cfg, public_model), dataset)
    generation = guidance_task(cfg, dataset, model)  # the config with the guidance scale and weights fixed
    parts = generate_shard_task.map(unmapped(generation), unmapped(model), range(shards), unmapped(shards))
    synthetic = merge_synthetic_task(generation, model, parts.result())
    searched = memorization_shard_task.map(unmapped(cfg), unmapped(reference.result()), unmapped(synthetic),
                                           range(shards), unmapped(shards))
    # `generation`: membership inference attacks the weights that generated the release.
    privacy_dir, released = privacy_audit_task(generation, dataset, synthetic, model, reference.result(),
                                               searched.result())
    names = stages.utility_jobs(cfg, dataset, released)
    jobs = utility_job_task.map(unmapped(cfg), unmapped(dataset), unmapped(released), names)
    utility_dir = utility_audit_task(cfg, dataset, released, dict(zip(names, jobs.result(), strict=True)))
    verdict = gate_task(cfg, privacy_dir, utility_dir, model, released, dp_audit.result())
    run = {"dataset": dataset, "model": model, "released": released, "privacy_dir": privacy_dir,
           "utility_dir": utility_dir}
    report = report_task(cfg, verdict=verdict, **run)
    return AuditedRun(synthetic=synthetic, report=report, verdict=verdict, **run)


def route_progress() -> None:
    """Stage progress (`synth.progress`: training steps, generated images, encoder steps, stage starts and ends)
    into this run's Prefect logs and onto stderr. Threads of the thread-pool runner inherit the run context, so
    their lines reach the API under their task runs."""
    import logging

    from prefect.logging.handlers import APILogHandler

    from synth.progress import LOGGER, log_to_stderr

    log_to_stderr()
    target = logging.getLogger(LOGGER)
    if not any(isinstance(h, APILogHandler) for h in target.handlers):
        target.addHandler(APILogHandler())


def _summary_markdown(release_id: str, verdict: Verdict, report: Path, utility_dir: Path) -> str:
    rows = "\n".join(f"| {'✅' if c.passed else '❌'} | {c.rule} | {c.message} |" for c in verdict.checks)
    return (
        f"# Release `{release_id}`: gate **{verdict.decision.upper()}**\n\n"
        f"{stages.utility_markdown(utility_dir)}\n\n"
        f"Steward's report (stays on site): `{report.resolve() / 'report.html'}`\n\n"
        f"| | rule | result |\n|---|---|---|\n{rows}\n"
    )


@flow(name="release", log_prints=True)
def release(config: ReleaseConfig) -> ReleaseResult:
    """Turn a real image set into a signed, documented synthetic release, or a blocked run with every reason."""
    log = get_run_logger()
    route_progress()
    cfg = stages.with_absolute_paths(config)
    check_release_config(cfg)  # runs started from the UI too: nothing runs on a config that cannot be released
    log.info("task runner: %s", runners.describe(cfg.runner))
    audited = release_pipeline.with_options(task_runner=runners.make_task_runner(cfg.runner))(cfg)
    verdict, report = audited.verdict, audited.report
    paths = audited.paths()
    release_id = stages.release_id_for(cfg, audited.released)

    summary = _summary_markdown(release_id, verdict, report, audited.utility_dir)
    create_markdown_artifact(key="release-summary", markdown=summary, description="gate verdict")
    create_table_artifact(key="gate-checks", table=[
        {"rule": c.rule, "passed": c.passed, "value": str(c.value), "threshold": str(c.threshold)}
        for c in verdict.checks], description="every gate check (numbers only)")
    if not verdict.passed:
        log.error("release blocked: %s", "; ".join(verdict.reasons))
        raise PolicyBlocked(f"release {release_id} blocked by the gate: " + "; ".join(verdict.reasons))

    existing = published_task(cfg, release_id)
    if existing is not None:  # a rerun after a crash past the move into the releases directory
        log.info("release %s was already published at %s; index rebuilt", release_id, existing)
        return ReleaseResult(status="published", release_id=release_id, bundle=existing, report=report)

    if cfg.approval.auto_approve:
        approval = auto_approval()
    else:
        approval = request_approval(report, summary,
                                    timeout_s=cfg.approval.timeout_s)
    if approval.decision != "approved":
        log.warning("release %s rejected by %s: %s", release_id, approval.reviewer, approval.comment)
        return ReleaseResult(status="rejected", release_id=release_id, report=report,
                             reasons=[f"rejected by {approval.reviewer}: {approval.comment}"])

    bundle = bundle_task(cfg, release_id=release_id, synthetic=audited.synthetic, verdict=verdict,
                         approval=approval, **paths)
    published = publish_task(cfg, bundle, release_id)
    log.info("published %s", published)
    return ReleaseResult(status="published", release_id=release_id, bundle=published, report=report)
