"""Researcher catalog on a real uvicorn server on loopback: pages, tokens, terms, downloads, fetch."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import sqlite3
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response

from flows.catalog.app import create_app
from flows.catalog.archive import Member, archive_size, bundle_members, iter_tar
from flows.catalog.fetch import release_urls, safe_extract
from flows.catalog.server import server_config
from flows.catalog.store import DB_NAME, Store, now
from flows.cli import app as cli_app
from flows.cli import run
from flows.keys import fingerprint, generate_keys, load_public_key
from flows.publish import publish
from flows.signing import sign_bundle, verify_bundle
from synth.errors import IntegrityError

CARD = """---
license: cc-by-4.0
pretty_name: Synthetic <script>alert(1)</script> set
---
# Card

Raw <script>alert("card")</script> html and a [bad link](javascript:alert(1)).
"""


# Until the lead adds flows.cli_catalog to flows/cli.py's _COMMAND_MODULES, register it here (once).
if not any(g.name == "tokens" for g in cli_app.registered_groups):
    import flows.cli_catalog

    flows.cli_catalog.register(cli_app)


@contextmanager
def serve(app, **config):
    """Run `app` on a real uvicorn server (configured as `synthgate serve` does, plus `config`) on a free loopback
    port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app, log_level="warning", lifespan="off", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# One human approval and one automatic one, as flows/approval.py records them.
HUMAN = {"decision": "approved", "reviewer": "dr <who>", "auto_approved": False}
AUTO = {"decision": "approved", "reviewer": None, "auto_approved": True,
        "comment": "auto-approved (--auto-approve): no human review"}


