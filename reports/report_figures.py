"""The audit report's figures (`reports.report`). Real pixels are read only in the functions named `_real_*`,
which the public report never calls."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from reports import figures
from reports.report_format import fmt
from reports.report_inputs import ReportInputs
from reports.report_layout import (
    MEMORIZATION_TABLE,
    PAIRS_PER_SPACE,
    SAMPLE_COLUMNS,
    SAMPLES_PER_CLASS,
    SELECTION_SEED,
    SIDE_BY_SIDE,
)
from reports.report_numbers import _membership_summary, _synthetic_rows
from synth.errors import InputError, where

# --------------------------------------------------------------------------------------------------------------
# Figures. Real pixels are read only in the functions named `_real_*`, which the public report never calls.


def _grid(images: np.ndarray, ncols: int) -> dict[str, Any]:
    """An image grid as a data URI with its pixel size (the HTML shows it scaled up, pixelated)."""
    grid = figures.tile_grid(images, ncols)
    return {"uri": figures.data_uri(figures.png_bytes(grid)), "width": int(grid.shape[1]),
            "height": int(grid.shape[0])}


def _pick(rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(rows) <= n:
        return np.sort(rows)
    return np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False))


def _withheld_synthetic_ids(inp: ReportInputs, *, public: bool) -> tuple[set[str], str]:
    """Synthetic image ids not to show in sample grids: flagged by the memorization audit or pixel-identical to a
    real image (sha256 from the real metadata; no real pixel is read). Returns (ids, how they were found)."""
    ids: set[str] = set()
    how = []
    memo = inp.memorization
    if memo is not None and "flagged" in memo.columns:
        ids |= set(memo.loc[memo["flagged"].astype(bool), "image_id"].astype(str))
        how.append("flagged by the memorization audit")
    else:
        summary = inp.privacy.get("memorization")
        flagged = summary.get("flagged") if isinstance(summary, Mapping) else None
        pairs = _top_pairs(inp)
        ids |= {str(p.get("synthetic_id")) for ps in pairs.values() for p in ps if p.get("flagged")}
        if public and flagged and len(ids) < int(flagged):
            raise InputError(where(inp.privacy_dir, f"{flagged} synthetic images are flagged but "
                                                    f"{MEMORIZATION_TABLE} is missing: cannot tell which ones to "
                                                    "keep out of the report's sample grids"))
        how.append("flagged in the memorization audit's closest pairs")
    real_sha = set(inp.real.metadata["sha256"].astype(str))
    meta = inp.synthetic.metadata
    copies = meta.loc[meta["sha256"].astype(str).isin(real_sha), "image_id"].astype(str)
    ids |= set(copies)
    how.append("pixel-identical to a real image")
    return ids, " or ".join(how)


def _sample_grids(inp: ReportInputs, withheld: set[str]) -> list[dict[str, Any]]:
    ds = inp.synthetic
    meta = ds.metadata
    rows = _synthetic_rows(ds)
    keep = ~meta["image_id"].astype(str).isin(withheld).to_numpy()
    out = []
    for c, name in enumerate(inp.class_names):
        cls_rows = rows[(meta["label"].to_numpy()[rows] == c) & keep[rows]]
        pick = _pick(cls_rows, SAMPLES_PER_CLASS, SELECTION_SEED + c)
        entry: dict[str, Any] = {"name": name, "n_class": int((meta["label"].to_numpy()[rows] == c).sum()),
                                 "n_shown": len(pick), "rows": pick}
        entry["grid"] = _grid(np.asarray(ds.images[pick]), SAMPLE_COLUMNS) if len(pick) else None
        out.append(entry)
    return out


def _real_side_by_side(inp: ReportInputs, samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Steward only: real training images beside synthetic ones, per class."""
    real_images, real_meta = inp.real.split("train")
    out = []
    for c, name in enumerate(inp.class_names):
        real_rows = np.flatnonzero(real_meta["label"].to_numpy() == c)
        pick_real = _pick(real_rows, SIDE_BY_SIDE, SELECTION_SEED + 100 + c)
        pick_syn = samples[c]["rows"][:SIDE_BY_SIDE]
        out.append({
            "name": name,
            "real": _grid(real_images[pick_real], SAMPLE_COLUMNS) if len(pick_real) else None,
            "synthetic": _grid(np.asarray(inp.synthetic.images[pick_syn]), SAMPLE_COLUMNS) if len(pick_syn) else None,
        })
    return out


def _top_pairs(inp: ReportInputs) -> dict[str, list[dict[str, Any]]]:
    memo = inp.privacy.get("memorization")
    pairs = (inp.privacy_plots.get("top_pairs") or (memo.get("top_pairs") if isinstance(memo, Mapping) else None)
             or {})
    return {str(s): [p for p in ps if isinstance(p, Mapping)] for s, ps in pairs.items() if isinstance(ps, list)}


