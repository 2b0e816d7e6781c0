"""Manifest, provenance and Ed25519 signature of a release bundle, and their verification.

    manifest.json    sha256 and size of every other file in the bundle
    provenance.json  an in-toto Statement v1: subjects = the files, predicate = what produced them
    signature        Ed25519 over the sha256 of manifest.json and provenance.json

Verification needs only the bundle and the steward's public key: signature, every hash, no missing or extra files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
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
_SIGNATURE_KEYS = {"algorithm", "public_key_fingerprint", "signed", "signature"}
_HEX = set("0123456789abcdef")
# The signature file is read before anything is authenticated: a few hundred bytes when genuine.
MAX_SIGNATURE_BYTES = 4096
# manifest.json and provenance.json are hashed from memory (read once, so what is parsed is what was checked).
MAX_METADATA_BYTES = 256 * 1024 * 1024


def bundle_files(root: Path) -> list[str]:
    """Relative POSIX paths of every regular file under `root`, except the signing files.

    Refuses what a manifest of files cannot describe: symbolic links, special files (FIFOs, devices, sockets) and
    empty directories."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        if not dirnames and not filenames and Path(dirpath) != Path(root):
            raise IntegrityError(where(dirpath, "is an empty directory, which the manifest cannot cover"))
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                raise IntegrityError(where(path, "bundles may not contain symbolic links"))
        for name in filenames:
            path = Path(dirpath) / name
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise IntegrityError(where(path, "is not a regular file"))
            rel = path.relative_to(root).as_posix()
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


def _safe_relpath(root: Path, rel: Any) -> str:
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise IntegrityError(where(root / MANIFEST, f"bad path entry {_short(rel)}"))
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or rel in SIGNING_FILES:
        raise IntegrityError(where(root / MANIFEST, f"path {_short(rel)} escapes the bundle or names a signing file"))
    return rel


def _short(value: Any) -> str:
    """repr of an untrusted value, cut so a message stays one readable line."""
    if not isinstance(value, str | float | bool | type(None)):
        return f"<{type(value).__name__}>"  # nested containers or huge ints could not even be repr'd safely
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class VerifiedBundle:
    """What a successful verification established, parsed from the very bytes that were checked."""

    root: Path
    fingerprint: str
    files: int
    bytes: int
    predicate: dict[str, Any]
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)
    # (size, sha256) of manifest.json, provenance.json and signature as verified: what a server may send later.
    signing_files: dict[str, tuple[int, str]] = field(repr=False, default_factory=dict)

    @property
    def release_id(self) -> str | None:
        """The release id the steward signed (inside the provenance), or None when the predicate has none."""
        value = self.predicate.get("release_id")
        return value if isinstance(value, str) else None


def _read_limited(root: Path, name: str, limit: int) -> bytes:
    path = root / name
    if path.is_symlink() or not path.is_file():
        raise IntegrityError(where(root, f"missing {name}"))
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise IntegrityError(where(path, f"is larger than {limit:,} bytes"))
    return data


def _parse_json(path: Path, data: bytes) -> Any:
    # Untrusted bytes: deep nesting raises RecursionError, a huge integer literal ValueError; both are malformed.
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise IntegrityError(where(path, "is not valid JSON")) from None


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _check_signature_file(root: Path, data: bytes) -> dict[str, Any]:
    """The signature file's fields, refused unless it has exactly the expected shape and canonical bytes."""
    path = root / SIGNATURE
    sig = _parse_json(path, data)
    if not isinstance(sig, dict) or set(sig) != _SIGNATURE_KEYS:
        raise IntegrityError(where(path, f"is malformed (expected exactly the keys {sorted(_SIGNATURE_KEYS)})"))
    signed = sig["signed"]
    if not isinstance(signed, dict) or set(signed) != {MANIFEST, PROVENANCE} or not all(
            _is_sha256(v) for v in signed.values()):
        raise IntegrityError(where(path, "is malformed ('signed' must map manifest.json and provenance.json to "
                                         "sha256 digests)"))
    if sig["algorithm"] != "ed25519":
        raise IntegrityError(where(path, f"unsupported algorithm {_short(sig['algorithm'])}"))
    if not isinstance(sig["signature"], str) or not isinstance(sig["public_key_fingerprint"], str):
        raise IntegrityError(where(path, "is malformed (signature and fingerprint must be strings)"))
    # Not signed itself: every byte must be the canonical encoding of the checked fields, so no byte of the
    # bundle can change unnoticed (the fingerprint field is bound to the verifying key below).
    if data != _canonical(sig):
        raise IntegrityError(where(path, "is not in canonical form"))
    return sig