def _bundle(root, private, release_id, *, epsilon=None, png_bytes=20_000, approval=HUMAN):
    rng = hashlib.sha256(release_id.encode()).digest()
    for label, cls in enumerate(["normal", "pneumonia"]):
        d = root / "data" / "train" / f"{label:02d}_{cls}"
        d.mkdir(parents=True)
        for i in range(3 + label):
            # deterministic pseudo-random "png" payloads, big enough that downloads take several chunks in total
            (d / f"syn-{i:06d}.png").write_bytes(b"\x89PNG" + (rng * (png_bytes // 32 + 1))[:png_bytes] + bytes([i]))
    (root / "data" / "train" / "metadata.csv").write_text("file_name,label\n")
    (root / "README.md").write_text(CARD)
    (root / "datasheet.md").write_text("# Datasheet\n\n## Motivation\n\n<img src=x onerror=alert(2)>\n")
    (root / "croissant.json").write_text("{}")
    (root / "report").mkdir()
    (root / "report" / "report.html").write_text("<html>report</html>")
    (root / "report" / "summary.json").write_text(json.dumps({
        "verdict": {"decision": "pass"},
        "key_numbers": [{"key": "flagged_fraction", "label": "Memorization flagged <i>fraction</i>",
                         "display": "0% (0 of 7)", "status": "green"}]}))
    privacy = {"epsilon": epsilon, "delta": 1e-5, "accountant": "prv"} if epsilon else None
    sign_bundle(root, private, predicate={
        "release_id": release_id, "summary": "<b>synthetic</b> chest x-rays", "privacy": privacy,
        "synthetic": {"images": 7}, "created": "2026-11-25T00:00:00+00:00",
        "approval": approval})
    return root


def publish_releases(base, specs):
    """A fresh key pair under `base/keys` and one signed release per (id, ε, PNG bytes[, approval]), published to
    `base/releases`. Returns (releases dir, public key, public key path)."""
    private_path, public_path = generate_keys(base / "keys")
    public = load_public_key(public_path)
    releases = base / "releases"
    for rid, eps, size, *approval in specs:
        bundle = _bundle(base / "work" / rid, private_path, rid, epsilon=eps, png_bytes=size,
                         approval=(approval or [HUMAN])[0])
        publish(bundle, releases, public, release_id=rid)
    return releases, public, public_path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("catalog")
    releases, public, public_path = publish_releases(base, [
        ("r-1", 8.0, 20_000), ("r-2", None, 20_000, AUTO), ("r-big", None, 3_000_000),
        ("r-tamper", None, 20_000), ("r-tamper-2", None, 20_000)])
    os.symlink(releases / "r-1", releases / "r-link")  # a symlinked release dir must not be served
    app = create_app(releases, [public])
    with serve(app) as url:
        yield {"url": url, "releases": releases, "public": public, "public_path": public_path, "base": base,
               "store": app.state.store, "fp": fingerprint(public)}


def _token(env, name):
    _, secret = env["store"].create_token(name, now() + timedelta(days=1))
    return secret


def _bearer(secret):
    return {"Authorization": f"Bearer {secret}"}


def test_pages_and_api_render_escaped(env):
    url = env["url"]
    index = httpx.get(url + "/")
    assert index.status_code == 200 and "default-src 'none'" in index.headers["content-security-policy"]
    html = index.text
    for rid in ("r-1", "r-2", "r-big"):
        assert f'href="/releases/{rid}"' in html
    assert "r-link" not in html
    assert "ε = 8, δ = 1.0e-05" in html and "no DP" in html and "cc-by-4.0" in html and "pneumonia: 4" in html
    assert "&lt;b&gt;synthetic&lt;/b&gt;" in html and "<b>synthetic" not in html
    assert "approved by a data steward" not in html  # not every release was


    page = httpx.get(url + "/releases/r-1").text
    assert env["fp"] in page and "synthgate verify r-1 --key release.pub" in page
    assert "Memorization flagged &lt;i&gt;fraction&lt;/i&gt;" in page and "0% (0 of 7)" in page
    assert "<script>" not in page and "onerror=alert" not in page.replace("&lt;img src=x onerror=alert", "")
    assert "&lt;script&gt;alert(&quot;card&quot;)&lt;/script&gt;" in page  # card rendered, raw HTML escaped
    assert 'href="javascript:' not in page and "dr &lt;who&gt;" in page and "<h1>Card</h1>" in page

    report = httpx.get(url + "/releases/r-1/report")
    assert report.status_code == 200 and report.text == "<html>report</html>"
    assert report.headers["content-security-policy"].startswith("sandbox;") and 'href="/releases/r-1/report"' in page
    assert httpx.get(url + "/releases/nope/report").status_code == 404

    listing = httpx.get(url + "/api/releases").json()["releases"]
    ids = [r["release_id"] for r in listing]
    assert ids == sorted(ids) and {"r-1", "r-2", "r-big"} <= set(ids) and "r-link" not in ids
    r1 = listing[0]
    assert r1["class_counts"] == {"normal": 3, "pneumonia": 4} and r1["epsilon"] == 8.0
    assert r1["fingerprint"] == env["fp"]
    detail = httpx.get(url + "/api/releases/r-1").json()
    assert detail["approved_by"] == "reviewer dr <who>"
    assert detail["license"] == "cc-by-4.0" and detail["audit"]["verdict"]["decision"] == "pass"
    assert detail["terms_sha256"] == hashlib.sha256(detail["terms"].encode()).hexdigest()
    spec = httpx.get(url + "/openapi.json").json()
    assert {"/api/releases", "/api/releases/{release_id}", "/api/releases/{release_id}/accept",
            "/api/releases/{release_id}/download"} <= set(spec["paths"])
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert {"ReleaseSummary", "ReleaseDetail", "Acceptance"} <= set(spec["components"]["schemas"])


def _raw_get(url, path):
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


@pytest.mark.parametrize("path", [
    "/releases/..", "/releases/%2e%2e", "/api/releases/%2e%2e%2fkeys", "/api/releases/..%2F..%2Fetc%2Fpasswd",
    "/api/releases/R-1", "/api/releases/.catalog.sqlite", "/api/releases/" + DB_NAME, "/api/releases/r-1%00",
    "/api/releases/index.json", "/api/releases/r-link", "/releases/r-link", "/api/releases/nope/download",
    "/releases/../../etc/passwd", "/api/releases/../r-1/../../keys/release.key", "/api/releases/%20",
])
def test_traversal_and_odd_names_are_404(env, path):
    assert _raw_get(env["url"], path) == 404


def test_bad_tokens_are_refused_and_logged(env):
    url, store = env["url"], env["store"]
    before = len(store.refusals())
    assert httpx.post(url + "/api/releases/r-1/accept").status_code == 401
    resp = httpx.get(url + "/api/releases/r-1/download", headers=_bearer("sgt_not-a-real-token"))
    assert resp.status_code == 401 and "Bearer" in resp.headers["www-authenticate"]
    _, expired = store.create_token("expired-one", now() - timedelta(seconds=1))
    assert httpx.post(url + "/api/releases/r-1/accept", headers=_bearer(expired)).status_code == 401
    assert run(["tokens", "create", "--name", "to-revoke", "--expires", "30d", "--releases", str(env["releases"])]) == 0
    revoked = _token(env, "revoked-one")
    assert httpx.post(url + "/api/releases/r-1/accept", headers=_bearer(revoked)).status_code == 200
    assert run(["tokens", "revoke", "revoked-one", "--releases", str(env["releases"])]) == 0
    assert httpx.get(url + "/api/releases/r-1/download", headers=_bearer(revoked)).status_code == 401
    reasons = [(r["status"], r["reason"], r["path"]) for r in store.refusals()[before:]]
    assert reasons == [
        (401, "missing bearer token", "/api/releases/r-1/accept"),
        (401, "unknown token", "/api/releases/r-1/download"),
        (401, "token expired", "/api/releases/r-1/accept"),
        (401, "token revoked", "/api/releases/r-1/download"),
    ]
    states = {t.name: t.state() for t in store.list_tokens()}
    assert states["expired-one"] == "expired" and states["revoked-one"] == "revoked" and states["to-revoke"] == "active"


def test_token_printed_once_and_stored_only_hashed(env, capsys):
    assert run(["tokens", "create", "--name", "alice", "--expires", "2099-01-01", "--releases",
                str(env["releases"])]) == 0
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    assert secret.startswith("sgt_") and len(secret) > 40
    assert env["store"].find_token(secret).name == "alice"
    db_bytes = (env["releases"] / DB_NAME).read_bytes()
    assert secret.encode() not in db_bytes and hashlib.sha256(secret.encode()).hexdigest().encode() in db_bytes
    assert run(["tokens", "list", "--releases", str(env["releases"])]) == 0
    assert secret not in capsys.readouterr().out
    assert run(["tokens", "create", "--name", "alice", "--expires", "1d", "--releases", str(env["releases"])]) == 2
    assert run(["tokens", "create", "--name", "bob", "--expires", "2001-01-01", "--releases",
                str(env["releases"])]) == 2


def test_download_needs_accepted_terms_and_is_logged(env, capsys):
    url, store = env["url"], env["store"]
    secret = _token(env, "carol")
    resp = httpx.get(url + "/api/releases/r-2/download", headers=_bearer(secret))
    assert resp.status_code == 403 and store.refusals()[-1]["reason"] == "terms not accepted for this release"
    assert httpx.post(url + "/api/releases/r-2/accept", headers=_bearer(secret),
                      json={"terms_sha256": "0" * 64}).status_code == 409
    assert httpx.post(url + "/api/releases/r-2/accept", headers=_bearer(secret)).status_code == 200
    # acceptance is per release
    assert httpx.get(url + "/api/releases/r-1/download", headers=_bearer(secret)).status_code == 403
    n_before = len(store.downloads())
    resp = httpx.get(url + "/api/releases/r-2/download", headers=_bearer(secret))
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/x-tar"
    assert int(resp.headers["content-length"]) == len(resp.content)
    with tarfile.open(fileobj=io.BytesIO(resp.content)) as tar:
        names = tar.getnames()
    manifest = json.loads((env["releases"] / "r-2" / "manifest.json").read_text())
    assert names == [f"r-2/{f['path']}" for f in manifest["files"]] + [
        "r-2/manifest.json", "r-2/provenance.json", "r-2/release.sig"]
    last = _wait_for_downloads(store, n_before + 1)[-1]
    assert (last["token_name"], last["release_id"], last["bytes"], last["complete"]) == (
        "carol", "r-2", len(resp.content), 1)
    assert run(["downloads", "--releases", str(env["releases"]), "--refusals", "--acceptances"]) == 0
    out = capsys.readouterr().out
    assert "carol" in out and f"{len(resp.content):,}" in out and "terms not accepted" in out
    assert "terms acceptances" in out
    accepted = [a for a in store.acceptances() if a["name"] == "carol"]
    assert [(a["release_id"], a["terms_sha256"]) for a in accepted] == [("r-2", httpx.get(
        url + "/api/releases/r-2").json()["terms_sha256"])]


def _wait_for_downloads(store, n, timeout=5.0):
    # The server logs a download when its generator finishes, which can be just after the client has every byte.
    deadline = time.monotonic() + timeout
    while len(rows := store.downloads()) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return rows


def test_concurrent_downloads_are_byte_identical(env):
    url, store = env["url"], env["store"]
    secret = _token(env, "dave")
    assert httpx.post(url + "/api/releases/r-1/accept", headers=_bearer(secret)).status_code == 200
    before = len(store.downloads())

    def get(_):
        with httpx.Client(timeout=30) as c:
            r = c.get(url + "/api/releases/r-1/download", headers=_bearer(secret))
            return r.status_code, hashlib.sha256(r.content).hexdigest(), len(r.content)

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(get, range(50)))
    assert {r[0] for r in results} == {200} and len({r[1] for r in results}) == 1
    rows = _wait_for_downloads(store, before + 50)[before:]
    assert len(rows) == 50 and all(r["complete"] == 1 and r["bytes"] == results[0][2] for r in rows)
    # the stream is exactly what tarfile would produce from the same members
    verified = verify_bundle(env["releases"] / "r-1", env["public"], release_id="r-1")
    members = bundle_members(env["releases"] / "r-1", "r-1", verified.manifest, verified.signing_files)
    assert archive_size(members) == results[0][2]
    assert hashlib.sha256(b"".join(iter_tar(members, chunk=1000))).hexdigest() == results[0][1]


def test_tampered_release_disappears(env, caplog):
    url, releases = env["url"], env["releases"]
    assert httpx.get(url + "/api/releases/r-tamper").status_code == 200
    png = releases / "r-tamper" / "data" / "train" / "00_normal" / "syn-000000.png"
    st = png.stat()
    data = bytearray(png.read_bytes())
    data[100] ^= 1
    with open(png, "r+b") as f:  # same size, same inode, mtime put back: only the content and ctime change
        f.write(data)
    os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns))
    with caplog.at_level(logging.WARNING, logger="synthgate.catalog"):
        assert "r-tamper" not in [r["release_id"] for r in httpx.get(url + "/api/releases").json()["releases"]]
        assert 'href="/releases/r-tamper"' not in httpx.get(url + "/").text
        assert httpx.get(url + "/releases/r-tamper").status_code == 404
        assert httpx.get(url + "/api/releases/r-tamper/download").status_code == 404
        assert httpx.get(url + "/releases/r-tamper/report").status_code == 404
    assert any("r-tamper hidden: failed verification" in m and "does not match" in m for m in caplog.messages)
    # an extra file is caught too
    (releases / "r-tamper-2" / "extra.txt").write_text("x")
    assert httpx.get(url + "/api/releases/r-tamper-2").status_code == 404
    assert "r-1" in [r["release_id"] for r in httpx.get(url + "/api/releases").json()["releases"]]


