"""The catalog web app: release pages and JSON API (public), terms acceptance and downloads (token-gated).

    GET  /                                 HTML index of intact releases
    GET  /releases/{id}                    HTML page of one release (card, datasheet, audit summary, key, terms)
    GET  /releases/{id}/report             the bundle's public audit report (sandboxed)
    GET  /api/releases                     JSON index
    GET  /api/releases/{id}                JSON detail
    POST /api/releases/{id}/accept         record acceptance of the terms (Bearer token)
    GET  /api/releases/{id}/download       the bundle as one tar stream (Bearer token, terms accepted)
    GET  /openapi.json                     OpenAPI

Every request for a release re-checks it (signature and hashes, cached by a stat stamp); a bundle that fails is
answered 404 exactly like an absent one. Token problems (missing, unknown, expired, revoked) answer 401, missing
terms acceptance 403, a stale terms hash 409; each refusal is recorded in the store and logged. The token is checked
before a request body is read, and the one body (accept) is read at most `MAX_BODY_BYTES` (413 beyond) within
`BODY_TIMEOUT_S` (408). A client refused too
often is answered 429 on the token-gated routes for a while (those are not recorded one by one). Every download is
recorded (token, release, start, end, bytes handed to the server, complete or not), however it ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError

from flows.catalog.archive import archive_size, bundle_members, iter_tar
from flows.catalog.releases import Release, ReleaseCatalog
from flows.catalog.schemas import Acceptance, AcceptRequest, ReleaseDetail, ReleaseList
from flows.catalog.store import DB_NAME, Store, Token, now
from flows.catalog.templates import environment, render_markdown
from flows.catalog.throttle import RefusalThrottle
from flows.keys import PublicKey

log = logging.getLogger("synthgate.catalog")
_REPORT = "report/report.html"
# The only request body is a terms hash: a few dozen bytes. Anything above this is refused unread.
MAX_BODY_BYTES = 16 * 1024
BODY_TIMEOUT_S = 30.0  # a body that trickles in slower than this is not waited for

# Pages carry only inline CSS and no scripts; a strict CSP makes any escaping slip inert.
_HTML_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _LoggedStream(StreamingResponse):
    """A streaming response that calls `on_close` once it ends, however it ends (complete, error, client gone).

    A generator's own `finally` is not enough: when the client hangs up, the suspended generator is only closed
    whenever it is garbage-collected."""

    def __init__(self, content: Generator[bytes, None, None], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._content, self._on_close = content, on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._close)

    def _close(self) -> None:
        # ValueError: still running in a worker thread; nothing more is read from it once the response is over.
        with contextlib.suppress(ValueError):
            self._content.close()
        self._on_close()


def create_app(releases_dir: Path, public_keys: PublicKey | Sequence[PublicKey],
               db_path: Path | None = None, *, max_refusals_per_minute: int = 30) -> FastAPI:
    """Build the catalog app over `releases_dir`; tokens and logs live in `db_path`
    (default `<releases_dir>/.catalog.sqlite`). A bundle is served when it verifies under any of `public_keys`.
    A client refused `max_refusals_per_minute` times within a minute gets 429 on token-gated routes for a while."""
    keys = [public_keys] if isinstance(public_keys, PublicKey) else list(public_keys)
    catalog = ReleaseCatalog(Path(releases_dir), keys)
    store = Store(Path(db_path) if db_path else Path(releases_dir) / DB_NAME)
    # Verify everything once at start: failures are logged now, and the first page view is served from the cache.
    log.info("catalog of %s: %d intact release(s)", releases_dir, len(catalog.all()))
    # No Swagger/ReDoc pages: they load scripts from a public CDN, which a hospital network may not reach and the
    # pages' Content-Security-Policy forbids; the schema itself is at /openapi.json.
    app = FastAPI(title="synthgate release catalog", version="1", docs_url=None, redoc_url=None,
                  description="Signed synthetic image releases: browse freely; download with a token after "
                              "accepting a release's terms.")
    app.state.catalog, app.state.store = catalog, store
    access = _Access(store, RefusalThrottle(limit=max_refusals_per_minute, window_s=60.0))
    _add_pages(app, catalog)
    _add_api(app, catalog)
    _add_token_routes(app, catalog, store, access)
    return app


def _release_or_404(catalog: ReleaseCatalog, release_id: str) -> Release:
    release = catalog.get(release_id)
    if release is None:
        raise HTTPException(404, "no such release")
    return release


class _Access:
    """Token checks of the gated routes: every refusal is recorded, logged and counted by the throttle."""

    def __init__(self, store: Store, throttle: RefusalThrottle) -> None:
        self.store, self.throttle = store, throttle

    def refuse(self, request: Request, status: int, reason: str, token: Token | None = None) -> HTTPException:
        client = request.client.host if request.client else None
        if self.throttle.record(client or "?"):
            log.warning("client %s throttled: %d refused requests within %.0f s", client, self.throttle.limit,
                        self.throttle.window_s)
        self.store.log_refusal(status, reason, request.url.path, token_id=token.id if token else None, client=client)
        log.warning("refused %s %s: %s (%s)", request.method, request.url.path, reason,
                    f"token {token.id}" if token else "no known token")
        headers = {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{reason}"'} \
            if status == 401 else None
        return HTTPException(status, reason, headers=headers)

    def authorize(self, request: Request, credentials: HTTPAuthorizationCredentials | None) -> Token:
        wait = self.throttle.retry_after(request.client.host if request.client else "?")
        if wait:  # not logged per request: that is what the throttle protects
            raise HTTPException(429, "too many refused requests; retry later", headers={"Retry-After": str(wait)})
        if credentials is None or not credentials.credentials.strip():
            raise self.refuse(request, 401, "missing bearer token")
        token = self.store.find_token(credentials.credentials.strip())
        if token is None:
            raise self.refuse(request, 401, "unknown token")
        state = token.state()
        if state != "active":
            raise self.refuse(request, 401, f"token {state}", token)
        return token


def _add_pages(app: FastAPI, catalog: ReleaseCatalog) -> None:
    """The public HTML pages: index, release page, sandboxed audit report."""
    env = environment()

    def page(name: str, **context: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(**context), headers=_HTML_HEADERS)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        # Browsers ask for it on their own; a 404 would be a console error on every page.
        return Response(status_code=204)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page() -> HTMLResponse:
        return page("index.html", releases=catalog.all())

    @app.get("/releases/{release_id}", response_class=HTMLResponse, include_in_schema=False)
    def release_page(release_id: str, request: Request) -> HTMLResponse:
        r = _release_or_404(catalog, release_id)
        return page("release.html", r=r, base_url=str(request.base_url),
                    card_html=render_markdown(r.card), datasheet_html=render_markdown(r.datasheet))

    @app.get("/releases/{release_id}/report", response_class=HTMLResponse, include_in_schema=False)
    def report_page(release_id: str) -> Response:
        # The bundle's public audit report (no real pixels): served sandboxed (no scripts, no requests, images only
        # as data: URIs) and only when its bytes still match the manifest.
        r = _release_or_404(catalog, release_id)
        entry = next((f for f in r.manifest["files"] if f["path"] == _REPORT), None)
        data = (r.root / _REPORT).read_bytes() if entry is not None else b""
        if entry is None or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise HTTPException(404, "no intact audit report in this release")
        return Response(data, media_type="text/html; charset=utf-8", headers={
            **_HTML_HEADERS, "Content-Security-Policy": "sandbox; default-src 'none'; img-src data:; "
                                                        "style-src 'unsafe-inline'"})


def _add_api(app: FastAPI, catalog: ReleaseCatalog) -> None:
    """The public JSON API: the index and one release's detail."""

    @app.get("/api/releases", summary="Intact releases")
    def list_releases() -> ReleaseList:
        return ReleaseList.model_validate({"releases": [r.listing() for r in catalog.all()]})

    @app.get("/api/releases/{release_id}", summary="One release: documents, audit summary, terms",
             responses={404: {"description": "no such release (or it failed verification)"}})
    def get_release(release_id: str) -> ReleaseDetail:
        return ReleaseDetail.model_validate(_release_or_404(catalog, release_id).detail())


