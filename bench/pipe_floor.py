"""The floor under any Python proxy on uvloop: bytes piped, nothing read.

``http_bench.py --floor`` runs this beside nginx and edge-router.  Each
client connection gets an upstream connection of its own, and whatever
one side sends is written to the other unchanged: no Host check, no route
lookup, no header rewrite, no HTTP framing, no pool.  What it costs per
request is what asyncio's protocol callbacks and uvloop's transports cost
for the same reads and writes edge-router makes, so edge-router's CPU over
this pipe's is the price of everything it does as a proxy.

Not a proxy to use: it relays to one fixed upstream and routes nothing.

    python bench/pipe_floor.py LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class Half(asyncio.Protocol):
    """One side of a pipe: what it reads goes to ``out``, with backpressure."""

    def __init__(self, out: asyncio.Transport | None = None) -> None:
        self.out = out
        self.transport: asyncio.Transport | None = None
        self.other: Half | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.out is None:
            self.early.append(data)  # the upstream is still connecting
        else:
            self.out.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.out is not None:
            self.out.close()

    # ``out`` is full: stop reading the side that fills it.
    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


class Client(Half):
    def __init__(self, upstream_port: int) -> None:
        super().__init__()
        self.upstream_port = upstream_port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            up, half = await loop.create_connection(
                lambda: Half(self.transport), "127.0.0.1", self.upstream_port
            )
        except OSError:
            self.transport.close()
            return
        half.other, self.other = self, half
        self.out = up
        for data in self.early:
            up.write(data)
        self.early = []


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Client(upstream_port), "127.0.0.1", port, backlog=4096
    )
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))
