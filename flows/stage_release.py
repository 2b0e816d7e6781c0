"""Release stages: the release id, the facts every release document is rendered from, the provenance predicate,
the signed bundle, and publishing."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.policy import Verdict
from flows.release_config import ReleaseConfig
from flows.stage_gate import report_stage
from flows.stage_generator import guidance_facts
from flows.stage_runner import (
    BUNDLE,
    artifact_hash,
)
from synth.errors import InputError, PolicyBlocked

if TYPE_CHECKING:
    from reports.facts import ApprovalFacts, ReleaseFacts


def release_id_for(cfg: ReleaseConfig, released: Path) -> str:
    """The configured id, or `<title slug>-<UTC date>-<first 8 hex of the released set's hash>`."""
    from flows.publish import check_release_id

    if cfg.release_id:
        return check_release_id(cfg.release_id)
    slug = re.sub(r"[^a-z0-9]+", "-", cfg.title.lower()).strip("-")[:40] or "release"
    return check_release_id(f"{slug}-{datetime.now(UTC):%Y%m%d}-{artifact_hash(released)[:8]}")


def release_facts(
    cfg: ReleaseConfig, *, release_id: str, dataset: Path, model: Path, synthetic: Path, released: Path,
    privacy_dir: Path, utility_dir: Path, verdict: Verdict, approval: ApprovalFacts,
) -> ReleaseFacts:
    """Everything the dataset card, datasheet and Croissant say, read off the run's artifacts."""
    from privacy.audit_result import load_privacy_audit
    from reports.facts import (
        GateFacts,
        ModelFacts,
        PrivacyAuditFacts,
        PrivacyFacts,
        ReleaseFacts,
        SourceFacts,
        SyntheticFacts,
        UtilityAuditFacts,
        git_commit,
    )
    from reports.utility_result import load_utility_audit
    from synth.data.canonical import load_dataset_header

    audit = load_privacy_audit(privacy_dir)
    utility = load_utility_audit(utility_dir).body()
    mem = audit.memorization
    n_generated = int(audit.counts["synthetic"])
    n_released = load_dataset_header(released).counts.total
    generation_facts = dict(load_dataset_header(synthetic).config)
    selected = guidance_facts(cfg)
    if selected is not None:
        generation_facts["guidance_selection"] = selected
    guidance_scale = (generation_facts.get("sampler") or {}).get("guidance_scale")
    return ReleaseFacts(
        release_id=release_id,
        title=cfg.title,
        purpose=cfg.purpose,
        publisher=cfg.publisher,
        contact=cfg.contact,
        git_commit=git_commit(),
        source=SourceFacts.from_dataset(dataset),
        model=ModelFacts.from_model_dir(model).model_copy(update={"guidance_scale": guidance_scale}),
        privacy=PrivacyFacts.from_model_dir(model).with_empirical_audit(_dp_audit_dir(cfg)),
        privacy_audit=PrivacyAuditFacts(
            flagged_fraction_before=mem.flagged_fraction,
            flagged_fraction_after=0.0 if released != synthetic else mem.flagged_fraction,
            removed=n_generated - n_released,
            thresholds={str(k): float(v) for k, v in (mem.thresholds or {}).items()
                        if isinstance(v, int | float)},
            membership_auc=audit.judged_membership_auc,  # the value the gate judged
            disclosure_k=int(audit.config.get("disclosure_k", 5)),
        ),
        utility_audit=UtilityAuditFacts.from_utility(utility,
                                                     classifier="small ResNet-style CNN (reports/classifier.py)"),
        gate=GateFacts(verdict=verdict.decision, reasons=tuple(verdict.reasons),
                       policy=cfg.policy.model_dump(mode="json"), loosened=cfg.policy.loosened()),
        approval=approval,
        synthetic=SyntheticFacts.from_dataset(released, generation=generation_facts),
    )


