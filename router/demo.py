"""The built-in demo upstream: what ``edge-router serve`` shows a newcomer.

A tiny HTTP server standing in for a program in a sandbox, so that the
quick start has something to route to with no other setup.  It uses h11
(correctness, not speed: it is a demo) and answers every request with a
short text naming what it received.
"""

from __future__ import annotations

import asyncio
import functools

import h11

from .listeners import tcp_server

DEMO_SANDBOX = "demo"
DEMO_TOKEN = "quickstart"


class DemoUpstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.conn = h11.Connection(h11.SERVER)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.conn.receive_data(data)
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                self.transport.close()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                self._answer(event)
            elif isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            self.data_received(b"")

    def _answer(self, request: h11.Request) -> None:
        assert self.transport is not None
        headers = dict(request.headers)
        body = (
            b"Hello from the edge-router demo sandbox!\n"
            b"You asked for "
            + request.target
            + b" with Host "
            + headers.get(b"host", b"-")
            + b"\nX-Forwarded-For: "
            + headers.get(b"x-forwarded-for", b"-")
            + b"\n"
        )
        out = self.conn.send(
            h11.Response(
                status_code=200,
                reason=b"OK",
                headers=[
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            )
        )
        assert out is not None
        self.transport.write(out)
        if request.method != b"HEAD":
            self.transport.write(self.conn.send(h11.Data(data=body)) or b"")
        self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")


async def start_demo(loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Server, int]:
    """Serve the demo on a free loopback port; return the server and port."""
    server = await tcp_server(
        functools.partial(loop.create_server, DemoUpstream), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    return server, port