def _pairs(inp: ReportInputs, *, public: bool) -> list[dict[str, Any]]:
    """The closest pairs per space; images (synthetic and training) only in the steward's copy."""
    pairs = _top_pairs(inp)
    syn_index = pd.Series(np.arange(len(inp.synthetic.metadata)),
                          index=inp.synthetic.metadata["image_id"].astype(str))
    real_index = None if public else pd.Series(np.arange(len(inp.real.metadata)),
                                               index=inp.real.metadata["image_id"].astype(str))
    memo = inp.privacy.get("memorization") or {}
    out = []
    for space, ps in pairs.items():
        rows = []
        for rank, p in enumerate(ps[:PAIRS_PER_SPACE], start=1):
            row: dict[str, Any] = {"rank": rank, "synthetic_id": str(p.get("synthetic_id")),
                                   "distance": p.get("distance"), "flagged": bool(p.get("flagged"))}
            if not public:
                row["train_id"] = str(p.get("train_id"))
                row.update(_real_pair_image(inp, syn_index, real_index, row["synthetic_id"], row["train_id"]))
            rows.append(row)
        threshold = (memo.get("thresholds") or {}).get(space) if isinstance(memo, Mapping) else None
        out.append({"space": space, "rows": rows, "threshold": threshold, "total": len(ps)})
    return out


def _real_pair_image(inp: ReportInputs, syn_index: pd.Series, real_index: pd.Series, syn_id: str,
                     train_id: str) -> dict[str, Any]:
    """Steward only: the synthetic image and its nearest training image as one two-tile PNG."""
    if syn_id not in syn_index.index and inp.synthetic.info.filtered:
        return {"grid": None, "missing": "removed from this (filtered) synthetic set"}
    if syn_id not in syn_index.index or train_id not in real_index.index:
        return {"grid": None, "missing": "image not found in the datasets given"}
    s = np.asarray(inp.synthetic.images[int(syn_index[syn_id])])
    r = np.asarray(inp.real.images[int(real_index[train_id])])
    return {"grid": _grid(np.stack([s, r]), 2), "missing": ""}


def _histograms(inp: ReportInputs) -> list[dict[str, Any]]:
    memo = inp.privacy.get("memorization")
    hists = (inp.privacy_plots.get("histograms") or (memo.get("histograms") if isinstance(memo, Mapping) else None)
             or {})
    out = []
    for space, h in hists.items():
        if not isinstance(h, Mapping) or not h.get("edges"):
            continue
        png = figures.histogram_figure(
            h["edges"], {"synthetic → train": h.get("synthetic_to_train") or [],
                         "real holdout → train (null)": h.get("holdout_to_train") or []},
            threshold=h.get("threshold"), title=f"{space} space")
        out.append({"space": space, "uri": figures.data_uri(png), "threshold": h.get("threshold")})
    return out


def _filtering(inp: ReportInputs) -> dict[str, Any] | None:
    """What filtering the flagged images out did: from the privacy audit's record and/or the synthetic set's own
    `filtered` header entry (when the report is about the filtered set)."""
    audit = inp.privacy.get("filtered") if isinstance(inp.privacy.get("filtered"), Mapping) else {}
    own = inp.synthetic.info.filtered or {}
    if not audit and not own:
        return None
    return {
        "written": audit.get("written"),
        "images": audit.get("images"),
        "removed": own.get("removed_memorized", audit.get("removed_memorized")),
        "reason": audit.get("reason"),
        "this_set_is_filtered": bool(own),
        "from": own.get("from"),
    }


def _membership(inp: ReportInputs) -> dict[str, Any] | None:
    mem = inp.privacy.get("membership")
    summary = _membership_summary(inp.privacy)
    judged = summary.judged if summary is not None else None
    if not isinstance(mem, Mapping) or judged is None:
        reason = mem.get("reason") or mem.get("status") if isinstance(mem, Mapping) else None
        return {"run": False, "reason": reason}
    attacks = []
    curves = {}
    for name, a in (mem.get("attacks") or {}).items():
        if not isinstance(a, Mapping):
            continue
        attacks.append({"name": name, "auc": {"value": a.get("auc"), "ci": a.get("auc_ci")},
                        "tpr1": {"value": a.get("tpr_at_1pct_fpr"), "ci": a.get("tpr_at_1pct_fpr_ci")},
                        "tpr01": {"value": a.get("tpr_at_0_1pct_fpr"), "ci": a.get("tpr_at_0_1pct_fpr_ci")},
                        "timesteps": a.get("timesteps")})
        if isinstance(a.get("roc"), Mapping):
            curves[f"{name} (AUC {fmt(a.get('auc'), '.3f')})"] = a["roc"]
    return {
        "run": True,
        "auc": {"value": judged.value, "ci": judged.ci},  # the judged AUC, as in the summary and the gate
        "auc_attack": judged.attack if not judged.reversed else f"{judged.attack} (reversed: 1 − AUC)",
        "tpr1": mem.get("tpr_at_1pct_fpr"),
        "n_members": mem.get("n_members"),
        "n_nonmembers": mem.get("n_nonmembers"),
        "weights": mem.get("weights"),
        "attacks": attacks,
        "note": mem.get("note") or "",
        "explanation": mem.get("explanation") or "",
        "roc_uri": figures.data_uri(figures.roc_figure({"linear scale": curves}, title="Membership inference ROC"))
        if curves else None,
        "logroc_uri": figures.data_uri(figures.log_roc_figure(curves, title="log–log (low FPR matters)"))
        if curves else None,
    }
