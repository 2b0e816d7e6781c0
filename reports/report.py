"""The steward's audit report: one self-contained HTML file (plus `summary.json`) read before approving a release.

`render_report` reads the audit artifacts (privacy, utility), the real and synthetic datasets, optionally the model
directory and the gate's verdict, and writes one atomic directory:

    report.html    self-contained: figures are PNG data URIs, no script, no external resource (a Content Security
                   Policy forbids both), autoescaped jinja2 (`templates/report.html.j2`)
    summary.json   header kind "report": inputs = content hashes of every input artifact, config = {"public": …},
                   body = the key numbers with their CIs and red/amber/green status, the verdict, the section ids

Summary first (verdict, key numbers with CIs, status against the policy), details below. Status of a number:
`red` a policy check on it failed; `amber` the check passed but the number's confidence interval reaches past the
threshold (the pass is not statistically clear); `green` passed and clear; `none` no policy rule covers it;
`not_judged` the gate has not been evaluated yet.

Two variants:

- the steward's copy (`public=False`): shows real training images (grids beside synthetic ones, the closest
  synthetic↔training pairs): that is its purpose; it is never published.
- the public copy (`public=True`), which goes into the release bundle: **no real pixel at all**, by construction.
  Its renderer never reads the real dataset's pixels (only its header and metadata: counts, hashes), shows
  closest pairs as distances only (no image, no real image id), and leaves out of the synthetic sample grids every
  synthetic image that the memorization audit flagged or that is pixel-identical to a real image (by sha256, from
  the real metadata), since a flagged synthetic image may be a near-copy of a patient's image. It also omits
  local paths and the ingest duplicate list (real image ids).

Consistency: the audit directories must match their content hashes (`IntegrityError` otherwise); the utility
audit must have been run on exactly these real and synthetic datasets (content hashes),
the privacy audit likewise when its header names them; a synthetic set that was *filtered* from the audited one
(`filtered.from`) is accepted. A model directory must be the one the synthetic set was generated from. Anything
else is an `InputError` (exit 2): a report that mixes artifacts of different runs would mislead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from privacy.audit_result import MembershipSummary, parse_privacy_audit
from reports import figures
from reports.utility_result import read_utility_audit
from synth import layout
from synth.artifacts import atomic_dir, read_header, verify_content, write_header
from synth.data.canonical import SPLIT_ORDER, Dataset, load_dataset
from synth.errors import InputError, IntegrityError, where

KIND = "report"
SCHEMA_VERSION = 1
HTML = layout.REPORT_HTML
SUMMARY = layout.REPORT_SUMMARY
TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE = "report.html.j2"

PRIVACY_HEADER = layout.PRIVACY_AUDIT_HEADER
MEMORIZATION_TABLE = layout.MEMORIZATION_TABLE
UTILITY_ROC = layout.UTILITY_ROC
SYNTHETIC_SPLIT = "synthetic"

SAMPLES_PER_CLASS = 24
SAMPLE_COLUMNS = 8
SIDE_BY_SIDE = 16  # real and synthetic images per class in the steward's comparison
PAIRS_PER_SPACE = 8
DUPLICATE_GROUPS_SHOWN = 20
SELECTION_SEED = 0

# Every section of the report, in order: (id, title). Both variants have all of them (the public one says what it
# leaves out), so a reader and a test can find each by id.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("summary", "Summary"),
    ("samples", "Synthetic samples per class"),
    ("real-vs-synthetic", "Real and synthetic side by side"),
    ("memorization", "Memorization: closest synthetic↔training pairs"),
    ("membership", "Membership inference"),
    ("utility", "Utility: is the clinical signal preserved?"),
    ("fidelity", "Fidelity"),
    ("disclosure", "Attribute disclosure"),
    ("privacy-ledger", "Privacy ledger"),
    ("provenance", "Dataset provenance"),
    ("gate", "Gate verdict"),
)
SECTION_IDS: tuple[str, ...] = tuple(s for s, _ in SECTIONS)
STATUSES = ("green", "amber", "red", "none", "not_judged")


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

    Accepts None, an object with `model_dump` (flows.policy.Verdict), a mapping, or a path to its JSON (the
    verdict at the top level or under a `verdict` key)."""
    if verdict is None:
        return None
    if isinstance(verdict, str | Path):
        source = verdict
        verdict = _read_json(Path(verdict), "verdict file")
    if hasattr(verdict, "model_dump"):
        verdict = verdict.model_dump(mode="json")
    if isinstance(verdict, Mapping) and "decision" not in verdict and isinstance(verdict.get("verdict"), Mapping):
        verdict = verdict["verdict"]
    if not isinstance(verdict, Mapping):
        raise InputError(where(source, f"a verdict must be a JSON object, got {type(verdict).__name__}"))
    decision = verdict.get("decision")
    if decision not in ("pass", "block"):
        raise InputError(where(source, f"verdict decision must be 'pass' or 'block', got {decision!r}"))
    checks = verdict.get("checks")
    if not isinstance(checks, list):
        raise InputError(where(source, "verdict has no list of checks"))
    out = []
    for i, c in enumerate(checks):
        if not isinstance(c, Mapping) or not isinstance(c.get("rule"), str) or not isinstance(c.get("passed"), bool):
            raise InputError(where(source, f"verdict check {i} needs a 'rule' (text) and 'passed' (true/false)"))
        out.append({"rule": c["rule"], "passed": c["passed"], "value": c.get("value"),
                    "threshold": c.get("threshold"), "message": str(c.get("message", ""))})
    return {"decision": decision, "checks": out}


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
    filtered = synthetic.header.get("filtered") or {}
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
        generated_from = (synthetic.header.get("generation") or {}).get("model_content_hash") or \
            (synthetic.header.get("inputs") or {}).get("model")
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