def test_archive_stream_aborts_when_a_file_changes_mid_download(tmp_path):
    f = tmp_path / "a.png"
    f.write_bytes(b"x" * 5000)
    members = [Member("r/a.png", f, 5000, hashlib.sha256(b"y" * 5000).hexdigest())]
    with pytest.raises(IntegrityError, match="changed while being sent"):
        b"".join(iter_tar(members))


def _evil_tar(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = 3
                tar.addfile(info, io.BytesIO(b"bad"))
            else:
                info.type = kind
                info.linkname = "/etc/passwd"
                tar.addfile(info)
    return buf.getvalue()


EVIL = {
    "dotdot": [("r-1/../../evil.txt", "file")],
    "absolute": [("/tmp/evil.txt", "file")],
    "outside folder": [("other/evil.txt", "file")],
    "top-level dotdot": [("../evil.txt", "file")],
    "symlink": [("r-1/link", tarfile.SYMTYPE)],
    "hardlink": [("r-1/hard", tarfile.LNKTYPE)],
    "device": [("r-1/dev", tarfile.CHRTYPE)],
    "fifo": [("r-1/fifo", tarfile.FIFOTYPE)],
    "duplicate": [("r-1/a.txt", "file"), ("r-1/./a.txt", "file")],
    "backslash": [("r-1\\..\\evil.txt", "file")],
}


@pytest.mark.parametrize("case", sorted(EVIL))
def test_safe_extract_refuses_unsafe_members(tmp_path, case):
    archive = tmp_path / "a.tar"
    archive.write_bytes(_evil_tar(EVIL[case]))
    dest = tmp_path / "deep" / "out"
    dest.mkdir(parents=True)
    with pytest.raises(IntegrityError):
        safe_extract(archive, "r-1", dest)
    assert not list(tmp_path.rglob("evil.txt"))


def test_fetch_refuses_an_archive_with_dotdot_from_a_server(env, tmp_path):
    evil = _evil_tar([("r-1/README.md", "file"), ("r-1/../../../evil.txt", "file")])
    app = FastAPI()

    @app.get("/api/releases/r-1/download")
    def download() -> Response:
        return Response(evil, media_type="application/x-tar")

    out = tmp_path / "x" / "y" / "z" / "out"
    with serve(app) as url:
        code = run(["fetch", url + "/releases/r-1", "--token", "t", "--out", str(out), "--key",
                    str(env["public_path"])])
    assert code == 1 and not out.exists() and not list(tmp_path.rglob("evil.txt"))
    assert [p.name for p in out.parent.iterdir()] == []  # no temporary leftovers


def test_fetch_end_to_end_verifies(env, tmp_path, capsys):
    url = env["url"]
    secret = _token(env, "erin")
    out = tmp_path / "got" / "r-1"
    args = ["fetch", url + "/releases/r-1", "--token", secret, "--out", str(out), "--key", str(env["public_path"])]
    assert run(args) == 2 and not out.exists()
    assert "--accept-terms" in capsys.readouterr().err
    assert run([*args, "--accept-terms", "--max-gb", "0.00001"]) == 2 and not out.exists()  # 10 kB limit
    assert "more than the limit" in capsys.readouterr().err
    assert run([*args, "--accept-terms"]) == 0
    printed = capsys.readouterr().out
    assert "valid" in printed and "load_dataset" in printed and "ImageFolder" in printed
    result = verify_bundle(out, env["public"])
    assert result.predicate["release_id"] == "r-1" and result.fingerprint == env["fp"]
    src = env["releases"] / "r-1"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    # a different key: refused, nothing left behind
    _, other_pub = generate_keys(tmp_path / "other")
    out2 = tmp_path / "got2"
    code = run(["fetch", url + "/api/releases/r-1/download", "--token", secret, "--out", str(out2),
                "--key", str(other_pub)])
    assert code == 1 and not out2.exists()
    assert run(["fetch", url + "/releases/..", "--token", secret, "--out", str(out2), "--key", str(other_pub)]) == 2


def test_release_urls():
    assert release_urls("http://h:1/releases/r-1") == ("http://h:1/api/releases/r-1", "r-1")
    assert release_urls("https://h/cat/api/releases/r-1/download") == ("https://h/cat/api/releases/r-1", "r-1")
    for bad in ["ftp://h/releases/r-1", "http://h/r-1", "http://h/releases/R%2F1"]:
        with pytest.raises(Exception, match="URL"):
            release_urls(bad)


def test_store_survives_concurrent_writers(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    token, _ = store.create_token("x", now() + timedelta(days=1))

    def log(i):
        store.log_download(token.id, "r", now(), i, True)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(log, range(40)))
    assert len(store.downloads()) == 40
    assert sqlite3.connect(tmp_path / "db.sqlite").execute("SELECT count(*) FROM tokens").fetchone() == (1,)


def test_serve_command_builds_the_app(env, tmp_path, monkeypatch, capsys):
    import uvicorn as uv

    seen = {}
    monkeypatch.setattr(uv.Server, "run", lambda self, sockets=None: seen.update(config=self.config))
    db = tmp_path / "serve.sqlite"
    assert run(["serve", "--releases", str(env["releases"]), "--key", str(env["public_path"]), "--port", "8123",
                "--db", str(db)]) == 0
    config = seen["config"]
    assert config.host == "127.0.0.1" and config.port == 8123 and db.exists()
    assert config.proxy_headers is False  # no proxy configured: X-Forwarded-For is not believed
    assert "intact release(s)" in capsys.readouterr().out
    assert run(["serve", "--releases", str(tmp_path / "missing"), "--key", str(env["public_path"])]) == 2


def test_aborted_download_is_logged_incomplete(env):
    url, store = env["url"], env["store"]
    secret = _token(env, "frank")
    assert httpx.post(url + "/api/releases/r-big/accept", headers=_bearer(secret)).status_code == 200
    before = len(store.downloads())
    # ~21 MB: far more than the socket buffers hold while the client reads nothing (send buffer max 4 MB, receive
    # window small since it only grows as the application reads), so the server is mid-stream when the client hangs up
    with httpx.Client(timeout=10) as c, c.stream("GET", url + "/api/releases/r-big/download",
                                                 headers=_bearer(secret)) as resp:
        assert resp.status_code == 200
        next(resp.iter_raw(512))  # read a little, then hang up
    row = _wait_for_downloads(store, before + 1)[before]
    assert row["complete"] == 0 and row["bytes"] < int(resp.headers["content-length"])


def test_fetch_refuses_redirects_and_errors(env, tmp_path):
    app = FastAPI()

    @app.get("/api/releases/r-1/download")
    def download() -> Response:
        return Response(status_code=307, headers={"Location": "http://example.invalid/steal"})

    out = tmp_path / "out"
    with serve(app) as url:
        code = run(["fetch", url + "/releases/r-1", "--token", "t", "--out", str(out), "--key",
                    str(env["public_path"])])
    assert code == 2 and not out.exists()


def test_refusals_are_throttled_per_client(env, tmp_path):
    from flows.catalog.throttle import RefusalThrottle

    app = create_app(env["releases"], env["public"], db_path=tmp_path / "t.sqlite", max_refusals_per_minute=3)
    _, secret = app.state.store.create_token("good", now() + timedelta(days=1))
    with serve(app) as url:
        codes = [httpx.post(url + "/api/releases/r-1/accept", headers=_bearer(f"sgt_guess{i}")).status_code
                 for i in range(5)]
        assert codes == [401, 401, 401, 429, 429]
        resp = httpx.post(url + "/api/releases/r-1/accept", headers=_bearer(secret))  # same client: throttled too
        assert resp.status_code == 429 and int(resp.headers["retry-after"]) > 0
        assert httpx.get(url + "/api/releases/r-1").status_code == 200  # browsing is not token-gated
    assert len(app.state.store.refusals()) == 3  # throttled requests are not logged one by one
    clock = [0.0]
    t = RefusalThrottle(limit=2, window_s=10, clock=lambda: clock[0])
    assert not t.record("a") and t.retry_after("a") == 0 and t.record("a") and t.retry_after("a") > 0
    assert t.retry_after("b") == 0
    clock[0] = 10.5
    assert t.retry_after("a") == 0


def test_index_shows_each_approval_as_recorded(env):
    """A human approval names its reviewer; an automatic one says nobody reviewed it; an unrecorded one says so."""
    rows = {r.split("</a>")[0]: r for r in httpx.get(env["url"] + "/").text.split('<tr><td><a href="/releases/')[1:]}
    assert "reviewer dr &lt;who&gt;" in rows['r-1">r-1'] and "automatic" not in rows['r-1">r-1']
    assert "automatic (no human review)" in rows['r-2">r-2'] and "reviewer" not in rows['r-2">r-2']
    by_id = {r["release_id"]: r["approved_by"] for r in httpx.get(env["url"] + "/api/releases").json()["releases"]}
    assert by_id["r-1"] == "reviewer dr <who>" and by_id["r-2"] == "automatic (no human review)"


def test_approval_without_a_recorded_decision_is_not_called_human():
    from pathlib import Path

    from flows.catalog.releases import Release

    def release(approval):
        return Release(release_id="x", root=Path("."), fingerprint="f", files=0, bytes=0, created=None, summary="",
                       epsilon=None, delta=None, accountant=None, license=None, title=None, class_counts={},
                       approval=approval, key_numbers=[], verdict={}, card="", datasheet="", terms="",
                       terms_sha256="", manifest={}, signing_files={})

    assert release({}).approved_by() == "not recorded"
    assert release({"reviewer": "someone"}).approved_by() == "not recorded"  # auto_approved missing: unknown
    assert release(AUTO).approved_by() == "automatic (no human review)"
    assert release(HUMAN).approved_by() == "reviewer dr <who>"


def test_static_index_shows_each_approval_as_recorded(env):
    """`publish` writes index.json / index.html beside the bundles: the approval column is as signed."""
    index = json.loads((env["releases"] / "index.json").read_text())
    by_id = {r["release_id"]: r["approved_by"] for r in index["releases"]}
    assert by_id["r-1"] == "reviewer dr <who>" and by_id["r-2"] == "automatic (no human review)"
    html = (env["releases"] / "index.html").read_text()
    assert "approved by a data steward" not in html
    assert "reviewer dr &lt;who&gt;" in html and "automatic (no human review)" in html
