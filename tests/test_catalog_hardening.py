"""Catalog hardening: malformed or mismatched bundles, request bodies, forwarded headers, idle connections."""

from __future__ import annotations

import io
import json
import shutil
import socket
import tarfile
import time
from datetime import timedelta

import anyio
import httpx
import pytest

from flows.catalog import releases as releases_module
from flows.catalog.app import MAX_BODY_BYTES, create_app
from flows.catalog.archive import bundle_members, iter_tar
from flows.catalog.fetch import safe_extract
from flows.catalog.releases import ReleaseCatalog
from flows.catalog.store import now
from flows.cli import run
from flows.signing import SIGNATURE, verify_bundle
from synth.errors import IntegrityError
from tests.test_catalog import publish_releases, serve


@pytest.fixture(scope="module")
def cat(tmp_path_factory):
    base = tmp_path_factory.mktemp("hardening")
    releases, public, public_path = publish_releases(base, [("r-1", 8.0, 2_000), ("r-2", None, 2_000)])
    return {"releases": releases, "public": public, "public_path": public_path, "base": base}


def _copy(cat, name, source="r-1"):
    shutil.copytree(cat["releases"] / source, cat["releases"] / name)
    return cat["releases"] / name


def test_malformed_signature_hides_one_release_not_the_catalog(cat):
    bad = _copy(cat, "r-nested")
    (bad / SIGNATURE).write_text("[" * 100_000 + "]" * 100_000)
    huge = _copy(cat, "r-huge")
    (huge / SIGNATURE).write_text("1" * 5000)
    app = create_app(cat["releases"], [cat["public"]])
    with serve(app) as url:
        assert httpx.get(url + "/").status_code == 200
        listed = httpx.get(url + "/api/releases")
        assert listed.status_code == 200
        assert [r["release_id"] for r in listed.json()["releases"]] == ["r-1", "r-2"]
        assert httpx.get(url + "/api/releases/r-nested").status_code == 404
        # a 5,000-character id is a 404 like any other unknown release, not a 500
        assert httpx.get(url + "/api/releases/" + "a" * 5000).status_code == 404
        assert httpx.get(url + "/releases/" + "a" * 5000).status_code == 404
    shutil.rmtree(bad)
    shutil.rmtree(huge)


def test_release_listed_only_under_its_signed_id(cat):
    _copy(cat, "r-copy")
    catalog = ReleaseCatalog(cat["releases"], [cat["public"]])
    assert catalog.get("r-copy") is None
    assert [r.release_id for r in catalog.all()] == ["r-1", "r-2"]
    shutil.rmtree(cat["releases"] / "r-copy")


def test_fetch_refuses_another_genuine_release(cat, tmp_path):
    # A server that answers a request for r-2 with the (genuine, signed) r-1: fetch must not call it valid.
    app = create_app(cat["releases"], [cat["public"]])
    _, secret = app.state.store.create_token("swap", now() + timedelta(days=1))
    with serve(app) as url:
        headers = {"Authorization": f"Bearer {secret}"}
        assert httpx.post(url + "/api/releases/r-1/accept", headers=headers).status_code == 200
        tar = httpx.get(url + "/api/releases/r-1/download", headers=headers).content
    from fastapi import FastAPI
    from fastapi.responses import Response

    evil = FastAPI()

    @evil.get("/api/releases/r-2/download")
    def download() -> Response:
        return Response(tar.replace(b"r-1/", b"r-2/"), media_type="application/x-tar")

    out = tmp_path / "got"
    with serve(evil) as url:
        code = run(["fetch", url + "/releases/r-2", "--token", "t", "--out", str(out), "--key",
                    str(cat["public_path"])])
    assert code == 1 and not out.exists()


