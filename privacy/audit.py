"""The privacy audit artifact: memorization, disclosure and the DP ledger check of one synthetic dataset.

`audit_privacy(real_dir, synthetic_dir, out, model_dir=..., config=...)` writes ONE directory atomically:

    privacy.json               header (kind "privacy_audit"; inputs = content hashes of real, synthetic, model,
                               ledger, encoder) and the findings: memorization summary, disclosure, ledger check,
                               membership inference on the model (privacy/membership.py) when a model is given
    memorization.parquet       one row per synthetic image (see `privacy.memorization`)
    holdout_distances.parquet  the null: one row per real holdout image, with the exclusion reason if excluded
    plots.json                 histograms of synthetic→train vs holdout→train distances per space, with the
                               thresholds, and the closest synthetic–training pairs (ids and distances only)
    encoder/                   the copy-detection encoder used (trained on the real TRAINING split; its weights
                               derive from patient images: keep this directory internal)

The real dataset's `train` split are the members, its `val` + `test` splits the holdout. All inputs are checked
before anything is computed or written; user errors are `InputError` (exit 2), and a failed blocking finding
leaves a complete audit with `passed: false` (the CLI exits 1).

Sharded, the memorization search is three kinds of task (the single-process audit runs the same three steps in
memory, so there is one code path):

    prepare_privacy_reference(real_dir, ref, config=cfg)                     once: encoder, embeddings, null,
                                                                              thresholds -> "privacy_reference"
    search_synthetic_shard(ref, synthetic_dir, shard_i, shard_index=i, shard_count=S)    per shard (any
                                                                              machine) -> "memorization_shard"
    audit_privacy(real_dir, synthetic_dir, out, config=cfg, reference=ref, shards=[shard_0, ...])    merge

(the first two in `privacy.audit_sharding`). The config is `privacy.audit_config.PrivacyAuditConfig`; the inputs
are loaded and checked by `privacy.audit_inputs`.

The merged audit's memorization.parquet, holdout_distances.parquet and plots.json are byte-identical to a
single-process audit's, and its findings and memorization summary equal (timings apart, under
`memorization.timings`), given the same library versions and thread counts (OpenBLAS' float sums depend on the
thread count) and no GPU/CPU mix. The reference holds real training images and embeddings: keep it internal.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privacy.audit_config import ENCODER_DIR, SCHEMA_VERSION, PrivacyAuditConfig
from privacy.audit_inputs import HOLDOUT_SPLITS, AuditInputs, audit_encoder, check_outputs, load_inputs
from privacy.audit_sharding import check_reference, open_reference, open_shards
from privacy.disclosure import check_disclosure
from privacy.embeddings import Encoder, save_encoder
from privacy.filtering import filter_flagged
from privacy.ledger_check import LEDGER_FILE, LedgerCheck, check_ledger
from privacy.membership import membership_audit, membership_summary
from privacy.memorization import MemorizationResult, merge_shards
from privacy.memorization_reference import prepare_reference
from privacy.memorization_shards import ShardResult, search_shard, synthetic_block_size
from synth import layout
from synth.artifacts import atomic_dir, read_header, sha256_file, write_header, write_json
from synth.errors import InputError, where
from synth.progress import phase

KIND = layout.PRIVACY_AUDIT_KIND
HEADER = layout.PRIVACY_AUDIT_HEADER
TABLE = layout.MEMORIZATION_TABLE
NULL_TABLE = "holdout_distances.parquet"
PLOTS = "plots.json"
PHASE = "privacy audit"  # the prefix of its progress lines (synth.progress)


@dataclass(frozen=True)
class Finding:
    severity: str  # "block" | "warn" | "info"
    rule: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"severity": self.severity, "rule": self.rule, "message": self.message}


def _findings(config: PrivacyAuditConfig, mem: Mapping[str, Any], disclosure: Mapping[str, Any],
              ledger: Mapping[str, Any] | None, inputs: AuditInputs) -> list[Finding]:
    out: list[Finding] = []
    n, flagged = mem["synthetic_images"], mem["flagged"]
    if mem["exact_copies"]:
        out.append(Finding("block", "memorization.exact_copies",
                           f"{mem['exact_copies']} synthetic images are pixel-identical to training images"))
    if mem.get("holdout_copies"):
        out.append(Finding("block", "memorization.holdout_copies",
                           f"{mem['holdout_copies']} synthetic images are pixel-identical to real holdout images"))
    limit = config.max_flagged_fraction
    if limit is not None and mem["flagged_fraction"] > limit:
        out.append(Finding("block", "memorization.flagged_fraction",
                           f"{flagged}/{n} synthetic images ({mem['flagged_fraction']:.2%}) are flagged as copies "
                           f"of training images; the limit is {limit:.2%}"))
    elif flagged:
        out.append(Finding("warn", "memorization.flagged",
                           f"{flagged}/{n} synthetic images ({mem['flagged_fraction']:.2%}) are flagged: closer to a "
                           f"training image than the calibrated thresholds or pixel-identical to a real image "
                           f"(expected false-flag rate on unseen real images "
                           f"{mem['null']['expected_false_flag_rate']:.2%}); review the closest pairs"))
    null = mem["null"]
    if null["quantile_below_resolution"]:
        out.append(Finding("warn", "memorization.calibration",
                           f"only {null['size']} holdout images calibrate quantile {mem['quantile']}: the thresholds "
                           f"are the smallest holdout distances (false-flag rate ~{1 / (null['size'] + 1):.1%})"))
    excluded = null["excluded_exact_duplicates"] + null["excluded_near_duplicates"]
    if excluded:
        out.append(Finding("info", "memorization.calibration_exclusions",
                           f"{excluded} holdout images duplicate training images ({null['excluded_exact_duplicates']}"
                           f" exact, {null['excluded_near_duplicates']} near) and were left out of calibration"))
    if not disclosure["passed"]:
        if disclosure["released_patient_id"]:
            out.append(Finding("block", "disclosure.patient_id", "the synthetic metadata releases a patient_id column"))
        if disclosure["violations"]:
            out.append(Finding("block", "disclosure.k_anonymity",
                               f"{disclosure['violations']} combinations of {disclosure['columns']} hold fewer than "
                               f"k={disclosure['k']} synthetic records ({disclosure['records_in_violations']} in all)"))
    if ledger is not None:
        sev = "info" if ledger["passed"] else "block"
        out.append(Finding(sev, "ledger.epsilon", ledger["message"]))
    elif inputs.model_card is not None and inputs.model_card.get("privacy"):
        out.append(Finding("block", "ledger.missing",
                           f"the model card declares differential privacy but the model has no {LEDGER_FILE}"))
    return out



def _dir_files(root: Path, sub: str) -> list[str]:
    return sorted(f"{sub}/{p.relative_to(root / sub).as_posix()}" for p in (root / sub).rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------------------
# The audit


@dataclass(frozen=True)
class _Memorization:
    """The merged memorization check and what it was computed with."""

    result: MemorizationResult
    parts: list[ShardResult]
    encoder: Encoder
    trained: bool  # the encoder was trained for this audit (or for its reference)
    encoder_source: Path | None  # the reference's encoder directory to copy; None: save `encoder`
    input_hashes: dict[str, str]  # the reference's and every shard's content hash (sharded)
    threads: list[Any]  # each shard's thread counts (sharded)


def _memorization(config: PrivacyAuditConfig, inputs: AuditInputs, reference: Path | None,
                  shards: Sequence[Path] | None) -> _Memorization:
    """Run the memorization check in memory as one shard, or merge a reference's shards after checking that they
    match these inputs and this config."""
    if reference is None:
        encoder, trained = audit_encoder(config, inputs.real, inputs.train)
        phase(PHASE, f"memorization: embedding {len(inputs.train)} training and {len(inputs.holdout)} holdout images")
        ref = prepare_reference(inputs.train, inputs.holdout, encoder=encoder, config=config.memorization)
        phase(PHASE, f"memorization: nearest training image of {len(inputs.synth)} synthetic images")
        parts = [search_shard(ref, inputs.synth.images)]
        return _Memorization(merge_shards(ref, inputs.synth, parts), parts, encoder, trained, None, {}, [])
    reference = Path(reference)
    ref_header, ref, encoder = open_reference(reference)
    check_reference(reference, ref_header, ref, inputs.real, config)
    parts, shard_headers = open_shards(list(shards or []), str(ref_header["content_hash"]), inputs.synthetic,
                                       len(inputs.synth), ref.config)
    ordered = sorted(shard_headers, key=lambda h: int(h["shard_index"]))
    hashes = {"privacy_reference": str(ref_header["content_hash"])}
    for h in ordered:
        hashes[f"memorization_shard_{int(h['shard_index'])}"] = str(h["content_hash"])
    return _Memorization(
        result=merge_shards(ref, inputs.synth, parts), parts=parts, encoder=encoder,
        trained=bool(ref_header["encoder"].get("trained_for_this_audit")), encoder_source=reference / ENCODER_DIR,
        input_hashes=hashes, threads=[h.get("threads") for h in ordered],
    )


def _input_hashes(inputs: AuditInputs, mem: _Memorization, ledger: LedgerCheck | None) -> dict[str, str]:
    """The header's `inputs`: content hashes of everything the audit read."""
    hashes = {"real": inputs.real.content_hash, "synthetic": inputs.synthetic.content_hash, **mem.input_hashes}
    if inputs.model_hash:
        hashes["model"] = inputs.model_hash
    if ledger is not None:
        hashes["privacy_ledger"] = sha256_file(Path(ledger.path))
    if not mem.trained:
        hashes["encoder"] = str(mem.encoder.meta.get("content_hash", ""))
    return hashes


