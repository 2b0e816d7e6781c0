"""Manifest, provenance and standard signature of a release bundle, and their verification.

    manifest.json    bundle format version, sha256 and size of every other file in the bundle
    provenance.json  an in-toto Statement v1: subjects = the files, predicate = what produced them
    release.sig      OpenSSF Model Signing v1.0 (`flows.model_signature`): the steward's ECDSA signature over the
                     sha256 of every file above, manifest.json and provenance.json included

Verification needs only the bundle and the steward's public key: signature, every hash, no missing or extra files,
and manifest, provenance and signature agreeing file for file. Bundle format 1 (synthgate 0.1: an Ed25519
`signature` file over two hashes) is refused with one line, never verified against the old rules.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from flows.keys import PublicKey, fingerprint, load_private_key
from flows.model_signature import SIGNATURE, is_sha256, short_repr, sign_directory, signed_digests
from synth.artifacts import sha256_file, write_json
from synth.errors import IntegrityError, where

MANIFEST = "manifest.json"
PROVENANCE = "provenance.json"
SIGNING_FILES = (MANIFEST, PROVENANCE, SIGNATURE)
# 2: release.sig (OpenSSF Model Signing, ECDSA) replaced format 1's Ed25519 `signature` file.
BUNDLE_FORMAT = 2
OLD_SIGNATURE = "signature"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://github.com/synthgate/synthgate/release/v1"
# release.sig is read before anything is authenticated; it lists every file (~150 bytes each), so this allows
# bundles of hundreds of thousands of images while bounding what an attacker can make us parse.
MAX_SIGNATURE_BYTES = 64 * 1024 * 1024
# manifest.json and provenance.json are hashed from memory (read once, so what is parsed is what was checked).
MAX_METADATA_BYTES = 256 * 1024 * 1024
_short = short_repr


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
    """Bundle format and sha256 and size of every file in the bundle (sorted by path)."""
    return {
        "schema_version": BUNDLE_FORMAT,
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


def sign_bundle(root: Path, private_key_path: Path, *, predicate: Mapping[str, Any],
                passphrase: bytes | None = None) -> str:
    """Write manifest.json, provenance.json and release.sig into `root`; return the key's fingerprint.

    The key is named by path (model_signing loads it); it is loaded here first so a wrong file, passphrase or an
    old Ed25519 key is one InputError line before anything is written."""
    root = Path(root)
    key = load_private_key(private_key_path, passphrase=passphrase)
    manifest = build_manifest(root)
    write_json(root / MANIFEST, manifest)
    write_json(root / PROVENANCE, build_provenance(manifest, predicate))
    sign_directory(root, Path(private_key_path), passphrase=passphrase)
    return fingerprint(key.public_key())


def _safe_relpath(root: Path, rel: Any) -> str:
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise IntegrityError(where(root / MANIFEST, f"bad path entry {_short(rel)}"))
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or rel in SIGNING_FILES:
        raise IntegrityError(where(root / MANIFEST, f"path {_short(rel)} escapes the bundle or names a signing file"))
    return rel


@dataclass(frozen=True)
class VerifiedBundle:
    """What a successful verification established, parsed from the very bytes that were checked."""

    root: Path
    fingerprint: str
    files: int
    bytes: int
    predicate: dict[str, Any]
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)
    # (size, sha256) of manifest.json, provenance.json and release.sig as verified: what a server may send later.
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


def _signed_json(root: Path, name: str, digest: str) -> tuple[Any, int]:
    """Read `name` once, check its bytes against the signed digest, and parse those same bytes (and their size)."""
    data = _read_limited(root, name, MAX_METADATA_BYTES)
    if hashlib.sha256(data).hexdigest() != digest:
        raise IntegrityError(where(root / name, "was changed after signing"))
    return _parse_json(root / name, data), len(data)


def _check_old_format(root: Path) -> None:
    if not (root / SIGNATURE).exists() and (root / OLD_SIGNATURE).is_file():
        raise IntegrityError(where(root, "is signed in bundle format 1 (synthgate 0.1, an Ed25519 'signature' file), "
                                         "which this version does not verify: ask the publisher to re-sign it "
                                         f"(format {BUNDLE_FORMAT}, OpenSSF Model Signing release.sig)"))


def _manifest_entries(root: Path, manifest: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(manifest, dict) or manifest.get("schema_version") != BUNDLE_FORMAT:
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise IntegrityError(where(root / MANIFEST, f"bundle format {_short(version)} is not {BUNDLE_FORMAT}"))
    entries = manifest.get("files")
    if not isinstance(entries, list):
        raise IntegrityError(where(root / MANIFEST, "has no file list"))
    listed: dict[str, dict[str, Any]] = {}
    for entry in entries:
        rel = _safe_relpath(root, entry.get("path") if isinstance(entry, dict) else None)
        size = entry.get("size")
        if not is_sha256(entry.get("sha256")) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise IntegrityError(where(root / MANIFEST, f"entry {_short(rel)} has no valid sha256 and size"))
        if rel in listed:
            raise IntegrityError(where(root / MANIFEST, f"lists {_short(rel)} twice"))
        listed[rel] = entry
    return listed


def _check_signed_matches_manifest(root: Path, signed: dict[str, str], listed: dict[str, dict[str, Any]]) -> None:
    """release.sig must sign exactly the manifest's files (same digests) plus manifest.json and provenance.json."""
    expected = {rel: e["sha256"] for rel, e in listed.items()}
    actual = {rel: d for rel, d in signed.items() if rel not in (MANIFEST, PROVENANCE)}
    if actual != expected:
        differ = sorted(set(actual) ^ set(expected)) or sorted(r for r in actual if actual[r] != expected[r])
        raise IntegrityError(where(root / SIGNATURE, f"signs other files than the manifest lists (first: "
                                                     f"{_short(differ[0])})"))


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


