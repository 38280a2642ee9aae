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
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from router.config import Config
from router.server import Service


class RouterThread:
    def __init__(
        self,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
        **settings: Any,
    ) -> None:
        settings.setdefault("listen", "127.0.0.1:0")
        settings.setdefault("demo", False)
        settings.setdefault("access_log", False)
        settings.setdefault("retry_window", 0.3)
        self.config = Config(**settings)
        # The stdlib loop unless told otherwise (``uvloop.new_event_loop``
        # is what ``serve`` runs on).
        self.loop = (loop_factory or asyncio.new_event_loop)()
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

    def begin_drain(self) -> Any:
        """Start the shutdown drain without waiting for it (a future)."""
        return asyncio.run_coroutine_threadsafe(self.service.drain(), self.loop)

    def stop(self) -> None:
        async def _stop() -> None:
            await self.service.drain()
            # Let the connections closed by the drain see connection_lost,
            # so no transport is left for the garbage collector to find.
            await asyncio.sleep(0.05)

        with contextlib.suppress(Exception):
            self.call(_stop(), timeout=15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request with JSON describing what it received."""

    protocol_version = "HTTP/1.1"
    # Head and body are two writes: with Nagle on, a kept-alive connection
    # waits out the client's delayed ACK (40 ms) between them.
    disable_nagle_algorithm = True
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
        # A short poll keeps ``stop`` (which waits for one poll) quick.
        self._thread = threading.Thread(
            target=self.serve_forever, args=(0.05,), daemon=True
        )
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


def serve_refused(*flags: str, timeout: float = 30) -> str:
    """Run ``edge-router serve`` on loopback with ``flags``; it must refuse
    to start.  Returns what it wrote to stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "router", "serve", "--listen", "127.0.0.1:0", *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode != 0, proc.stderr
    return proc.stderr


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


# ---------------------------------------------------------------------------
# Raw clients and scripted upstreams, for the data-path tests that need to see
# or send exact bytes (framing, pipelining, half-sent heads, cut streams).


class Response:
    """One HTTP response as read off a socket, header names as sent."""

    def __init__(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        head: bytes,
        interim: list[bytes],
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.head = head
        self.interim = interim

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        lname = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.headers if k.lower() == lname]

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.head!r} body={self.body[:200]!r}>"


class Wire:
    """A client socket to the router with a read buffer, so that responses
    on one connection (keep-alive, pipelining) are read one at a time."""

    def __init__(self, port: int, timeout: float = 5) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.eof = False

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        """Read once more; False at EOF (a reset counts as EOF)."""
        if self.eof:
            return False
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def _take_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            if not self._fill():
                raise EOFError(f"EOF before {marker!r}; have {self.buf[:200]!r}")
        end = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def _take(self, size: int) -> bytes:
        while len(self.buf) < size:
            if not self._fill():
                raise EOFError(f"EOF after {len(self.buf)} of {size} body bytes")
        out, self.buf = self.buf[:size], self.buf[size:]
        return out

    def read_some(self) -> bytes:
        """Whatever is buffered, else one read (b"" at EOF)."""
        if not self.buf:
            self._fill()
        out, self.buf = self.buf, b""
        return out

    def head(self) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes]:
        raw = self._take_until(b"\r\n\r\n")
        lines = raw[:-4].split(b"\r\n")
        version, status, reason = [*lines[0].split(b" ", 2), b""][:3]
        assert version in (b"HTTP/1.1", b"HTTP/1.0"), raw
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name, value.strip(b" \t")))
        return int(status), reason, headers, raw

    def response(self, head_request: bool = False) -> Response:
        """Read one complete response, interim (1xx) heads collected."""
        interim = []
        while True:
            status, reason, headers, raw = self.head()
            if 100 <= status < 200 and status != 101:
                interim.append(raw)
                continue
            break
        names = {k.lower(): v for k, v in headers}
        if head_request or status in (204, 304) or status < 200:
            body = b""
        elif names.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = self._chunked()
        elif b"content-length" in names:
            body = self._take(int(names[b"content-length"]))
        else:
            while self._fill():
                pass
            body, self.buf = self.buf, b""
        return Response(status, reason, headers, body, raw, interim)

    def _chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self._take_until(b"\r\n").split(b";")[0], 16)
            if size == 0:
                while self._take_until(b"\r\n") != b"\r\n":
                    pass
                return b"".join(parts)
            parts.append(self._take(size))
            assert self._take(2) == b"\r\n"

    def closed_within(self, seconds: float) -> bool:
        """True if the router closes this connection within ``seconds``;
        bytes that arrive meanwhile are kept in ``buf``."""
        end = time.monotonic() + seconds
        old = self.sock.gettimeout()
        try:
            while not self.eof:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.sock.settimeout(left)
                try:
                    self._fill()
                except TimeoutError:
                    return False
            return True
        finally:
            self.sock.settimeout(old)


