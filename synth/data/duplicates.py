"""Exact duplicate images: found by pixel hash, recorded, and (by default) collapsed.

PneumoniaMNIST, like many public sets, holds exact duplicates inside a split and across splits. A duplicate across
splits is leakage (a holdout image that was trained on); a duplicated training image is what a generative model
memorises first. The default policy keeps one copy in the earliest split (train, then val, then test), so the
holdout never holds a training image.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd

from synth.data.canonical import SPLIT_ORDER
from synth.errors import ConfigError


class DuplicatePolicy(StrEnum):
    COLLAPSE = "collapse"  # keep one copy, in the earliest split
    KEEP = "keep"  # record only; validation then blocks on cross-split leakage


def find_duplicate_groups(metadata: pd.DataFrame) -> list[dict[str, Any]]:
    """Groups of rows with identical pixels, each member listed in split order (train, val, test)."""
    order = metadata["split"].map(lambda s: SPLIT_ORDER.get(s, 99)).to_numpy()
    groups = []
    for sha, rows in metadata.groupby("sha256", sort=True):
        if len(rows) < 2:
            continue
        idx = rows.index.to_numpy()
        idx = idx[np.lexsort((idx, order[idx]))]
        members = metadata.loc[idx]
        splits = list(dict.fromkeys(members["split"]))
        groups.append(
            {
                "sha256": sha,
                "image_ids": members["image_id"].tolist(),
                "splits": members["split"].tolist(),
                "spans_splits": len(splits) > 1,
                "labels_agree": members["label"].nunique() == 1,
                "kept": members["image_id"].iloc[0],
                "_rows": idx.tolist(),
            }
        )
    return groups


def apply_policy(
    metadata: pd.DataFrame, policy: DuplicatePolicy | str = DuplicatePolicy.COLLAPSE
) -> tuple[np.ndarray, dict[str, Any]]:
    """Return (boolean mask of rows to keep, the findings to record in dataset.json)."""
    try:
        policy = DuplicatePolicy(policy)
    except ValueError:
        raise ConfigError(f"unknown duplicate policy {policy!r}; use 'collapse' or 'keep'") from None
    groups = find_duplicate_groups(metadata)
    keep = np.ones(len(metadata), dtype=bool)
    if policy is DuplicatePolicy.COLLAPSE:
        for g in groups:
            keep[g["_rows"][1:]] = False
    removed = metadata[~keep]
    findings = {
        "policy": policy.value,
        "groups": len(groups),
        "within_split": sum(not g["spans_splits"] for g in groups),
        "across_splits": sum(g["spans_splits"] for g in groups),
        "label_conflicts": sum(not g["labels_agree"] for g in groups),
        "images_in_groups": sum(len(g["image_ids"]) for g in groups),
        "removed": int((~keep).sum()),
        "removed_per_split": {str(k): int(v) for k, v in removed["split"].value_counts().sort_index().items()},
        "group_list": [{k: v for k, v in g.items() if k != "_rows"} for g in groups],
    }
    return keep, findings
