"""`synthgate report`: render the steward's audit report (HTML + summary.json) from the audit artifacts.

    synthgate report AUDIT_DIR --out REPORT_DIR [--public] [--verdict FILE] [--model MODEL_DIR]
    synthgate report --privacy DIR --utility DIR [--real DS] [--synthetic DS] [--model M] [--verdict FILE]
                     --out REPORT_DIR [--public] [--overwrite]

AUDIT_DIR is a parent directory holding `privacy/` (a privacy audit) and `utility/` (a utility audit), and
optionally `verdict.json` (the gate's verdict); `--privacy`, `--utility` and `--verdict` override its parts.
`--real` and `--synthetic` default to the dataset directories the utility audit recorded, `--model` to the model
directory the synthetic set records as its generator (when that directory exists); the report checks every one of
them against the audits' content hashes, so a default can never silently mix runs. `--public` renders the version
for the release bundle (no real patient pixels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

console = Console(highlight=False, soft_wrap=True)  # paths and commands stay copy-pasteable
err_console = Console(stderr=True, highlight=False)

PRIVACY_SUBDIR = "privacy"
UTILITY_SUBDIR = "utility"
VERDICT_FILE = "verdict.json"


def _recorded_dirs(utility_dir: Path) -> tuple[Path | None, Path | None]:
    """The real and synthetic dataset directories a utility audit recorded (None when it has none)."""
    from reports.utility_result import read_utility_audit

    header: dict[str, Any] = read_utility_audit(utility_dir)
    data = header.get("data") or {}
    real = (data.get("real") or {}).get("dir")
    synthetic = (data.get("synthetic") or {}).get("dir")
    return (Path(real) if real else None), (Path(synthetic) if synthetic else None)


def resolve_inputs(
    audit_dir: Path | None,
    *,
    privacy: Path | None,
    utility: Path | None,
    real: Path | None,
    synthetic: Path | None,
    model: Path | None,
    verdict: Path | None,
) -> dict[str, Path | None]:
    """Fill in what the command line left out from AUDIT_DIR and the audits' own records (see module docstring)."""
    from synth.errors import InputError, where

    if audit_dir is not None:
        if not audit_dir.is_dir():
            raise InputError(where(audit_dir, "audit directory does not exist"))
        privacy = privacy or audit_dir / PRIVACY_SUBDIR
        utility = utility or audit_dir / UTILITY_SUBDIR
        if verdict is None and (audit_dir / VERDICT_FILE).is_file():
            verdict = audit_dir / VERDICT_FILE
    if privacy is None or utility is None:
        raise InputError(where("synthgate report", "give AUDIT_DIR (holding privacy/ and utility/) or both "
                                                   "--privacy and --utility"))
    if real is None or synthetic is None:
        rec_real, rec_synthetic = _recorded_dirs(utility)
        real, synthetic = real or rec_real, synthetic or rec_synthetic
        if real is None or synthetic is None:
            raise InputError(where(utility, "records no dataset directories; pass --real and --synthetic"))
    if model is None:
        from synth.data.canonical import load_dataset_header

        gen = load_dataset_header(synthetic).generation or {}
        if gen.get("model"):
            if Path(gen["model"]).is_dir():
                model = Path(gen["model"])
            else:
                err_console.print(f"note: the synthetic set's model {gen['model']} was not found; the report will "
                                  "not show the privacy ledger (pass --model)")
    return {"privacy": privacy, "utility": utility, "real": real, "synthetic": synthetic, "model": model,
            "verdict": verdict}


def report_cmd(
    audit_dir: Annotated[Path | None, typer.Argument(
        help="Directory holding privacy/ and utility/ audits (and optionally verdict.json).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Report directory to create.")] = None,
    privacy: Annotated[Path | None, typer.Option("--privacy", help="Privacy audit directory.")] = None,
    utility: Annotated[Path | None, typer.Option("--utility", help="Utility audit directory.")] = None,
    real: Annotated[Path | None, typer.Option(
        "--real", help="Real canonical dataset (default: the one the utility audit recorded).")] = None,
    synthetic: Annotated[Path | None, typer.Option(
        "--synthetic", help="Synthetic canonical dataset (default: the one the utility audit recorded).")] = None,
    model: Annotated[Path | None, typer.Option(
        "--model", help="Model directory (default: the synthetic set's generator, if present).")] = None,
    verdict: Annotated[Path | None, typer.Option("--verdict", help="The gate's verdict JSON.")] = None,
    public: Annotated[bool, typer.Option(
        "--public/--steward", help="Public version for the release bundle (no real patient pixels).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> int:
    """Render the audit report (report.html + summary.json) a data steward reads before approving a release."""
    from reports.report import HTML, render_report
    from reports.report_summary import load_report_summary
    from synth.errors import InputError, where

    if out is None:
        raise InputError(where("synthgate report", "--out is required (the report directory to create)"))
    paths = resolve_inputs(audit_dir, privacy=privacy, utility=utility, real=real, synthetic=synthetic,
                           model=model, verdict=verdict)
    with console.status("rendering the report"):
        path = render_report(privacy_dir=paths["privacy"], utility_dir=paths["utility"], real_dir=paths["real"],
                             synthetic_dir=paths["synthetic"], model_dir=paths["model"], verdict=paths["verdict"],
                             out=out, public=public, overwrite=overwrite)
    summary = load_report_summary(path)
    v = summary.verdict
    gate = "gate not evaluated yet" if v is None else f"gate: {v.decision.upper()}"
    console.print(f"{gate}; key numbers: {summary.count('red')} red, {summary.count('amber')} amber, "
                  f"{summary.count('green')} green")
    kind = "public report (no real images)" if public else "steward's report (contains real images: do not publish)"
    console.print(f"[green]wrote[/] {kind}: {path / HTML}")
    return 0


def register(app: typer.Typer) -> None:
    """Add `synthgate report`."""
    app.command("report")(report_cmd)
