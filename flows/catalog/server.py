"""How the catalog is served by uvicorn: which forwarded headers are trusted, and deadlines for idle connections.

uvicorn by default believes `X-Forwarded-For` from 127.0.0.1, so any local process (or a proxy that passes the
header through) could pick the client address the refusal throttle and the logs see. The catalog trusts forwarded
headers only from the proxies named with `--forwarded-allow-ips`, and otherwise records the socket's peer.

uvicorn starts no timer before a connection's first request, so a client that connects and sends nothing, or a
request head one byte at a time, holds the connection forever. `HeadDeadlineProtocol` closes a connection whose
request head is not complete within a fixed time after the connection opened or the previous response ended.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_TIMEOUT_S = 15.0


def head_deadline_protocol(timeout_s: float = HEAD_TIMEOUT_S) -> type[H11Protocol]:
    """An h11 protocol class that closes connections whose request head takes longer than `timeout_s`."""

    class HeadDeadlineProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_deadline()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # A request head arrived: its cycle now runs (the body has its own bound in the app).
            if self.cycle is not None and not self.cycle.response_complete:
                self._cancel_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_deadline()
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            # Absolute, not reset by each byte received: a trickled head is closed as surely as a silent one.
            self._cancel_head_deadline()
            self._head_timer = self.loop.call_later(timeout_s, self._head_deadline_passed)

        def _cancel_head_deadline(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_deadline_passed(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            if self.conn.our_state not in (h11.ERROR, h11.CLOSED):
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()

    return HeadDeadlineProtocol


def server_config(app: Any, *, host: str = "127.0.0.1", port: int = 8000, forwarded_allow_ips: str | None = None,
                  head_timeout_s: float = HEAD_TIMEOUT_S, **kwargs: Any) -> Any:
    """The uvicorn.Config the catalog runs with: forwarded headers trusted only from `forwarded_allow_ips`
    (comma-separated addresses or networks of the proxies in front; none by default), request-head deadline."""
    import uvicorn

    proxies = (forwarded_allow_ips or "").strip()
    return uvicorn.Config(app, host=host, port=port, proxy_headers=bool(proxies),
                          forwarded_allow_ips=proxies or None, http=head_deadline_protocol(head_timeout_s),
                          timeout_keep_alive=5, **kwargs)
