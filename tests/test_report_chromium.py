"""The audit report in a real browser: headless Debian Chromium renders both variants with every section, every
embedded image decodes, and the console stays free of errors (a script or external resource would be a
Content-Security-Policy error). Driven over the DevTools protocol with `websockets`; a full-page screenshot of each
report is kept (in tmp_path, and in $SYNTHGATE_TEST_ARTIFACTS when set).

Chromium missing: skipped locally, a failure when $CI is set (CI installs the apt packages `chromium` and
`chromium-driver`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from reports.report import HTML, SECTION_IDS, render_report
from tests.report_fixtures import build_report_inputs, verdict_for

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run")
START_TIMEOUT_S = 60
PAGE_TIMEOUT_S = 60


def _chromium() -> str:
    path = os.environ.get("SYNTHGATE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and Path("/usr/bin/chromium").exists():
        path = "/usr/bin/chromium"
    if path is None:
        message = "headless Chromium not found (Debian: apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must not skip the browser test")
        pytest.skip(message)
    return path


class Browser:
    """One headless Chromium process with a DevTools websocket; `load` opens a page and reports what happened."""

    def __init__(self, binary: str, profile: Path) -> None:
        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        self.stderr: list[str] = []
        self._ws_url: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()  # keeps the pipe from filling up

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip())
            if "DevTools listening on " in line and self._ws_url is None:
                self._ws_url = line.split("DevTools listening on ", 1)[1].strip()
                self._ready.set()
        self._ready.set()

    def ws_url(self) -> str:
        self._ready.wait(START_TIMEOUT_S)
        if self._ws_url is None:
            tail = "\n".join(self.stderr[-20:])
            raise RuntimeError(f"chromium did not open a DevTools port (exit {self.proc.poll()}):\n{tail}")
        return self._ws_url

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the process group this test started
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


async def _visit(ws_url: str, pages: list[Path]) -> list[dict[str, Any]]:
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
        for page in pages:
            target = (await call("Target.createTarget", {"url": "about:blank"}))["targetId"]
            session = (await call("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                await call(f"{domain}.enable", session=session)
            await call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
            await until("Page.loadEventFired", session)
            probe = """JSON.stringify({
                sections: [...document.querySelectorAll('section[id]')].map(s => s.id),
                ids: [...document.querySelectorAll('[id]')].map(e => e.id),
                images: document.images.length,
                broken: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length,
                scripts: document.scripts.length,
                title: document.title,
                height: document.documentElement.scrollHeight,
            })"""
            value = (await call("Runtime.evaluate", {"expression": probe, "returnByValue": True},
                                session=session))["result"]["value"]
            dom = json.loads(value)
            width = 1280
            shot = await call("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": min(dom["height"], 16000), "scale": 1},
            }, session=session)
            mine = [e for e in events if e.get("sessionId") == session]
            errors = [e["params"]["entry"]["text"] for e in mine
                      if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"]
            errors += [" ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"])
                       for e in mine if e.get("method") == "Runtime.consoleAPICalled"
                       and e["params"]["type"] in ("error", "assert")]
            errors += [e["params"]["exceptionDetails"].get("text", "exception") for e in mine
                       if e.get("method") == "Runtime.exceptionThrown"]
            results.append({"dom": dom, "errors": errors, "screenshot": base64.b64decode(shot["data"])})
            await call("Target.closeTarget", {"targetId": target})
        return results


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    b = Browser(_chromium(), tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield b
    finally:
        b.close()


def _keep(name: str, data: bytes, tmp_path: Path) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    artifacts = os.environ.get("SYNTHGATE_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(artifacts) / name)
    return path


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
    results = asyncio.run(asyncio.wait_for(_visit(browser.ws_url(), pages), PAGE_TIMEOUT_S))
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
        _keep(f"report-{name}.png", result["screenshot"], tmp_path)

    control_result = results[2]
    assert control_result["dom"]["title"] == "c"  # the script did not run
    assert any("Content Security Policy" in e for e in control_result["errors"]), control_result["errors"]
