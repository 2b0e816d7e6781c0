"""Artifact directories: atomic, hashed, self-describing.

Every stage writes exactly one directory. It is written under `<out>.tmp-<random>` and renamed to `<out>` only when
complete, so a directory that exists is complete. Each artifact carries a JSON header (`kind`, `schema_version`,
the content hashes of its inputs, its config and its own content hash); provenance and caching read that chain.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from synth.errors import InputError, IntegrityError, where

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def content_hash(root: Path, files: list[str]) -> str:
    """Hash of an artifact's payload: the sorted (relative path, file sha256) pairs."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode())
        h.update(b"\0")
        h.update(sha256_file(root / rel).encode())
        h.update(b"\n")
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_tmp(out: Path) -> None:
    """Remove `<out>.tmp-*` leftovers of a crashed earlier run."""
    for stale in out.parent.glob(f"{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to `out` when the block completes.

    On any exception the temporary directory is removed and `out` is untouched. With `overwrite`, an existing
    `out` is replaced (the old one is moved aside first, then deleted, so readers never see a mix).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(where(out, "already exists; choose another --out or remove it"))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(where(out.parent, f"cannot create the output's parent directory ({e.strerror})")) from None
    remove_stale_tmp(out)
    tmp = out.parent / f"{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if out.exists():
            old = out.parent / f"{out.name}.tmp-old-{secrets.token_hex(4)}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it to `path` when the block completes."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write JSON deterministically (sorted keys, 2-space indent)."""
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@dataclass(frozen=True)
class Header:
    """The JSON header every artifact carries."""

    kind: str
    schema_version: int
    content_hash: str
    inputs: dict[str, str]
    config: dict[str, Any]
    files: list[str]
    created: str
    body: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "schema_version": self.schema_version,
            "content_hash": self.content_hash,
            "inputs": self.inputs,
            "config": self.config,
            "files": self.files,
            "created": self.created,
            **self.body,
        }


_HEADER_KEYS = {"kind", "schema_version", "content_hash", "inputs", "config", "files", "created"}


def write_header(
    root: Path,
    name: str,
    *,
    kind: str,
    schema_version: int,
    files: list[str],
    inputs: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
    body: Mapping[str, Any] | None = None,
) -> Header:
    """Hash `files` (relative to `root`) and write the header `root/name`."""
    header = Header(
        kind=kind,
        schema_version=schema_version,
        content_hash=content_hash(root, files),
        inputs=dict(inputs or {}),
        config=dict(config or {}),
        files=sorted(files),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        body=dict(body or {}),
    )
    write_json(root / name, header.to_json())
    return header


def read_header(root: Path, name: str, *, kind: str | None = None) -> dict[str, Any]:
    """Read an artifact header, checking it exists, parses and has the expected kind."""
    path = Path(root) / name
    if not Path(root).is_dir():
        raise InputError(where(root, "is not a directory"))
    if not path.is_file():
        raise InputError(where(root, f"is not a synthgate artifact (no {name})"))
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(where(path, f"cannot be read as JSON ({e.__class__.__name__})")) from None
    if not isinstance(data, dict) or not data.keys() >= _HEADER_KEYS:
        raise InputError(where(path, "is not a synthgate artifact header"))
    if kind is not None and data["kind"] != kind:
        raise InputError(where(root, f"is a {data['kind']!r} artifact, expected {kind!r}"))
    return data


def verify_content(root: Path, header: Mapping[str, Any]) -> None:
    """Raise IntegrityError when the payload no longer matches the header's content hash."""
    missing = [rel for rel in header["files"] if not (Path(root) / rel).is_file()]
    if missing:
        raise IntegrityError(where(root, f"is missing {missing[0]!r}, listed in its header"))
    actual = content_hash(Path(root), list(header["files"]))
    if actual != header["content_hash"]:
        raise IntegrityError(where(root, "content hash does not match its header (files changed)"))
