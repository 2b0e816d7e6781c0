"""`synthgate audit …`: audits of a synthetic dataset. `audit privacy` lives here; `audit utility` joins the same
`audit_app` sub-app (add its command function beside `privacy_cmd` and register it in `register`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console(highlight=False, soft_wrap=True)  # paths and commands stay copy-pasteable

audit_app = typer.Typer(
    name="audit",
    help="Audit a synthetic dataset against the real one (privacy; utility).",
    no_args_is_help=True,
    add_completion=False,
)


def privacy_cmd(
    real: Annotated[Path, typer.Option("--real", help="The real canonical dataset (train = members, val+test = "
                                                      "holdout).")],
    synthetic: Annotated[Path, typer.Option("--synthetic", help="The synthetic canonical dataset to audit.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to create for the privacy audit.")],
    model: Annotated[Path | None, typer.Option("--model", help="The model directory (its privacy_ledger.json is "
                                                               "checked).")] = None,
    quantile: Annotated[float, typer.Option(help="False-flag rate on unseen real images that calibrates the "
                                                 "thresholds.")] = 0.01,
    filter_out: Annotated[Path | None, typer.Option("--filter", help="Also write the synthetic dataset without "
                                                                     "flagged images (and k-anonymous) here.")]
    = None,
    encoder_steps: Annotated[int | None, typer.Option(help="Training steps of the copy-detection encoder.")] = None,
    encoder: Annotated[Path | None, typer.Option("--encoder", help="Reuse a saved encoder (e.g. AUDIT/encoder) "
                                                                   "trained on this real training split.")] = None,
    max_flagged_fraction: Annotated[float | None, typer.Option(help="Exit 1 when more than this share of synthetic "
                                                                    "images is flagged.")] = None,
    k: Annotated[int, typer.Option("--k", help="Minimum synthetic records per combination of released "
                                                "attributes.")] = 5,
    index: Annotated[str, typer.Option(help="auto (exact up to 250k training images, IVF beyond) | exact | ivf | hnsw")]
    = "auto",
    membership: Annotated[bool, typer.Option(help="Run membership inference on --model (loss and PIA attacks).")]
    = True,
    membership_n: Annotated[int, typer.Option(help="Members (and as many non-members) the attacks use.")] = 256,
    threads: Annotated[int | None, typer.Option(min=1, help="torch and faiss threads (default: theirs); on shared "
                                                            "cores 1 can be faster")] = None,
) -> int:
    """Memorization (nearest training image of every synthetic image), disclosure (k-anonymity), the DP ledger check
    and, with --model, membership inference; exit 1 when a blocking finding fails, 2 on bad input."""
    from privacy.audit import audit_privacy, read_privacy_audit
    from privacy.audit_config import PrivacyAuditConfig
    from privacy.embeddings import EncoderConfig
    from privacy.membership_config import MembershipConfig
    from privacy.memorization_config import MemorizationConfig
    from privacy.search import SearchConfig

    if threads is not None:
        import faiss
        import torch

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    enc_cfg = EncoderConfig() if encoder_steps is None else EncoderConfig(steps=encoder_steps)
    config = PrivacyAuditConfig(
        memorization=MemorizationConfig(quantile=quantile, search=SearchConfig(index=index)),
        encoder=enc_cfg,
        encoder_dir=encoder,
        disclosure_k=k,
        max_flagged_fraction=max_flagged_fraction,
        membership=MembershipConfig(n=membership_n) if membership else None,
    )
    from flows.cli_progress import cli_progress

    # The spinner's text follows the progress lines on a terminal; elsewhere the lines go to stderr.
    with console.status("auditing privacy (training the copy-detection encoder)" if encoder is None
                        else "auditing privacy") as status, cli_progress(status=status):
        path = audit_privacy(real, synthetic, out, model_dir=model, config=config, filter_out=filter_out)
    header = read_privacy_audit(path)
    print_privacy(header)
    verdict = "[green]passed[/]" if header["passed"] else "[red]BLOCKED[/]"
    console.print(f"privacy audit {verdict}; wrote {path}")
    if header.get("filtered"):
        f = header["filtered"]
        if f.get("written"):
            console.print(f"filtered synthetic dataset: {f['path']} ({f['images']} images); audit it again")
        else:
            console.print(f"filtered synthetic dataset not written: {f['reason']}")
    return 0 if header["passed"] else 1


def print_privacy(header: dict) -> None:
    """The memorization summary per space, then the findings."""
    mem = header["memorization"]
    table = Table(title=f"Memorization ({mem['synthetic_images']} synthetic images, null of {mem['null']['size']} "
                        f"holdout images, quantile {mem['quantile']})", title_justify="left")
    for col in ("space", "threshold", "flagged", "DCR q01", "DCR q50", "closer-to-train share"):
        table.add_column(col, justify="left" if col == "space" else "right")
    for space in mem["spaces"]:
        s = mem["per_space"][space]
        closer = s.get("closer_to_train")
        table.add_row(space, f"{s['threshold']:.4f}", f"{s['flagged']} ({s['flagged_fraction']:.2%})",
                      f"{s['dcr_synthetic'].get('q01', float('nan')):.4f}",
                      f"{s['dcr_synthetic'].get('q50', float('nan')):.4f}",
                      "–" if not closer else f"{closer['share']:.3f}")
    table.add_row("any", "", f"{mem['flagged']} ({mem['flagged_fraction']:.2%})", "", "", "")
    console.print(table)
    colours = {"block": "red", "warn": "yellow", "info": "cyan"}
    for f in header["findings"]:
        console.print(f"[{colours.get(f['severity'], 'white')}]{f['severity']}[/] {f['rule']}: {f['message']}")


def register(app: typer.Typer) -> None:
    audit_app.command("privacy")(privacy_cmd)
    app.add_typer(audit_app, name="audit")