# --------------------------------------------------------------------------------------------------------------
# Formatting (jinja filters)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def fmt(v: Any, spec: str = ".3g") -> str:
    """A number for people: `spec` for floats, thousands separators for ints, '–' when missing."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        return format(v, spec)
    return str(v)


def fmt_pct(v: Any) -> str:
    return "–" if not _finite(v) else f"{100 * float(v):.3g}%"


def fmt_ci(ci: Any, spec: str = ".3f") -> str:
    if not isinstance(ci, list | tuple) or len(ci) != 2 or not all(_finite(x) for x in ci):
        return "–"
    return f"[{format(float(ci[0]), spec)}, {format(float(ci[1]), spec)}]"


def metric_parts(m: Any) -> tuple[float | None, list[float] | None]:
    """(value, ci) from `{"value": v, "ci": [lo, hi]}` or a bare number."""
    if isinstance(m, Mapping):
        v, ci = m.get("value"), m.get("ci")
        return (float(v) if _finite(v) else None), (list(ci) if isinstance(ci, list | tuple) else None)
    return (float(m) if _finite(m) else None), None


def fmt_metric(m: Any, spec: str = ".3f") -> str:
    """'0.912 [0.880, 0.940]' from a `{"value", "ci"}` metric."""
    v, ci = metric_parts(m)
    if v is None:
        return "–"
    text = format(v, spec)
    return f"{text} {fmt_ci(ci, spec)}" if ci and all(_finite(x) for x in ci) else text


def _clip(text: str, n: int = 48) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def short_hash(h: Any) -> str:
    return (str(h)[:12] + "…") if h else "–"


@functools.cache
def html_env():  # -> jinja2.Environment
    """The report's jinja2 environment: HTML autoescaping always on, undefined names are errors."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(num=fmt, pct=fmt_pct, ci=fmt_ci, metric=fmt_metric, short=short_hash)
    return env


# --------------------------------------------------------------------------------------------------------------
# Key numbers and their status against the policy


@dataclass(frozen=True)
class KeyNumber:
    key: str
    label: str
    value: float | int | None
    ci: list[float] | None
    display: str
    rules: tuple[str, ...] = ()
    direction: str | None = None  # "max" (value must stay below) or "min"
    note: str = ""


def status_of(k: KeyNumber, verdict: Mapping[str, Any] | None) -> tuple[str, list[dict[str, Any]]]:
    """(status, the verdict's checks on this number); see the module docstring for the statuses."""
    if verdict is None:
        return "not_judged", []
    checks = [c for c in verdict["checks"] if c["rule"] in k.rules]
    if not checks:
        return "none", []
    if not all(c["passed"] for c in checks):
        return "red", checks
    thresholds = [c["threshold"] for c in checks if _finite(c["threshold"])]
    if k.ci and all(_finite(x) for x in k.ci) and thresholds:
        if k.direction == "max" and max(k.ci) > min(thresholds):
            return "amber", checks
        if k.direction == "min" and min(k.ci) < max(thresholds):
            return "amber", checks
    return "green", checks


