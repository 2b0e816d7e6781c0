"""`synthgate keys generate` and `synthgate verify`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

console = Console(highlight=False, soft_wrap=True)  # paths and commands stay copy-pasteable
keys_app = typer.Typer(help="Manage the steward's ECDSA P-256 release keys (OpenSSF Model Signing).",
                       no_args_is_help=True)


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to create (release.key, release.pub).")],
    passphrase_env: Annotated[
        str | None, typer.Option(help="Name of an environment variable holding a passphrase for the private key.")
    ] = None,
) -> None:
    """Create a new ECDSA P-256 key pair. The private key is written with mode 0600 and never leaves this machine."""
    from flows.keys import fingerprint, generate_keys, load_public_key
    from synth.errors import InputError

    passphrase = None
    if passphrase_env:
        value = os.environ.get(passphrase_env)
        if not value:
            raise InputError(f"--passphrase-env {passphrase_env}: the variable is not set or empty")
        passphrase = value.encode()
    private, public = generate_keys(out, passphrase=passphrase)
    console.print(f"private key: {private} (keep it secret; mode 0600)")
    console.print(f"public key:  {public} (publish it beside your releases)")
    console.print(f"fingerprint: {fingerprint(load_public_key(public))}")


def verify_cmd(
    bundle: Annotated[Path, typer.Argument(help="A downloaded release bundle directory.")],
    key: Annotated[Path, typer.Option("--key", "-k", help="The steward's public key (release.pub).")],
    release_id: Annotated[str | None, typer.Option(
        help="The release you expect: refused unless the steward signed this id.")] = None,
) -> None:
    """Check a release bundle: signature, every file's hash, no missing or extra files. Exit 0 valid, 1 invalid.

    The OpenSSF Model Signing signature (release.sig) is checked twice: by synthgate's own strict reading, then by
    the reference verifier `model_signing` (the same check as `model_signing verify key`)."""
    from flows.keys import load_public_key
    from flows.model_signature import SIGNATURE, reference_verify
    from flows.signing import verify_bundle

    result = verify_bundle(bundle, load_public_key(key), release_id=release_id)
    version = reference_verify(bundle, key)
    p = result.predicate
    console.print(
        f"[green]valid[/]: {result.files} files, {result.bytes:,} bytes, signed by key {result.fingerprint[:16]}…"
    )
    console.print(f"OpenSSF Model Signing: {SIGNATURE} verified by model_signing {version}")
    summary = p.get("summary") if isinstance(p.get("summary"), str) else ""
    console.print(f"release {escape(result.release_id or '(no id signed)')}: {escape(summary)}".rstrip(": "))
    console.print(f"privacy: {_privacy_line(p.get('privacy'))}")


def _privacy_line(privacy: object) -> str:
    """ε/δ of a signed predicate, shown only when they are numbers (the predicate is data, not code)."""
    fields = privacy if isinstance(privacy, dict) else {}
    eps, delta = fields.get("epsilon"), fields.get("delta")
    if not isinstance(eps, int | float) or isinstance(eps, bool):
        return "not differentially private"
    shown_delta = f"{delta:g}" if isinstance(delta, int | float) and not isinstance(delta, bool) else "?"
    return f"ε = {eps:g}, δ = {shown_delta} ({escape(str(fields.get('accountant')))})"


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.command("verify")(verify_cmd)
