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

The merged audit's memorization.parquet, holdout_distances.parquet and plots.json are byte-identical to a
single-process audit's, and its findings and memorization summary equal (timings apart, under
`memorization.timings`), given the same library versions and thread counts (OpenBLAS' float sums depend on the
thread count) and no GPU/CPU mix. The reference holds real training images and embeddings: keep it internal.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from privacy.disclosure import check_disclosure
from privacy.embeddings import (
    ENCODER_HEADER,
    ENCODER_WEIGHTS,
    Encoder,
    EncoderConfig,
    load_encoder,
    save_encoder,
    train_encoder,
    training_data_id,
)
from privacy.filtering import filter_flagged
from privacy.image_set import ImageSet
from privacy.ledger_check import LEDGER_FILE, check_ledger
from privacy.membership import MembershipConfig, membership_audit, membership_summary
from privacy.memorization import merge_shards
from privacy.memorization_artifacts import read_reference, read_shard, write_reference_files, write_shard_files
from privacy.memorization_config import MemorizationConfig
from privacy.memorization_reference import Reference, prepare_reference
from privacy.memorization_shards import ShardResult, search_shard, shard_rows, synthetic_block_size
from synth.artifacts import atomic_dir, read_header, sha256_file, verify_content, write_header, write_json
from synth.data.canonical import Dataset, image_spec, load_dataset
from synth.errors import ConfigError, InputError, where

KIND = "privacy_audit"
SCHEMA_VERSION = 1
HEADER = "privacy.json"
TABLE = "memorization.parquet"
NULL_TABLE = "holdout_distances.parquet"
PLOTS = "plots.json"
ENCODER_DIR = "encoder"
MEMBER_SPLIT = "train"
HOLDOUT_SPLITS = ("val", "test")
REFERENCE_KIND = "privacy_reference"
REFERENCE_HEADER = "reference.json"
SHARD_KIND = "memorization_shard"
SHARD_HEADER = "shard.json"
SHARD_SCHEMA_VERSION = 1
# Synthetic rows a memorization shard should hold at least (below that, a task's fixed costs dominate).
ROWS_PER_SHARD = 8192


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


def _real_sets(real: Dataset, real_images: np.ndarray, real_dir: Path) -> tuple[ImageSet, ImageSet]:
    train = _image_set(real, real_images, (MEMBER_SPLIT,), "real train split")
    if not len(train):
        raise InputError(where(real_dir, f"has no {MEMBER_SPLIT!r} split (the members the audit protects)"))
    holdout = _image_set(real, real_images, HOLDOUT_SPLITS, "real holdout (val+test)")
    if not len(holdout):
        raise InputError(where(real_dir, "has no holdout images (val or test split) to calibrate thresholds on"))
    return train, holdout


def _load_inputs(real_dir: Path, synthetic_dir: Path, model_dir: Path | None) -> _Inputs:
    real, synthetic = load_dataset(real_dir), load_dataset(synthetic_dir)
    real_images, synth_images = _images(real), _images(synthetic)
    if not len(synth_images):
        raise InputError(where(synthetic_dir, "the synthetic dataset holds no images"))
    _check_spec(synthetic_dir, image_spec(synth_images), image_spec(real_images))
    train, holdout = _real_sets(real, real_images, real_dir)
    synth = _image_set(synthetic, synth_images, None, "synthetic")
    model_hash, card = None, None
    if model_dir is not None:
        card = read_header(Path(model_dir), "model_card.json", kind="model")
        model_hash = str(card["content_hash"])
    return _Inputs(real, synthetic, train, holdout, synth, model_hash, card)


def _check_spec(synthetic_dir: Path, synth_spec: Mapping[str, Any], real_spec: Mapping[str, Any]) -> None:
    if (real_spec["height"], real_spec["width"], real_spec["channels"]) != (
        synth_spec["height"], synth_spec["width"], synth_spec["channels"]
    ):
        raise InputError(where(synthetic_dir, f"synthetic images are {_spec_text(synth_spec)} but the real images "
                                              f"are {_spec_text(real_spec)}"))


def _encoder(config: PrivacyAuditConfig, real: Dataset, train: ImageSet) -> tuple[Encoder, bool]:
    data_hash = training_data_id(real.content_hash, MEMBER_SPLIT)
    if config.encoder_dir is None:
        return train_encoder(train.images, config.encoder, data_hash=data_hash), True
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


# --------------------------------------------------------------------------------------------------------------
# Sharded memorization search: the reference, the shards