def request_bytes(
    host: str,
    path: str = "/",
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    version: str = "1.1",
) -> bytes:
    """A request head (and body), Host first, Content-Length when a body."""
    lines = [f"{method} {path} HTTP/{version}", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Peer:
    """The upstream side of one connection from the router."""

    def __init__(self, sock: socket.socket, server: ScriptedUpstream) -> None:
        self.sock = sock
        self.server = server
        self.buf = b""

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return False
        self.buf += chunk
        return True

    def read_head(self) -> bytes:
        """The next request head, recorded in ``server.heads``; b"" at EOF."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return b""
        end = self.buf.index(b"\r\n\r\n") + 4
        head, self.buf = self.buf[:end], self.buf[end:]
        self.server.heads.append(head)
        return head

    def read_exact(self, size: int) -> bytes:
        while len(self.buf) < size:
            if not self._fill():
                raise EOFError("router closed mid-body")
        out, self.buf = self.buf[:size], self.buf[size:]
        return out

    def read_request(self) -> tuple[bytes, bytes] | None:
        """One request with a Content-Length body (or none); None at EOF."""
        head = self.read_head()
        if not head:
            return None
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return head, self.read_exact(length)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def closed_within(self, seconds: float) -> bool:
        """True if the router closes its side within ``seconds``."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            readable, _, _ = select.select([self.sock], [], [], left)
            if readable and not self._fill():
                return True
        return False


class ScriptedUpstream:
    """A TCP server whose every connection runs ``script(peer)`` in a thread.

    Scripts write raw bytes, so a test can send exactly the response it
    needs: a cut body, a slow stream, a head that never comes.  Exceptions
    other than socket errors are kept in ``errors`` for the test to check.
    """

    def __init__(self, script: Callable[[Peer], None], port: int = 0) -> None:
        self.script = script
        self.heads: list[bytes] = []
        self.errors: list[BaseException] = []
        self.connections = 0
        self.notes: dict[str, Any] = {}
        self._stop = threading.Event()
        self._peers: list[socket.socket] = []
        self._lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(128)
        self.listener.settimeout(0.1)
        self.port = int(self.listener.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def __enter__(self) -> ScriptedUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            sock.settimeout(10)
            with self._lock:
                self.connections += 1
                self._peers.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            self.script(Peer(sock, self))
        except OSError:
            pass
        except BaseException as exc:  # handed to the test thread
            self.errors.append(exc)
        finally:
            sock.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()
        with self._lock:
            for sock in self._peers:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def answer_with(response: bytes) -> Callable[[Peer], None]:
    """A script that answers every request on a connection with ``response``."""

    def script(peer: Peer) -> None:
        while peer.read_request() is not None:
            peer.send(response)

    return script


# ---------------------------------------------------------------------------
# A router in its own process (uvloop, as ``edge-router serve`` runs), for
# the tests that watch its memory.  Routes are made before it prints its
# port; SIGTERM drains it.

_ROUTER_PROGRAM = """
import asyncio, json, signal, sys
import uvloop
from router.config import Config
from router.server import Service

async def main():
    service = Service(Config(**json.loads(sys.argv[1])))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, service.stopping.set)
    await service.start()
    results = [(await service.router.commit([op])).results[0]
               for op in json.loads(sys.argv[2])]
    print(json.dumps({"port": service.public_port, "results": results}), flush=True)
    await service.stopping.wait()
    await service.drain()

uvloop.run(main())
"""


class RouterProcess:
    def __init__(self, ops: list[dict[str, Any]], **settings: Any) -> None:
        settings.setdefault("listen", "127.0.0.1:0")
        settings.setdefault("demo", False)
        settings.setdefault("access_log", False)
        settings.setdefault("log_level", "warning")
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _ROUTER_PROGRAM,
                json.dumps(settings),
                json.dumps(ops),
            ],
            cwd=root,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError("router process did not start")
        info = json.loads(line)
        self.port: int = info["port"]
        self.results: list[dict[str, Any]] = info["results"]

    def __enter__(self) -> RouterProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def rss_kib(self) -> int:
        """Resident memory now, from /proc (Linux only)."""
        return self._status_kib("VmRSS")

    def peak_rss_kib(self) -> int:
        return self._status_kib("VmHWM")

    def _status_kib(self, field: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise LookupError(field)

    def stop(self) -> None:
        stop_process(self.proc, 15)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def stop_process(proc: subprocess.Popen[Any], seconds: float) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``seconds``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def router_factory(**defaults: Any) -> Iterator[Callable[..., RouterThread]]:
    """Make routers with test settings; all are stopped on the way out.

    ``grace`` defaults to one second so that stopping a router that still
    has connections (the drain waits for them) stays quick.
    """
    made: list[RouterThread] = []
    defaults.setdefault("grace", 1.0)

    def make(**settings: Any) -> RouterThread:
        router = RouterThread(**{**defaults, **settings})
        made.append(router)
        return router

    try:
        yield make
    finally:
        for router in made:
            router.stop()
