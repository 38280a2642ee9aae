"""A real browser and a dev-server-like upstream, for the browser tests.

``DevServer`` plays what sits behind a preview URL in practice (a Vite dev
server, say): it serves a page, a Server-Sent Events stream and a WebSocket
with a subprotocol on one port, and records every request head it gets.
HTTP is the standard library's server; the WebSocket handshake and frames
are wsproto's, so the upstream accepts permessage-deflate as real dev
servers do.  The page's script reports what the browser saw by POSTing JSON
to ``/report`` on a second preview URL of the same server, so that it can
still report after its own URL has been revoked.

``Chromium`` runs Debian's headless Chromium on one URL.  Chromium resolves
every ``*.localhost`` name to the loopback address by itself, so the browser
uses the preview URL as a user would: no resolver tricks, the Host header is
the browser's own.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from harness import stop_process
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

TIMEOUT = 15.0
SSE_EVENTS = 3
SSE_GAP = 0.3  # seconds between two events of /events
COOKIE = "sid=s3cret"

PAGE = Path(__file__).with_name("browser_page.html").read_bytes()


class DevServer(http.server.ThreadingHTTPServer):
    """The upstream: ``/`` page, ``/events`` SSE, ``/hmr`` WebSocket echo,
    ``POST /report`` the page's findings."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _DevHandler)
        self.port: int = self.server_address[1]
        self.heads: list[tuple[str, dict[str, str]]] = []
        self.reports: list[dict[str, Any]] = []
        self.closes: list[tuple[int, str]] = []
        self.changed = threading.Condition()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def record(self, kind: str, item: Any) -> None:
        with self.changed:
            getattr(self, kind).append(item)
            self.changed.notify_all()

    def wait_report(self, stage: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The page's report of ``stage``; fails with every report so far."""

        def found() -> dict[str, Any] | None:
            for report in self.reports:
                if report.get("stage") in (stage, "error"):
                    return report
            return None

        with self.changed:
            self.changed.wait_for(lambda: found() is not None, timeout)
            report = found()
        assert report is not None, f"no {stage!r} report; got {self.reports}"
        assert report["stage"] == stage, f"the page failed: {report}"
        return report

    def wait_closes(
        self, count: int, timeout: float = TIMEOUT
    ) -> list[tuple[int, str]]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.closes) >= count, timeout)
            return list(self.closes)

    def head_of(self, method: str, path: str) -> dict[str, str]:
        """The first request head for ``path`` (query string ignored)."""
        for request_line, headers in self.heads:
            verb, target, _ = request_line.split(" ", 2)
            if verb == method and target.split("?")[0] == path:
                return headers
        raise AssertionError(f"upstream got no {method} {path}: {self.heads}")


class _DevHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: DevServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _remember(self) -> dict[str, str]:
        # Header names lower-cased; a repeated header would show as its
        # last value, and none of the tests relies on repeats.
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.server.record("heads", (self.requestline, headers))
        return headers

    def do_GET(self) -> None:
        headers = self._remember()
        path = self.path.split("?")[0]
        if path == "/" and headers.get("upgrade", "").lower() != "websocket":
            self._send(200, "text/html; charset=utf-8", PAGE, cookie=True)
        elif path == "/events":
            self._events()
        elif path == "/hmr":
            self._websocket()
        else:
            self._send(404, "text/plain", b"not here")

    def do_POST(self) -> None:
        self._remember()
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path == "/report":
            self.server.record("reports", json.loads(body))
        self._send(204, "text/plain", b"")

    def _send(self, status: int, kind: str, body: bytes, cookie: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        if cookie:
            self.send_header("Set-Cookie", f"{COOKIE}; Path=/; HttpOnly; SameSite=Lax")
        self.end_headers()
        self.wfile.write(body)

    def _events(self) -> None:
        # Chunked and spaced out: a proxy that buffers the stream delivers
        # the events together at the end, which the page's clock shows.
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for n in range(1, SSE_EVENTS + 1):
            event = f"data: tick {n}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
            time.sleep(SSE_GAP)
        self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    def _websocket(self) -> None:
        # The head was read by http.server; wsproto gets it back whole.
        lines = [self.requestline] + [f"{k}: {v}" for k, v in self.headers.items()]
        ws = WSConnection(ConnectionType.SERVER)
        ws.receive_data(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        request = next(ws.events())
        assert isinstance(request, Request)
        subprotocol = "vite-hmr" if "vite-hmr" in request.subprotocols else None
        self.wfile.write(
            ws.send(
                AcceptConnection(
                    subprotocol=subprotocol, extensions=[PerMessageDeflate()]
                )
            )
        )
        self.wfile.write(ws.send(TextMessage(data='{"type":"connected"}')))
        self.close_connection = True
        self.connection.settimeout(TIMEOUT * 2)
        # wsproto hands over a message in pieces as its bytes arrive; the
        # echo is of whole messages.
        text, binary = "", b""
        with contextlib.suppress(OSError):
            while True:
                data = self.connection.recv(65536)
                ws.receive_data(data or None)
                for event in ws.events():
                    if isinstance(event, TextMessage):
                        text += event.data
                        if event.message_finished:
                            echo = TextMessage(data="echo:" + text)
                            self.wfile.write(ws.send(echo))
                            text = ""
                    elif isinstance(event, BytesMessage):
                        binary += event.data
                        if event.message_finished:
                            self.wfile.write(ws.send(BytesMessage(data=binary)))
                            binary = b""
                    elif isinstance(event, Ping):
                        self.wfile.write(ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        self.server.record("closes", (event.code, event.reason))
                        with contextlib.suppress(Exception):
                            self.wfile.write(ws.send(event.response()))
                        return
                if not data:
                    self.server.record("closes", (1006, "no close frame"))
                    return


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """Headless Chromium showing one URL until ``stop``."""

    def __init__(self, url: str) -> None:
        path = chromium_path()
        assert path is not None, "chromium is not installed"
        self._profile = tempfile.TemporaryDirectory(prefix="edge-router-chromium-")
        flags = [
            "--headless",
            "--disable-gpu",
            "--no-first-run",
            # Nothing but the page's own traffic: no background fetches
            # (this machine has no way out), no proxy, no QUIC.
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--no-proxy-server",
            f"--user-data-dir={self._profile.name}",
        ]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses root otherwise
        # A session of its own, so that its helper processes can be
        # stopped with it (they are in its process group).
        self.proc = subprocess.Popen(
            [path, *flags, url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        stop_process(self.proc, 10)
        # Chromium's helpers (zygote, renderers, crash handler) can outlive
        # the browser process for a moment, still writing in the profile:
        # removing it then failed with "Directory not empty" (seen once in
        # CI).  Stop the group, and give stragglers a few seconds.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for _ in range(50):
            try:
                self._profile.cleanup()
                return
            except OSError:
                time.sleep(0.1)
        self._profile.cleanup()