def audit_privacy(
    real_dir: Path,
    synthetic_dir: Path,
    out: Path,
    *,
    model_dir: Path | None = None,
    config: PrivacyAuditConfig | None = None,
    filter_out: Path | None = None,
    reference: Path | None = None,
    shards: Sequence[Path] | None = None,
) -> Path:
    """Audit `synthetic_dir` against the real dataset `real_dir` (and the model in `model_dir`, if given) and
    write the privacy audit directory `out`. With `filter_out`, also write the synthetic dataset without its
    flagged images and with k-anonymity suppression applied. Returns `out`.

    Sharded: `reference` (from `prepare_privacy_reference`) and `shards` (from `search_synthetic_shard`, every
    shard index once, any order) are merged instead of searching here; they must match `real_dir`,
    `synthetic_dir` and `config`. Without them the same steps run in memory as one shard."""
    config = config or PrivacyAuditConfig()
    out = Path(out)
    check_outputs(out, filter_out)
    if (reference is None) != (shards is None):
        named = reference if reference is not None else next(iter(shards or []), out)
        raise InputError(where(named, "a privacy reference and its memorization shards go together: give both "
                                      "or neither"))
    inputs = load_inputs(Path(real_dir), Path(synthetic_dir), Path(model_dir) if model_dir else None)
    ledger = check_ledger(Path(model_dir), tolerance=config.ledger_tolerance) if model_dir else None
    disclosure = check_disclosure(
        inputs.synthetic.metadata, k=config.disclosure_k, columns=config.disclosure_columns,
        real_attributes=inputs.real.header.get("attributes", []),
    )
    mem = _memorization(config, inputs, reference, shards)
    result = mem.result
    membership = None
    if model_dir is not None and config.membership is not None:
        phase(PHASE, "membership inference: started")
        membership = membership_summary(membership_audit(Path(model_dir), Path(real_dir), config=config.membership))
        phase(PHASE, "membership inference: done")

    ledger_json = None if ledger is None else {**ledger.to_json(), "message": ledger.message()}
    findings = _findings(config, result.summary, disclosure.to_json(), ledger_json, inputs)
    passed = not any(f.severity == "block" for f in findings)
    input_hashes = _input_hashes(inputs, mem, ledger)
    sharding = {
        "shard_count": len(mem.parts),
        "block_size": synthetic_block_size(len(inputs.synth), config.memorization),
        "rows": [[p.lo, p.hi] for p in sorted(mem.parts, key=lambda p: p.lo)],
        "privacy_reference": input_hashes.get("privacy_reference"),
        "threads": mem.threads,
    }
    body = {
        "passed": passed,
        "findings": [f.to_json() for f in findings],
        "counts": {
            "train": len(inputs.train),
            "holdout": len(inputs.holdout),
            "holdout_splits": list(HOLDOUT_SPLITS),
            "synthetic": len(inputs.synth),
        },
        "memorization": {**result.summary, "table": TABLE, "holdout_table": NULL_TABLE, "plots": PLOTS},
        "memorization_sharding": sharding,
        "disclosure": disclosure.to_json(),
        "ledger_check": ledger_json,
        "membership": membership,
        "encoder": {"dir": ENCODER_DIR, "trained_for_this_audit": mem.trained, **mem.encoder.meta},
    }
    _write_audit(out, mem, body, config=config, inputs=inputs, input_hashes=input_hashes,
                 synthetic_dir=Path(synthetic_dir), filter_out=filter_out)
    return out


