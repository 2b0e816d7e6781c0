"""`synthgate serve` (the researcher catalog), `synthgate tokens`, `synthgate downloads` and `synthgate fetch`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from flows.catalog.store import Store

console = Console(highlight=False, soft_wrap=True)
tokens_app = typer.Typer(help="Access tokens for the researcher catalog (stored hashed; shown once).",
                         no_args_is_help=True)

ReleasesOpt = Annotated[Path | None, typer.Option("--releases", "-r", help="Releases directory (database "
                                                  "<releases>/.catalog.sqlite).")]
DbOpt = Annotated[Path | None, typer.Option("--db", help="Catalog database file, instead of the one in --releases.")]


def _store(releases: Path | None, db: Path | None) -> Store:
    from flows.catalog.store import DB_NAME, Store
    from synth.errors import InputError

    if db is None:
        if releases is None:
            raise InputError("give --releases DIR (or --db FILE) to locate the catalog database")
        if not releases.is_dir():
            raise InputError(f"{releases}: releases directory does not exist")
        db = releases / DB_NAME
    return Store(db)


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Option("--name", "-n", help="Who the token is for (unique).")],
    expires: Annotated[str, typer.Option("--expires", "-e", help="30d, 12h, 2w, or a date (2027-01-31, UTC).")],
    releases: ReleasesOpt = None,
    db: DbOpt = None,
) -> None:
    """Create a token and print it once: only its hash is stored, so it cannot be shown again."""
    from flows.catalog.store import parse_expiry

    token, secret = _store(releases, db).create_token(name, parse_expiry(expires))
    console.print(f"token {token.id} for {escape(token.name)}, expires {token.expires}")
    console.print("give it to the researcher now; it cannot be shown again:")
    print(secret)


@tokens_app.command("list")
def tokens_list(releases: ReleasesOpt = None, db: DbOpt = None) -> None:
    """List tokens (id, name, created, expires, state); never the secrets."""
    table = Table("id", "name", "created", "expires", "state")
    for t in _store(releases, db).list_tokens():
        table.add_row(str(t.id), escape(t.name), t.created, t.expires, t.state())
    console.print(table)


@tokens_app.command("revoke")
def tokens_revoke(
    token: Annotated[str, typer.Argument(help="Token name or id.")],
    releases: ReleasesOpt = None,
    db: DbOpt = None,
) -> None:
    """Revoke a token: later requests with it are refused (401) and logged."""
    t = _store(releases, db).revoke_token(token)
    console.print(f"token {t.id} ({escape(t.name)}) revoked at {t.revoked}")


def downloads_cmd(
    releases: ReleasesOpt = None,
    db: DbOpt = None,
    refusals: Annotated[bool, typer.Option("--refusals", help="Also list refused requests.")] = False,
    acceptances: Annotated[bool, typer.Option("--acceptances", help="Also list terms acceptances.")] = False,
) -> None:
    """Print the download log (token, release, time, bytes, complete), optionally refusals and acceptances."""
    store = _store(releases, db)
    table = Table("started", "finished", "token", "release", "bytes", "complete", title="downloads")
    for d in store.downloads():
        table.add_row(d["started"], d["finished"], f"{d['token_id']} {escape(d['token_name'])}",
                      escape(d["release_id"]), f"{d['bytes']:,}", "yes" if d["complete"] else "NO")
    console.print(table)
    if acceptances:
        table = Table("time", "token", "release", "terms sha256", title="terms acceptances")
        for a in store.acceptances():
            table.add_row(a["time"], f"{a['token_id']} {escape(a['name'])}", escape(a["release_id"]),
                          a["terms_sha256"][:16])
        console.print(table)
    if refusals:
        table = Table("time", "status", "reason", "token", "path", "client", title="refused requests")
        for r in store.refusals():
            table.add_row(r["time"], str(r["status"]), escape(r["reason"]), str(r["token_id"] or ""),
                          escape(r["path"]), escape(r["client"] or ""))
        console.print(table)


def serve_cmd(
    releases: Annotated[Path, typer.Option("--releases", "-r", help="Releases directory (published bundles).")],
    key: Annotated[list[Path], typer.Option("--key", "-k", help="Public key(s) bundles must verify under.")],
    host: Annotated[str, typer.Option(help="Interface to listen on (loopback by default; put TLS in front).")] = (
        "127.0.0.1"),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    db: DbOpt = None,
    forwarded_allow_ips: Annotated[str | None, typer.Option(
        "--forwarded-allow-ips", help="Comma-separated addresses of the reverse proxies in front (TLS): only "
        "their X-Forwarded-For is believed. Default: none; the client address is the connection's peer.")] = None,
) -> None:
    """Serve the researcher catalog: release pages and API, token-gated downloads."""
    import uvicorn

    from flows.catalog.app import create_app
    from flows.catalog.server import server_config
    from flows.keys import fingerprint, load_public_key
    from synth.errors import InputError

    if not releases.is_dir():
        raise InputError(f"{releases}: releases directory does not exist")
    keys = [load_public_key(k) for k in key]
    app = create_app(releases, keys, db_path=db)
    intact = app.state.catalog.all()
    console.print(f"{len(intact)} intact release(s) in {releases}; keys {', '.join(fingerprint(k)[:16] for k in keys)}")
    uvicorn.Server(server_config(app, host=host, port=port, forwarded_allow_ips=forwarded_allow_ips,
                                 log_level="info")).run()


def fetch_cmd(
    url: Annotated[str, typer.Argument(help="Release URL: http(s)://HOST/releases/RELEASE_ID.")],
    token: Annotated[str, typer.Option("--token", "-t", envvar="SYNTHGATE_TOKEN",
                                       help="Access token (or SYNTHGATE_TOKEN).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to create for the bundle.")],
    key: Annotated[Path, typer.Option("--key", "-k", help="The publisher's public key (release.pub).")],
    accept_terms: Annotated[bool, typer.Option("--accept-terms", help="Accept the release's terms (read them on "
                                               "its page first) before downloading.")] = False,
    max_gb: Annotated[float, typer.Option("--max-gb", help="Refuse archives larger than this (GB), downloaded or "
                                          "unpacked.")] = 50.0,
) -> None:
    """Download a release, unpack it safely and verify it with the publisher's key. Exit 1 if it does not verify."""
    import math
    from urllib.parse import urlsplit

    from flows.catalog.fetch import fetch, loading_hint
    from flows.keys import load_public_key
    from synth.errors import InputError

    if not (math.isfinite(max_gb) and max_gb > 0):
        raise InputError(f"--max-gb must be a positive number, got {max_gb!r}")

    parts = urlsplit(url)
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        Console(stderr=True, highlight=False).print(
            "warning: plain http to a remote host: the token travels unencrypted (use https)")
    result = fetch(url, token, out, load_public_key(key), accept_terms=accept_terms, max_bytes=int(max_gb * 1e9))
    console.print(f"[green]valid[/]: {result.files} files, {result.bytes:,} bytes in {escape(str(out))}, "
                  f"signed by key {result.fingerprint[:16]}…")
    console.print(escape(loading_hint(out)))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
    app.add_typer(tokens_app, name="tokens")
    app.command("downloads")(downloads_cmd)
    app.command("fetch")(fetch_cmd)
