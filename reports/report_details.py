"""The audit report's detail sections (`reports.report`): membership, utility, fidelity, privacy ledger,
provenance and the gate."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reports import figures
from reports.report_format import _clip, fmt
from reports.report_inputs import ReportInputs
from reports.report_layout import DUPLICATE_GROUPS_SHOWN
from reports.report_numbers import _synthetic_counts
from synth.data.canonical import SPLIT_ORDER

# --------------------------------------------------------------------------------------------------------------
# Utility, fidelity, ledger, provenance, gate


_SETTINGS = (("trtr", "TRTR", "real train → real test"), ("trts", "TRTS", "real-trained classifier → synthetic"),
             ("tstr", "TSTR", "synthetic train → real test"))
_METRICS = (("balanced_accuracy", "balanced accuracy"), ("worst_class_sensitivity", "worst-class sensitivity"),
            ("f1_macro", "F1 macro"), ("accuracy", "accuracy"), ("auroc", "AUROC"))


def _utility(inp: ReportInputs) -> dict[str, Any]:
    u, roc = inp.utility, inp.roc
    rows = [{"setting": label, "what": what, **{m: (u.get(key) or {}).get(m) for m, _ in _METRICS},
             "n": (u.get(key) or {}).get("n")} for key, label, what in _SETTINGS]
    aug = (u.get("augmentation") or {}).get("curve") or []
    for p in aug[1:]:
        rows.append({"setting": f"real + {fmt(p.get('ratio'), 'g')}× synthetic",
                     "what": f"{fmt(p.get('n_real'))} real + {fmt(p.get('n_synthetic'))} synthetic → real test",
                     **{m: p.get(m) for m, _ in _METRICS}, "n": None})
    per_class = []
    for key, label, _ in _SETTINGS:
        for name, pc in ((u.get(key) or {}).get("per_class") or {}).items():
            per_class.append({"setting": label, "class": name,
                              **{m: pc.get(m) for m in ("n", "auroc", "f1", "specificity", "precision")},
                              "sensitivity": pc.get("sensitivity", pc.get("accuracy"))})
    subgroups = []
    for key, label, _ in _SETTINGS:
        for attr, groups in ((u.get(key) or {}).get("subgroups") or {}).items():
            for value, g in (groups or {}).items():
                subgroups.append({"setting": label, "attribute": attr, "value": value, "n": g.get("n"),
                                  "auroc": g.get("auroc"), "accuracy": g.get("accuracy"),
                                  "balanced_accuracy": g.get("balanced_accuracy"),
                                  "worst_class_sensitivity": g.get("worst_class_sensitivity"),
                                  "skipped": g.get("skipped")})
    panels: dict[str, dict[str, Any]] = {}
    for key, label, _ in _SETTINGS:
        for cls, pts in (roc.get(key) or {}).items():
            if isinstance(pts, Mapping):
                title = f"class {cls} vs rest" if len(inp.class_names) > 2 else f"positive class: {cls}"
                curve = f"{label} (scored on synthetic)" if key == "trts" else f"{label} (real test)"
                panels.setdefault(_clip(title), {})[curve] = pts
    aug_points = [p for p in aug if isinstance(p, Mapping)]
    return {
        "rows": rows,
        "per_class": per_class,
        "subgroups": subgroups,
        "paired": {m: (u.get("tstr_vs_trtr") or {}).get(m) or {} for m in
                   ("balanced_accuracy", "worst_class_sensitivity")},
        "worst": {key: (u.get(key) or {}).get("worst_class") for key in ("trtr", "tstr")},
        "majority": (((u.get("baselines") or {}).get("majority_class") or {}).get("real_test") or None),
        "ratio": u.get("tstr_over_trtr"),
        "difference": u.get("tstr_minus_trtr"),
        "roc_uri": figures.data_uri(figures.roc_figure(panels, title="ROC curves")) if panels else None,
        "aug_uri": figures.data_uri(figures.augmentation_figure(aug_points)) if len(aug_points) > 1 else None,
        "aug": [{"ratio": p.get("ratio"), "ratio_effective": p.get("ratio_effective"), "n_real": p.get("n_real"),
                 "n_synthetic": p.get("n_synthetic"), "auroc": p.get("auroc"),
                 "balanced_accuracy": p.get("balanced_accuracy"),
                 "worst_class_sensitivity": p.get("worst_class_sensitivity"),
                 "ba_delta": p.get("balanced_accuracy_minus_trtr"),
                 "delta": p.get("auroc_minus_trtr"), "note": p.get("note", "")} for p in aug_points],
    }


def _fidelity(inp: ReportInputs) -> list[dict[str, Any]]:
    fid = inp.utility.get("fidelity")
    rows = []
    if not isinstance(fid, Mapping):
        return rows
    for space, s in (fid.get("spaces") or {}).items():
        for which, label in (("synthetic", "synthetic"), ("real_holdout", "real holdout (floor)")):
            block = (s or {}).get(which) or {}
            for scope, m in [("all classes", block.get("overall") or {}),
                             *((f"class {c}", v or {}) for c, v in (block.get("per_class") or {}).items())]:
                kid = m.get("kid") or {}
                rows.append({"space": space, "set": label, "scope": scope, "fid": m.get("fid"),
                             "kid": kid.get("value"), "kid_std": kid.get("std"), "precision": m.get("precision"),
                             "recall": m.get("recall"), "n_real": m.get("n_real"), "n_synthetic": m.get("n_synthetic"),
                             "skipped": m.get("skipped")})
    return rows


def _ledger(inp: ReportInputs, *, public: bool) -> dict[str, Any]:
    card = inp.model_card
    if card is None:
        return {"state": "no_model"}
    claim = card.get("privacy")
    ledger = inp.ledger
    if claim is None and ledger is None:
        return {"state": "not_dp"}
    ledger = ledger or {}
    events = [e for e in ledger.get("events") or [] if isinstance(e, Mapping)]
    lc = inp.privacy.get("ledger_check")
    return {
        "state": "dp",
        "epsilon": ledger.get("epsilon", (claim or {}).get("epsilon")),
        "target_epsilon": ledger.get("target_epsilon"),
        "delta": ledger.get("delta", (claim or {}).get("delta")),
        "accountant": ledger.get("accountant", (claim or {}).get("accountant")),
        "events": [{"noise_multiplier": e.get("noise_multiplier"), "sample_rate": e.get("sample_rate"),
                    "steps": e.get("steps")} for e in events],
        "steps": ledger.get("steps", sum(int(e.get("steps") or 0) for e in events)),
        "max_grad_norm": ledger.get("max_grad_norm"),
        "noise_multiplicity": ledger.get("noise_multiplicity", (claim or {}).get("noise_multiplicity")),
        "dataset_size": ledger.get("dataset_size"),
        "batch_size": ledger.get("batch_size"),
        "sample_rate_source": ledger.get("sample_rate_source"),
        "poisson_sampling": ledger.get("poisson_sampling"),
        "secure_rng": bool(ledger.get("secure_rng", False)),
        "secure_rng_reason": ledger.get("secure_rng_reason") or "",
        "privacy_unit": ledger.get("privacy_unit") or "",
        "epsilon_check": dict(ledger.get("epsilon_check") or {}),
        "explanation": (claim or {}).get("explanation") or "",
        "ledger_check": [(k, v) for k, v in _scalars(lc) if not (public and k == "path")]
        if isinstance(lc, Mapping) else None,
    }


def _scalars(d: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The scalar entries of a mapping (nested ones flattened one level), for a key/value table."""
    out = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            out += [(f"{k}.{k2}", v2) for k2, v2 in v.items() if not isinstance(v2, Mapping | list)]
        elif not isinstance(v, list):
            out.append((str(k), v))
    return out


