"""The sharded privacy audit's memorization artifacts: the privacy reference (step 1) and the synthetic shards
(step 2), written and read back with every check that they belong together (see `privacy.audit`).

    prepare_privacy_reference(real_dir, ref, config=cfg)    once: encoder, embeddings, null, thresholds
                                                             -> "privacy_reference"
    search_synthetic_shard(ref, synthetic_dir, shard_i, shard_index=i, shard_count=S)    per shard (any machine)
                                                             -> "memorization_shard"

The merge is `privacy.audit.audit_privacy(..., reference=ref, shards=[...])`. The reference holds real training
images and embeddings: keep it internal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from privacy.audit_config import ENCODER_DIR, SCHEMA_VERSION, PrivacyAuditConfig
from privacy.audit_inputs import audit_encoder, check_image_spec, check_outputs, dataset_images, real_sets
from privacy.embeddings import ENCODER_HEADER, ENCODER_WEIGHTS, Encoder, load_encoder, save_encoder
from privacy.memorization_artifacts import read_reference, read_shard, write_reference_files, write_shard_files
from privacy.memorization_config import MemorizationConfig
from privacy.memorization_reference import Reference, prepare_reference
from privacy.memorization_shards import ShardResult, search_shard, shard_rows, synthetic_block_size
from synth.artifacts import atomic_dir, read_header, verify_content, write_header
from synth.data.canonical import Dataset, image_spec, load_dataset
from synth.errors import ConfigError, InputError, where

REFERENCE_KIND = "privacy_reference"
REFERENCE_HEADER = "reference.json"
SHARD_KIND = "memorization_shard"
SHARD_HEADER = "shard.json"
SHARD_SCHEMA_VERSION = 1
# Synthetic rows a memorization shard should hold at least (below that, a task's fixed costs dominate).
ROWS_PER_SHARD = 8192


def reference_config(config: PrivacyAuditConfig) -> dict[str, Any]:
    """The part of the audit config a reference is computed from (checked again at the merge)."""
    return {
        "memorization": config.memorization.model_dump(mode="json"),
        "encoder": config.encoder.model_dump(mode="json"),
        "encoder_dir": str(config.encoder_dir) if config.encoder_dir is not None else None,
    }



def prepare_privacy_reference(real_dir: Path, out: Path, *, config: PrivacyAuditConfig | None = None) -> Path:
    """Step 1 of a sharded privacy audit: train (or load, `config.encoder_dir`) the copy-detection encoder, embed
    the real training and holdout images, search holdout → train in every space (the null), calibrate the
    thresholds; write the artifact directory `out` (kind "privacy_reference") holding everything the per-shard
    searches and the merge need. It holds real training images and embeddings: keep it internal. Returns `out`."""
    config = config or PrivacyAuditConfig()
    out, real_dir = Path(out), Path(real_dir)
    check_outputs(out, None)
    real = load_dataset(real_dir)
    train, holdout = real_sets(real, dataset_images(real), real_dir)
    encoder, trained = audit_encoder(config, real, train)
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
                     inputs=inputs, config=reference_config(config),
                     body={"memorization_reference": body,
                           "encoder": {"dir": ENCODER_DIR, "trained_for_this_audit": trained, **meta},
                           "internal": "holds real training images and embeddings derived from them"})
    return out


def open_reference(reference_dir: Path) -> tuple[dict[str, Any], Reference, Encoder]:
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
    check_outputs(out, None)
    shard_rows(1, shard_index, shard_count, 1)  # index/count validated before any work
    header, reference, _ = open_reference(reference_dir)
    synthetic = load_dataset(synthetic_dir)
    images = dataset_images(synthetic)
    if not len(images):
        raise InputError(where(synthetic_dir, "the synthetic dataset holds no images"))
    real_spec = dict(zip(("height", "width", "channels"), reference.spec, strict=True))
    check_image_spec(synthetic_dir, image_spec(images), real_spec)
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


def check_reference(reference_dir: Path, header: Mapping[str, Any], reference: Reference, real: Dataset,
                     config: PrivacyAuditConfig) -> None:
    """The reference was prepared from this real dataset with this audit's memorization and encoder config."""
    got = str(header["inputs"].get("real", ""))
    if got != real.content_hash:
        raise InputError(where(reference_dir, f"was prepared from real dataset {got[:12]}…, not from "
                                              f"{real.root} ({real.content_hash[:12]}…)"))
    ref_cfg, want = header["config"], reference_config(config)
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


def open_shards(shards: Sequence[Path], reference_hash: str, synthetic: Dataset, n_synthetic: int,
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
