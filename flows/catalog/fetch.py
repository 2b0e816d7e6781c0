"""Researcher side: download a release with a token, unpack it safely, verify it with the publisher's key.

The tar is streamed to a temporary file next to `out`, then unpacked member by member into a temporary directory
(written atomically into `out` only after verification succeeds). Only regular files and directories are accepted,
under the single top-level `<release_id>/` folder; absolute names, '..', backslashes, links, devices, FIFOs,
sparse members (a few stored bytes that unpack to gigabytes) and duplicate names are refused, every target path is
checked to stay inside the output directory, and the bytes unpacked are bounded like the bytes downloaded.
"""

from __future__ import annotations

import dataclasses
import os
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlsplit, urlunsplit

from flows.keys import PublicKey
from flows.publish import check_release_id
from flows.signing import VerifiedBundle, verify_bundle
from synth.artifacts import atomic_dir
from synth.errors import InputError, IntegrityError, where

if TYPE_CHECKING:
    import httpx

CHUNK = 256 * 1024


def release_urls(url: str) -> tuple[str, str]:
    """(API base of the release, release id) from a release page or API URL, e.g. `http://h/releases/r1`,
    `http://h/api/releases/r1` or `http://h/api/releases/r1/download`."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"URL {url!r}: expected http(s)://HOST/releases/RELEASE_ID")
    segments = [s for s in parts.path.split("/") if s]
    if segments and segments[-1] in ("download", "accept"):
        segments.pop()
    if len(segments) < 2 or segments[-2] != "releases":
        raise InputError(f"URL {url!r}: expected .../releases/RELEASE_ID")
    release_id = segments[-1]
    try:
        check_release_id(release_id)
    except InputError as e:
        raise InputError(f"URL {url!r}: {e}") from None
    prefix = segments[:-2]
    if prefix and prefix[-1] == "api":
        prefix.pop()
    path = "/" + "/".join([*prefix, "api", "releases", release_id])
    return urlunsplit((parts.scheme, parts.netloc, path, "", "")), release_id


def _safe_name(name: str, release_id: str, archive: Path) -> PurePosixPath | None:
    """The member's path inside the bundle (None for the top folder itself); raises on anything unsafe."""
    if not name or "\\" in name or "\0" in name:
        raise IntegrityError(where(archive, f"member {name!r} has an unsafe name"))
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and pure.parts[0] != release_id):
        raise IntegrityError(where(archive, f"member {name!r} escapes the release folder {release_id!r}/"))
    rest = pure.parts[1:]
    return PurePosixPath(*rest) if rest else None


def safe_extract(archive: Path, release_id: str, dest: Path, *, max_bytes: int | None = None) -> int:
    """Unpack `<release_id>/...` from a tar into the existing empty directory `dest`; return the file count.

    Raises IntegrityError on the first unsafe member (nothing outside `dest` is ever written), and before writing
    a member that would take the unpacked total past `max_bytes`."""
    dest_real = Path(os.path.realpath(dest))
    try:
        with tarfile.open(archive, mode="r:") as tar:
            count = _extract_members(tar, release_id, dest_real, archive, max_bytes)
    except tarfile.TarError as e:
        raise IntegrityError(where(archive, f"is not a readable tar archive ({e})")) from None
    except OSError as e:  # e.g. a file member where a directory member was, or the reverse
        raise IntegrityError(where(archive, f"cannot unpack ({e.strerror}: {e.filename})")) from None
    return count


def _extract_members(tar: tarfile.TarFile, release_id: str, dest_real: Path, archive: Path,
                     max_bytes: int | None) -> int:
    seen: set[str] = set()
    count = unpacked = 0
    for member in tar:
        rel = _safe_name(member.name, release_id, archive)
        if not (member.isreg() or member.isdir()):
            raise IntegrityError(where(archive, f"member {member.name!r} is a link or special file"))
        if member.issparse():
            raise IntegrityError(where(archive, f"member {member.name!r} is a sparse file"))
        unpacked += member.size
        if max_bytes is not None and unpacked > max_bytes:
            raise IntegrityError(where(archive, f"unpacks to more than the limit {max_bytes:,} bytes"))
        if rel is None:
            if member.isreg():
                raise IntegrityError(where(archive, f"member {member.name!r} is not inside a folder"))
            continue
        key = rel.as_posix()
        if key in seen:
            raise IntegrityError(where(archive, f"member {member.name!r} appears twice"))
        seen.add(key)
        target = dest_real.joinpath(*rel.parts)
        # Belt and braces: the resolved parent must stay inside dest (no symlink can exist there, but check).
        parent = Path(os.path.realpath(target.parent))
        if parent != dest_real and dest_real not in parent.parents:
            raise IntegrityError(where(archive, f"member {member.name!r} resolves outside the output"))
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        src = tar.extractfile(member)
        if src is None:  # pragma: no cover - regular members always have a file object
            raise IntegrityError(where(archive, f"member {member.name!r} has no data"))
        _copy_exactly(src, target, member.size, archive, member.name)
        count += 1
    return count