def _provenance(inp: ReportInputs, *, public: bool) -> dict[str, Any]:
    def artifact(name: str, header: Mapping[str, Any], path: Path | None) -> dict[str, Any]:
        return {"name": name, "kind": header.get("kind"), "content_hash": header.get("content_hash"),
                "created": header.get("created"), "path": None if public or path is None else str(path)}

    arts = [artifact("real dataset", inp.real.header, inp.real.root),
            artifact("synthetic dataset", inp.synthetic.header, inp.synthetic.root)]
    if inp.model_card is not None:
        arts.append(artifact("model", inp.model_card, inp.model_dir))
    arts += [artifact("privacy audit", inp.privacy, inp.privacy_dir),
             artifact("utility audit", inp.utility, inp.utility_dir)]
    if inp.verdict is not None:
        arts.append({"name": "gate verdict", "kind": "verdict", "content_hash": inp.hashes["verdict"],
                     "created": None, "path": None if public else inp.verdict_source})

    real = inp.real.info
    rc, per_class = real.counts.per_split(), real.counts.per_class
    splits = sorted((s for s in rc if s != "total"), key=lambda s: (SPLIT_ORDER.get(s, 99), s))
    real_counts = [{"split": s, "n": rc.get(s), **{f"c{i}": per_class.get(s, {}).get(n)
                                                    for i, n in enumerate(inp.class_names)}} for s in splits]
    dup = dict(real.duplicates)
    groups = dup.pop("group_list", None) or []
    model = None
    if inp.model_card is not None:
        c = inp.model_card
        model = [(k, c.get(k)) for k in ("steps", "epochs", "train_images", "training_seconds", "stopped_by",
                                         "final_loss", "device") if c.get(k) is not None]
        preset = ((c.get("config") or {}).get("model") or {}).get("name")
        if preset:
            model.insert(0, ("model preset", preset))
    source = real.source
    return {
        "artifacts": arts,
        "real_counts": real_counts,
        "synthetic_counts": _synthetic_counts(inp),
        "duplicates": [(k, v) for k, v in dup.items() if not isinstance(v, Mapping | list)]
        + [(f"{k} ({k2})", v2) for k, v in dup.items() if isinstance(v, Mapping) for k2, v2 in v.items()],
        "duplicate_groups": [] if public else groups[:DUPLICATE_GROUPS_SHOWN],
        "duplicate_groups_total": len(groups),
        "source": [(k, v) for k, v in source.items() if not isinstance(v, Mapping | list)
                   and not (public and k in ("file", "path", "dir"))],
        "license": real.license,
        "model": model,
        "generation": _scalars(inp.synthetic.info.config),
        "notes": list(inp.notes),
    }


def _gate(inp: ReportInputs) -> dict[str, Any] | None:
    v = inp.verdict
    if v is None:
        return None
    return {"decision": v["decision"], "checks": v["checks"],
            "reasons": [c["message"] for c in v["checks"] if not c["passed"]]}