def _reference_config(config: PrivacyAuditConfig) -> dict[str, Any]:
    """The part of the audit config a reference is computed from (checked again at the merge)."""
    return {
        "memorization": config.memorization.model_dump(mode="json"),
        "encoder": config.encoder.model_dump(mode="json"),
        "encoder_dir": str(config.encoder_dir) if config.encoder_dir is not None else None,
    }


def _dir_files(root: Path, sub: str) -> list[str]:
    return sorted(f"{sub}/{p.relative_to(root / sub).as_posix()}" for p in (root / sub).rglob("*") if p.is_file())


def prepare_privacy_reference(real_dir: Path, out: Path, *, config: PrivacyAuditConfig | None = None) -> Path:
    """Step 1 of a sharded privacy audit: train (or load, `config.encoder_dir`) the copy-detection encoder, embed
    the real training and holdout images, search holdout → train in every space (the null), calibrate the
    thresholds; write the artifact directory `out` (kind "privacy_reference") holding everything the per-shard
    searches and the merge need. It holds real training images and embeddings: keep it internal. Returns `out`."""
    config = config or PrivacyAuditConfig()
    out, real_dir = Path(out), Path(real_dir)
    _check_outputs(out, None)
    real = load_dataset(real_dir)
    train, holdout = _real_sets(real, _images(real), real_dir)
    encoder, trained = _encoder(config, real, train)
    reference = prepare_reference(train, holdout, encoder=encoder, config=config.memorization)
    inputs = {"real": real.content_hash}
    if not trained:
        inputs["encoder"] = str(encoder.meta.get("content_hash", ""))
    with atomic_dir(out) as tmp:
        files, body = write_reference_files(reference, tmp)
        save_encoder(encoder, tmp / ENCODER_DIR)
        # Weights only: encoder.json holds a timestamp and the training time, which would change the reference's
        # hash (a cache key of every shard) on each run; load_encoder checks it against its own hash.
        files.append(f"{ENCODER_DIR}/{ENCODER_WEIGHTS}")
        meta = {k: v for k, v in encoder.meta.items() if k != "content_hash"}
        write_header(tmp, REFERENCE_HEADER, kind=REFERENCE_KIND, schema_version=SCHEMA_VERSION, files=files,
                     inputs=inputs, config=_reference_config(config),
                     body={"memorization_reference": body,
                           "encoder": {"dir": ENCODER_DIR, "trained_for_this_audit": trained, **meta},
                           "internal": "holds real training images and embeddings derived from them"})
    return out


def _open_reference(reference_dir: Path) -> tuple[dict[str, Any], Reference, Encoder]:
    """A reference's header (content verified), the reference itself and its encoder."""
    reference_dir = Path(reference_dir)
    header = read_header(reference_dir, REFERENCE_HEADER, kind=REFERENCE_KIND)
    verify_content(reference_dir, header)
    encoder = load_encoder(reference_dir / ENCODER_DIR)
    timings = (header.get("memorization_reference") or {}).get("timings")
    return header, read_reference(reference_dir, encoder, timings=timings), encoder


def privacy_audit_shard_count(n_synthetic: int, *, block: int | None = None, rows_per_shard: int = ROWS_PER_SHARD,
                              max_shards: int | None = None) -> int:
    """A sensible number of memorization shards for `n_synthetic` synthetic images: about one per
    `rows_per_shard` rows, at most one per block of `block` rows (default `MemorizationConfig().block_size`; a
    shard is whole blocks) and at most `max_shards`; at least 1."""
    if block is not None and block < 1:
        raise ConfigError(f"memorization block size must be >= 1, got {block}")
    block = synthetic_block_size(n_synthetic, MemorizationConfig() if block is None else
                                 MemorizationConfig(block_size=block))
    blocks = max(1, math.ceil(n_synthetic / block))
    count = max(1, math.ceil(n_synthetic / max(1, rows_per_shard)))
    return max(1, min(count, blocks, max_shards or count))


