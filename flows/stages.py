"""The release pipeline's stages as plain functions over artifact directories, with content-hash caching.

Each stage writes one directory under the release's work dir. A stamp (`.stages/<name>.json`) records the hash
of the stage's inputs (their content hashes) and config; a rerun with the same key reuses the directory, so a
release that crashed resumes after the last finished stage (and training resumes from its last checkpoint).
Prefect tasks in `flows/release.py` are thin wrappers over these; tests call them without Prefect.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from flows.policy import GateInputs, Verdict, gate
from flows.release_config import ReleaseConfig
from synth.artifacts import atomic_file, read_header
from synth.config import build
from synth.errors import ConfigError, InputError, PolicyBlocked, where

if TYPE_CHECKING:
    from reports.facts import ApprovalFacts, ReleaseFacts

T = TypeVar("T", bound=BaseModel)

# The header file of each artifact kind, in the order they are looked for.
_HEADERS = ("dataset.json", "model_card.json", "privacy.json", "utility.json", "summary.json", "report.json")
STAMPS = ".stages"


def artifact_hash(root: Path) -> str:
    """Content hash of an artifact directory, read from its header (a known header name first, else the one
    top-level JSON file that is a synthgate header)."""
    for name in _HEADERS:
        if (Path(root) / name).is_file():
            return str(read_header(root, name)["content_hash"])
    for candidate in sorted(Path(root).glob("*.json")):
        with contextlib.suppress(InputError):
            return str(read_header(root, candidate.name)["content_hash"])
    raise InputError(where(root, "is not a synthgate artifact (no header found)"))


def stage_key(name: str, inputs: Mapping[str, str], config: Any) -> str:
    """Cache key of a stage: its name, its inputs' content hashes and its config."""
    blob = json.dumps({"stage": name, "inputs": dict(inputs), "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_stage(
    workdir: Path,
    name: str,
    *,
    inputs: Mapping[str, str],
    config: Any,
    build: Callable[[Path], Path],
    extra_outputs: Sequence[Path] = (),
    on_cached: Callable[[str, Path], None] | None = None,
) -> Path:
    """Run `build(out)` for `workdir/name` unless a finished run with the same key is there.

    An output without a matching stamp is stale (other inputs or config, or a crash between the stage's atomic
    rename and the stamp) and is removed before rebuilding, with any `extra_outputs` the stage also writes.
    """
    workdir = Path(workdir)
    out = workdir / name
    stamp = workdir / STAMPS / f"{name}.json"
    key = stage_key(name, inputs, config)
    if out.exists() and all(p.exists() for p in extra_outputs) and stamp.is_file():
        try:
            recorded = json.loads(stamp.read_text())
        except (OSError, json.JSONDecodeError):
            recorded = {}
        if recorded.get("key") == key:
            if on_cached:
                on_cached(name, out)
            return out
    for stale in (out, *extra_outputs):
        if stale.exists():
            shutil.rmtree(stale)
    stamp.unlink(missing_ok=True)
    result = Path(build(out))
    stamp.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(stamp) as tmp:
        tmp.write_text(json.dumps({"stage": name, "key": key, "inputs": dict(inputs)}, indent=2, sort_keys=True))
    return result


# ---------------------------------------------------------------------------------------------------------------
# The stages of a release, in pipeline order. Each returns the path of the artifact it wrote (or reused).
# ---------------------------------------------------------------------------------------------------------------

DATASET, VALIDATION, MODEL, SYNTHETIC = "dataset", "validation", "model", "synthetic"
PRIVACY, RELEASED, UTILITY = "audit-privacy", "synthetic-released", "audit-utility"
PRIVACY_REFERENCE = "audit-privacy-reference"
GUIDANCE = "guidance-selection"
REPORT, PUBLIC_REPORT, VERDICT, BUNDLE = "report", "report-public", "verdict.json", "bundle"


def shard_name(stage: str, index: int, count: int) -> str:
    """Directory of one shard of a mapped stage, e.g. `synthetic-shard-0-of-2`."""
    return f"{stage}-shard-{index}-of-{count}"


def with_absolute_paths(cfg: ReleaseConfig) -> ReleaseConfig:
    """The config with its paths made absolute: tasks may run in worker processes on other machines that share
    the work directory but not the flow's working directory."""
    return cfg.model_copy(update={
        "workdir": Path(cfg.workdir).absolute(),
        "releases_dir": Path(cfg.releases_dir).absolute(),
        "private_key": Path(cfg.private_key).absolute(),
    })


def ingest_stage(cfg: ReleaseConfig) -> Path:
    """The real dataset, in canonical form."""
    from synth.data.ingest import ingest

    src = cfg.source
    source_id = _source_identity(src.path, src.csv)
    return run_stage(
        cfg.workdir, DATASET, inputs={"source": source_id}, config=src.model_dump(mode="json"),
        build=lambda out: ingest(
            src.path, out, csv=src.csv, fmt=src.format, size=src.size, channels=src.channels,
            class_names=src.classes, duplicate_policy=src.duplicates, license=src.license,
            attribution=src.attribution,
        ),
    )


def _source_identity(path: str, csv: Path | None) -> str:
    """What identifies a source for caching: the file's hash, or a folder's listing (names, sizes, mtimes)."""
    from synth.artifacts import sha256_file
    from synth.data.medmnist import resolve

    p = Path(path)
    if not p.exists() and p.suffix != ".npz":
        p = resolve(path)
    if p.is_file():
        ident = sha256_file(p)
    elif p.is_dir():
        listing = sorted((str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns)
                         for f in p.rglob("*") if f.is_file())
        ident = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    else:
        raise InputError(where(p, "no such file or directory"))
    if csv is not None and Path(csv).is_file():
        ident += ":" + sha256_file(csv)
    return ident


def validate_stage(cfg: ReleaseConfig, dataset: Path) -> Path:
    """Validation report of the real dataset; raises ValidationFailed (exit 1) on a blocking finding."""
    from synth.data.validate import load_report, validate_dataset

    out = run_stage(
        cfg.workdir, VALIDATION, inputs={"dataset": artifact_hash(dataset)},
        config={"min_per_class": cfg.source.min_per_class},
        build=lambda out: validate_dataset(dataset, out, min_per_class=cfg.source.min_per_class).out or out,
    )
    load_report(out).raise_for_blocking()
    return out


def train_stage(cfg: ReleaseConfig, dataset: Path) -> Path:
    """The generator. A crashed run resumes from its checkpoint (same config ⇒ same weights)."""
    from synth.training import train

    train_cfg = cfg.train.model_copy(update={"device": cfg.device})
    config = {"train": train_cfg.model_dump(mode="json"), "dp": cfg.dp.model_dump(mode="json")}

    def build(out: Path) -> Path:
        ckpt = out.parent / f"{out.name}.ckpt"
        if cfg.training.nproc > 1:
            from synth.distributed import launch_training

            return launch_training(dataset, out, train_cfg, nproc=cfg.training.nproc,
                                   dp=_dp_config(cfg).to_dict() if cfg.dp.enabled else None,
                                   backend=cfg.training.backend, resume=ckpt.exists(), checkpoint_dir=ckpt,
                                   progress=_interactive())
        privacy = _dp_strategy(cfg, dataset) if cfg.dp.enabled else None
        return train(dataset, out, train_cfg, privacy=privacy, resume=ckpt.exists(), checkpoint_dir=ckpt,
                     progress=_interactive())

    return run_stage(cfg.workdir, MODEL, inputs={"dataset": artifact_hash(dataset)}, config=config, build=build)


def _interactive() -> bool:
    """Progress bars only for a person at a terminal (not in CI logs or Prefect workers)."""
    import sys

    return sys.stderr.isatty()


def _dp_config(cfg: ReleaseConfig) -> Any:
    from privacy.dp import DPConfig

    dp = cfg.dp
    return DPConfig(target_epsilon=dp.epsilon, target_delta=dp.delta, max_grad_norm=dp.max_grad_norm,
                    accountant=dp.accountant, noise_multiplicity=dp.noise_multiplicity,
                    max_physical_batch_size=dp.max_physical_batch_size)


def _dp_strategy(cfg: ReleaseConfig, dataset: Path) -> Any:
    from privacy.dp import make_strategy
    from synth.data.canonical import load_dataset

    n_train = int(load_dataset(dataset).header["counts"]["train"])
    return make_strategy(_dp_config(cfg), dataset_size=n_train)


def _generation_config(cfg: ReleaseConfig) -> dict[str, Any]:
    from synth.sampling import DEFAULT_SAMPLER

    return {**cfg.generate.model_dump(mode="json"), "sampler": cfg.generate.sampler or DEFAULT_SAMPLER}


def guidance_stage(cfg: ReleaseConfig, dataset: Path, model: Path) -> ReleaseConfig:
    """The config with its guidance scale fixed: as given, or (`guidance_scale: auto`) chosen on the real
    validation split for the utility the gate judges (`reports/guidance.py`)."""
    g = cfg.generate
    if g.guidance_scale != "auto":
        return cfg
    from reports.guidance import GuidanceSelectionConfig, read_guidance, select_guidance

    selection = build_config(GuidanceSelectionConfig, g.guidance_selection, "generate.guidance_selection")
    sampler = _generation_config(cfg)["sampler"]
    out = run_stage(
        cfg.workdir, GUIDANCE, inputs={"dataset": artifact_hash(dataset), "model": artifact_hash(model)},
        config={"selection": selection.model_dump(mode="json"), "sampler": sampler, "steps": g.steps,
                "batch_size": g.batch_size},
        build=lambda out: select_guidance(dataset, model, out, sampler=sampler, steps=g.steps, config=selection,
                                          device=cfg.device, batch_size=g.batch_size, progress=print),
    )
    chosen = float(read_guidance(out)["guidance_scale"])
    return cfg.model_copy(update={"generate": g.model_copy(update={"guidance_scale": chosen})})


def guidance_facts(cfg: ReleaseConfig) -> dict[str, Any] | None:
    """What the guidance selection tried and chose (None when the scale was given, not selected)."""
    from reports.guidance import read_guidance

    if cfg.generate.guidance_scale != "auto" or not (cfg.workdir / GUIDANCE).is_dir():
        return None
    h = read_guidance(cfg.workdir / GUIDANCE)
    return {"guidance_scale": h["guidance_scale"], "objective": h["objective"],
            "candidates": [{k: c.get(k) for k in ("guidance_scale", "balanced_accuracy", "worst_class_sensitivity")}
                           for c in h["candidates"]]}


def generate_stage(cfg: ReleaseConfig, model: Path, *, shard_index: int = 0, shard_count: int = 1) -> Path:
    """The synthetic set (or one shard of it: images i with i % shard_count == shard_index), every image's seed
    recorded."""
    from synth.generate import generate

    g, config = cfg.generate, _generation_config(cfg)
    if g.guidance_scale == "auto":
        raise ConfigError("generate.guidance_scale is 'auto': pass the config returned by guidance_stage, which "
                          "holds the chosen scale")
    name = SYNTHETIC if shard_count == 1 else shard_name(SYNTHETIC, shard_index, shard_count)
    return run_stage(
        cfg.workdir, name, inputs={"model": artifact_hash(model)},
        config={**config, "shard_index": shard_index, "shard_count": shard_count} if shard_count > 1 else config,
        build=lambda out: generate(
            model, out, n=None if g.per_class else g.n, per_class=g.per_class, balance=g.balance,
            sampler=config["sampler"],
            steps=g.steps, guidance_scale=g.guidance_scale, batch_size=g.batch_size, seed=g.seed,
            shard_index=shard_index, shard_count=shard_count, device=cfg.device,
            progress=_interactive() and shard_count == 1,
        ),
    )


def merge_synthetic_stage(cfg: ReleaseConfig, model: Path, shards: Sequence[Path]) -> Path:
    """The synthetic set from its shards: byte-identical to the single-shard run with the same seed."""
    from synth.generate import merge_shards

    if len(shards) == 1 and Path(shards[0]).name == SYNTHETIC:
        return Path(shards[0])
    return run_stage(
        cfg.workdir, SYNTHETIC,
        inputs={"model": artifact_hash(model), **{f"shard{i}": artifact_hash(p) for i, p in enumerate(shards)}},
        config={**_generation_config(cfg), "merged_from": len(shards)},
        build=lambda out: merge_shards(list(shards), out),
    )


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


def privacy_audit_stage(cfg: ReleaseConfig, dataset: Path, synthetic: Path, model: Path, *,
                        reference: Path | None = None, shards: Sequence[Path] | None = None) -> tuple[Path, Path]:
    """Memorization (merged from its shards when given), disclosure, the DP ledger check and membership
    inference; returns (audit dir, the set to release: the synthetic set without flagged images and with
    k-anonymity suppression when `filter_flagged`)."""
    from privacy.audit import audit_privacy

    audit_cfg = _privacy_audit_config(cfg)
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


def build_config(cls: type[T], data: Mapping[str, Any], name: str) -> T:
    """A stage's typed config from the release file's mapping (errors name the section)."""
    return build(cls, data, source=f"release config [{name}]")


def gate_inputs(privacy_dir: Path, utility_dir: Path, model: Path, released: Path) -> GateInputs:
    """The numbers the gate judges, read off the artifacts (and recomputed on the released set where it matters:
    what is released is what must be safe)."""
    import pandas as pd

    from privacy.audit import read_privacy_audit
    from privacy.disclosure import check_disclosure
    from synth.data.canonical import load_dataset

    audit = read_privacy_audit(privacy_dir)
    utility = read_header(utility_dir, "utility.json")
    card = read_header(model, "model_card.json")
    privacy = card.get("privacy") or {}
    rel = load_dataset(released)
    table = pd.read_parquet(privacy_dir / audit["memorization"]["table"], columns=["image_id", "flagged"])
    flagged_ids = set(table.loc[table["flagged"], "image_id"])
    released_ids = rel.metadata["image_id"]
    ledger_check = audit.get("ledger_check")
    membership = audit.get("membership") or {}
    # The released set is re-checked on the columns the audit judged released (label + patient attributes).
    disclosure = check_disclosure(rel.metadata, k=int(audit["disclosure"]["k"]),
                                  columns=list(audit["disclosure"]["columns"]))
    counts = rel.header["counts"]["per_class"].get("synthetic", {})
    return GateInputs(
        dp=bool(privacy),
        epsilon=privacy.get("epsilon"),
        delta=privacy.get("delta"),
        ledger_check_passed=None if ledger_check is None else bool(ledger_check.get("passed")),
        flagged_fraction=float(released_ids.isin(flagged_ids).mean()) if len(released_ids) else 1.0,
        flagged_fraction_before_filter=float(audit["memorization"]["flagged_fraction"]),
        # Either direction: an attacker can learn an attack's sign from shadow models.
        membership_auc=membership.get("auc_any_direction", membership.get("auc")),
        membership_tpr_at_1pct_fpr=membership.get("tpr_at_1pct_fpr"),
        **utility_gate_fields(utility),
        per_class_counts={str(k): int(v) for k, v in counts.items()},
        disclosure_violations=disclosure.violations + int(disclosure.released_patient_id),
    )


def utility_gate_fields(utility: Mapping[str, Any]) -> dict[str, float | None]:
    """The `GateInputs` fields read off a `utility.json` body (None where the audit did not measure them)."""
    return {
        "tstr_trtr_balanced_accuracy_ratio": _paired_ratio(utility, "balanced_accuracy"),
        "tstr_trtr_worst_class_ratio": _paired_ratio(utility, "worst_class_sensitivity"),
        "trts_balanced_accuracy": _value(utility, "trts", "balanced_accuracy"),
        "tstr_trtr_ratio": (utility.get("tstr_over_trtr") or {}).get("value"),
        "trts_accuracy": _value(utility, "trts", "accuracy"),
    }


def _value(utility: Mapping[str, Any], setting: str, metric: str) -> float | None:
    return ((utility.get(setting) or {}).get(metric) or {}).get("value")


def _paired_ratio(utility: Mapping[str, Any], metric: str) -> float | None:
    """TSTR/TRTR of `metric` (paired bootstrap point estimate); None when the audit did not measure it."""
    return (((utility.get("tstr_vs_trtr") or {}).get(metric) or {}).get("ratio") or {}).get("value")


def utility_markdown(utility_dir: Path) -> str:
    """Key utility numbers for the Prefect summary: balanced accuracy and the worst class first, with the floor a
    majority-class classifier scores (numbers only)."""
    from reports.facts import UtilityAuditFacts

    u = UtilityAuditFacts.from_utility(read_header(utility_dir, "utility.json"))

    def est(e: Any) -> str:
        return "–" if e is None else f"{e.value:.3f}"

    lines = ["| | TRTR | TSTR | TRTS |", "|---|---|---|---|"]
    for label, values in (("balanced accuracy", u.balanced_accuracy),
                          ("worst-class sensitivity", u.worst_class_sensitivity), ("AUROC", u.auroc)):
        lines.append(f"| {label} | " + " | ".join(est(values.get(p)) for p in ("TRTR", "TSTR", "TRTS")) + " |")
    worst = ", ".join(f"{p}: {c}" for p, c in u.worst_class.items())
    ratios = "; ".join(f"{m.replace('_', ' ')} {e.value:.3f}" for m, e in u.ratios.items())
    m = u.majority_baseline
    floor = (f"Always predicting '{m['class']}' scores balanced accuracy {float(m['balanced_accuracy']):.3f}, "
             f"accuracy {float(m['accuracy']):.3f}." if m.get("class") is not None else "")
    return "\n".join([*lines, "", f"TSTR/TRTR ratios: {ratios or '–'}. Worst classes: {worst or '–'}. {floor}"])


def gate_stage(cfg: ReleaseConfig, privacy_dir: Path, utility_dir: Path, model: Path, released: Path) -> Verdict:
    """Judge the run against the policy; the verdict is written to the work dir (small JSON)."""
    verdict = gate(gate_inputs(privacy_dir, utility_dir, model, released), cfg.policy)
    with atomic_file(cfg.workdir / VERDICT) as tmp:
        tmp.write_text(verdict.model_dump_json(indent=2))
    return verdict


def report_stage(
    cfg: ReleaseConfig, *, dataset: Path, model: Path, released: Path, privacy_dir: Path, utility_dir: Path,
    verdict: Verdict | None, public: bool,
) -> Path:
    """The steward's report (real images shown; never leaves the site) or its public variant (no real pixels)."""
    from reports.report import render_report

    out = cfg.workdir / (PUBLIC_REPORT if public else REPORT)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(out)  # cheap to redo, and the verdict changes between the two renderings of a run
    return render_report(privacy_dir=privacy_dir, utility_dir=utility_dir, real_dir=dataset, synthetic_dir=released,
                         model_dir=model, verdict=verdict, out=out, public=public)


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
    from privacy.audit import read_privacy_audit
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

    audit = read_privacy_audit(privacy_dir)
    utility = read_header(utility_dir, "utility.json")
    mem = audit["memorization"]
    membership = audit.get("membership") or {}
    n_generated = int(audit["counts"]["synthetic"])
    n_released = int(read_header(released, "dataset.json")["counts"]["total"])

    generation = read_header(synthetic, "dataset.json")
    generation_facts = dict(generation.get("config") or {})
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
        privacy=PrivacyFacts.from_model_dir(model),
        privacy_audit=PrivacyAuditFacts(
            flagged_fraction_before=float(mem["flagged_fraction"]),
            flagged_fraction_after=0.0 if released != synthetic else float(mem["flagged_fraction"]),
            removed=n_generated - n_released,
            thresholds={str(k): float(v) for k, v in (mem.get("thresholds") or {}).items()
                        if isinstance(v, int | float)},
            membership_auc=membership.get("auc"),
            disclosure_k=int(audit["config"].get("disclosure_k", 5)),
        ),
        utility_audit=UtilityAuditFacts.from_utility(utility,
                                                     classifier="small ResNet-style CNN (reports/classifier.py)"),
        gate=GateFacts(verdict=verdict.decision, reasons=tuple(verdict.reasons),
                       policy=cfg.policy.model_dump(mode="json")),
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
    key = load_private_key(cfg.private_key, passphrase=_passphrase(cfg))
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
        sign_bundle(tmp, key, predicate=provenance_predicate(cfg, facts, {
            "dataset": dataset, "model": model, "synthetic": synthetic, "released": released,
            "privacy_audit": privacy_dir, "utility_audit": utility_dir}))
    return out


def _passphrase(cfg: ReleaseConfig) -> bytes | None:
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

    public_key = load_private_key(cfg.private_key, passphrase=_passphrase(cfg)).public_key()
    return published(cfg.releases_dir, public_key, release_id)


def publish_stage(cfg: ReleaseConfig, bundle: Path, release_id: str) -> Path:
    """Verify the signed bundle with the public half of the key and move it into the releases directory."""
    from flows.keys import load_private_key
    from flows.publish import publish

    public_key = load_private_key(cfg.private_key, passphrase=_passphrase(cfg)).public_key()
    return publish(bundle, cfg.releases_dir, public_key, release_id=release_id)