def _canonical(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _check_signature(root: Path, sig: dict[str, Any], public_key: Ed25519PublicKey) -> str:
    path = root / SIGNATURE
    try:
        signature = base64.b64decode(sig["signature"], validate=True)
    except ValueError:
        raise IntegrityError(where(path, "is malformed (signature is not base64)")) from None
    fp = fingerprint(public_key)
    try:
        public_key.verify(signature, _payload(sig["signed"]))
    except InvalidSignature:
        problem = f"signature is not valid for the given key (fingerprint {fp[:16]}…)"
        raise IntegrityError(where(path, problem)) from None
    if sig["public_key_fingerprint"] != fp:
        raise IntegrityError(where(path, "public_key_fingerprint does not name the key the signature verifies under"))
    return fp


def _signed_json(root: Path, name: str, digest: str) -> tuple[Any, int]:
    """Read `name` once, check its bytes against the signed digest, and parse those same bytes (and their size)."""
    data = _read_limited(root, name, MAX_METADATA_BYTES)
    if hashlib.sha256(data).hexdigest() != digest:
        raise IntegrityError(where(root / name, "was changed after signing"))
    return _parse_json(root / name, data), len(data)


def _manifest_entries(root: Path, manifest: Any) -> dict[str, dict[str, Any]]:
    entries = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(entries, list):
        raise IntegrityError(where(root / MANIFEST, "has no file list"))
    listed: dict[str, dict[str, Any]] = {}
    for entry in entries:
        rel = _safe_relpath(root, entry.get("path") if isinstance(entry, dict) else None)
        size = entry.get("size")
        if not _is_sha256(entry.get("sha256")) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise IntegrityError(where(root / MANIFEST, f"entry {_short(rel)} has no valid sha256 and size"))
        if rel in listed:
            raise IntegrityError(where(root / MANIFEST, f"lists {_short(rel)} twice"))
        listed[rel] = entry
    return listed


def _check_files(root: Path, listed: dict[str, dict[str, Any]]) -> int:
    present = set(bundle_files(root))
    missing = sorted(set(listed) - present)
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise IntegrityError(where(root, f"missing file {missing[0]!r}{more}"))
    extra = sorted(present - set(listed))
    if extra:
        raise IntegrityError(where(root, f"unexpected file {extra[0]!r} not in the manifest"))
    total = 0
    for rel, entry in listed.items():
        path = root / rel
        size = path.stat().st_size
        if size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise IntegrityError(where(path, "does not match its manifest hash"))
        total += size
    return total


def _check_provenance(root: Path, provenance: Any, listed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    path = root / PROVENANCE
    if not isinstance(provenance, dict) or provenance.get("_type") != STATEMENT_TYPE:
        raise IntegrityError(where(path, "is not an in-toto Statement v1"))
    subjects = provenance.get("subject")
    expected = [{"name": rel, "digest": {"sha256": e["sha256"]}} for rel, e in sorted(listed.items())]
    if not isinstance(subjects, list) or not all(isinstance(s, dict) for s in subjects) or sorted(
            subjects, key=lambda s: str(s.get("name", ""))) != expected:
        raise IntegrityError(where(path, "subjects do not match the manifest"))
    predicate = provenance.get("predicate", {})
    if not isinstance(predicate, dict):
        raise IntegrityError(where(path, "predicate is not an object"))
    return predicate


def verify_bundle(root: Path, public_key: Ed25519PublicKey, *, release_id: str | None = None) -> VerifiedBundle:
    """Check signature, manifest, provenance, and every file; raise IntegrityError with the first reason.

    With `release_id`, the release id signed inside the provenance must equal it (the id a URL asked for or a
    folder is named): a genuine but different release of the same steward is refused. Every file the bundle
    holds is untrusted until checked; any malformation is an IntegrityError, never another exception."""
    root = Path(root)
    if not root.is_dir():
        raise IntegrityError(where(root, "is not a directory"))
    sig_bytes = _read_limited(root, SIGNATURE, MAX_SIGNATURE_BYTES)
    sig = _check_signature_file(root, sig_bytes)
    fp = _check_signature(root, sig, public_key)
    manifest, manifest_size = _signed_json(root, MANIFEST, sig["signed"][MANIFEST])
    provenance, provenance_size = _signed_json(root, PROVENANCE, sig["signed"][PROVENANCE])
    listed = _manifest_entries(root, manifest)
    total = _check_files(root, listed)
    predicate = _check_provenance(root, provenance, listed)
    signing_files = {MANIFEST: (manifest_size, sig["signed"][MANIFEST]),
                     PROVENANCE: (provenance_size, sig["signed"][PROVENANCE]),
                     SIGNATURE: (len(sig_bytes), hashlib.sha256(sig_bytes).hexdigest())}
    result = VerifiedBundle(root=root, fingerprint=fp, files=len(listed), bytes=total, predicate=predicate,
                            manifest=manifest, signing_files=signing_files)
    if release_id is not None and result.release_id != release_id:
        raise IntegrityError(where(root, f"is signed as release {_short(result.release_id)}, not {release_id!r}"))
    return result