def _utility_key_numbers(body_u: Mapping[str, Any]) -> list[KeyNumber]:
    """Balanced accuracy and the worst class first: AUROC ranks cases and can look good while a class is dead."""
    out: list[KeyNumber] = []
    floor = (((body_u.get("baselines") or {}).get("majority_class") or {}).get("real_test") or {})
    floor_note = (f"a classifier that always predicts '{floor['class']}' scores balanced accuracy "
                  f"{fmt(floor.get('balanced_accuracy'), '.3f')} (accuracy {fmt(floor.get('accuracy'), '.3f')})"
                  if floor.get("class") else "")
    for key, label, setting in (("trtr_balanced_accuracy", "TRTR balanced accuracy (real → real test)", "trtr"),
                                ("tstr_balanced_accuracy", "TSTR balanced accuracy (synthetic → real test)",
                                 "tstr")):
        v, ci = metric_parts((body_u.get(setting) or {}).get("balanced_accuracy"))
        out.append(KeyNumber(key, label, v, ci, fmt(v, ".3f"), note=floor_note))
    paired = body_u.get("tstr_vs_trtr") or {}
    v, ci = metric_parts((paired.get("balanced_accuracy") or {}).get("ratio"))
    out.append(KeyNumber("tstr_trtr_balanced_accuracy_ratio", "TSTR / TRTR balanced-accuracy ratio", v, ci,
                         fmt(v, ".3f"), ("min_tstr_trtr_balanced_accuracy_ratio",), "min"))
    for setting, label in (("trtr", "TRTR"), ("tstr", "TSTR")):
        block = body_u.get(setting) or {}
        v, ci = metric_parts(block.get("worst_class_sensitivity"))
        worst = block.get("worst_class")
        out.append(KeyNumber(f"{setting}_worst_class_sensitivity",
                             f"{label} sensitivity of the worst class{f' ({worst})' if worst else ''}", v, ci,
                             fmt(v, ".3f")))
    v, ci = metric_parts((paired.get("worst_class_sensitivity") or {}).get("ratio"))
    out.append(KeyNumber("tstr_trtr_worst_class_ratio", "TSTR / TRTR worst-class sensitivity ratio", v, ci,
                         fmt(v, ".3f"), ("min_tstr_trtr_worst_class_ratio",), "min"))
    v, ci = metric_parts((body_u.get("trts") or {}).get("balanced_accuracy"))
    out.append(KeyNumber("trts_balanced_accuracy", "TRTS balanced accuracy (real-trained classifier on synthetic "
                         "images)", v, ci, fmt(v, ".3f"), ("min_trts_balanced_accuracy",), "min"))
    for key, label, setting in (("trtr_auroc", "TRTR AUROC (real → real test)", "trtr"),
                                ("tstr_auroc", "TSTR AUROC (synthetic → real test)", "tstr")):
        v, ci = metric_parts((body_u.get(setting) or {}).get("auroc"))
        out.append(KeyNumber(key, label, v, ci, fmt(v, ".3f")))
    v, ci = metric_parts(body_u.get("tstr_over_trtr"))
    out.append(KeyNumber("tstr_over_trtr", "TSTR / TRTR AUROC ratio", v, ci, fmt(v, ".3f"),
                         ("min_tstr_trtr_ratio",), "min"))
    v, ci = metric_parts((body_u.get("trts") or {}).get("accuracy"))
    out.append(KeyNumber("trts_accuracy", "TRTS accuracy (real-trained classifier on synthetic images)", v, ci,
                         fmt(v, ".3f"), ("min_trts_accuracy",), "min"))
    return out


