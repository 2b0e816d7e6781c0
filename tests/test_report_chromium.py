"""The audit report in a real browser: headless Debian Chromium renders both variants with every section, every
embedded image decodes, and the console stays free of errors (a script or external resource would be a
Content-Security-Policy error). Driven over the DevTools protocol with `websockets`; a full-page screenshot of each
report is kept (in tmp_path, and in $SYNTHGATE_TEST_ARTIFACTS when set).

Chromium missing: skipped locally, a failure when $CI is set (CI installs the apt packages `chromium` and
`chromium-driver`).
"""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reports.report import HTML, SECTION_IDS, render_report
from tests.browser import PAGE_TIMEOUT_S, Browser, chromium_binary, keep_artifact, visit
from tests.report_fixtures import build_report_inputs, verdict_for

_PROBE = """JSON.stringify({
    sections: [...document.querySelectorAll('section[id]')].map(s => s.id),
    ids: [...document.querySelectorAll('[id]')].map(e => e.id),
    images: document.images.length,
    broken: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length,
    scripts: document.scripts.length,
    title: document.title,
    height: document.documentElement.scrollHeight,
})"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    with Browser(chromium_binary(), tmp_path_factory.mktemp("chromium-profile")) as b:
        yield b


def test_reports_render_in_chromium_without_console_errors(
    browser: Browser, pneumonia_slice: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
) -> None:
    inputs = build_report_inputs(tmp_path_factory.getbasetemp() / "report-inputs", pneumonia_slice)
    pages = []
    for public in (False, True):
        out = render_report(privacy_dir=inputs["privacy"], utility_dir=inputs["utility"], real_dir=inputs["real"],
                            synthetic_dir=inputs["synthetic"], model_dir=inputs["model"], verdict=verdict_for(inputs),
                            out=tmp_path / ("public" if public else "steward"), public=public)
        pages.append(out / HTML)
    # A control page: an inline script under the same policy must show up as a console error, so a report that
    # let a script through could not pass silently.
    control = tmp_path / "control.html"
    control.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><meta http-equiv='Content-Security-Policy' "
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\"><title>c</title></head>"
        "<body><script>document.title = 'ran'</script></body></html>", encoding="utf-8")
    pages.append(control)

    t0 = time.monotonic()
    urls = [page.resolve().as_uri() for page in pages]
    results = asyncio.run(asyncio.wait_for(visit(browser.ws_url(), urls, probe_js=_PROBE), PAGE_TIMEOUT_S))
    assert time.monotonic() - t0 < PAGE_TIMEOUT_S

    for name, result in zip(("steward", "public"), results[:2], strict=True):
        dom = result["dom"]
        assert dom["sections"] == list(SECTION_IDS), name
        for sub in ("memorization-pairs", "memorization-histograms", "utility-roc", "utility-metrics"):
            assert sub in dom["ids"], (name, sub)
        assert dom["images"] >= 8 and dom["broken"] == 0, (name, dom)
        assert dom["scripts"] == 0
        assert "synthgate audit report" in dom["title"]
        assert result["errors"] == [], (name, result["errors"])
        shot = np.asarray(Image.open(io.BytesIO(result["screenshot"])).convert("L"))
        assert shot.shape[1] == 1280 and shot.shape[0] > 2000 and shot.std() > 10  # a real, non-blank page
        keep_artifact(f"report-{name}.png", result["screenshot"], tmp_path)

    control_result = results[2]
    assert control_result["dom"]["title"] == "c"  # the script did not run
    assert any("Content Security Policy" in e for e in control_result["errors"]), control_result["errors"]
