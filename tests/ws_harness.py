"""WebSocket peers on 127.0.0.1 for the tunnel and internal-entry tests.

``WsUpstream`` is a real WebSocket server (the ``websockets`` library, sync
API, one thread per connection) whose behaviour is chosen by the request
path and which records what it saw: request heads, and how each connection
ended.  ``RawUpstream`` is a bare TCP listener for the cases a conforming
server cannot produce (a wrong accept key, a socket dropped mid-stream).
The frame helpers let a test speak RFC 6455 by hand on a raw socket.

Every socket operation here has a timeout, so a router that hangs fails a
test instead of stalling the suite.
"""

from __future__ import annotations

import base64
import contextlib
import http
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import uvloop
from harness import RouterThread
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.client import ClientConnection, connect, unix_connect
from websockets.sync.server import ServerConnection, serve

from router import speedups

TIMEOUT = 5.0

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


@dataclass
class Ended:
    """How one upstream connection ended, as the upstream saw it."""

    path: str
    code: int | None
    reason: str
    at: float  # time.monotonic() when the handler saw the end


class WsUpstream:
    """A WebSocket server; the path picks what it does.

    ``/echo...``   echo every message back;
    ``/close``     read one message, then close with 4001 "upstream says bye";
    ``/ping``      ping the client, then send "pong seen" once the pong is in;
    ``/push``      send "tick" every 0.3 s until the connection ends;
    ``/page``      plain HTTP: 200 and a JSON body naming the Host it got;
    ``/deny``      plain HTTP: 403 "nope" instead of a 101.
    """

    def __init__(self, subprotocol: str | None = None) -> None:
        self.requests: list[tuple[str, Headers]] = []
        self.ended: list[Ended] = []
        self._changed = threading.Condition()
        self._subprotocol = subprotocol
        self.server = serve(
            self._handle,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            select_subprotocol=self._select if subprotocol else None,
            ping_interval=None,
            max_size=None,
            open_timeout=TIMEOUT,
            close_timeout=TIMEOUT,
        )
        self.port: int = self.server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def __enter__(self) -> WsUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self._thread.join(TIMEOUT)

    # -- what the server does ---------------------------------------------

    def _process_request(
        self, conn: ServerConnection, request: Request
    ) -> Response | None:
        with self._changed:
            self.requests.append((request.path, request.headers))
            self._changed.notify_all()
        if request.path == "/page":
            body = json.dumps({"host": request.headers.get("Host")})
            return conn.respond(http.HTTPStatus.OK, body)
        if request.path == "/deny":
            return conn.respond(http.HTTPStatus.FORBIDDEN, "nope")
        return None

    def _select(self, conn: ServerConnection, offered: Any) -> str | None:
        return self._subprotocol if self._subprotocol in offered else None

    def _handle(self, conn: ServerConnection) -> None:
        path = conn.request.path if conn.request is not None else ""
        try:
            if path.startswith("/echo"):
                for message in conn:
                    conn.send(message)
            elif path == "/close":
                conn.recv(TIMEOUT)
                conn.close(4001, "upstream says bye")
            elif path == "/ping":
                pong = conn.ping(b"from upstream")
                if pong.wait(TIMEOUT):
                    conn.send("pong seen")
                conn.recv(TIMEOUT)
            elif path == "/push":
                while True:
                    conn.send("tick")
                    time.sleep(0.3)
        except (ConnectionClosed, TimeoutError):
            pass
        # Wait for the end of the closing handshake (or the socket) so that
        # the code we record is the one the peer sent.
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            while True:
                conn.recv(TIMEOUT)
        with self._changed:
            self.ended.append(
                Ended(path, conn.close_code, conn.close_reason or "", time.monotonic())
            )
            self._changed.notify_all()

    # -- waiting for what it saw -------------------------------------------

    def wait_requests(self, count: int, timeout: float = TIMEOUT) -> None:
        with self._changed:
            ok = self._changed.wait_for(lambda: len(self.requests) >= count, timeout)
        assert ok, f"upstream saw {len(self.requests)} requests, expected {count}"

    def wait_ended(self, count: int, timeout: float = TIMEOUT) -> list[Ended]:
        with self._changed:
            ok = self._changed.wait_for(lambda: len(self.ended) >= count, timeout)
        assert ok, f"{len(self.ended)} upstream connections ended, expected {count}"
        return list(self.ended)


