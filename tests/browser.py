"""Shared headless-Chromium machinery for the browser tests: find the binary (skip locally, fail under $CI), run one
Chromium process with a DevTools websocket, visit pages over the DevTools protocol (`websockets`) collecting a DOM
probe, console errors, the document's HTTP status and a full-page screenshot, and keep screenshots as artifacts.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run")
START_TIMEOUT_S = 60
PAGE_TIMEOUT_S = 60
WIDTH = 1280
MAX_SHOT_HEIGHT = 16000


def chromium_binary() -> str:
    """Path of a Chromium binary; skips the test when there is none, or fails it when $CI is set."""
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
    """One headless Chromium process with a DevTools websocket (`ws_url()`); a context manager that closes it."""

    def __init__(self, binary: str, profile: Path) -> None:
        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        self.stderr: list[str] = []
        self._ws_url: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()  # keeps the pipe from filling up

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip())
            if "DevTools listening on " in line and self._ws_url is None:
                self._ws_url = line.split("DevTools listening on ", 1)[1].strip()
                self._ready.set()
        self._ready.set()

    def ws_url(self) -> str:
        """The DevTools websocket URL, waiting up to START_TIMEOUT_S for Chromium to announce it."""
        self._ready.wait(START_TIMEOUT_S)
        if self._ws_url is None:
            tail = "\n".join(self.stderr[-20:])
            raise RuntimeError(f"chromium did not open a DevTools port (exit {self.proc.poll()}):\n{tail}")
        return self._ws_url

    def close(self) -> None:
        """Stop the Chromium process group this test started."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def keep_artifact(name: str, data: bytes, tmp_path: Path) -> Path:
    """Write `data` to tmp_path/name, and copy it into $SYNTHGATE_TEST_ARTIFACTS when that is set."""
    path = tmp_path / name
    path.write_bytes(data)
    artifacts = os.environ.get("SYNTHGATE_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(artifacts) / name)
    return path


def _console_errors(events: list[dict[str, Any]]) -> list[str]:
    """Console errors of one tab: log entries at level error, console.error/assert calls, uncaught exceptions."""
    errors = [f'{e["params"]["entry"]["text"]} [{e["params"]["entry"].get("url", "")}]' for e in events
              if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"]
    errors += [" ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"])
               for e in events if e.get("method") == "Runtime.consoleAPICalled"
               and e["params"]["type"] in ("error", "assert")]
    errors += [e["params"]["exceptionDetails"].get("text", "exception") for e in events
               if e.get("method") == "Runtime.exceptionThrown"]
    return errors


async def visit(ws_url: str, urls: list[str], *, probe_js: str, network: bool = False) -> list[dict[str, Any]]:
    """Open each URL in a fresh tab once it has loaded; return per page {"dom": the JSON.stringify'd result of
    `probe_js` parsed (it must include `height`), "errors": console errors, "status": the document's HTTP status
    (None unless `network`), "screenshot": full-page PNG bytes, WIDTH wide}."""
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
                events.append(reply)  # an event that arrived before the reply: kept for `until` and the errors

        async def until(method: str, session: str) -> None:
            if any(e.get("method") == method and e.get("sessionId") == session for e in events):
                return
            while True:
                e = json.loads(await ws.recv())
                events.append(e)
                if e.get("method") == method and e.get("sessionId") == session:
                    return

        domains = ("Page", "Runtime", "Log", "Network") if network else ("Page", "Runtime", "Log")
        results = []
        for url in urls:
            target = (await call("Target.createTarget", {"url": "about:blank"}))["targetId"]
            session = (await call("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
            for domain in domains:
                await call(f"{domain}.enable", session=session)
            await call("Page.navigate", {"url": url}, session=session)
            await until("Page.loadEventFired", session)
            value = (await call("Runtime.evaluate", {"expression": probe_js, "returnByValue": True},
                                session=session))["result"]["value"]
            dom = json.loads(value)
            await call("Emulation.setDeviceMetricsOverride",
                       {"width": WIDTH, "height": 800, "deviceScaleFactor": 1, "mobile": False}, session=session)
            height = max(1, min(dom["height"], MAX_SHOT_HEIGHT))
            shot = await call("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1},
            }, session=session)
            mine = [e for e in events if e.get("sessionId") == session]
            document = [e["params"]["response"]["status"] for e in mine
                        if e.get("method") == "Network.responseReceived" and e["params"].get("type") == "Document"]
            results.append({"dom": dom, "errors": _console_errors(mine), "status": document[0] if document else None,
                            "screenshot": base64.b64decode(shot["data"])})
            await call("Target.closeTarget", {"targetId": target})
        return results