def _write_audit(out: Path, mem: _Memorization, body: Mapping[str, Any], *, config: PrivacyAuditConfig,
                 inputs: AuditInputs, input_hashes: Mapping[str, str], synthetic_dir: Path,
                 filter_out: Path | None) -> None:
    """Write the audit directory `out` atomically: the tables, the plot data, the encoder and the header (`body`
    plus `filtered`); with `filter_out`, the filtered synthetic set too. The two directories stand or fall
    together."""
    result = mem.result
    filter_written = False
    try:
        with atomic_dir(out) as tmp:
            result.table.to_parquet(tmp / TABLE, index=False)
            result.null_table.to_parquet(tmp / NULL_TABLE, index=False)
            write_json(tmp / PLOTS, {"histograms": result.histograms, "top_pairs": result.top_pairs})
            if mem.encoder_source is not None:
                shutil.copytree(mem.encoder_source, tmp / ENCODER_DIR)
            else:
                save_encoder(mem.encoder, tmp / ENCODER_DIR)
            filtered = None
            if filter_out is not None:
                if result.summary["flagged"] >= len(inputs.synth):
                    filtered = {"written": False, "reason": "every synthetic image is flagged"}
                else:
                    path = filter_flagged(synthetic_dir, result, Path(filter_out), k=config.disclosure_k,
                                          real_attributes=inputs.real.header.get("attributes", []))
                    filter_written = True
                    header = read_header(path, "dataset.json")
                    filtered = {"written": True, "path": str(path), "content_hash": header["content_hash"],
                                "images": header["counts"]["total"], **header.get("filtered", {})}
            files = [TABLE, NULL_TABLE, PLOTS, *_dir_files(tmp, ENCODER_DIR)]
            write_header(tmp, HEADER, kind=KIND, schema_version=SCHEMA_VERSION, files=files, inputs=input_hashes,
                         config=config.model_dump(mode="json"), body={**body, "filtered": filtered})
    except BaseException:
        if filter_written:  # the two directories stand or fall together
            shutil.rmtree(Path(filter_out), ignore_errors=True)
        raise


def read_privacy_audit(root: Path) -> dict[str, Any]:
    """The header (`privacy.json`) of a privacy audit directory, checked against its schema
    (`privacy.audit_result`, where the typed reader lives)."""
    from privacy.audit_result import read_privacy_audit as read

    return read(root)
