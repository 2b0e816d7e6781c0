"""Stages on the real data: ingest into canonical form, and validation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from flows.release_config import ReleaseConfig
from flows.stage_runner import (
    DATASET,
    VALIDATION,
    artifact_hash,
    run_stage,
)
from synth.errors import InputError, where


def ingest_stage(cfg: ReleaseConfig) -> Path:
    """The real dataset, in canonical form."""
    from synth.data.ingest_config import ingest_with

    src = cfg.source
    source_id = _source_identity(src.path, src.csv)
    return run_stage(
        cfg.workdir, DATASET, inputs={"source": source_id}, config=src.model_dump(mode="json"),
        build=lambda out: ingest_with(src, out),
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
