"""`synthgate releases list|show|diff`: what is in a releases directory, and what changed between two releases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from flows.release_info import ReleaseInfo

console = Console(highlight=False, soft_wrap=True)
releases_app = typer.Typer(help="List published releases, show one, compare two.", no_args_is_help=True)

KeyOpt = Annotated[Path | None, typer.Option(
    "--key", "-k", help="Public key (release.pub): verify each bundle first (exit 1 if one fails). Without it, "
                        "bundles are read unverified.")]
ReleasesOpt = Annotated[Path | None, typer.Option(
    "--releases", "-r", help="Releases directory, to name releases by id instead of by directory.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def _key(path: Path | None) -> Any:
    from flows.keys import load_public_key

    return load_public_key(path) if path is not None else None


def _read(release: str, releases: Path | None, key: Path | None) -> ReleaseInfo:
    from flows.release_info import locate, read_release

    return read_release(locate(release, releases), _key(key))


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value) if not isinstance(value, list | dict) else json.dumps(value)


def _eps(r: ReleaseInfo) -> str:
    if r.epsilon is None:
        return "no DP"
    return f"ε = {r.epsilon:.3g}" + (f", δ = {r.delta:.1e}" if r.delta is not None else "")


@releases_app.command("list")
def list_cmd(
    releases: Annotated[Path, typer.Argument(help="Releases directory (where `synthgate release` publishes).")],
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One line per release: id, created, approval, gate, privacy, images. Exit 1 if --key and one fails."""
    from flows.release_info import read_release, release_dirs
    from synth.errors import IntegrityError

    public = _key(key)
    rows, failed = [], []
    for root in release_dirs(releases):
        try:
            rows.append(read_release(root, public))
        except IntegrityError as e:
            failed.append((root.name, str(e)))
    if as_json:
        print(json.dumps({"releases": [r.to_json() for r in rows],
                          "failed_verification": [{"release": n, "reason": why} for n, why in failed]}, indent=2))
    else:
        table = Table(title=f"{len(rows)} release(s) in {escape(str(releases))}")
        table.add_column("release", no_wrap=True)  # ids are copied into `show`/`diff`: never wrapped
        for name in ("created", "approval", "gate", "privacy", "images", "verified"):
            table.add_column(name)
        for r in rows:
            verified = r.verified_by[:16] + "…" if r.verified_by else "not checked"
            table.add_row(escape(r.release_id), r.created or "?", escape(r.approval), r.gate or "?", _eps(r),
                          str(sum(r.class_counts.values())), verified)
        for name, why in failed:
            table.add_row(escape(name), "", "", "", "", "", f"[red]FAILED[/]: {escape(why)}")
        console.print(table)
    if failed:
        raise typer.Exit(1)


@releases_app.command("show")
def show_cmd(
    release: Annotated[str, typer.Argument(help="A release directory, or a release id with --releases.")],
    releases: ReleasesOpt = None,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A release's approval, gate, privacy, images per class, key audit numbers and policy."""
    r = _read(release, releases, key)
    if as_json:
        print(json.dumps(r.to_json(), indent=2))
        return
    console.print(f"[bold]{escape(r.release_id)}[/] ({escape(r.root)})")
    console.print(f"created {r.created or '?'}; approval: {escape(r.approval)}; gate: {r.gate or '?'}; {_eps(r)}"
                  + (f" ({escape(r.accountant)})" if r.accountant else ""))
    console.print("signature: " + (f"verified (key {r.verified_by[:16]}…)" if r.verified_by else
                                   "not checked (give --key release.pub)"))
    console.print("images: " + ", ".join(f"{escape(c)} {n}" for c, n in r.class_counts.items()))
    table = Table("key number", "value", "status", title="public audit summary")
    for n in r.key_numbers.values():
        table.add_row(escape(n.label), escape(n.display), n.status)
    console.print(table)
    table = Table("policy rule", "threshold", title="policy")
    for rule, value in sorted(r.policy.items()):
        if value is not None:
            table.add_row(escape(rule), escape(_fmt(value)))
    console.print(table)


@releases_app.command("diff")
def diff_cmd(
    a: Annotated[str, typer.Argument(help="The first release (directory, or id with --releases).")],
    b: Annotated[str, typer.Argument(help="The second release.")],
    releases: ReleasesOpt = None,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare two releases: key audit numbers side by side, then what differs in privacy (ε, δ), images per
    class, approval, gate, policy and config."""
    from flows.release_info import diff

    d = diff(_read(a, releases, key), _read(b, releases, key))
    if as_json:
        print(json.dumps(d, indent=2))
        return
    table = Table("key number", escape(d["a"]), escape(d["b"]), "change", title="public audit summary")
    for n in d["key_numbers"].values():
        change = f"{n['change']:+.4g}" if n["change"] is not None else ""
        table.add_row(escape(n["label"]), escape(_fmt(n["a"])), escape(_fmt(n["b"])), change)
    console.print(table)
    table = Table("what", escape(d["a"]), escape(d["b"]), title="what differs")
    for name, (va, vb) in d["privacy"].items():
        table.add_row(name, _fmt(va), _fmt(vb))
    for cls, (na, nb) in d["counts"].items():
        if na != nb:
            table.add_row(f"images: {escape(cls)}", str(na), str(nb))
    for section in ("approval", "gate"):
        if d[section]:
            table.add_row(section, *(escape(_fmt(v)) for v in d[section]))
    for section in ("policy", "config"):
        for name, (va, vb) in d[section].items():
            table.add_row(f"{section}.{escape(name)}", escape(_fmt(va)), escape(_fmt(vb)))
    if table.row_count:
        console.print(table)
    else:
        console.print("no differences in privacy, images, approval, gate, policy or config")


def register(app: typer.Typer) -> None:
    app.add_typer(releases_app, name="releases")
