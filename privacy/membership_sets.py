"""Who the membership audit attacks: members drawn from the real dataset's train split and as many non-members
from its holdout (val + test, minus pixel duplicates of training images), seeded and, by default, with the same
number per condition (so a different class mix between train and holdout cannot pass for a membership signal).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from privacy.membership_config import HOLDOUT_SPLITS, MIN_PER_SIDE, MembershipConfig
from synth.errors import ConfigError, InputError, where


@dataclass(frozen=True)
class AuditSets:
    """Who is a member: the sampled rows of the real dataset and everything the attacks need about them."""

    images: np.ndarray  # uint8 N×H×W[×C]: members first, then non-members
    conditions: np.ndarray  # int64 N
    is_member: np.ndarray  # bool N
    splits: np.ndarray  # str N ("train", "val", "test")
    image_ids: np.ndarray  # str N
    excluded_duplicates: int  # holdout images left out because their pixels are in the train split
    available: dict[str, int]  # train / holdout images that could be drawn

    @property
    def n_members(self) -> int:
        return int(self.is_member.sum())

    @property
    def n_nonmembers(self) -> int:
        return int((~self.is_member).sum())


def _allocate(n: int, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Split n over groups proportionally to `weights`, at most `caps[i]` each (largest shortfall first)."""
    n = int(min(n, caps.sum()))
    share = n * weights / weights.sum()
    counts = np.minimum(np.floor(share).astype(np.int64), caps)
    while counts.sum() < n:
        room = counts < caps
        counts[np.argmax(np.where(room, share - counts, -np.inf))] += 1
    return counts


def select_sets(ds: Any, conditions_of: Any, config: MembershipConfig, *, where_: Path) -> AuditSets:
    """Draw members (train split) and as many non-members (val + test) from a canonical dataset, seeded.

    `conditions_of(metadata) -> int64 array` encodes the condition of each row (the model's condition space).
    """
    meta: pd.DataFrame = ds.metadata
    split = meta["split"].astype(str).to_numpy()
    train_rows = np.flatnonzero(split == "train")
    hold_rows = np.flatnonzero(np.isin(split, HOLDOUT_SPLITS))
    if train_rows.size == 0:
        raise InputError(where(where_, f"has no 'train' split (splits: {sorted(set(split))}): no members to audit"))
    if hold_rows.size == 0:
        raise InputError(
            where(where_, f"has no holdout images (no {'/'.join(HOLDOUT_SPLITS)} split; splits: "
                          f"{sorted(set(split))}): membership needs real non-members the model never saw")
        )
    excluded = 0
    if config.exclude_duplicates:
        train_hashes = set(meta["sha256"].to_numpy()[train_rows])
        dup = np.isin(meta["sha256"].to_numpy()[hold_rows], list(train_hashes))
        excluded = int(dup.sum())
        hold_rows = hold_rows[~dup]
    try:
        cond = np.asarray(conditions_of(meta), dtype=np.int64)
    except (ConfigError, KeyError) as e:
        raise InputError(where(where_, f"metadata does not fit the model's condition space ({e})")) from None
    available = {"train": int(train_rows.size), "holdout": int(hold_rows.size)}
    per_side = min(config.n, train_rows.size, hold_rows.size)
    if per_side < MIN_PER_SIDE:
        raise InputError(
            where(where_, f"only {per_side} members/non-members can be drawn (train {train_rows.size}, holdout "
                          f"{hold_rows.size} after {excluded} duplicate(s)); need >= {MIN_PER_SIDE} each")
        )
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 1]))
    if config.stratify:
        groups = np.unique(cond[np.r_[train_rows, hold_rows]])
        n_train = np.array([(cond[train_rows] == g).sum() for g in groups])
        n_hold = np.array([(cond[hold_rows] == g).sum() for g in groups])
        counts = _allocate(per_side, n_hold.astype(float), np.minimum(n_train, n_hold))
        members = np.concatenate([rng.choice(train_rows[cond[train_rows] == g], size=c, replace=False)
                                  for g, c in zip(groups, counts, strict=True)])
        nonmembers = np.concatenate([rng.choice(hold_rows[cond[hold_rows] == g], size=c, replace=False)
                                     for g, c in zip(groups, counts, strict=True)])
        if members.size < MIN_PER_SIDE:
            raise InputError(
                where(where_, f"only {members.size} members/non-members share a condition; need >= {MIN_PER_SIDE}")
            )
    else:
        members = rng.choice(train_rows, size=per_side, replace=False)
        nonmembers = rng.choice(hold_rows, size=per_side, replace=False)
    rows = np.r_[np.sort(members), np.sort(nonmembers)]
    return AuditSets(
        images=np.asarray(ds.images[rows]),
        conditions=cond[rows],
        is_member=np.r_[np.ones(members.size, bool), np.zeros(nonmembers.size, bool)],
        splits=split[rows],
        image_ids=meta["image_id"].astype(str).to_numpy()[rows],
        excluded_duplicates=excluded,
        available=available,
    )