class RawUpstream:
    """A TCP listener that hands each accepted socket to ``serve_one``."""

    def __init__(self, serve_one: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self._serve_one = serve_one
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def __enter__(self) -> RawUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._accepter.join(TIMEOUT)
        self.listener.close()
        for sock in self._socks:
            sock.close()
        for thread in self._threads:
            thread.join(TIMEOUT)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(TIMEOUT)
            self._socks.append(sock)
            thread = threading.Thread(target=self._run, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self._serve_one(sock)


def router_maker(loop: str, **defaults: Any) -> Iterator[Callable[..., RouterThread]]:
    """For a fixture: make routers on the stdlib loop or on uvloop (what
    ``serve`` runs); those still running at the end are stopped.

    ``grace`` defaults to one second, so that a failed test's teardown does
    not wait long for connections it left open.
    """
    factory = uvloop.new_event_loop if loop == "uvloop" else None
    defaults.setdefault("grace", 1.0)
    made: list[RouterThread] = []

    def make(**settings: Any) -> RouterThread:
        made.append(RouterThread(loop_factory=factory, **{**defaults, **settings}))
        return made[-1]

    try:
        yield make
    finally:
        for router in made:
            if router.loop.is_running():
                router.stop()


# -- clients ------------------------------------------------------------------


def ws_connect(port: int, host: str, path: str = "/echo", **options: Any) -> Any:
    """A websockets client to the router's listener, for the URL of ``host``.

    The client cannot resolve ``*.localhost`` names itself, so it gets a
    socket already connected to the router.  Keep-alive pings are off: a
    tunnel's traffic is exactly what the test sends.  Use it as a context
    manager (``with ws_connect(...) as ws``): the handshake happens there.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    options.setdefault("ping_interval", None)
    options.setdefault("max_size", None)
    options.setdefault("open_timeout", TIMEOUT)
    options.setdefault("close_timeout", TIMEOUT)
    return connect(f"ws://{host}{path}", sock=sock, **options)


def ws_connect_unix(
    path: str, host: str, url_path: str = "/echo", **options: Any
) -> Any:
    options.setdefault("ping_interval", None)
    options.setdefault("open_timeout", TIMEOUT)
    options.setdefault("close_timeout", TIMEOUT)
    return unix_connect(path, f"ws://{host}{url_path}", **options)


def echo(ws: ClientConnection, message: str | bytes = "hello") -> None:
    """One round trip through a tunnel."""
    ws.send(message)
    assert ws.recv(TIMEOUT) == message


def closed_code(ws: ClientConnection, timeout: float = TIMEOUT) -> int | None:
    """Read until the connection ends; the close code the client received.

    ``None`` means the socket ended without a close frame.
    """
    end = time.monotonic() + timeout
    with contextlib.suppress(ConnectionClosed):
        while time.monotonic() < end:
            ws.recv(max(end - time.monotonic(), 0.01))
    rcvd = ws.protocol.close_rcvd
    return None if rcvd is None else rcvd.code


def http_request(
    port: int | str, host: str, path: str = "/", headers: str = ""
) -> tuple[int, bytes, bytes]:
    """One GET with ``Connection: close``: (status, head, body).

    ``port`` may be a Unix socket path.
    """
    if isinstance(port, str):
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(TIMEOUT)
        sock.connect(port)
    else:
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    with sock:
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close"
        sock.sendall(request.encode("latin-1") + b"\r\n\r\n")
        data = read_to_eof(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# -- RFC 6455 by hand ---------------------------------------------------------


def new_key() -> bytes:
    return base64.b64encode(os.urandom(16))


def encode_frame(
    opcode: int, payload: bytes, mask: bool, fin: bool = True, rsv: int = 0
) -> bytes:
    """One frame with the shortest length form (RFC 6455 §5.2)."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    maskbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", first, maskbit | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, maskbit | 126, n)
    else:
        head = struct.pack("!BBQ", first, maskbit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class FrameReader:
    """Reads whole frames (unmasking them) from a socket, after a raw handshake."""

    def __init__(self, sock: socket.socket, buffered: bytes = b"") -> None:
        self.sock = sock
        self.buf = buffered

    def _need(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("socket closed mid-frame")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def frame(self) -> tuple[int, bytes]:
        b0, b1 = self._need(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._need(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._need(8))[0]
        key = self._need(4) if b1 & 0x80 else b""
        payload = self._need(n)
        if key:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        return b0 & 0x0F, payload

    def at_eof(self) -> bool:
        """True when the peer has closed and nothing is left to read."""
        return not self.buf and self.sock.recv(1) == b""


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """An HTTP head (without the blank line) and whatever came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"closed before a whole head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def switching_protocols(request_head: bytes, accept: bytes | None = None) -> bytes:
    """A 101 answer to a raw upgrade request; ``accept`` overrides the key."""
    key = header(request_head, b"sec-websocket-key") or b""
    if accept is None:
        accept = speedups.tunnel.accept_key(key)
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


def upgrade_request(
    host: str,
    path: str = "/echo",
    connection: str = "Upgrade",
    upgrade: str = "websocket",
    key: bytes = b"dGhlIHNhbXBsZSBub25jZQ==",
) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: {connection}\r\n"
        f"Upgrade: {upgrade}\r\nSec-WebSocket-Version: 13\r\n".encode()
        + b"Sec-WebSocket-Key: "
        + key
        + b"\r\n\r\n"
    )


@contextlib.contextmanager
def raw_upgrade(
    port: int,
    host: str,
    path: str = "/echo",
    connection: str = "Upgrade",
    upgrade: str = "websocket",
    key: bytes = b"dGhlIHNhbXBsZSBub25jZQ==",
) -> Iterator[tuple[bytes, FrameReader, socket.socket]]:
    """A hand-made upgrade request: yields (response head, reader, socket)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    with sock:
        sock.sendall(upgrade_request(host, path, connection, upgrade, key))
        head, rest = read_head(sock)
        yield head, FrameReader(sock, rest), sock
