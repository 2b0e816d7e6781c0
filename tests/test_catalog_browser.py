"""The catalog's pages in a real browser: headless Debian Chromium, driven over the DevTools protocol, opens the index
and a release page served by a real uvicorn on loopback. Both render (title, headings, the releases), the console
stays free of errors (the pages' strict Content-Security-Policy turns any script or stray resource into one), every
link into the site answers 200, and a full-page screenshot of each page is kept (in tmp_path, and in
$SYNTHGATE_TEST_ARTIFACTS when set).

Chromium missing: skipped locally, a failure when $CI is set.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from flows.catalog.app import create_app
from flows.keys import fingerprint
from tests.browser import PAGE_TIMEOUT_S, WIDTH, Browser, chromium_binary, keep_artifact, visit
from tests.test_catalog import publish_releases, serve

RELEASES = ("r-1", "r-2")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory):
    """Two small signed releases served on loopback."""
    base = tmp_path_factory.mktemp("catalog-browser")
    releases, public, _ = publish_releases(base, [(rid, eps, 2_000) for rid, eps in zip(RELEASES, (8.0, None),
                                                                                         strict=True)])
    with serve(create_app(releases, [public])) as url:
        yield {"url": url, "fp": fingerprint(public)}


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    with Browser(chromium_binary(), tmp_path_factory.mktemp("chromium-profile")) as b:
        yield b


_PROBE = """JSON.stringify({
    title: document.title,
    h1: [...document.querySelectorAll('h1')].map(h => h.textContent.trim()),
    text: document.body ? document.body.innerText : '',
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    scripts: document.scripts.length,
    height: Math.max(document.documentElement.scrollHeight, document.body ? document.body.scrollHeight : 0),
})"""


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
    visiting = visit(browser.ws_url(), pages, probe_js=_PROBE, network=True)
    index, release, control = asyncio.run(asyncio.wait_for(visiting, PAGE_TIMEOUT_S))

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
        keep_artifact(f"catalog-{name}.png", result["screenshot"], tmp_path)
