"""The audit report's inputs (`reports.report`): every artifact it reads, opened through its typed reader and
cross-checked against the others (one-line `InputError` naming the file otherwise)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from privacy.audit_result import parse_privacy_audit
from reports.report_layout import MEMORIZATION_TABLE, PRIVACY_HEADER, UTILITY_ROC
from reports.utility_result import read_utility_audit
from reports.verdict import parse_verdict, read_verdict
from synth import layout
from synth.artifacts import read_header, verify_content
from synth.data.canonical import Dataset, load_dataset
from synth.errors import InputError, IntegrityError, where

# --------------------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class ReportInputs:
    """Everything the report reads, checked against each other."""

    privacy_dir: Path
    privacy: dict[str, Any]
    memorization: pd.DataFrame | None  # memorization.parquet, one row per synthetic image
    utility_dir: Path
    utility: dict[str, Any]
    roc: dict[str, Any]
    real: Dataset
    synthetic: Dataset
    model_dir: Path | None = None
    model_card: dict[str, Any] | None = None  # as written; validated by synth.model_card.ModelCard
    ledger: dict[str, Any] | None = None  # privacy.ledger.PrivacyLedger.to_dict()
    verdict: dict[str, Any] | None = None
    verdict_source: str | None = None
    hashes: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    privacy_plots: dict[str, Any] = field(default_factory=dict)  # plots.json: histograms, top_pairs

    @property
    def class_names(self) -> list[str]:
        return self.real.class_names


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise InputError(where(path, f"{what} not found"))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(where(path, f"cannot be read as JSON ({e.__class__.__name__})")) from None


def _canonical_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def normalise_verdict(verdict: Any, *, source: object = "verdict") -> dict[str, Any] | None:
    """A gate verdict as a plain dict `{"decision", "checks": [{rule, passed, value, threshold, message}]}`.

    Accepts None, a `reports.verdict.Verdict` (or another object with `model_dump`), a mapping, or a path to its
    JSON (read by `reports.verdict.read_verdict`)."""
    if verdict is None:
        return None
    if isinstance(verdict, str | Path):
        return read_verdict(Path(verdict)).model_dump(mode="json")
    if hasattr(verdict, "model_dump"):
        verdict = verdict.model_dump(mode="json")
    return parse_verdict(verdict, source=source).model_dump(mode="json")


def _verify(root: Path, header: Mapping[str, Any]) -> None:
    """`verify_content`, with a missing or unreadable payload file as a one-line IntegrityError too."""
    try:
        verify_content(root, header)
    except OSError as e:
        raise IntegrityError(where(root, f"a file its header lists cannot be read ({e.__class__.__name__}: "
                                         f"{Path(str(e.filename)).name}); the artifact is incomplete")) from None


def _privacy_plots(privacy_dir: Path, privacy: Mapping[str, Any]) -> dict[str, Any]:
    """The privacy audit's plot data (`memorization.plots` names a file in its directory: histograms and the
    closest pairs); older layouts keep them inside the `memorization` entry."""
    memo = privacy.get("memorization")
    name = memo.get("plots") if isinstance(memo, Mapping) else None
    if not name:
        return {}
    path = privacy_dir / str(name)
    if Path(str(name)).name != str(name):
        raise InputError(where(privacy_dir / PRIVACY_HEADER, f"plots file {name!r} must be a plain file name"))
    data = _read_json(path, "privacy audit plot data")
    if not isinstance(data, dict):
        raise InputError(where(path, "must be a JSON object"))
    return data


def _synthetic_ok(expected: str | None, synthetic: Dataset, notes: list[str], audit: str) -> bool:
    """The synthetic set is the audited one, or was filtered from it (then a note says so)."""
    if not expected or expected == synthetic.content_hash:
        return True
    filtered = synthetic.info.filtered or {}
    if expected == filtered.get("from"):
        notes.append(f"the {audit} was run on the synthetic set this one was filtered from "
                     f"({str(expected)[:12]}…)")
        return True
    return False


def load_report_inputs(
    *,
    privacy_dir: Path,
    utility_dir: Path,
    real_dir: Path,
    synthetic_dir: Path,
    model_dir: Path | None = None,
    verdict: Any = None,
) -> ReportInputs:
    """Open and cross-check every input; each problem is a one-line `InputError` naming the file."""
    from privacy.ledger import read_model_ledger
    from synth.model_card import read_model_card

    privacy_dir, utility_dir = Path(privacy_dir), Path(utility_dir)
    real, synthetic = load_dataset(Path(real_dir)), load_dataset(Path(synthetic_dir))
    if synthetic.class_names != real.class_names:
        raise InputError(where(synthetic_dir, f"class names {synthetic.class_names} differ from the real set's "
                                              f"{real.class_names}"))

    privacy = read_header(privacy_dir, PRIVACY_HEADER, kind=layout.PRIVACY_AUDIT_KIND)
    parse_privacy_audit(privacy, source=privacy_dir / PRIVACY_HEADER)
    _verify(privacy_dir, privacy)  # small files: a report must not describe an altered audit
    memo = None
    if (privacy_dir / MEMORIZATION_TABLE).is_file():
        try:
            memo = pd.read_parquet(privacy_dir / MEMORIZATION_TABLE)
        except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
            raise InputError(where(privacy_dir / MEMORIZATION_TABLE, f"cannot be read ({e.__class__.__name__})"),
                             ) from None
        if "image_id" not in memo.columns:
            raise InputError(where(privacy_dir / MEMORIZATION_TABLE, "has no image_id column"))
    plots = _privacy_plots(privacy_dir, privacy)
    p_inputs = privacy.get("inputs") or {}
    if p_inputs.get("real") and p_inputs["real"] != real.content_hash:
        raise InputError(where(privacy_dir, f"privacy audit was run on real set {str(p_inputs['real'])[:12]}…, not "
                                            f"on {real_dir} ({real.content_hash[:12]}…)"))
    notes: list[str] = []
    if not _synthetic_ok(p_inputs.get("synthetic"), synthetic, notes, "privacy audit"):
        raise InputError(where(privacy_dir, f"privacy audit was run on synthetic set "
                                            f"{str(p_inputs['synthetic'])[:12]}…, not on {synthetic_dir} "
                                            f"({synthetic.content_hash[:12]}…) or the set it was filtered from"))

    utility = read_utility_audit(utility_dir)
    _verify(utility_dir, utility)
    u_inputs = utility.get("inputs") or {}
    if u_inputs.get("real") != real.content_hash:
        raise InputError(where(utility_dir, f"utility audit was run on real set {str(u_inputs.get('real'))[:12]}…, "
                                            f"not on {real_dir} ({real.content_hash[:12]}…)"))
    if not _synthetic_ok(u_inputs.get("synthetic") or "?", synthetic, notes, "utility audit"):
        raise InputError(where(utility_dir, f"utility audit was run on synthetic set "
                                            f"{str(u_inputs.get('synthetic'))[:12]}…, not on {synthetic_dir} "
                                            f"({synthetic.content_hash[:12]}…)"))
    if list(utility.get("class_names") or []) != real.class_names:
        raise InputError(where(utility_dir, f"utility audit class names {utility.get('class_names')} differ from "
                                            f"the real set's {real.class_names}"))
    roc = _read_json(utility_dir / UTILITY_ROC, "utility ROC points") if (utility_dir / UTILITY_ROC).exists() else {}
    if not isinstance(roc, dict):
        raise InputError(where(utility_dir / UTILITY_ROC, "must be a JSON object"))

    hashes = {
        "privacy_audit": str(privacy["content_hash"]),
        "utility_audit": str(utility["content_hash"]),
        "real": real.content_hash,
        "synthetic": synthetic.content_hash,
    }
    inputs = ReportInputs(privacy_dir=privacy_dir, privacy=privacy, memorization=memo, utility_dir=utility_dir,
                          utility=utility, roc=roc, real=real, synthetic=synthetic, hashes=hashes,
                          privacy_plots=plots, notes=notes)

    if model_dir is not None:
        model_dir = Path(model_dir)
        card = read_model_card(model_dir, require_weights=False)
        generated_from = (synthetic.info.generation or {}).get("model_content_hash") or \
            synthetic.info.inputs.get("model")
        if generated_from and generated_from != card["content_hash"]:
            raise InputError(where(model_dir, f"is model {str(card['content_hash'])[:12]}…, but the synthetic set "
                                              f"was generated by model {str(generated_from)[:12]}…"))
        if list(card.get("class_names") or real.class_names) != real.class_names:
            raise InputError(where(model_dir, f"model class names {card.get('class_names')} differ from the real "
                                              f"set's {real.class_names}"))
        audited = (privacy.get("inputs") or {}).get("model")
        if audited and audited != card["content_hash"]:
            raise InputError(where(model_dir, f"is model {str(card['content_hash'])[:12]}…, but the privacy audit "
                                              f"checked model {str(audited)[:12]}…"))
        trained_on = (card.get("inputs") or {}).get("dataset")
        if trained_on and trained_on != real.content_hash:
            inputs.notes.append(f"the model was trained on dataset {str(trained_on)[:12]}…, not on the real set "
                                f"given here ({real.content_hash[:12]}…)")
        typed_ledger = read_model_ledger(model_dir)
        if typed_ledger is None and card.get("privacy") is not None:
            raise InputError(where(model_dir / layout.PRIVACY_LEDGER,
                                   "privacy ledger (the model card claims DP) not found"))
        ledger = None if typed_ledger is None else typed_ledger.to_dict()
        inputs.model_dir, inputs.model_card, inputs.ledger = model_dir, card, ledger
        hashes["model"] = str(card["content_hash"])

    v = normalise_verdict(verdict)
    if v is not None:
        inputs.verdict = v
        inputs.verdict_source = str(verdict) if isinstance(verdict, str | Path) else None
        hashes["verdict"] = _canonical_hash(v)
    return inputs