def _copy_exactly(src: BinaryIO, target: Path, size: int, archive: Path, name: str) -> None:
    """Write a member's data to the new file `target`, never more than its declared `size`."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    written = 0
    with os.fdopen(fd, "wb") as out, src:
        while data := src.read(min(CHUNK, size - written + 1)):
            written += len(data)
            if written > size:
                raise IntegrityError(where(archive, f"member {name!r} holds more data than it declares"))
            out.write(data)


def download(api_url: str, token: str, dest_file: Path, *, accept_terms: bool = False, timeout: float = 60,
             max_bytes: int | None = None) -> int:
    """Stream the release tar to `dest_file`; accept the terms first when asked. Returns bytes written.

    Refuses (before writing) an archive larger than `max_bytes`, and stops if the server sends more than that."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(timeout=timeout, headers=headers) as client:
        if accept_terms:
            detail = client.get(api_url)
            _check(detail, api_url)
            try:
                terms_sha256 = str(detail.json()["terms_sha256"])
            except (ValueError, KeyError, TypeError):
                raise InputError(f"{api_url}: the answer has no terms_sha256: is this a synthgate catalog?") from None
            resp = client.post(api_url + "/accept", json={"terms_sha256": terms_sha256})
            _check(resp, api_url + "/accept")
        written = 0
        with client.stream("GET", api_url + "/download") as resp:
            if resp.status_code == 403:
                raise InputError(f"{api_url}: the server refused the download: {_detail(resp)}. Read the terms at "
                                 f"{api_url.replace('/api/releases/', '/releases/')} and rerun with --accept-terms")
            _check(resp, api_url + "/download")
            declared = int(resp.headers.get("content-length", "0") or 0)
            if max_bytes is not None and declared > max_bytes:
                raise InputError(f"{api_url}: the release is {declared:,} bytes, more than the limit {max_bytes:,}")
            with open(dest_file, "wb") as f:
                for chunk in resp.iter_bytes(CHUNK):
                    written += len(chunk)
                    if max_bytes is not None and written > max_bytes:
                        raise InputError(f"{api_url}: the server sent more than the limit {max_bytes:,} bytes")
                    f.write(chunk)
    return written


def _detail(resp: httpx.Response) -> str:
    resp.read()
    try:
        data = resp.json()
    except ValueError:
        data = None
    text = str(data["detail"]) if isinstance(data, dict) and "detail" in data else resp.text
    # The server is not trusted: no control characters reach the researcher's terminal.
    return "".join(ch for ch in text[:200] if ch.isprintable())


def _check(resp: httpx.Response, url: str) -> None:
    # Only 2xx: redirects are not followed (the token must not travel to another host) and count as failures.
    if not 200 <= resp.status_code < 300:
        status = resp.status_code
        raise InputError(f"{url}: HTTP {status}: {_detail(resp)}")


def fetch(url: str, token: str, out: Path, public_key: PublicKey, *,
          accept_terms: bool = False, max_bytes: int | None = None) -> VerifiedBundle:
    """Download the release at `url` into the new directory `out`, unpack safely, verify; return the result.

    `out` appears only when everything succeeded."""
    import httpx

    api_url, release_id = release_urls(url)
    out = Path(out)
    if out.exists():
        raise InputError(where(out, "already exists; choose another --out or remove it"))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.download-", dir=out.parent) as tmp:
        archive = Path(tmp) / f"{release_id}.tar"
        try:
            download(api_url, token, archive, accept_terms=accept_terms, max_bytes=max_bytes)
        except httpx.HTTPError as e:
            raise InputError(f"{api_url}: download failed: {e}") from None
        return unpack_and_verify(archive, release_id, out, public_key, max_bytes=max_bytes)


def unpack_and_verify(archive: Path, release_id: str, out: Path, public_key: PublicKey, *,
                      max_bytes: int | None = None) -> VerifiedBundle:
    """Safely unpack a downloaded release tar into `out` (atomically; at most `max_bytes` unpacked) and verify it
    with `public_key`, as the release `release_id`."""
    with atomic_dir(Path(out)) as tmp:
        safe_extract(archive, release_id, tmp, max_bytes=max_bytes)
        # The signed release id must be the one the URL asked for: a server could hand back another genuine release.
        result = verify_bundle(tmp, public_key, release_id=release_id)
    return dataclasses.replace(result, root=Path(out))


def loading_hint(out: Path) -> str:
    """How to load a fetched bundle with Hugging Face `datasets` or torchvision."""
    return (
        "load it with Hugging Face datasets (the dataset card declares the files and class names):\n"
        "    from datasets import load_dataset\n"
        f"    ds = load_dataset('{out}', split='train')\n"
        "or with torchvision (class folders sort in label order):\n"
        "    from torchvision.datasets import ImageFolder\n"
        f"    ds = ImageFolder('{out}/data/train')"
    )