def provenance_predicate(
    cfg: ReleaseConfig, facts: ReleaseFacts, artifacts: Mapping[str, Path]
) -> dict[str, Any]:
    """What produced the bundle (the in-toto predicate): input hashes, config, code version, approval."""
    config = cfg.model_dump(mode="json", exclude={"workdir", "releases_dir", "private_key", "passphrase_env"})
    privacy = facts.privacy
    return {
        "release_id": facts.release_id,
        "summary": f"{facts.title}: {facts.synthetic.counts_per_class}",
        "created": facts.created.isoformat(),
        "builder": {"name": "synthgate", "version": facts.synthgate_version, "git_commit": facts.git_commit},
        "inputs": {name: artifact_hash(path) for name, path in artifacts.items()},
        "source": {"content_hash": facts.source.content_hash, "file_sha256": facts.source.file_sha256},
        "config": config,
        "privacy": ({"epsilon": privacy.epsilon, "delta": privacy.delta, "accountant": privacy.accountant}
                    if privacy.dp else None),
        "synthetic": {"images": sum(facts.synthetic.counts_per_class.values()),
                      "content_hash": facts.synthetic.content_hash},
        "gate": facts.gate.verdict,
        "approval": facts.approval.model_dump(mode="json") if facts.approval else None,
    }


def bundle_stage(
    cfg: ReleaseConfig, *, release_id: str, dataset: Path, model: Path, synthetic: Path, released: Path,
    privacy_dir: Path, utility_dir: Path, verdict: Verdict, approval: ApprovalFacts,
) -> Path:
    """Render the public report, write the bundle, sign it; all in a temporary directory renamed into place."""
    from flows.bundle import write_bundle_content
    from flows.keys import load_private_key
    from flows.signing import sign_bundle
    from synth.artifacts import atomic_dir
    from synth.data.canonical import load_dataset

    if not verdict.passed or approval.decision != "approved":
        raise PolicyBlocked("a release is signed only after a passing gate and an approval")
    key_passphrase = passphrase(cfg)
    load_private_key(cfg.private_key, passphrase=key_passphrase)  # a wrong key fails before the report is rendered
    public_report = report_stage(cfg, dataset=dataset, model=model, released=released, privacy_dir=privacy_dir,
                                 utility_dir=utility_dir, verdict=verdict, public=True)
    facts = release_facts(cfg, release_id=release_id, dataset=dataset, model=model, synthetic=synthetic,
                          released=released, privacy_dir=privacy_dir, utility_dir=utility_dir, verdict=verdict,
                          approval=approval)
    real_hashes = set(load_dataset(dataset).metadata["sha256"])
    out = cfg.workdir / BUNDLE
    with atomic_dir(out, overwrite=True) as tmp:
        write_bundle_content(tmp, synthetic_dir=released, public_report_dir=public_report, facts=facts,
                             summaries={"gate.json": verdict.model_dump(mode="json")}, real_pixel_hashes=real_hashes)
        sign_bundle(tmp, cfg.private_key, passphrase=key_passphrase, predicate=provenance_predicate(cfg, facts, {
            "dataset": dataset, "model": model, "synthetic": synthetic, "released": released,
            "privacy_audit": privacy_dir, "utility_audit": utility_dir}))
    return out


def passphrase(cfg: ReleaseConfig) -> bytes | None:
    """The signing key's passphrase from the environment variable the config names (None when it names none)."""
    import os

    if not cfg.passphrase_env:
        return None
    value = os.environ.get(cfg.passphrase_env)
    if not value:
        raise InputError(f"passphrase_env {cfg.passphrase_env}: the variable is not set or empty")
    return value.encode()


def published_stage(cfg: ReleaseConfig, release_id: str) -> Path | None:
    """The intact release already published under `release_id` (index repaired), or None: a rerun after a crash
    past the move into the releases directory finishes there instead of being refused as a duplicate."""
    from flows.keys import load_private_key
    from flows.publish import published

    public_key = load_private_key(cfg.private_key, passphrase=passphrase(cfg)).public_key()
    return published(cfg.releases_dir, public_key, release_id)


def publish_stage(cfg: ReleaseConfig, bundle: Path, release_id: str) -> Path:
    """Verify the signed bundle with the public half of the key and move it into the releases directory."""
    from flows.keys import load_private_key
    from flows.publish import publish

    public_key = load_private_key(cfg.private_key, passphrase=passphrase(cfg)).public_key()
    return publish(bundle, cfg.releases_dir, public_key, release_id=release_id)


def _dp_audit_dir(cfg: ReleaseConfig) -> Path | None:
    """The run's canary audit of its DP training (`flows.stage_dp_audit`), when it ran."""
    from flows.stage_dp_audit import DP_AUDIT

    path = cfg.workdir / DP_AUDIT
    return path if cfg.dp.enabled and cfg.dp_audit.enabled and path.is_dir() else None