def verify_bundle(root: Path, public_key: PublicKey, *, release_id: str | None = None) -> VerifiedBundle:
    """Check signature, manifest, provenance, and every file; raise IntegrityError with the first reason.

    With `release_id`, the release id signed inside the provenance must equal it (the id a URL asked for or a
    folder is named): a genuine but different release of the same steward is refused. Every file the bundle
    holds is untrusted until checked; any malformation is an IntegrityError, never another exception."""
    root = Path(root)
    if not root.is_dir():
        raise IntegrityError(where(root, "is not a directory"))
    _check_old_format(root)
    sig_bytes = _read_limited(root, SIGNATURE, MAX_SIGNATURE_BYTES)
    signed = signed_digests(root / SIGNATURE, sig_bytes, public_key)
    for name in (MANIFEST, PROVENANCE):
        if name not in signed:
            raise IntegrityError(where(root / SIGNATURE, f"does not sign {name}"))
    manifest, manifest_size = _signed_json(root, MANIFEST, signed[MANIFEST])
    provenance, provenance_size = _signed_json(root, PROVENANCE, signed[PROVENANCE])
    listed = _manifest_entries(root, manifest)
    _check_signed_matches_manifest(root, signed, listed)
    total = _check_files(root, listed)
    predicate = _check_provenance(root, provenance, listed)
    signing_files = {MANIFEST: (manifest_size, signed[MANIFEST]), PROVENANCE: (provenance_size, signed[PROVENANCE]),
                     SIGNATURE: (len(sig_bytes), hashlib.sha256(sig_bytes).hexdigest())}
    result = VerifiedBundle(root=root, fingerprint=fingerprint(public_key), files=len(listed), bytes=total,
                            predicate=predicate, manifest=manifest, signing_files=signing_files)
    if release_id is not None and result.release_id != release_id:
        raise IntegrityError(where(root, f"is signed as release {_short(result.release_id)}, not {release_id!r}"))
    return result
