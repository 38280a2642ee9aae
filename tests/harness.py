"""Real routers and real upstreams on 127.0.0.1 for the data-path tests.

``RouterThread`` runs a whole ``Service`` (the same object ``edge-router
serve`` runs) on its own event loop in a background thread, so a test can
change routes through ``Router.commit`` and then talk to the listener with
ordinary clients.  ``Upstream`` is a real HTTP/1.1 server (the standard
library's, in threads) that records what it received.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from router.config import Config
from router.server import Service


class RouterThread:
    def __init__(self, **settings: Any) -> None:
        settings.setdefault("listen", "127.0.0.1:0")
        settings.setdefault("demo", False)
        settings.setdefault("access_log", False)
        settings.setdefault("retry_window", 0.3)
        self.config = Config(**settings)
        self.loop = asyncio.new_event_loop()
        self.service = Service(self.config)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.service.start())
        except BaseException as exc:  # handed to the test thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    @property
    def port(self) -> int:
        return self.service.public_port

    def call(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def commit(self, *ops: dict[str, Any], batch: bool = False) -> Any:
        assert self.service.router is not None
        txn = self.call(self.service.router.commit(list(ops), batch=batch))
        return txn.results

    def expose(self, sandbox: str, port: int, **args: Any) -> dict[str, Any]:
        op = {"op": "expose_port", "sandbox": sandbox, "port": port, **args}
        result: dict[str, Any] = self.commit(op)[0]
        return result

    def host(self, exposed: dict[str, Any]) -> str:
        """The Host header of an exposed port's URL."""
        return str(exposed["url"]).split("//", 1)[1].rstrip("/")

    def stop(self) -> None:
        async def _stop() -> None:
            await self.service.drain()

        with contextlib.suppress(Exception):
            self.call(_stop(), timeout=15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request with JSON describing what it received."""

    protocol_version = "HTTP/1.1"
    server: UpstreamServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        seen = {
            "method": self.command,
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body": body.decode("latin-1"),
        }
        self.server.seen.append(seen)
        out = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle


class UpstreamServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.seen: list[dict[str, Any]] = []
        self.port = self.server_address[1]
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def raw_request(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send bytes, read until the router closes or ``timeout`` passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def upstream(
    handler: type[http.server.BaseHTTPRequestHandler] = Recorder,
) -> Iterator[UpstreamServer]:
    server = UpstreamServer(handler)
    try:
        yield server
    finally:
        server.stop()
