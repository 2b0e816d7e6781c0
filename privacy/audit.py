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
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from privacy.disclosure import check_disclosure
from privacy.embeddings import EncoderConfig, load_encoder, save_encoder, train_encoder, training_data_id
from privacy.ledger_check import LEDGER_FILE, check_ledger
from privacy.membership import MembershipConfig, membership_audit, membership_summary
from privacy.memorization import ImageSet, MemorizationConfig, check_memorization, filter_flagged
from synth.artifacts import atomic_dir, read_header, sha256_file, write_header, write_json
from synth.data.canonical import Dataset, image_spec, load_dataset
from synth.errors import InputError, where

KIND = "privacy_audit"
SCHEMA_VERSION = 1
HEADER = "privacy.json"
TABLE = "memorization.parquet"
NULL_TABLE = "holdout_distances.parquet"
PLOTS = "plots.json"
ENCODER_DIR = "encoder"
MEMBER_SPLIT = "train"
HOLDOUT_SPLITS = ("val", "test")


class PrivacyAuditConfig(BaseModel):
    """Everything that shapes a privacy audit (written into the artifact's header)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memorization: MemorizationConfig = MemorizationConfig()
    encoder: EncoderConfig = EncoderConfig()
    # A saved encoder (`privacy.embeddings.save_encoder`) trained on this real dataset's training split; None:
    # train one (EncoderConfig) for this audit.
    encoder_dir: Path | None = None
    disclosure_k: int = Field(5, ge=1)
    disclosure_columns: tuple[str, ...] | None = None
    # Blocking threshold on the share of synthetic images flagged as copies; None: flagged images only warn.
    max_flagged_fraction: float | None = Field(None, ge=0.0, le=1.0)
    ledger_tolerance: float = Field(0.01, ge=0.0, lt=1.0)
    # Membership inference on the model (when a model is given); None skips it.
    membership: MembershipConfig | None = MembershipConfig()


@dataclass(frozen=True)
class Finding:
    severity: str  # "block" | "warn" | "info"
    rule: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"severity": self.severity, "rule": self.rule, "message": self.message}


def _images(ds: Dataset) -> np.ndarray:
    """The dataset's images, checked: readable, uint8 N×H×W[×C], one per metadata row."""
    path = ds.root / "images.npy"
    try:
        images = ds.images
    except (ValueError, OSError, EOFError) as e:
        raise InputError(where(path, f"cannot be read as a numpy array ({e.__class__.__name__}: {e})")) from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise InputError(where(path, f"must hold uint8 N×H×W[×C] images, got {images.dtype} {images.shape}"))
    try:
        n_meta = len(ds.metadata)
    except (ValueError, OSError) as e:
        raise InputError(where(ds.root / "metadata.parquet", f"cannot be read ({e.__class__.__name__})")) from None
    if len(images) != n_meta:
        raise InputError(where(ds.root, f"{len(images)} images but {n_meta} metadata rows"))
    return images


def _image_set(ds: Dataset, images: np.ndarray, splits: tuple[str, ...] | None, name: str) -> ImageSet:
    meta = ds.metadata
    for col in ("image_id", "sha256"):
        if col not in meta.columns:
            raise InputError(where(ds.root / "metadata.parquet", f"has no {col!r} column"))
    mask = np.ones(len(meta), dtype=bool) if splits is None else meta["split"].isin(splits).to_numpy()
    return ImageSet.from_frame(np.asarray(images[mask]), meta[mask].reset_index(drop=True), name=name)


def _spec_text(spec: Mapping[str, Any]) -> str:
    return f"{spec['height']}×{spec['width']}×{spec['channels']} (H×W×C)"


@dataclass(frozen=True)
class _Inputs:
    real: Dataset
    synthetic: Dataset
    train: ImageSet
    holdout: ImageSet
    synth: ImageSet
    model_hash: str | None
    model_card: dict[str, Any] | None


def _load_inputs(real_dir: Path, synthetic_dir: Path, model_dir: Path | None) -> _Inputs:
    real, synthetic = load_dataset(real_dir), load_dataset(synthetic_dir)
    real_images, synth_images = _images(real), _images(synthetic)
    if not len(synth_images):
        raise InputError(where(synthetic_dir, "the synthetic dataset holds no images"))
    real_spec, synth_spec = image_spec(real_images), image_spec(synth_images)
    if (real_spec["height"], real_spec["width"], real_spec["channels"]) != (
        synth_spec["height"], synth_spec["width"], synth_spec["channels"]
    ):
        raise InputError(where(synthetic_dir, f"synthetic images are {_spec_text(synth_spec)} but the real images "
                                              f"are {_spec_text(real_spec)}"))
    train = _image_set(real, real_images, (MEMBER_SPLIT,), "real train split")
    if not len(train):
        raise InputError(where(real_dir, f"has no {MEMBER_SPLIT!r} split (the members the audit protects)"))
    holdout = _image_set(real, real_images, HOLDOUT_SPLITS, "real holdout (val+test)")
    if not len(holdout):
        raise InputError(where(real_dir, "has no holdout images (val or test split) to calibrate thresholds on"))
    synth = _image_set(synthetic, synth_images, None, "synthetic")
    model_hash, card = None, None
    if model_dir is not None:
        card = read_header(Path(model_dir), "model_card.json", kind="model")
        model_hash = str(card["content_hash"])
    return _Inputs(real, synthetic, train, holdout, synth, model_hash, card)