def search_synthetic_shard(reference_dir: Path, synthetic_dir: Path, out: Path, *, shard_index: int,
                           shard_count: int) -> Path:
    """Step 2 of a sharded privacy audit: search shard `shard_index` of `shard_count` of the synthetic dataset's
    rows (contiguous whole blocks, see `privacy.memorization.shard_rows`) in every space against the reference;
    write the artifact directory `out` (kind "memorization_shard"; its header records the reference and synthetic
    hashes, the shard index/count and the row range). Returns `out`."""
    out, reference_dir, synthetic_dir = Path(out), Path(reference_dir), Path(synthetic_dir)
    _check_outputs(out, None)
    shard_rows(1, shard_index, shard_count, 1)  # index/count validated before any work
    header, reference, _ = _open_reference(reference_dir)
    synthetic = load_dataset(synthetic_dir)
    images = _images(synthetic)
    if not len(images):
        raise InputError(where(synthetic_dir, "the synthetic dataset holds no images"))
    real_spec = dict(zip(("height", "width", "channels"), reference.spec, strict=True))
    _check_spec(synthetic_dir, image_spec(images), real_spec)
    shard = search_shard(reference, images, shard_index=shard_index, shard_count=shard_count)
    block = synthetic_block_size(len(images), reference.config)
    import faiss
    import torch

    with atomic_dir(out) as tmp:
        files = write_shard_files(shard, tmp)
        write_header(
            tmp, SHARD_HEADER, kind=SHARD_KIND, schema_version=SHARD_SCHEMA_VERSION, files=files,
            inputs={"privacy_reference": str(header["content_hash"]), "synthetic": synthetic.content_hash},
            config={"shard_index": shard_index, "shard_count": shard_count, "block_size": block},
            body={
                "shard_index": shard_index, "shard_count": shard_count, "rows": [shard.lo, shard.hi],
                "synthetic_images": len(images), "block_size": block, "gpu": shard.gpu,
                # float sums (OpenBLAS, conv kernels) depend on these: shards agree bit for bit at equal counts
                "threads": {"faiss": faiss.omp_get_max_threads(), "torch": torch.get_num_threads()},
                "timings": shard.timings,
            },
        )
    return out


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The first dotted key where two JSON-like values differ, with both values; None when equal."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
            if diff:
                return diff
        return None
    return None if a == b else f"{path or 'value'}: {a!r} here vs {b!r} in this audit's config"


def _check_reference(reference_dir: Path, header: Mapping[str, Any], reference: Reference, real: Dataset,
                     config: PrivacyAuditConfig) -> None:
    """The reference was prepared from this real dataset with this audit's memorization and encoder config."""
    got = str(header["inputs"].get("real", ""))
    if got != real.content_hash:
        raise InputError(where(reference_dir, f"was prepared from real dataset {got[:12]}…, not from "
                                              f"{real.root} ({real.content_hash[:12]}…)"))
    ref_cfg, want = header["config"], _reference_config(config)
    diff = _first_difference(reference.config.model_dump(mode="json"), want["memorization"], "memorization")
    trained = bool(header.get("encoder", {}).get("trained_for_this_audit"))
    if diff is None and trained:
        if config.encoder_dir is not None:
            diff = f"encoder: trained for the reference vs --encoder {config.encoder_dir} in this audit's config"
        else:
            diff = _first_difference(ref_cfg.get("encoder"), want["encoder"], "encoder")
    if diff is None and not trained:
        if config.encoder_dir is None:
            diff = "encoder: a saved encoder here vs one trained for this audit in this audit's config"
        else:
            mine = str(read_header(Path(config.encoder_dir), ENCODER_HEADER)["content_hash"])
            if mine != header["inputs"].get("encoder"):
                diff = f"encoder: {str(header['inputs'].get('encoder'))[:12]}… here vs {config.encoder_dir}"
    if diff:
        raise InputError(where(reference_dir, f"was prepared with another config ({diff})"))


def _open_shards(shards: Sequence[Path], reference_hash: str, synthetic: Dataset, n_synthetic: int,
                 config: MemorizationConfig) -> tuple[list[ShardResult], list[dict[str, Any]]]:
    """Read the shards, checking each against the reference and synthetic set, and that every shard index of
    one shard count is there exactly once (any order)."""
    if not shards:
        raise InputError("audit_privacy: shards is empty; give every memorization shard's directory")
    block = synthetic_block_size(n_synthetic, config)
    seen: dict[int, Path] = {}
    results, headers = [], []
    count: tuple[int, Path] | None = None
    for path in map(Path, shards):
        h = read_header(path, SHARD_HEADER, kind=SHARD_KIND)
        verify_content(path, h)
        ref, syn = h["inputs"].get("privacy_reference", ""), h["inputs"].get("synthetic", "")
        if ref != reference_hash:
            raise InputError(where(path, f"was searched against privacy reference {ref[:12]}…, not the given "
                                         f"reference ({reference_hash[:12]}…)"))
        if syn != synthetic.content_hash:
            raise InputError(where(path, f"was searched on synthetic dataset {syn[:12]}…, not on {synthetic.root} "
                                         f"({synthetic.content_hash[:12]}…)"))
        i, c = int(h["shard_index"]), int(h["shard_count"])
        if count is None:
            count = (c, path)
        elif c != count[0]:
            raise InputError(where(path, f"is shard {i} of {c}, but {count[1]} is a shard of {count[0]}"))
        if i in seen:
            raise InputError(where(path, f"repeats shard {i} of {c} (also given as {seen[i]})"))
        seen[i] = path
        expected = list(shard_rows(n_synthetic, i, c, block))
        if list(h["rows"]) != expected or int(h["synthetic_images"]) != n_synthetic:
            raise InputError(where(path, f"holds rows {h['rows']} of {h['synthetic_images']}, expected {expected} "
                                         f"of {n_synthetic} for shard {i} of {c}"))
        results.append(read_shard(path, h))
        headers.append(h)
    total = count[0] if count is not None else 0
    missing = sorted(set(range(total)) - set(seen))
    if missing:
        parent = Path(shards[0]).parent
        raise InputError(where(parent, f"memorization shard(s) {missing} of {total} missing (given: "
                                       f"{sorted(seen)})"))
    return results, headers