def test_documents_are_served_from_what_was_verified(cat, monkeypatch):
    # A card swapped right after verification (the time-of-check/time-of-use window) is not served.
    root = _copy(cat, "r-race", source="r-1")
    real_verify = releases_module.verify_bundle

    def verify_then_swap(path, key, **kwargs):
        result = real_verify(path, key, **kwargs)
        (path / "README.md").write_text("---\nlicense: swapped\n---\n# swapped after the check\n")
        return result

    monkeypatch.setattr(releases_module, "verify_bundle", verify_then_swap)
    with pytest.raises(IntegrityError, match="changed after verification"):
        releases_module._load(root, "r-1", [cat["public"]])
    shutil.rmtree(root)


def test_download_sends_the_signature_that_was_verified(cat, tmp_path):
    root = tmp_path / "r-1"
    shutil.copytree(cat["releases"] / "r-1", root)
    verified = verify_bundle(root, cat["public"], release_id="r-1")
    sig = json.loads((root / SIGNATURE).read_text())
    sig["verificationMaterial"]["publicKey"]["hint"] = "0" * 64
    (root / SIGNATURE).write_text(json.dumps(sig))  # swapped between verification and download
    with pytest.raises(IntegrityError, match="changed while being sent"):
        b"".join(iter_tar(bundle_members(root, "r-1", verified.manifest, verified.signing_files)))


class _Body:
    """An ASGI receive() that hands out `total` bytes in 1 MiB chunks and counts what the app pulled."""

    def __init__(self, total: int) -> None:
        self.total, self.pulled = total, 0

    async def __call__(self) -> dict:
        chunk = min(1 << 20, self.total - self.pulled)
        self.pulled += chunk
        return {"type": "http.request", "body": b"x" * chunk, "more_body": self.pulled < self.total}


def _post(app, path, body, headers=()):
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    anyio.run(app, scope, body, send)
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_token_is_checked_before_the_body_is_read_and_bodies_are_capped(cat):
    app = create_app(cat["releases"], [cat["public"]], db_path=cat["base"] / "body.sqlite")
    _, secret = app.state.store.create_token("body", now() + timedelta(days=1))
    big = 200 * (1 << 20)
    # no token: refused without pulling a byte of the 200 MB body
    body = _Body(big)
    assert _post(app, "/api/releases/r-1/accept", body) == 401 and body.pulled == 0
    # a declared oversize body: refused from its Content-Length, unread
    body = _Body(big)
    headers = [("Authorization", f"Bearer {secret}"), ("Content-Length", str(big))]
    assert _post(app, "/api/releases/r-1/accept", body, headers) == 413 and body.pulled == 0
    # an undeclared (chunked) oversize body: read only until it passes the cap
    body = _Body(big)
    assert _post(app, "/api/releases/r-1/accept", body, headers[:1]) == 413
    assert body.pulled <= MAX_BODY_BYTES + (1 << 20)
    # a small valid body still works; an invalid one is a 422
    ok = json.dumps({"terms_sha256": None}).encode()

    async def small():
        return {"type": "http.request", "body": ok, "more_body": False}

    assert _post(app, "/api/releases/r-1/accept", small, headers[:1]) == 200

    async def invalid():
        return {"type": "http.request", "body": b'{"terms_sha256": 5}', "more_body": False}

    assert _post(app, "/api/releases/r-1/accept", invalid, headers[:1]) == 422


def test_forwarded_for_is_ignored_unless_a_proxy_is_configured(cat):
    app = create_app(cat["releases"], [cat["public"]], db_path=cat["base"] / "fwd.sqlite", max_refusals_per_minute=2)
    spoofed = {"X-Forwarded-For": "203.0.113.9", "Authorization": "Bearer sgt_wrong"}
    with serve(app) as url:
        for _ in range(3):
            httpx.post(url + "/api/releases/r-1/accept", headers=spoofed)
        assert {r["client"] for r in app.state.store.refusals()} == {"127.0.0.1"}
        # the spoofed address is not locked out: throttling hit the real peer
        assert httpx.post(url + "/api/releases/r-1/accept", headers=spoofed).status_code == 429
    app = create_app(cat["releases"], [cat["public"]], db_path=cat["base"] / "fwd2.sqlite")
    with serve(app, forwarded_allow_ips="127.0.0.1") as url:
        httpx.post(url + "/api/releases/r-1/accept", headers=spoofed)
        assert [r["client"] for r in app.state.store.refusals()] == ["203.0.113.9"]


