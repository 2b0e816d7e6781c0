"""The catalog's pages in a real browser: headless Debian Chromium, driven over the DevTools protocol, opens the index
and a release page served by a real uvicorn on loopback. Both render (title, headings, the releases), the console
stays free of errors (the pages' strict Content-Security-Policy turns any script or stray resource into one), every
link into the site answers 200, and a full-page screenshot of each page is kept (in tmp_path, and in
$SYNTHGATE_TEST_ARTIFACTS when set).

Chromium missing: skipped locally, a failure when $CI is set.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from flows.catalog.app import create_app
from flows.keys import fingerprint, generate_keys, load_private_key, load_public_key
from flows.publish import publish
from tests.test_catalog import _bundle, serve
from tests.test_report_chromium import START_TIMEOUT_S, Browser, _chromium, _keep

RELEASES = ("r-1", "r-2")
PAGE_TIMEOUT_S = 60
WIDTH = 1280


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory):
    """Two small signed releases served on loopback."""
    base = tmp_path_factory.mktemp("catalog-browser")
    private_path, public_path = generate_keys(base / "keys")
    private, public = load_private_key(private_path), load_public_key(public_path)
    releases = base / "releases"
    for rid, eps in zip(RELEASES, (8.0, None), strict=True):
        publish(_bundle(base / "work" / rid, private, rid, epsilon=eps, png_bytes=2_000), releases, public,
                release_id=rid)
    with serve(create_app(releases, [public])) as url:
        yield {"url": url, "fp": fingerprint(public)}


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    b = Browser(_chromium(), tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield b
    finally:
        b.close()


_PROBE = """JSON.stringify({
    title: document.title,
    h1: [...document.querySelectorAll('h1')].map(h => h.textContent.trim()),
    text: document.body ? document.body.innerText : '',
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    scripts: document.scripts.length,
    height: Math.max(document.documentElement.scrollHeight, document.body ? document.body.scrollHeight : 0),
})"""


async def _visit(ws_url: str, urls: list[str]) -> list[dict[str, Any]]:
    """Open each URL in a fresh tab; return its DOM probe, console errors, HTTP status and a full-page screenshot."""
    from websockets.asyncio.client import connect

    async with connect(ws_url, max_size=None, open_timeout=START_TIMEOUT_S) as ws:
        counter = iter(range(1, 1_000_000))
        events: list[dict[str, Any]] = []

        async def call(method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
            msg_id = next(counter)
            msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
            if session:
                msg["sessionId"] = session
            await ws.send(json.dumps(msg))
            while True:
                reply = json.loads(await ws.recv())
                if reply.get("id") == msg_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
                events.append(reply)

        async def until(method: str, session: str) -> None:
            if any(e.get("method") == method and e.get("sessionId") == session for e in events):
                return
            while True:
                e = json.loads(await ws.recv())
                events.append(e)
                if e.get("method") == method and e.get("sessionId") == session:
                    return

        results = []
        for url in urls:
            target = (await call("Target.createTarget", {"url": "about:blank"}))["targetId"]
            session = (await call("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                await call(f"{domain}.enable", session=session)
            await call("Page.navigate", {"url": url}, session=session)
            await until("Page.loadEventFired", session)
            value = (await call("Runtime.evaluate", {"expression": _PROBE, "returnByValue": True},
                                session=session))["result"]["value"]
            dom = json.loads(value)
            await call("Emulation.setDeviceMetricsOverride",
                       {"width": WIDTH, "height": 800, "deviceScaleFactor": 1, "mobile": False}, session=session)
            height = max(1, min(dom["height"], 16000))
            shot = await call("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1},
            }, session=session)
            mine = [e for e in events if e.get("sessionId") == session]
            errors = [f'{e["params"]["entry"]["text"]} [{e["params"]["entry"].get("url", "")}]' for e in mine
                      if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"]
            errors += [" ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"])
                       for e in mine if e.get("method") == "Runtime.consoleAPICalled"
                       and e["params"]["type"] in ("error", "assert")]
            errors += [e["params"]["exceptionDetails"].get("text", "exception") for e in mine
                       if e.get("method") == "Runtime.exceptionThrown"]
            document = [e["params"]["response"]["status"] for e in mine
                        if e.get("method") == "Network.responseReceived" and e["params"].get("type") == "Document"]
            results.append({"dom": dom, "errors": errors, "status": document[0] if document else None,
                            "screenshot": base64.b64decode(shot["data"])})
            await call("Target.closeTarget", {"targetId": target})
        return results


def _internal_links(links: list[str], base: str) -> set[str]:
    origin = urlsplit(base).netloc
    return {urldefrag(link).url for link in links if urlsplit(link).netloc == origin}


def _check_shot(data: bytes) -> None:
    shot = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    assert shot.shape[1] == WIDTH and shot.shape[0] >= 200 and shot.std() > 5  # a real, non-blank page


def test_catalog_pages_render_in_chromium(browser: Browser, catalog: dict[str, Any], tmp_path: Path) -> None:
    url = catalog["url"]
    # The last page is a control: a missing release answers 404, which Chromium reports on the console, so a
    # console-error check that saw nothing could not be a check that sees nothing ever.
    pages = [url + "/", url + "/releases/r-1", url + "/releases/no-such-release"]
    index, release, control = asyncio.run(asyncio.wait_for(_visit(browser.ws_url(), pages), PAGE_TIMEOUT_S))

    assert index["status"] == 200 and release["status"] == 200, (index["status"], release["status"])
    assert index["errors"] == [], index["errors"]
    assert release["errors"] == [], release["errors"]
    assert index["dom"]["scripts"] == 0 and release["dom"]["scripts"] == 0
    assert index["dom"]["title"] and release["dom"]["title"]
    for rid in RELEASES:
        assert rid in index["dom"]["text"]
    assert "ε = 8" in index["dom"]["text"] and "cc-by-4.0" in index["dom"]["text"]
    assert "Card" in release["dom"]["h1"], release["dom"]["h1"]
    assert catalog["fp"] in release["dom"]["text"] and "synthgate verify r-1" in release["dom"]["text"]
    assert "<script>" in release["dom"]["text"]  # the card's raw HTML is shown as text, not run

    assert control["status"] == 404 and any("404" in e for e in control["errors"]), control["errors"]

    index_links = _internal_links(index["dom"]["links"], url)
    assert {f"{url}/releases/{rid}" for rid in RELEASES} <= index_links, index_links
    release_links = _internal_links(release["dom"]["links"], url)
    assert f"{url}/releases/r-1/report" in release_links, release_links
    with httpx.Client(follow_redirects=True, timeout=30) as client:
        statuses = {link: client.get(link).status_code for link in sorted(index_links | release_links)}
    assert set(statuses.values()) == {200}, statuses

    for name, result in (("index", index), ("release", release)):
        _check_shot(result["screenshot"])
        _keep(f"catalog-{name}.png", result["screenshot"], tmp_path)
