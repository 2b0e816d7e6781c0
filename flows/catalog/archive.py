"""Stream a verified bundle as one deterministic tar, chunk by chunk, never holding a file in memory.

Members are the manifest's files in sorted order, then manifest.json, provenance.json and release.sig, all under
`<release_id>/`, with fixed metadata (mode 0644, uid/gid 0, mtime 0), so two downloads of one release are
byte-identical. Each file is re-hashed while it streams: if it no longer matches the manifest (changed after the
request was verified) the stream is aborted rather than finished with bytes the signature does not cover.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.signing import SIGNING_FILES
from synth.errors import IntegrityError, where

CHUNK = 256 * 1024
BLOCK = tarfile.BLOCKSIZE


@dataclass(frozen=True)
class Member:
    arcname: str
    path: Path
    size: int
    sha256: str


def bundle_members(root: Path, release_id: str, manifest: dict[str, Any],
                   signing_files: dict[str, tuple[int, str]]) -> list[Member]:
    """The tar members of a verified bundle: data files sorted, then the signing files, each with the size and
    hash that verification saw (so a file swapped after the check aborts the stream instead of being sent)."""
    members = [Member(f"{release_id}/{f['path']}", root / f["path"], int(f["size"]), str(f["sha256"]))
               for f in sorted(manifest["files"], key=lambda f: f["path"])]
    for name in SIGNING_FILES:
        size, digest = signing_files[name]
        members.append(Member(f"{release_id}/{name}", root / name, size, digest))
    return members


def _header(member: Member) -> bytes:
    info = tarfile.TarInfo(member.arcname)
    info.size, info.mode, info.mtime = member.size, 0o644, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    # PAX only adds extended headers when needed (long or non-ASCII names), deterministically.
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


def _padding(size: int) -> int:
    return (-size) % BLOCK


def archive_size(members: list[Member]) -> int:
    """Exact byte length of the tar `iter_tar(members)` produces (for Content-Length)."""
    total = sum(len(_header(m)) + m.size + _padding(m.size) for m in members)
    total += 2 * BLOCK
    # tarfile pads the archive to a multiple of RECORDSIZE; we do the same so the stream equals tarfile's output.
    return total + (-total) % tarfile.RECORDSIZE


def iter_tar(members: list[Member], chunk: int = CHUNK) -> Iterator[bytes]:
    """Yield the tar archive of `members` in chunks of about `chunk` bytes (at most 2×)."""
    # Coalesce small pieces (headers, padding, small PNGs): each chunk costs a thread hop and a socket write.
    buffer, size = [], 0
    for piece in _tar_pieces(members, chunk):
        buffer.append(piece)
        size += len(piece)
        if size >= chunk:
            yield b"".join(buffer)
            buffer, size = [], 0
    if buffer:
        yield b"".join(buffer)


def _tar_pieces(members: list[Member], chunk: int) -> Iterator[bytes]:
    total = 0
    for m in members:
        header = _header(m)
        yield header
        total += len(header)
        digest, sent = hashlib.sha256(), 0
        with open(m.path, "rb") as f:
            while sent < m.size:
                data = f.read(min(chunk, m.size - sent))
                if not data:
                    break
                digest.update(data)
                sent += len(data)
                yield data
        if sent != m.size or _size_changed(m.path, m.size) or digest.hexdigest() != m.sha256:
            raise IntegrityError(where(m.path, "changed while being sent; download aborted"))
        pad = _padding(m.size)
        if pad:
            yield b"\0" * pad
        total += m.size + pad
    end = 2 * BLOCK
    end += (-(total + end)) % tarfile.RECORDSIZE
    yield b"\0" * end


def _size_changed(path: Path, size: int) -> bool:
    """True when the file grew beyond its manifest size."""
    return path.stat().st_size != size

