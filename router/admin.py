"""``--admin HOST:PORT``: health and counters for operators, over HTTP.

``GET /healthz`` answers 200 while the router runs (503 while it drains),
``GET /stats`` the same JSON as the control socket's ``stats`` operation
(table version and sizes, the data path's counters).  Requests are few and
small, so this listener uses h11 as it is, without the compiled fast path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import h11
import orjson


class AdminConnection(asyncio.Protocol):
    def __init__(
        self, stats: Callable[[], dict[str, Any]], draining: Callable[[], bool]
    ):
        self.stats = stats
        self.draining = draining
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        while self.transport is not None:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                self.transport.close()
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                # One request answered; a kept-alive client may send another.
                if self.conn.our_state is h11.DONE:
                    self.conn.start_next_cycle()
                    continue
                self.transport.close()
                return
            if isinstance(event, h11.Request):
                self._answer(event)
            elif isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return

    def _answer(self, request: h11.Request) -> None:
        path = request.target.split(b"?", 1)[0]
        if request.method not in (b"GET", b"HEAD"):
            self._send(
                405,
                {"error": "Only GET and HEAD", "code": "METHOD_NOT_ALLOWED"},
                [(b"allow", b"GET, HEAD")],  # RFC 9110 §15.5.6: a 405 says so
            )
        elif path == b"/healthz":
            if self.draining():
                self._send(503, {"status": "draining"})
            else:
                self._send(200, {"status": "ok"})
        elif path == b"/stats":
            self._send(200, self.stats())
        else:
            self._send(404, {"error": "Try /healthz or /stats", "code": "NOT_FOUND"})

    def _send(
        self,
        status: int,
        payload: dict[str, Any],
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        assert self.transport is not None
        body = orjson.dumps(payload)
        out = self.conn.send(
            h11.Response(
                status_code=status,
                reason=HTTPStatus(status).phrase.encode(),
                headers=[
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body)),
                    (b"cache-control", b"no-store"),
                    *(extra or ()),
                ],
            )
        )
        data = self.conn.send(h11.Data(data=body))
        end = self.conn.send(h11.EndOfMessage())
        self.transport.write(b"".join(x for x in (out, data, end) if x))
        if self.conn.our_state is h11.MUST_CLOSE:
            self.transport.close()
