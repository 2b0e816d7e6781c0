"""The synthetic dataset without the images the memorization check flagged (and, optionally, k-anonymised)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from privacy.memorization import MemorizationResult
from synth.errors import InputError, where


def filter_flagged(
    synthetic_dir: Path,
    result: MemorizationResult,
    out: Path,
    *,
    k: int | None = None,
    real_attributes: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic canonical dataset without its flagged images to `out`; with `k`, also apply the
    k-anonymity suppression of `privacy.disclosure` to what is left. Returns `out`."""
    from privacy.disclosure import suppress
    from synth.data.canonical import load_dataset, write_dataset

    ds = load_dataset(synthetic_dir)
    meta = ds.metadata
    ids = meta["image_id"].astype(str)
    if len(result.table) != len(meta) or set(result.table["image_id"]) != set(ids):
        raise InputError(where(synthetic_dir, "the memorization result was computed on a different dataset"))
    keep = ~ids.isin(set(result.flagged_ids)).to_numpy()
    kept_meta = meta[keep].drop(columns="sha256").reset_index(drop=True)
    images = np.asarray(ds.images[keep])
    disclosure_counts: dict[str, int] | None = None
    if k is not None:
        kept_meta, mask, disclosure_counts = suppress(kept_meta, k=k, real_attributes=real_attributes)
        kept_meta, images = kept_meta[mask].reset_index(drop=True), images[mask]
    if not len(images):
        raise InputError(where(synthetic_dir, "every synthetic image was filtered out; nothing to write"))
    standard = {
        "source",
        "class_names",
        "license",
        "attribution",
        "image",
        "attributes",
        "has_patient_id",
        "counts",
        "duplicates",
        "kind",
        "schema_version",
        "content_hash",
        "inputs",
        "config",
        "files",
        "created",
    }
    extra = {key: v for key, v in ds.header.items() if key not in standard}
    extra["filtered"] = {
        "from": ds.content_hash,
        "removed_memorized": int((~keep).sum()),
        "thresholds": result.summary["thresholds"],
        "quantile": result.summary["quantile"],
        "disclosure_k": k,
        "disclosure": disclosure_counts,
    }
    return write_dataset(
        out,
        images,
        kept_meta,
        class_names=ds.class_names,
        source=ds.header["source"],
        license=ds.header.get("license", "unknown"),
        attribution=ds.header.get("attribution", ""),
        duplicates=ds.header.get("duplicates"),
        inputs={"synthetic": ds.content_hash},
        config=dict(ds.header.get("config", {})),
        extra=extra,
        overwrite=overwrite,
    )
