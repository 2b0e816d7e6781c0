"""Manifest, provenance and Ed25519 signature of a release bundle, and their verification.

    manifest.json    sha256 and size of every other file in the bundle
    provenance.json  an in-toto Statement v1: subjects = the files, predicate = what produced them
    signature        Ed25519 over the sha256 of manifest.json and provenance.json

Verification needs only the bundle and the steward's public key: signature, every hash, no missing or extra files.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from flows.keys import fingerprint
from synth.artifacts import sha256_file, write_json
from synth.errors import IntegrityError, where

MANIFEST = "manifest.json"
PROVENANCE = "provenance.json"
SIGNATURE = "signature"
SIGNING_FILES = (MANIFEST, PROVENANCE, SIGNATURE)
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://github.com/synthgate/synthgate/release/v1"
# Domain separation: a synthgate release signature can never be replayed as a signature over something else.
_DOMAIN = b"synthgate-release-signature-v1\n"


def bundle_files(root: Path) -> list[str]:
    """Relative POSIX paths of every regular file under `root`, except the signing files; refuses symlinks."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                raise IntegrityError(where(path, "bundles may not contain symbolic links"))
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel not in SIGNING_FILES:
                files.append(rel)
    return sorted(files)


def build_manifest(root: Path) -> dict[str, Any]:
    """sha256 and size of every file in the bundle (sorted by path)."""
    return {
        "schema_version": 1,
        "files": [
            {"path": rel, "sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}
            for rel in bundle_files(root)
        ],
    }


def build_provenance(manifest: Mapping[str, Any], predicate: Mapping[str, Any]) -> dict[str, Any]:
    """An in-toto Statement v1 over the manifest's files."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": f["path"], "digest": {"sha256": f["sha256"]}} for f in manifest["files"]],
        "predicateType": PREDICATE_TYPE,
        "predicate": dict(predicate),
    }


def _payload(signed: Mapping[str, str]) -> bytes:
    return _DOMAIN + json.dumps(dict(signed), sort_keys=True, separators=(",", ":")).encode()


def sign_bundle(root: Path, private_key: Ed25519PrivateKey, *, predicate: Mapping[str, Any]) -> str:
    """Write manifest.json, provenance.json and signature into `root`; return the key's fingerprint."""
    root = Path(root)
    manifest = build_manifest(root)
    write_json(root / MANIFEST, manifest)
    write_json(root / PROVENANCE, build_provenance(manifest, predicate))
    signed = {MANIFEST: sha256_file(root / MANIFEST), PROVENANCE: sha256_file(root / PROVENANCE)}
    fp = fingerprint(private_key.public_key())
    write_json(
        root / SIGNATURE,
        {
            "algorithm": "ed25519",
            "public_key_fingerprint": fp,
            "signed": signed,
            "signature": base64.b64encode(private_key.sign(_payload(signed))).decode(),
        },
    )
    return fp


@dataclass(frozen=True)
class VerifiedBundle:
    """What a successful verification established."""

    root: Path
    fingerprint: str
    files: int
    bytes: int
    predicate: dict[str, Any]


def _load_json(root: Path, name: str) -> Any:
    path = root / name
    if not path.is_file():
        raise IntegrityError(where(root, f"missing {name}"))
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise IntegrityError(where(path, "is not valid JSON")) from None


def _safe_relpath(root: Path, rel: Any) -> str:
    if not isinstance(rel, str) or not rel or "\\" in rel:
        raise IntegrityError(where(root / MANIFEST, f"bad path entry {rel!r}"))
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or rel in SIGNING_FILES:
        raise IntegrityError(where(root / MANIFEST, f"path {rel!r} escapes the bundle or names a signing file"))
    return rel


def verify_bundle(root: Path, public_key: Ed25519PublicKey) -> VerifiedBundle:
    """Check signature, manifest, provenance, and every file; raise IntegrityError with the first reason."""
    root = Path(root)
    if not root.is_dir():
        raise IntegrityError(where(root, "is not a directory"))
    sig = _load_json(root, SIGNATURE)
    try:
        signed = dict(sig["signed"])
        signature = base64.b64decode(sig["signature"], validate=True)
        algorithm = sig["algorithm"]
    except (KeyError, TypeError, ValueError):
        raise IntegrityError(where(root / SIGNATURE, "is malformed")) from None
    if algorithm != "ed25519":
        raise IntegrityError(where(root / SIGNATURE, f"unsupported algorithm {algorithm!r}"))
    fp = fingerprint(public_key)
    try:
        public_key.verify(signature, _payload(signed))
    except InvalidSignature:
        raise IntegrityError(
            where(root / SIGNATURE, f"signature is not valid for the given key (fingerprint {fp[:16]}…)")
        ) from None
    for name in (MANIFEST, PROVENANCE):
        if not (root / name).is_file():
            raise IntegrityError(where(root, f"missing {name}"))
        if sha256_file(root / name) != signed.get(name):
            raise IntegrityError(where(root / name, "was changed after signing"))

    manifest = _load_json(root, MANIFEST)
    entries = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(entries, list):
        raise IntegrityError(where(root / MANIFEST, "has no file list"))
    listed: dict[str, dict[str, Any]] = {}
    for entry in entries:
        rel = _safe_relpath(root, entry.get("path") if isinstance(entry, dict) else None)
        if rel in listed:
            raise IntegrityError(where(root / MANIFEST, f"lists {rel!r} twice"))
        listed[rel] = entry
    present = set(bundle_files(root))
    missing = sorted(set(listed) - present)
    if missing:
        raise IntegrityError(where(root, f"missing file {missing[0]!r}" + (f" (+{len(missing) - 1} more)"
                                                                            if len(missing) > 1 else "")))
    extra = sorted(present - set(listed))
    if extra:
        raise IntegrityError(where(root, f"unexpected file {extra[0]!r} not in the manifest"))
    total = 0
    for rel, entry in listed.items():
        path = root / rel
        size = path.stat().st_size
        if size != entry.get("size") or sha256_file(path) != entry.get("sha256"):
            raise IntegrityError(where(path, "does not match its manifest hash"))
        total += size

    provenance = _load_json(root, PROVENANCE)
    subjects = provenance.get("subject") if isinstance(provenance, dict) else None
    expected = [{"name": rel, "digest": {"sha256": e["sha256"]}} for rel, e in sorted(listed.items())]
    if provenance.get("_type") != STATEMENT_TYPE or sorted(subjects or [], key=lambda s: s.get("name", "")) != expected:
        raise IntegrityError(where(root / PROVENANCE, "subjects do not match the manifest"))
    return VerifiedBundle(root=root, fingerprint=fp, files=len(listed), bytes=total,
                          predicate=dict(provenance.get("predicate") or {}))