def _closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(30)  # a guard against hanging forever, not a timing assertion
    try:
        return sock.recv(1024) == b""
    except (TimeoutError, ConnectionResetError):
        return False


def test_idle_and_trickling_connections_are_closed(cat):
    app = create_app(cat["releases"], [cat["public"]], db_path=cat["base"] / "idle.sqlite")
    with serve(app, head_timeout_s=0.5) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as silent:
            assert _closed_by_server(silent)
        with socket.create_connection((host, int(port))) as trickle:
            for byte in b"GET / HTTP/1.1\r\nHost: x\r\n":
                try:
                    trickle.sendall(bytes([byte]))
                except OSError:
                    break
                time.sleep(0.05)
            assert _closed_by_server(trickle)
        # a normal request still works after all that
        assert httpx.get(url + "/api/releases").status_code == 200


def _sparse_tar(name: str, real_size: int) -> bytes:
    """A GNU sparse member: 512 stored bytes that tarfile unpacks to `real_size` bytes (mostly a hole)."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 512
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    # sparse map entry 0 at offset 386: (offset, numbytes) as 12-byte octal fields; real size at 483
    header[386:398] = tarfile.itn(real_size - 512, 12, tarfile.GNU_FORMAT)
    header[398:410] = tarfile.itn(512, 12, tarfile.GNU_FORMAT)
    header[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])
    return bytes(header[:512]) + b"x" * 512 + b"\0" * tarfile.RECORDSIZE


def test_sparse_members_are_refused_before_anything_is_written(tmp_path):
    archive = tmp_path / "sparse.tar"
    archive.write_bytes(_sparse_tar("r-1/big.png", 64 << 20))
    with tarfile.open(archive) as tar:  # what the attack relies on: tarfile would unpack 64 MB from 10 kB
        assert tar.getmembers()[0].issparse()
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(IntegrityError, match="sparse"):
        safe_extract(archive, "r-1", dest)
    assert list(dest.iterdir()) == []


def test_unpacked_bytes_are_bounded(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"r-1/f{i}.png")
            info.size = 4000
            tar.addfile(info, io.BytesIO(b"p" * 4000))
    archive = tmp_path / "a.tar"
    archive.write_bytes(buf.getvalue())
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(IntegrityError, match="more than the limit 10,000 bytes"):
        safe_extract(archive, "r-1", dest, max_bytes=10_000)
    assert sorted(p.name for p in dest.iterdir()) == ["f0.png", "f1.png"]  # the third was never written
    dest2 = tmp_path / "out2"
    dest2.mkdir()
    assert safe_extract(archive, "r-1", dest2, max_bytes=12_000) == 3


def test_odd_signed_predicate_shapes_are_shown_as_absent(tmp_path, capsys):
    from flows.keys import generate_keys, load_public_key
    from flows.publish import publish
    from flows.signing import sign_bundle

    private_path, public_path = generate_keys(tmp_path / "keys")
    bundle = tmp_path / "work" / "odd"
    bundle.mkdir(parents=True)
    (bundle / "README.md").write_text("card")
    deep: list = []
    for _ in range(900):
        deep = [deep]
    sign_bundle(bundle, private_path, predicate={
        "release_id": "r-odd", "summary": deep, "privacy": ["epsilon", 1], "synthetic": {"images": "many"},
        "created": {"a": 1}})
    public = load_public_key(public_path)
    releases = tmp_path / "releases"
    publish(bundle, releases, public, release_id="r-odd")
    entry = json.loads((releases / "index.json").read_text())["releases"][0]
    assert entry["summary"] == "" and entry["epsilon"] is None and entry["images"] is None
    release = ReleaseCatalog(releases, [public]).get("r-odd")
    assert release is not None and release.summary == "" and release.created is None
    assert run(["verify", str(releases / "r-odd"), "--key", str(public_path)]) == 0
    assert "not differentially private" in capsys.readouterr().out