def _key_numbers(inp: ReportInputs) -> list[KeyNumber]:
    body_p, body_u = inp.privacy, inp.utility
    out: list[KeyNumber] = _utility_key_numbers(body_u)

    ledger = inp.ledger
    privacy_claim = (inp.model_card or {}).get("privacy")
    if ledger or privacy_claim:
        eps = (ledger or {}).get("epsilon", (privacy_claim or {}).get("epsilon"))
        delta = (ledger or {}).get("delta", (privacy_claim or {}).get("delta"))
        out.append(KeyNumber("epsilon", "DP-SGD privacy budget ε", eps, None,
                             f"ε = {fmt(eps)} at δ = {fmt(delta, '.2g')}", ("require_dp", "max_epsilon", "max_delta"),
                             "max"))
    elif inp.model_card is not None:
        out.append(KeyNumber("epsilon", "DP-SGD privacy budget ε", None, None, "not differentially private",
                             ("require_dp", "max_epsilon"), "max"))
    else:
        out.append(KeyNumber("epsilon", "DP-SGD privacy budget ε", None, None, "model not given",
                             ("require_dp", "max_epsilon"), "max"))
    lc = body_p.get("ledger_check")
    if isinstance(lc, Mapping) and "passed" in lc:
        out.append(KeyNumber("ledger_check", "ε recomputed from the ledger", None, None,
                             "agrees" if lc.get("passed") else "does NOT agree", ("ledger_check",)))

    memo = body_p.get("memorization")
    if isinstance(memo, Mapping) and "flagged_fraction" in memo:
        n, flagged = memo.get("synthetic_images"), memo.get("flagged")
        out.append(KeyNumber("flagged_fraction", "Memorization: synthetic images flagged as too close to a training "
                             "image", memo.get("flagged_fraction"), None,
                             f"{fmt_pct(memo.get('flagged_fraction'))} ({fmt(flagged)} of {fmt(n)}; "
                             f"exact copies {fmt(memo.get('exact_copies'))})", ("max_flagged_fraction",), "max",
                             "before filtering; the gate judges the set to be released"))
        # `excess` rescales the closer-to-train share so that 0 is what a generator that does not memorise scores
        # (its share equals n_train / (n_train + n_holdout), not 0.5) and 1 is every image nearer to training.
        excesses = [s["closer_to_train"]["excess"] for s in (memo.get("per_space") or {}).values()
                    if isinstance(s, Mapping) and isinstance(s.get("closer_to_train"), Mapping)
                    and _finite(s["closer_to_train"].get("excess"))]
        if excesses:
            out.append(KeyNumber("closer_to_train", "Excess share of synthetic images closer to a training than to a "
                                 "holdout image (0 = no memorization signal, 1 = all; worst space)", max(excesses),
                                 None, fmt(max(excesses), ".3f")))
    else:
        out.append(KeyNumber("flagged_fraction", "Memorization: flagged synthetic images", None, None, "not run",
                             ("max_flagged_fraction",), "max"))

    membership = _membership_summary(body_p)
    judged = membership.judged if membership is not None else None
    if judged is not None:
        # The value the gate judges (`MembershipSummary.judged`), not only the published-direction headline.
        label = "strongest attack" + (f", {judged.attack} reversed: 1 − AUC" if judged.reversed else "")
        out.append(KeyNumber("membership_auc", f"Membership inference AUC ({label})", judged.value, judged.ci,
                             fmt(judged.value, ".3f"), ("max_membership_auc",), "max"))
        mem = body_p["membership"]
        attack = (mem.get("attacks") or {}).get(mem.get("auc_attack")) or {}
        tpr = mem.get("tpr_at_1pct_fpr")
        out.append(KeyNumber("membership_tpr_at_1pct_fpr", "Membership TPR at 1% FPR (strongest)", tpr,
                             attack.get("tpr_at_1pct_fpr_ci"), fmt(tpr, ".3f"), ("max_membership_tpr_at_1pct_fpr",),
                             "max"))
    else:
        out.append(KeyNumber("membership_auc", "Membership inference AUC", None, None, "not run",
                             ("max_membership_auc", "max_membership_tpr_at_1pct_fpr"), "max"))
    fid = _headline_fid(body_u.get("fidelity"))
    if fid is not None:
        out.append(KeyNumber("fid", f"FID in the {fid['space']} space (real holdout floor)", fid["synthetic"], None,
                             f"{fmt(fid['synthetic'], '.4g')} (floor {fmt(fid['floor'], '.4g')})"))

    counts = _synthetic_counts(inp)
    smallest = min(counts.values()) if counts else None
    out.append(KeyNumber("min_class_count", "Synthetic images in the smallest class", smallest, None,
                         ", ".join(f"{k}: {fmt(v)}" for k, v in counts.items()), ("min_per_class_count",), "min"))

    disc = body_p.get("disclosure")
    if isinstance(disc, Mapping) and "violations" in disc:
        out.append(KeyNumber("disclosure_violations", f"Attribute combinations with fewer than k={fmt(disc.get('k'))} "
                             "records", disc.get("violations"), None, fmt(disc.get("violations")), ("disclosure_k",),
                             "max"))
    else:
        out.append(KeyNumber("disclosure_violations", "Attribute disclosure (k-anonymity)", None, None, "not run",
                             ("disclosure_k",), "max"))
    return out