# --------------------------------------------------------------------------------------------------------------
# The audit


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
    _check_outputs(out, filter_out)
    if (reference is None) != (shards is None):
        named = reference if reference is not None else next(iter(shards or []), out)
        raise InputError(where(named, "a privacy reference and its memorization shards go together: give both "
                                      "or neither"))
    inputs = _load_inputs(Path(real_dir), Path(synthetic_dir), Path(model_dir) if model_dir else None)
    ledger = check_ledger(Path(model_dir), tolerance=config.ledger_tolerance) if model_dir else None
    disclosure = check_disclosure(
        inputs.synthetic.metadata, k=config.disclosure_k, columns=config.disclosure_columns,
        real_attributes=inputs.real.header.get("attributes", []),
    )
    input_hashes = {"real": inputs.real.content_hash, "synthetic": inputs.synthetic.content_hash}
    n_synth = len(inputs.synth)
    if reference is None:
        encoder, trained = _encoder(config, inputs.real, inputs.train)
        ref = prepare_reference(inputs.train, inputs.holdout, encoder=encoder, config=config.memorization)
        parts = [search_shard(ref, inputs.synth.images)]
        encoder_source: Path | None = None
        threads: list[Any] = []
    else:
        reference = Path(reference)
        ref_header, ref, encoder = _open_reference(reference)
        _check_reference(reference, ref_header, ref, inputs.real, config)
        parts, shard_headers = _open_shards(list(shards or []), str(ref_header["content_hash"]), inputs.synthetic,
                                            n_synth, ref.config)
        trained = bool(ref_header["encoder"].get("trained_for_this_audit"))
        encoder_source = reference / ENCODER_DIR
        input_hashes["privacy_reference"] = str(ref_header["content_hash"])
        for h in sorted(shard_headers, key=lambda h: int(h["shard_index"])):
            input_hashes[f"memorization_shard_{int(h['shard_index'])}"] = str(h["content_hash"])
        threads = [h.get("threads") for h in sorted(shard_headers, key=lambda h: int(h["shard_index"]))]
    result = merge_shards(ref, inputs.synth, parts)
    membership = None
    if model_dir is not None and config.membership is not None:
        membership = membership_summary(membership_audit(Path(model_dir), Path(real_dir), config=config.membership))

    ledger_json = None if ledger is None else {**ledger.to_json(), "message": ledger.message()}
    findings = _findings(config, result.summary, disclosure.to_json(), ledger_json, inputs)
    passed = not any(f.severity == "block" for f in findings)
    if inputs.model_hash:
        input_hashes["model"] = inputs.model_hash
    if ledger is not None:
        input_hashes["privacy_ledger"] = sha256_file(Path(ledger.path))
    if not trained:
        input_hashes["encoder"] = str(encoder.meta.get("content_hash", ""))
    sharding = {
        "shard_count": len(parts),
        "block_size": synthetic_block_size(n_synth, config.memorization),
        "rows": [[p.lo, p.hi] for p in sorted(parts, key=lambda p: p.lo)],
        "privacy_reference": input_hashes.get("privacy_reference"),
        "threads": threads,
    }

    filter_written = False
    try:
        with atomic_dir(out) as tmp:
            result.table.to_parquet(tmp / TABLE, index=False)
            result.null_table.to_parquet(tmp / NULL_TABLE, index=False)
            write_json(tmp / PLOTS, {"histograms": result.histograms, "top_pairs": result.top_pairs})
            if encoder_source is not None:
                shutil.copytree(encoder_source, tmp / ENCODER_DIR)
            else:
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
                "memorization_sharding": sharding,
                "disclosure": disclosure.to_json(),
                "ledger_check": ledger_json,
                "membership": membership,
                "encoder": {"dir": ENCODER_DIR, "trained_for_this_audit": trained, **encoder.meta},
                "filtered": filtered,
            }
            files = [TABLE, NULL_TABLE, PLOTS, *_dir_files(tmp, ENCODER_DIR)]
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
