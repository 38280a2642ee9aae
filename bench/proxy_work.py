"""The router's own work per request, without sockets: what a change to the
data path costs or saves, measured to a few percent.

``http_bench.py`` measures the whole proxy beside nginx, where three
quarters of the CPU is the kernel's and rounds vary by 5-10 %.  Here one
``ClientConnection`` and one pooled ``UpstreamConnection`` of the real data
path (``speedups.proxy``, on a real route table) are driven in process: a
request's bytes go in through ``data_received``, the upstream's answer
(nginx's 13-byte ``/small`` response, as ``http_bench.py`` sends) through
the upstream's ``data_received``, and the answer must come out whole.  The
transports are stand-ins whose methods are C builtins, so what is timed is
the parse, the route lookup, the rewrite and the pool, not a socket.

    python bench/proxy_work.py            # compiled twins
    EDGE_ROUTER_PURE=1 python bench/proxy_work.py --requests 20000

The figure is the best of ``--repeats`` runs of ``--requests`` requests, in
nanoseconds per request; pin it (``taskset -c 1``) on a shared machine.
"""

from __future__ import annotations

import argparse
import collections
import time
from typing import Any

import uvloop

from router import config, speedups
from router.routes import RouteTable

REQUEST = b"GET /small HTTP/1.1\r\nHost: 18801-bench-benchtoken.localhost:8787\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n"
    b"Date: Sat, 05 Dec 2026 12:40:57 GMT\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 13\r\nConnection: keep-alive\r\n\r\nhello, world\n"
)


class Transport:
    """Stands in for a uvloop transport; ``written`` keeps the last writes."""

    def __init__(self, peer: tuple[str, int], local: tuple[str, int]) -> None:
        self.written: collections.deque[bytes] = collections.deque(maxlen=4)
        # Builtins, not Python methods: the stand-in costs next to nothing.
        self.write = self.written.append
        self.is_closing = bool  # bool() is False
        self._extra = {"peername": peer, "sockname": local}

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    settings = config.load(None, {"EDGE_ROUTER_ACCESS_LOG": "0"})
    loop = uvloop.new_event_loop()
    table = RouteTable(("localhost",))
    table.run(
        [
            {
                "op": "expose_port",
                "sandbox": "bench",
                "port": 18801,
                "token": "benchtoken",
            }
        ]
    )
    proxy = speedups.proxy.Proxy(settings, table.forwarding, loop)

    client = proxy.protocol()
    client_side = Transport(("127.0.0.1", 40000), ("127.0.0.1", 8787))
    client.connection_made(client_side)  # type: ignore[arg-type]
    key = ("bench", ("127.0.0.1", 18801))
    up = speedups.proxy.UpstreamConnection(proxy, key)
    upstream_side = Transport(("127.0.0.1", 18801), ("127.0.0.1", 40001))
    up.connection_made(upstream_side)  # type: ignore[arg-type]
    proxy.give_back(up)

    # One request first: it must take the pooled connection and come back.
    client.data_received(REQUEST)  # type: ignore[attr-defined]
    if upstream_side.written[-1].split(b"\r\n", 1)[0] != b"GET /small HTTP/1.1":
        raise SystemExit(f"the upstream got {upstream_side.written[-1]!r}")
    up.data_received(RESPONSE)
    if not client_side.written[-1].endswith(b"\r\n\r\nhello, world\n"):
        raise SystemExit(f"the client got {client_side.written[-1]!r}")

    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.requests):
            client.data_received(REQUEST)  # type: ignore[attr-defined]
            up.data_received(RESPONSE)
        best = min(best, (time.perf_counter() - start) / args.requests)
    print(
        f"{speedups.describe()}: {best * 1e9:.0f} ns of the router's own work per "
        f"request (best of {args.repeats} x {args.requests:,})"
    )
    loop.close()


if __name__ == "__main__":
    main()