def _headline_fid(fidelity: Any) -> dict[str, Any] | None:
    if not isinstance(fidelity, Mapping):
        return None
    for name, space in (fidelity.get("spaces") or {}).items():
        syn = ((space or {}).get("synthetic") or {}).get("overall") or {}
        floor = ((space or {}).get("real_holdout") or {}).get("overall") or {}
        if _finite(syn.get("fid")):
            return {"space": name, "synthetic": syn["fid"], "floor": floor.get("fid")}
    return None


def _synthetic_rows(ds: Dataset) -> np.ndarray:
    marked = (ds.metadata["split"] == SYNTHETIC_SPLIT).to_numpy()
    return np.flatnonzero(marked) if marked.any() else np.arange(len(ds.metadata))


def _synthetic_counts(inp: ReportInputs) -> dict[str, int]:
    meta = inp.synthetic.metadata.iloc[_synthetic_rows(inp.synthetic)]
    return {name: int((meta["label"] == c).sum()) for c, name in enumerate(inp.class_names)}


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
    if syn_id not in syn_index.index and inp.synthetic.header.get("filtered"):
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
    own = inp.synthetic.header.get("filtered") if isinstance(inp.synthetic.header.get("filtered"), Mapping) else {}
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


def _membership_summary(privacy: Mapping[str, Any]) -> MembershipSummary | None:
    """The typed `membership` section of a privacy audit header (validated when the inputs were loaded)."""
    mem = privacy.get("membership")
    return MembershipSummary.model_validate(mem) if isinstance(mem, Mapping) else None


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

    rc = inp.real.header.get("counts") or {}
    splits = sorted((s for s in rc if s not in ("total", "per_class")), key=lambda s: (SPLIT_ORDER.get(s, 99), s))
    real_counts = [{"split": s, "n": rc.get(s), **{f"c{i}": (rc.get("per_class") or {}).get(s, {}).get(n)
                                                    for i, n in enumerate(inp.class_names)}} for s in splits]
    dup = dict(inp.real.header.get("duplicates") or {})
    groups = dup.pop("group_list", None) or []
    model = None
    if inp.model_card is not None:
        c = inp.model_card
        model = [(k, c.get(k)) for k in ("steps", "epochs", "train_images", "training_seconds", "stopped_by",
                                         "final_loss", "device") if c.get(k) is not None]
        preset = ((c.get("config") or {}).get("model") or {}).get("name")
        if preset:
            model.insert(0, ("model preset", preset))
    source = inp.real.header.get("source") or {}
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
        "license": inp.real.header.get("license"),
        "model": model,
        "generation": _scalars(inp.synthetic.header.get("config") or {}),
        "notes": list(inp.notes),
    }


def _gate(inp: ReportInputs) -> dict[str, Any] | None:
    v = inp.verdict
    if v is None:
        return None
    return {"decision": v["decision"], "checks": v["checks"],
            "reasons": [c["message"] for c in v["checks"] if not c["passed"]]}


# --------------------------------------------------------------------------------------------------------------
# Rendering


