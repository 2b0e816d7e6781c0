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

Modules: `report_layout` (file names, sections, sizes), `report_inputs` (reading and cross-checking),
`report_format` (jinja filters), `report_numbers` (key numbers and status), `report_figures`, `report_details`
(the detail sections); this module builds the context and renders.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reports.report_details import _fidelity, _gate, _ledger, _provenance, _utility
from reports.report_figures import (
    _filtering,
    _histograms,
    _membership,
    _pairs,
    _real_side_by_side,
    _sample_grids,
    _withheld_synthetic_ids,
)
from reports.report_format import html_env
from reports.report_inputs import ReportInputs, load_report_inputs
from reports.report_layout import (
    HTML,
    KIND,
    PAIRS_PER_SPACE,
    SAMPLES_PER_CLASS,
    SCHEMA_VERSION,
    SECTION_IDS,
    SECTIONS,
    SELECTION_SEED,
    STATUSES,
    SUMMARY,
    TEMPLATE,
)
from reports.report_numbers import _key_numbers, _synthetic_counts, _synthetic_rows, status_of
from synth.artifacts import atomic_dir, write_header
from synth.errors import InputError, where

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
