"""`synthgate ingest` and `synthgate validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console(highlight=False, soft_wrap=True)  # paths and commands stay copy-pasteable


def ingest_cmd(
    source: Annotated[str, typer.Argument(help="An .npz file, a known MedMNIST name (pneumoniamnist), or a folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to create for the canonical dataset.")],
    csv: Annotated[Path | None, typer.Option(help="CSV naming each image (file, label[, patient_id, split, ...]).")]
    = None,
    fmt: Annotated[str, typer.Option("--format", help="auto | medmnist | imagefolder | dicom")] = "auto",
    size: Annotated[int | None, typer.Option(help="Resize images to SIZE×SIZE (any source).")] = None,
    channels: Annotated[int | None, typer.Option(help="1 (grayscale) or 3 (RGB); default: detect.")] = None,
    classes: Annotated[
        str | None, typer.Option(help="Comma-separated class names in label order (default: from the source).")
    ] = None,
    window: Annotated[
        tuple[float, float] | None, typer.Option(help="DICOM window CENTER WIDTH (default: the file's own).")
    ] = None,
    duplicates: Annotated[str, typer.Option(help="collapse (keep one copy, earliest split) | keep")] = "collapse",
    license: Annotated[str | None, typer.Option(help="License of the source data.")] = None,
    attribution: Annotated[str | None, typer.Option(help="Attribution text for the source data.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for split assignment when the CSV has none.")] = 0,
) -> None:
    """Read a real image set into synthgate's canonical form (images.npy, metadata.parquet, dataset.json)."""
    from synth.config import build
    from synth.data.canonical import load_dataset
    from synth.data.ingest import SourceFormat
    from synth.data.ingest_config import IngestConfig, ingest_with

    try:
        SourceFormat(fmt)
    except ValueError:
        raise typer.BadParameter(f"unknown format {fmt!r}", param_hint="--format") from None
    settings = {
        "path": source, "csv": csv, "format": fmt, "size": size, "channels": channels,
        "classes": [c.strip() for c in classes.split(",")] if classes else None, "window": window,
        "duplicates": duplicates, "license": license, "attribution": attribution, "seed": seed,
    }
    config = build(IngestConfig, settings, source="command line")
    with console.status(f"ingesting {source}"):
        path = ingest_with(config, out)
    header = load_dataset(path).header
    console.print(f"[green]wrote[/] {path}  ({header['counts']['total']} images, hash {header['content_hash'][:12]})")
    print_counts(header)
    print_duplicates(header["duplicates"])


def validate_cmd(
    dataset: Annotated[Path, typer.Argument(help="A canonical dataset directory.")],
    out: Annotated[Path | None, typer.Option(help="Validation artifact dir (default DATASET/validation).")]
    = None,
    min_per_class: Annotated[int, typer.Option(help="Minimum training images per class.")] = 10,
) -> int:
    """Check a canonical dataset (great-expectations + pixel checks); exit 1 when a finding blocks."""
    from synth.data.canonical import load_dataset

    header = load_dataset(dataset).header
    from synth.data.validate import validate_dataset

    with console.status(f"validating {dataset}"):
        report = validate_dataset(dataset, out, min_per_class=min_per_class)
    print_counts(header)
    print_duplicates(header.get("duplicates", {}))
    table = Table(title="Validation findings", title_justify="left")
    for col in ("severity", "rule", "finding"):
        table.add_column(col)
    colours = {"block": "red", "warn": "yellow", "info": "cyan"}
    for f in report.findings:
        table.add_row(f"[{colours.get(f.severity, 'white')}]{f.severity}[/]", f.rule, f.message)
    console.print(table)
    target = out or Path(dataset) / "validation"
    verdict = "[green]passed[/]" if report.passed else "[red]BLOCKED[/]"
    console.print(f"validation {verdict}; report: {target / 'report.json'}, data docs: {target / 'data_docs'}")
    return 0 if report.passed else 1


def print_counts(header: dict) -> None:
    """Per-split, per-class counts as a table."""
    counts = header["counts"]
    table = Table(title="Images per split and class", title_justify="left")
    table.add_column("split")
    for name in header["class_names"]:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    for split, per_class in counts["per_class"].items():
        table.add_row(split, *(str(per_class[c]) for c in header["class_names"]), str(counts[split]))
    console.print(table)


def print_duplicates(dup: dict) -> None:
    """One line summarising the exact-duplicate findings and what the policy did."""
    if not dup:
        return
    removed = ", ".join(f"{s} {n}" for s, n in dup.get("removed_per_split", {}).items()) or "none"
    console.print(
        f"exact duplicates: {dup['groups']} groups ({dup['within_split']} inside a split, "
        f"{dup['across_splits']} across splits); policy {dup['policy']!r} removed {dup['removed']} ({removed})"
    )


def register(app: typer.Typer) -> None:
    app.command("ingest")(ingest_cmd)
    app.command("validate")(validate_cmd)