def build_context(inp: ReportInputs, *, public: bool) -> dict[str, Any]:
    """Everything the template shows, as plain values (numbers, strings, data URIs). In the public variant no real
    pixel is read (`_real_*` helpers are not called)."""
    keys = []
    for k in _key_numbers(inp):
        status, checks = status_of(k, inp.verdict)
        keys.append({"key": k.key, "label": k.label, "value": k.value, "ci": k.ci, "display": k.display,
                     "status": status, "checks": [c["message"] for c in checks], "note": k.note,
                     "threshold": next((c["threshold"] for c in checks), None)})
    withheld, withheld_how = _withheld_synthetic_ids(inp, public=public)
    samples = _sample_grids(inp, withheld)
    memo = inp.privacy.get("memorization") if isinstance(inp.privacy.get("memorization"), Mapping) else None
    disclosure = inp.privacy.get("disclosure") if isinstance(inp.privacy.get("disclosure"), Mapping) else None
    u = inp.utility
    ctx: dict[str, Any] = {
        "public": public,
        "sections": SECTIONS,
        "class_names": inp.class_names,
        "gate": _gate(inp),
        "keys": keys,
        "n_synthetic": len(_synthetic_rows(inp.synthetic)),
        "samples": samples,
        "samples_per_class": SAMPLES_PER_CLASS,
        "withheld": {"n": sum(1 for s in inp.synthetic.metadata["image_id"].astype(str) if s in withheld),
                     "how": withheld_how},
        "side_by_side": None if public else _real_side_by_side(inp, samples),
        "memo": memo,
        "memo_spaces": [{"space": s, **(v or {})} for s, v in ((memo or {}).get("per_space") or {}).items()],
        "pairs": _pairs(inp, public=public) if memo is not None else [],
        "histograms": _histograms(inp) if memo is not None else [],
        "membership": _membership(inp),
        "utility": _utility(inp),
        "fidelity": _fidelity(inp),
        "fidelity_reference": (u.get("fidelity") or {}).get("reference") if isinstance(u.get("fidelity"), Mapping)
        else None,
        "disclosure": disclosure,
        "findings": [f for f in inp.privacy.get("findings") or [] if isinstance(f, Mapping)],
        "filtering": _filtering(inp),
        "disclosure_below": [c for c in (disclosure or {}).get("combinations") or [] if c.get("below_k")],
        "ledger": _ledger(inp, public=public),
        "provenance": _provenance(inp, public=public),
        "inputs": dict(inp.hashes),
    }
    ctx["summary"] = {
        "public": public,
        "gate_evaluated": inp.verdict is not None,
        "verdict": None if inp.verdict is None else {"decision": inp.verdict["decision"],
                                                     "reasons": ctx["gate"]["reasons"]},
        "key_numbers": [dict(key) for key in keys],
        "status_counts": {s: sum(1 for k in keys if k["status"] == s) for s in STATUSES},
        "class_names": inp.class_names,
        "synthetic_counts": _synthetic_counts(inp),
        "sample_images_withheld": ctx["withheld"]["n"],
        "sections": list(SECTION_IDS),
    }
    return ctx


def render_html(ctx: Mapping[str, Any]) -> str:
    """The report's HTML from a `build_context` result."""
    return html_env().get_template(TEMPLATE).render(**ctx)


def render_report(
    *,
    privacy_dir: Path,
    utility_dir: Path,
    real_dir: Path,
    synthetic_dir: Path,
    model_dir: Path | None = None,
    verdict: Any = None,
    out: Path,
    public: bool = False,
    overwrite: bool = False,
) -> Path:
    """Render the audit report into the new directory `out` (`report.html` + `summary.json`) and return `out`.

    `verdict`: None (the gate has not run: the report says so), a `flows.policy.Verdict`, its dict, or a path to
    its JSON. `public=True` renders the variant for the release bundle, with no real patient pixel in it.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(where(out, "already exists; choose another --out or remove it"))
    inp = load_report_inputs(privacy_dir=privacy_dir, utility_dir=utility_dir, real_dir=real_dir,
                             synthetic_dir=synthetic_dir, model_dir=model_dir, verdict=verdict)
    ctx = build_context(inp, public=public)
    html = render_html(ctx)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / HTML).write_text(html, encoding="utf-8", newline="\n")
        write_header(tmp, SUMMARY, kind=KIND, schema_version=SCHEMA_VERSION, files=[HTML], inputs=inp.hashes,
                     config={"public": public, "samples_per_class": SAMPLES_PER_CLASS,
                             "pairs_per_space": PAIRS_PER_SPACE, "selection_seed": SELECTION_SEED},
                     body=ctx["summary"])
    return out