def _encoder(config: PrivacyAuditConfig, inputs: _Inputs):
    data_hash = training_data_id(inputs.real.content_hash, MEMBER_SPLIT)
    if config.encoder_dir is None:
        return train_encoder(inputs.train.images, config.encoder, data_hash=data_hash), True
    enc = load_encoder(config.encoder_dir)
    trained_on = enc.meta.get("trained_on", {}).get("data_hash")
    if trained_on != data_hash:
        raise InputError(where(config.encoder_dir, f"encoder was trained on {trained_on!r}, not on this real "
                                                   f"dataset's training split ({data_hash!r})"))
    return enc, False


def _check_outputs(out: Path, filter_out: Path | None) -> None:
    for path, what in ((out, "--out"), (filter_out, "--filter")):
        if path is None:
            continue
        if Path(path).exists():
            raise InputError(where(path, f"already exists; choose another {what} or remove it"))
        if not Path(path).parent.is_dir():
            raise InputError(where(Path(path).parent, f"{what}'s parent directory does not exist"))
    if filter_out is not None and Path(filter_out).resolve() == Path(out).resolve():
        raise InputError(where(filter_out, "--filter and --out must be different directories"))


def _findings(config: PrivacyAuditConfig, mem: Mapping[str, Any], disclosure: Mapping[str, Any],
              ledger: Mapping[str, Any] | None, inputs: _Inputs) -> list[Finding]:
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


def audit_privacy(
    real_dir: Path,
    synthetic_dir: Path,
    out: Path,
    *,
    model_dir: Path | None = None,
    config: PrivacyAuditConfig | None = None,
    filter_out: Path | None = None,
) -> Path:
    """Audit `synthetic_dir` against the real dataset `real_dir` (and the model in `model_dir`, if given) and
    write the privacy audit directory `out`. With `filter_out`, also write the synthetic dataset without its
    flagged images and with k-anonymity suppression applied. Returns `out`."""
    config = config or PrivacyAuditConfig()
    out = Path(out)
    _check_outputs(out, filter_out)
    inputs = _load_inputs(Path(real_dir), Path(synthetic_dir), Path(model_dir) if model_dir else None)
    ledger = check_ledger(Path(model_dir), tolerance=config.ledger_tolerance) if model_dir else None
    disclosure = check_disclosure(
        inputs.synthetic.metadata, k=config.disclosure_k, columns=config.disclosure_columns,
        real_attributes=inputs.real.header.get("attributes", []),
    )
    encoder, trained = _encoder(config, inputs)
    result = check_memorization(inputs.train, inputs.holdout, inputs.synth, encoder=encoder,
                                config=config.memorization)
    membership = None
    if model_dir is not None and config.membership is not None:
        membership = membership_summary(membership_audit(Path(model_dir), Path(real_dir), config=config.membership))

    ledger_json = None if ledger is None else {**ledger.to_json(), "message": ledger.message()}
    findings = _findings(config, result.summary, disclosure.to_json(), ledger_json, inputs)
    passed = not any(f.severity == "block" for f in findings)
    input_hashes = {"real": inputs.real.content_hash, "synthetic": inputs.synthetic.content_hash}
    if inputs.model_hash:
        input_hashes["model"] = inputs.model_hash
    if ledger is not None:
        input_hashes["privacy_ledger"] = sha256_file(Path(ledger.path))
    if not trained:
        input_hashes["encoder"] = str(encoder.meta.get("content_hash", ""))

    filter_written = False
    try:
        with atomic_dir(out) as tmp:
            result.table.to_parquet(tmp / TABLE, index=False)
            result.null_table.to_parquet(tmp / NULL_TABLE, index=False)
            write_json(tmp / PLOTS, {"histograms": result.histograms, "top_pairs": result.top_pairs})
            save_encoder(encoder, tmp / ENCODER_DIR)
            filtered = None
            if filter_out is not None:
                if result.summary["flagged"] >= len(inputs.synth):
                    filtered = {"written": False, "reason": "every synthetic image is flagged"}
                else:
                    path = filter_flagged(Path(synthetic_dir), result, Path(filter_out), k=config.disclosure_k,
                                          real_attributes=inputs.real.header.get("attributes", []))
                    filter_written = True
                    header = read_header(path, "dataset.json")
                    filtered = {"written": True, "path": str(path), "content_hash": header["content_hash"],
                                "images": header["counts"]["total"], **header.get("filtered", {})}
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
                "disclosure": disclosure.to_json(),
                "ledger_check": ledger_json,
                "membership": membership,
                "encoder": {"dir": ENCODER_DIR, "trained_for_this_audit": trained, **encoder.meta},
                "filtered": filtered,
            }
            files = [TABLE, NULL_TABLE, PLOTS, *(f"{ENCODER_DIR}/{p.name}" for p in (tmp / ENCODER_DIR).iterdir())]
            write_header(tmp, HEADER, kind=KIND, schema_version=SCHEMA_VERSION, files=files, inputs=input_hashes,
                         config=config.model_dump(mode="json"), body=body)
    except BaseException:
        if filter_written:  # the two directories stand or fall together
            shutil.rmtree(Path(filter_out), ignore_errors=True)
        raise
    return out


def read_privacy_audit(root: Path) -> dict[str, Any]:
    """The header (`privacy.json`) of a privacy audit directory."""
    return read_header(Path(root), HEADER, kind=KIND)