def _add_token_routes(app: FastAPI, catalog: ReleaseCatalog, store: Store, access: _Access) -> None:
    """The token-gated routes: accept a release's terms, download a release."""
    # auto_error=False: a missing or malformed header is refused (and logged) by `authorize`, not by FastAPI.
    bearer = HTTPBearer(auto_error=False, description="An access token from `synthgate tokens create`.")

    @app.post("/api/releases/{release_id}/accept", summary="Accept a release's terms (Bearer token)",
              openapi_extra={"requestBody": {"required": False, "content": {
                  "application/json": {"schema": AcceptRequest.model_json_schema()}}}},
              responses={400: {"description": "request body is not UTF-8"},
                         401: {"description": "missing, unknown, expired or revoked token"},
                         404: {"description": "no such release"},
                         408: {"description": "request body not received in time"},
                         409: {"description": "terms_sha256 is not the current terms"},
                         413: {"description": f"request body larger than {MAX_BODY_BYTES} bytes"},
                         422: {"description": "request body is not a valid AcceptRequest"},
                         429: {"description": "too many refused requests from this client"}})
    async def accept(release_id: str, request: Request,
                     credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Acceptance:
        # No body parameter: FastAPI would read the whole body before any check. The release and the token are
        # checked first; only then is the body read, bounded in size and time.
        r = await run_in_threadpool(_release_or_404, catalog, release_id)
        token = await run_in_threadpool(access.authorize, request, credentials)
        body = await read_accept_body(request)
        if body is not None and body.terms_sha256 is not None and body.terms_sha256 != r.terms_sha256:
            raise await run_in_threadpool(access.refuse, request, 409, "terms changed: read them again", token)
        accepted = await run_in_threadpool(store.accept, token.id, r.release_id, r.terms_sha256)
        log.info("token %s accepted the terms of %s", token.id, r.release_id)
        return Acceptance(release_id=r.release_id, token=token.name, terms_sha256=r.terms_sha256, accepted=accepted)

    @app.get("/api/releases/{release_id}/download", summary="The bundle as one tar (Bearer token, terms accepted)",
             response_class=StreamingResponse,
             responses={200: {"content": {"application/x-tar": {}}},
                        401: {"description": "missing, unknown, expired or revoked token"},
                        403: {"description": "terms not accepted"}, 404: {"description": "no such release"},
                        429: {"description": "too many refused requests from this client"}})
    def download(release_id: str, request: Request,
                 credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> StreamingResponse:
        r = _release_or_404(catalog, release_id)
        token = access.authorize(request, credentials)
        if not store.has_accepted(token.id, r.release_id, r.terms_sha256):
            raise access.refuse(request, 403, "terms not accepted for this release", token)
        return _download_response(store, r, token)


def _download_response(store: Store, r: Release, token: Token) -> StreamingResponse:
    """The release as one tar stream; the download is recorded (bytes sent, complete or not) however it ends."""
    members = bundle_members(r.root, r.release_id, r.manifest, r.signing_files)
    size = archive_size(members)
    started = now()
    progress = {"sent": 0}

    def stream() -> Generator[bytes, None, None]:
        for chunk in iter_tar(members):
            progress["sent"] += len(chunk)
            yield chunk

    def record() -> None:
        sent = progress["sent"]
        store.log_download(token.id, r.release_id, started, sent, sent == size)
        log.info("download of %s by token %s: %d of %d bytes", r.release_id, token.id, sent, size)

    return _LoggedStream(stream(), record, media_type="application/x-tar", headers={
        "Content-Length": str(size),
        "Content-Disposition": f'attachment; filename="{r.release_id}.tar"',
        "X-Release-Fingerprint": r.fingerprint,
        "Cache-Control": "no-store",
    })


async def read_body(request: Request, limit: int = MAX_BODY_BYTES, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` (by its Content-Length, or
    while it streams in) and with 408 when it takes longer than `timeout_s`: never more than `limit` bytes held."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body larger than {limit} bytes")
    chunks, size = [], 0
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"request body larger than {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise HTTPException(408, "request body not received in time") from None
    return b"".join(chunks)


async def read_accept_body(request: Request) -> AcceptRequest | None:
    """The optional AcceptRequest of an accept call (None for an empty body); invalid bodies answer 422."""
    data = await read_body(request)
    if not data:  # no body at all: the terms shown now are accepted
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(400, "request body is not UTF-8 JSON") from None
    try:
        return AcceptRequest.model_validate_json(text)
    except ValidationError as e:
        # No "input" in the answer: the client's bytes are not echoed back.
        errors = [{"type": err["type"], "loc": ("body", *err["loc"]), "msg": err["msg"]}
                  for err in e.errors(include_url=False, include_context=False)]
        raise RequestValidationError(errors) from None
