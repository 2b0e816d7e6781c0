"""`synthgate audit utility`: the biomarker-preservation audit (TRTR, TRTS, TSTR, augmentation) and fidelity.

The command joins the `audit` sub-app of `flows/cli_audit.py` (`synthgate audit privacy ...`). Torch and the audit
code are imported inside the command so `synthgate --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

console = Console(highlight=False, soft_wrap=True)  # paths and commands stay copy-pasteable


def utility_cmd(
    real: Annotated[Path, typer.Option("--real", help="The real canonical dataset (train/val/test splits).")],
    synthetic: Annotated[Path, typer.Option("--synthetic", help="The synthetic canonical dataset to audit.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to create for the audit.")],
    epochs: Annotated[int | None, typer.Option(help="Classifier training epochs (default 8).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of classifiers, bootstrap and subsets (default 0).")]
    = None,
    ratios: Annotated[str | None, typer.Option(help="Synthetic:real ratios for augmentation, e.g. 0.5,1,2; "
                                                    "an empty string skips augmentation.")] = None,
    bootstrap: Annotated[int | None, typer.Option(help="Bootstrap resamples for the 95% CIs (default 1000).")]
    = None,
    config: Annotated[Path | None, typer.Option(help="YAML file with UtilityConfig settings; flags override.")]
    = None,
    encoder: Annotated[Path | None, typer.Option(help="A privacy copy-detection encoder dir: extra fidelity space.")]
    = None,
    inception_weights: Annotated[Path | None, typer.Option(
        "--inception-weights", help="Inception-v3 TorchScript file for FID/KID in Inception space (never "
                                    "downloaded; a state dict is refused).")] = None,
    threads: Annotated[int | None, typer.Option(help="Torch threads for the classifiers (default: 1, "
                                                     "so results are identical on any machine or worker).")] = None,
    fidelity: Annotated[bool, typer.Option("--fidelity/--no-fidelity", help="Compute FID/KID/precision/recall.")]
    = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> int:
    """Audit whether the clinical signal survives in a synthetic set: TRTR, TRTS, TSTR, augmentation, fidelity."""
    from reports.utility import HEADER, UtilityConfig, audit_utility, parse_ratios
    from synth.config import build, load_yaml

    base: dict[str, Any] = load_yaml(config) if config is not None else {}
    cfg = build(UtilityConfig, base, source=config or "utility config")
    update: dict[str, Any] = {"fidelity": fidelity and cfg.fidelity}
    classifier_update: dict[str, Any] = {}
    if epochs is not None:
        classifier_update["epochs"] = epochs
    if threads is not None:
        classifier_update["threads"] = threads
    if seed is not None:
        update["seed"] = seed
        classifier_update["seed"] = seed
        update["fidelity_config"] = {**cfg.fidelity_config.model_dump(), "seed": seed}
    if ratios is not None:
        update["ratios"] = parse_ratios(ratios)
    if bootstrap is not None:
        update["n_boot"] = bootstrap
    if encoder is not None:
        update["encoder"] = encoder
    if inception_weights is not None:
        update["inception_weights"] = inception_weights
    update["classifier"] = {**cfg.classifier.model_dump(), **classifier_update}
    # Re-validate the merged settings so a bad flag value is a one-line config error, not a silent override.
    cfg = build(UtilityConfig, {**cfg.model_dump(), **update}, source="command line")

    from flows.cli_progress import cli_progress
    from synth.progress import phase

    # Each step of the audit is a progress line: the spinner's text on a terminal, a line on stderr elsewhere.
    with console.status("utility audit") as status, cli_progress(status=status):
        path = audit_utility(real, synthetic, out, config=cfg, overwrite=overwrite,
                             progress=lambda msg: phase("utility audit", msg))
    from reports.utility_result import read_utility_audit

    result = read_utility_audit(path)
    print_summary(result)
    console.print(f"[green]wrote[/] {path / HEADER}")
    return 0


def _fmt(metric: dict[str, Any] | None) -> str:
    if not metric or metric.get("value") is None:
        return "–"
    ci = metric.get("ci")
    return f"{metric['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def print_summary(result: dict[str, Any]) -> None:
    """The headline numbers of a `utility.json` as two tables."""
    table = Table(title="Utility (95% bootstrap CIs)", title_justify="left")
    for col in ("setting", "AUROC", "accuracy", "F1 macro"):
        table.add_column(col)
    rows = [("TRTR real→real", result["trtr"]), ("TRTS real→synthetic", result["trts"]),
            ("TSTR synthetic→real", result["tstr"])]
    rows += [(f"real + {p['ratio']:g}× synthetic", p) for p in result["augmentation"]["curve"][1:]]
    for name, m in rows:
        table.add_row(name, _fmt(m["auroc"]), _fmt(m["accuracy"]), _fmt(m["f1_macro"]))
    console.print(table)
    console.print(f"TSTR/TRTR AUROC ratio: {_fmt(result['tstr_over_trtr'])}")
    fid = result.get("fidelity")
    if fid:
        ft = Table(title=f"Fidelity against {fid['reference']} (real holdout = floor)", title_justify="left")
        for col in ("space", "set", "FID", "KID", "precision", "recall"):
            ft.add_column(col)
        for space, s in fid["spaces"].items():
            for which in ("synthetic", "real_holdout"):
                o = s[which]["overall"]
                if "skipped" in o:
                    ft.add_row(space, which, "–", "–", "–", "–")
                    continue
                ft.add_row(space, which, f"{o['fid']:.4g}", f"{o['kid']['value']:.3g}", f"{o['precision']:.3f}",
                           f"{o['recall']:.3f}")
        console.print(ft)


def register(app: typer.Typer) -> None:
    """Add `utility` to the `audit` sub-app of flows/cli_audit.py (or to a stand-in `audit` group without it)."""
    try:
        from flows.cli_audit import audit_app
    except ModuleNotFoundError as e:
        if e.name != "flows.cli_audit":
            raise
        # cli_audit (the privacy audit commands) is not in this checkout: keep `synthgate audit utility` working.
        audit_app = typer.Typer(name="audit", help="Audit a synthetic set.", no_args_is_help=True)
        app.add_typer(audit_app, name="audit")
    audit_app.command("utility")(utility_cmd)
