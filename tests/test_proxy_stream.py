"""Bodies and connections over time (SPEC §2 revocation, §4 streaming).

What these tests check happens *between* bytes: an event reaching the
client before the next is written, a closed socket noticed on the other
side, a stream cut after the grace period, slow clients timed out while
others are served.  They use scripted upstreams (``ScriptedUpstream``) that
write raw bytes from a thread, and wait on events rather than sleeps where
the order of things is the point.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import h11
import pytest
import uvloop
from harness import (
    Peer,
    RouterProcess,
    RouterThread,
    ScriptedUpstream,
    Wire,
    answer_with,
    free_port,
    raw_request,
    request_bytes,
    router_factory,
    upstream,
)

MakeRouter = Callable[..., RouterThread]

OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


# What is tested here depends on how the loop reports EOFs, full buffers
# and closed sockets, so each test runs on the stdlib loop and on uvloop
# (the one ``serve`` uses).
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(params=list(LOOPS))
def make_router(request: pytest.FixtureRequest) -> Iterator[MakeRouter]:
    with router_factory(loop_factory=LOOPS[request.param]) as make:
        yield make


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def wait_for(condition: Callable[[], object], seconds: float = 5) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return bool(condition())


class Ticker:
    """An upstream script streaming a chunked response, one tick per
    ``every`` seconds, until ``finish`` is set (then it ends the body
    cleanly) or the router closes the connection (noted in ``cut_at``)."""

    def __init__(self, every: float = 0.05, limit: float = 10) -> None:
        self.every = every
        self.limit = limit
        self.finish = threading.Event()
        self.cut_at: float | None = None
        self.ticks = 0

    def __call__(self, peer: Peer) -> None:
        peer.read_head()
        self.stream(peer)

    def stream(self, peer: Peer) -> None:
        peer.send(CHUNKED_HEAD)
        end = time.monotonic() + self.limit
        while time.monotonic() < end:
            if self.finish.is_set():
                peer.send(b"0\r\n\r\n")
                return
            try:
                peer.send(chunk(b"tick %d\n" % self.ticks))
            except OSError:
                self.cut_at = time.monotonic()
                return
            self.ticks += 1
            if peer.closed_within(self.every):
                self.cut_at = time.monotonic()
                return


def read_until(wire: Wire, marker: bytes, seconds: float = 5) -> bytes:
    """Raw bytes up to and including ``marker``; what follows stays in
    ``wire.buf``.  EOFError at EOF, TimeoutError after ``seconds``."""
    got = b""
    end = time.monotonic() + seconds
    while marker not in got:
        if time.monotonic() > end:
            raise TimeoutError(f"no {marker!r} in {got[-200:]!r}")
        part = wire.read_some()
        if not part:
            raise EOFError(f"EOF before {marker!r}; have {got[-200:]!r}")
        got += part
    cut = got.index(marker) + len(marker)
    wire.buf = got[cut:] + wire.buf
    return got[:cut]


# ---------------------------------------------------------------------------
# SSE: each event forwarded as it arrives


def sse_script(
    framing: str, arrived: list[threading.Event], sent: list[float]
) -> Callable[[Peer], None]:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    head += b"Cache-Control: no-cache\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n" if framing == "chunked" else b"\r\n"

    def script(peer: Peer) -> None:
        peer.read_head()
        peer.send(head)
        for i, seen in enumerate(arrived):
            event = b"id: %d\ndata: event %d\n\n" % (i, i)
            sent.append(time.monotonic())
            peer.send(chunk(event) if framing == "chunked" else event)
            # The next event is written only once the client has this one:
            # anything buffering the stream would stall the test here.
            if not seen.wait(5):
                return
        if framing == "chunked":
            peer.send(b"0\r\n\r\n")

    return script


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_sse_events_arrive_one_by_one(make_router: MakeRouter, framing: str) -> None:
    router = make_router()
    arrived = [threading.Event() for _ in range(3)]
    sent: list[float] = []
    with ScriptedUpstream(sse_script(framing, arrived, sent)) as up:
        host = router.host(router.expose("sb", up.port))
        received: list[float] = []
        with Wire(router.port) as wire:
            wire.send(
                request_bytes(
                    host, "/events", headers=[("Accept", "text/event-stream")]
                )
            )
            got = read_until(wire, b"\r\n\r\n")
            assert got.startswith(b"HTTP/1.1 200 ")
            assert b"Content-Type: text/event-stream\r\n" in got
            for i, event in enumerate(arrived):
                got += read_until(wire, b"data: event %d\n\n" % i)
                received.append(time.monotonic())
                event.set()
            if framing == "chunked":
                read_until(wire, b"0\r\n\r\n")
            else:
                # Close-delimited upstream body: the client's ends at EOF.
                assert b"Connection: close\r\n" in got
                assert wire.closed_within(5)
        assert len(received) == 3 == len(sent)
        for i in range(2):
            assert received[i] < sent[i + 1]
        assert not up.errors


def test_sse_through_curl_no_buffer(make_router: MakeRouter) -> None:
    router = make_router()
    arrived = [threading.Event() for _ in range(3)]
    sent: list[float] = []
    with ScriptedUpstream(sse_script("chunked", arrived, sent)) as up:
        host = router.host(router.expose("sb", up.port))
        with subprocess.Popen(
            [
                "curl",
                "-sS",
                "-N",
                "--max-time",
                "20",
                "-H",
                f"Host: {host}",
                f"http://127.0.0.1:{router.port}/events",
            ],
            stdout=subprocess.PIPE,
        ) as curl:
            assert curl.stdout is not None
            out = b""
            try:
                for i, event in enumerate(arrived):
                    while b"data: event %d\n\n" % i not in out:
                        ready, _, _ = select.select([curl.stdout], [], [], 5)
                        assert ready, f"event {i} did not reach curl: {out!r}"
                        part = os.read(curl.stdout.fileno(), 65536)
                        assert part, out
                        out += part
                    event.set()
                assert curl.wait(10) == 0
            finally:
                if curl.poll() is None:
                    curl.kill()
        assert len(sent) == 3


# ---------------------------------------------------------------------------
# A large upload: streamed, checksummed, and the router's memory flat


UPLOAD_BYTES = 50 * 1024 * 1024
BLOCK = 64 * 1024


def hashing_sink(peer: Peer) -> None:
    """Read requests with h11 (the reference) and answer each body's
    size and SHA-256."""
    conn = h11.Connection(h11.SERVER)
    while True:
        digest = hashlib.sha256()
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(peer.sock.recv(256 * 1024))
            elif isinstance(event, h11.Request):
                peer.server.notes["headers"] = event.headers
            elif isinstance(event, h11.Data):
                digest.update(event.data)
                size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                # The router closed the connection (h11.ConnectionClosed).
                return
        body = json.dumps({"sha256": digest.hexdigest(), "size": size}).encode()
        length = [("Content-Length", str(len(body)))]
        peer.send(
            conn.send(h11.Response(status_code=200, headers=length))
            + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage())
        )
        conn.start_next_cycle()


def upload_body(expected: Any) -> Iterator[bytes]:
    """50 MiB in 64 KiB blocks, made as they are sent, hashed on the way."""
    base = os.urandom(BLOCK)
    for i in range(UPLOAD_BYTES // BLOCK):
        cut = (i * 7919) % BLOCK
        block = base[cut:] + base[:cut]
        expected.update(block)
        yield block


def test_50_mib_chunked_upload_streams_with_flat_memory() -> None:
    with ScriptedUpstream(hashing_sink) as up:
        op = {"op": "expose_port", "sandbox": "big", "port": up.port, "token": "up"}
        with RouterProcess([op]) as router:
            host = router.results[0]["url"].split("//", 1)[1].rstrip("/")
            conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=30)
            try:
                # A warm-up request, so that the baseline includes whatever
                # the first request allocates once.
                conn.request("GET", "/", headers={"Host": host})
                assert conn.getresponse().read()
            finally:
                conn.close()
            before = router.rss_kib()

            expected = hashlib.sha256()
            conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=60)
            try:
                conn.request(
                    "PUT",
                    "/upload",
                    body=upload_body(expected),
                    headers={"Host": host, "Content-Type": "application/octet-stream"},
                    encode_chunked=True,
                )
                response = conn.getresponse()
                result = json.loads(response.read())
            finally:
                conn.close()
            peak = router.peak_rss_kib()

        assert response.status == 200
        assert result == {"sha256": expected.hexdigest(), "size": UPLOAD_BYTES}
        assert (b"transfer-encoding", b"chunked") in up.notes["headers"]
        growth_mib = (peak - before) / 1024
        assert growth_mib < 30, f"router RSS grew {growth_mib:.1f} MiB"
        assert not up.errors


def test_50_mib_download_to_a_stalled_client_keeps_memory_flat() -> None:
    # The client reads nothing for a while: the router must stop reading the
    # upstream (backpressure) instead of holding the response in memory.
    sent = hashlib.sha256()

    def source(peer: Peer) -> None:
        peer.read_head()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % UPLOAD_BYTES)
        for block in upload_body(sent):
            peer.send(block)
        peer.closed_within(10)

    with ScriptedUpstream(source) as up:
        op = {"op": "expose_port", "sandbox": "big", "port": up.port, "token": "dn"}
        with RouterProcess([op]) as router:
            host = router.results[0]["url"].split("//", 1)[1].rstrip("/")
            before = router.rss_kib()
            with Wire(router.port, timeout=30) as wire:
                wire.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
                wire.send(request_bytes(host, "/download"))
                time.sleep(1.5)
                status, _, _, _ = wire.head()
                assert status == 200
                got = hashlib.sha256()
                got.update(wire.buf)
                size = len(wire.buf)
                wire.buf = b""
                while size < UPLOAD_BYTES:
                    part = wire.sock.recv(1 << 20)
                    assert part, f"EOF after {size} bytes"
                    got.update(part)
                    size += len(part)
            peak = router.peak_rss_kib()
        assert size == UPLOAD_BYTES
        assert got.hexdigest() == sent.hexdigest()
        growth_mib = (peak - before) / 1024
        assert growth_mib < 30, f"router RSS grew {growth_mib:.1f} MiB"


# ---------------------------------------------------------------------------
# One side goes away


def test_client_going_away_closes_the_upstream_within_a_second(
    make_router: MakeRouter,
) -> None:
    router = make_router()
    ticker = Ticker()
    with ScriptedUpstream(ticker) as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            wire.send(request_bytes(host, "/stream"))
            read_until(wire, b"tick 2\n")
            gone = time.monotonic()
        assert wait_for(lambda: ticker.cut_at is not None, 5)
        assert ticker.cut_at is not None and ticker.cut_at - gone < 1.0


def test_client_going_away_mid_upload_closes_the_upstream(
    make_router: MakeRouter,
) -> None:
    router = make_router()
    noticed: list[float] = []

    def reader(peer: Peer) -> None:
        peer.read_head()
        try:
            peer.read_exact(1_000_000)
        except EOFError:
            noticed.append(time.monotonic())

    with ScriptedUpstream(reader) as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            length = [("Content-Length", "1000000")]
            wire.send(request_bytes(host, method="POST", headers=length))
            wire.send(b"x" * 100_000)
            assert wait_for(lambda: up.heads)
            gone = time.monotonic()
        assert wait_for(lambda: noticed, 5)
        assert noticed[0] - gone < 1.0


@pytest.mark.parametrize("phase", ["waiting-for-head", "quiet-stream"])
def test_client_going_away_from_a_quiet_upstream_closes_it(
    make_router: MakeRouter, phase: str
) -> None:
    # Nothing is written to the client for seconds (a long poll, an SSE
    # stream between heartbeats): the router must notice the client's EOF
    # itself rather than on its next write.
    router = make_router()
    noticed: list[float] = []

    def quiet(peer: Peer) -> None:
        peer.read_head()
        if phase == "quiet-stream":
            peer.send(CHUNKED_HEAD + chunk(b"first\n"))
        if peer.closed_within(8):
            noticed.append(time.monotonic())

    with ScriptedUpstream(quiet) as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            wire.send(request_bytes(host, "/poll"))
            if phase == "quiet-stream":
                read_until(wire, b"first\n")
            else:
                assert wait_for(lambda: up.heads)
            gone = time.monotonic()
        assert wait_for(lambda: noticed, 5), "upstream never saw the client go"
        assert noticed[0] - gone < 1.0


@pytest.mark.parametrize("last", ["http/1.0", "connection: close"])
def test_client_that_sends_its_last_request_and_shuts_down_writing_gets_its_answer(
    make_router: MakeRouter, last: str
) -> None:
    router = make_router()
    if last == "http/1.0":
        request = {"version": "1.0"}
    else:
        request = {"headers": [("Connection", "close")]}
    with upstream() as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            wire.send(request_bytes(host, "/half", **request))  # type: ignore[arg-type]
            wire.sock.shutdown(socket.SHUT_WR)
            response = wire.response()
            assert response.status == 200 and response.json()["path"] == "/half"


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_upstream_dying_mid_response_closes_the_client(
    make_router: MakeRouter, framing: str
) -> None:
    router = make_router()
    heads = {
        "length": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 100,
        "chunked": CHUNKED_HEAD + chunk(b"a" * 100),
        "close": b"HTTP/1.1 200 OK\r\n\r\n" + b"a" * 100,
    }

    def dies(peer: Peer) -> None:
        peer.read_head()
        peer.send(heads[framing])
        time.sleep(0.2)

    with ScriptedUpstream(dies) as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port, timeout=5) as wire:
            wire.send(request_bytes(host))
            assert wire.closed_within(4), "client connection left hanging"
            head, _, body = wire.buf.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            if framing == "chunked":
                # Never the last chunk: the client knows the body is cut.
                assert not body.endswith(b"0\r\n\r\n")
            elif framing == "length":
                assert len(body) == 100

        if framing != "close":
            # curl reports the cut body as a partial transfer (exit 18),
            # not as a timeout (exit 28) and not as success.
            done = subprocess.run(
                [
                    "curl",
                    "-sS",
                    "--max-time",
                    "8",
                    "-o",
                    "/dev/null",
                    "-H",
                    f"Host: {host}",
                    f"http://127.0.0.1:{router.port}/",
                ],
                capture_output=True,
                timeout=15,
            )
            assert done.returncode == 18, done.stderr


# ---------------------------------------------------------------------------
# Revocation on live connections (SPEC §2)


def test_unexpose_answers_the_next_request_on_the_same_connection(
    make_router: MakeRouter,
) -> None:
    router = make_router()
    with upstream() as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            wire.send(request_bytes(host, "/1"))
            assert wire.response().status == 200
            router.commit({"op": "unexpose_port", "sandbox": "sb", "port": up.port})
            wire.send(request_bytes(host, "/2"))
            response = wire.response()
            assert response.status == 404
            assert response.json()["code"] == "INVALID_TOKEN"
            # An answer of its own does not end a kept-alive connection.
            router.expose("sb", up.port, token=host.split(".")[0].rsplit("-", 1)[1])
            wire.send(request_bytes(host, "/3"))
            assert wire.response().status == 200
        assert [s["path"] for s in up.seen] == ["/1", "/3"]


def test_rotation_kills_the_old_url_on_the_same_connection(
    make_router: MakeRouter,
) -> None:
    router = make_router()
    with upstream() as up:
        old = router.host(router.expose("sb", up.port, token="old"))
        new = router.host(router.expose("sb", up.port, token="new"))
        with Wire(router.port) as wire:
            wire.send(request_bytes(new, "/new"))
            assert wire.response().status == 200
        with Wire(router.port) as wire:
            wire.send(request_bytes(new, "/1"))
            assert wire.response().status == 200
            router.expose("sb", up.port, token="newer")
            wire.send(request_bytes(new, "/2"))
            assert wire.response().json()["code"] == "INVALID_TOKEN"
            wire.send(request_bytes(old, "/3"))
            assert wire.response().json()["code"] == "INVALID_TOKEN"
            wire.send(request_bytes(new.replace("-new.", "-newer."), "/4"))
            assert wire.response().status == 200
        assert [s["path"] for s in up.seen] == ["/new", "/1", "/4"]


def test_stop_and_destroy_answer_on_the_same_connection(
    make_router: MakeRouter,
) -> None:
    router = make_router()
    with upstream() as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            wire.send(request_bytes(host))
            assert wire.response().status == 200
            router.commit({"op": "set_sandbox", "sandbox": "sb", "state": "stopped"})
            wire.send(request_bytes(host))
            response = wire.response()
            assert response.status == 410
            assert response.json()["code"] == "STALE_PREVIEW_URL"
            router.commit({"op": "destroy_sandbox", "sandbox": "sb"})
            wire.send(request_bytes(host))
            assert wire.response().json()["code"] == "INVALID_TOKEN"


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"op": "unexpose_port", "port": None}, 404, "INVALID_TOKEN"),
        ({"op": "set_sandbox", "state": "stopped"}, 410, "STALE_PREVIEW_URL"),
        ({"op": "destroy_sandbox"}, 404, "INVALID_TOKEN"),
    ],
)
def test_revoked_request_waiting_for_its_head_gets_the_new_answer(
    make_router: MakeRouter, change: dict[str, Any], status: int, code: str
) -> None:
    # The answer a new request would get at that moment.
    router = make_router()

    def silent(peer: Peer) -> None:
        peer.read_head()
        peer.closed_within(8)

    with ScriptedUpstream(silent) as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            wire.send(request_bytes(host))
            assert wait_for(lambda: up.heads)
            op = {**change, "sandbox": "sb"}
            if "port" in op:
                op["port"] = up.port
            router.commit(op)
            response = wire.response()
            assert response.status == status
            assert response.json()["code"] == code
        with Wire(router.port) as wire:
            wire.send(request_bytes(host))
            assert wire.response().json()["code"] == code


@pytest.mark.parametrize("then", ["fallback", "another route"])
def test_revoking_a_route_spares_a_later_request_elsewhere_on_its_connection(
    make_router: MakeRouter, then: str
) -> None:
    # A kept-alive connection whose earlier request used the route, and
    # whose request in flight goes elsewhere, is not that route's: the
    # route's unexpose must neither answer nor cut what is in flight.
    go = threading.Event()
    with upstream() as first, ScriptedUpstream(answers_when(go)) as slow:
        if then == "fallback":
            router = make_router(fallback=f"127.0.0.1:{slow.port}")
            other = "example.com"
        else:
            router = make_router()
            other = router.host(router.expose("sb2", slow.port))
        host = router.host(router.expose("sb", first.port))
        with Wire(router.port) as wire:
            wire.send(request_bytes(host, "/1"))
            assert wire.response().status == 200
            wire.send(request_bytes(other, "/2"))
            assert wait_for(lambda: slow.heads)
            router.commit({"op": "unexpose_port", "sandbox": "sb", "port": first.port})
            go.set()
            response = wire.response()
            assert (response.status, response.body) == (200, b"ok")
            # The revocation holds for the route's own URL on this connection.
            wire.send(request_bytes(host, "/3"))
            assert wire.response().json()["code"] == "INVALID_TOKEN"
        assert [s["path"] for s in first.seen] == ["/1"]


def answers_when(go: threading.Event) -> Callable[[Peer], None]:
    """An upstream script: read the head, answer 200 "ok" once ``go`` is set."""

    def script(peer: Peer) -> None:
        peer.read_head()
        go.wait(10)
        peer.send(OK_RESPONSE)

    return script


def test_a_batch_that_leaves_the_sandbox_running_revokes_nothing(
    make_router: MakeRouter,
) -> None:
    # Stopped and started again in one transaction: no stored state ever
    # had it stopped, so the request in flight gets its response.
    router = make_router()
    go = threading.Event()
    with ScriptedUpstream(answers_when(go)) as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            wire.send(request_bytes(host))
            assert wait_for(lambda: up.heads)
            router.commit(
                {"op": "set_sandbox", "sandbox": "sb", "state": "stopped"},
                {"op": "set_sandbox", "sandbox": "sb", "state": "running"},
                batch=True,
            )
            go.set()
            response = wire.response()
            assert (response.status, response.body) == (200, b"ok")


# Batches after which the label "{port}-sb-keep" leads where it did.
PUT_BACK: dict[str, Callable[[int], list[dict[str, Any]]]] = {
    "unexpose-expose": lambda port: [
        {"op": "unexpose_port", "sandbox": "sb", "port": port},
        {"op": "expose_port", "sandbox": "sb", "port": port, "token": "keep"},
    ],
    "rotate-and-back": lambda port: [
        {"op": "expose_port", "sandbox": "sb", "port": port, "token": "elsewhere"},
        {"op": "expose_port", "sandbox": "sb", "port": port, "token": "keep"},
    ],
    "destroy-and-recreate": lambda port: [
        {"op": "destroy_sandbox", "sandbox": "sb"},
        {"op": "expose_port", "sandbox": "sb", "port": port, "token": "keep"},
    ],
}


@pytest.mark.parametrize("how", list(PUT_BACK))
def test_a_batch_that_puts_the_label_back_revokes_nothing(
    make_router: MakeRouter, how: str
) -> None:
    # The URL never stopped working for anyone, so the request in flight
    # on it gets its response; and it is still under watch: revoking the
    # route afterwards ends it as usual.
    router = make_router()
    go = threading.Event()
    with ScriptedUpstream(answers_when(go)) as up:
        host = router.host(router.expose("sb", up.port, token="keep"))
        with Wire(router.port) as wire:
            wire.send(request_bytes(host))
            assert wait_for(lambda: up.heads)
            router.commit(*PUT_BACK[how](up.port), batch=True)
            go.set()
            response = wire.response()
            assert (response.status, response.body) == (200, b"ok")

        go.clear()
        with Wire(router.port) as wire:
            wire.send(request_bytes(host))
            assert wait_for(lambda: len(up.heads) == 2)
            router.commit(*PUT_BACK[how](up.port), batch=True)
            router.commit({"op": "unexpose_port", "sandbox": "sb", "port": up.port})
            assert wire.response().json()["code"] == "INVALID_TOKEN"
            go.set()


# (sandbox, token) of the route in flight, and a batch that looks like a
# put-back but is not one.
NOT_PUT_BACK: dict[str, tuple[str, str, Callable[[int], list[dict[str, Any]]]]] = {
    "updated-then-unexposed": (
        "sb",
        "keep",
        lambda port: [
            {"op": "expose_port", "sandbox": "sb", "port": port, "name": "new"},
            {"op": "unexpose_port", "sandbox": "sb", "port": port},
        ],
    ),
    # Sandbox a-b token c and sandbox a token b-c have one label.
    "label-to-another-sandbox": (
        "a-b",
        "c",
        lambda port: [
            {"op": "unexpose_port", "sandbox": "a-b", "port": port},
            {"op": "expose_port", "sandbox": "a", "port": port, "token": "b-c"},
        ],
    ),
}


@pytest.mark.parametrize("how", list(NOT_PUT_BACK))
def test_a_batch_that_only_looks_like_a_put_back_revokes(
    make_router: MakeRouter, how: str
) -> None:
    router = make_router()
    sandbox, token, batch = NOT_PUT_BACK[how]
    go = threading.Event()
    with ScriptedUpstream(answers_when(go)) as up:
        host = router.host(router.expose(sandbox, up.port, token=token))
        with Wire(router.port) as wire:
            wire.send(request_bytes(host))
            assert wait_for(lambda: up.heads)
            router.commit(*batch(up.port), batch=True)
            assert wire.response().json()["code"] == "INVALID_TOKEN"
            go.set()


def test_revoked_request_leaves_the_pipelined_ones_behind_it_answered(
    make_router: MakeRouter,
) -> None:
    router = make_router()

    def silent(peer: Peer) -> None:
        peer.read_head()
        peer.closed_within(8)

    with ScriptedUpstream(silent) as doomed, upstream() as other:
        doomed_host = router.host(router.expose("doomed", doomed.port))
        other_host = router.host(router.expose("other", other.port))
        with Wire(router.port) as wire:
            wire.send(request_bytes(doomed_host) + request_bytes(other_host, "/a"))
            assert wait_for(lambda: doomed.heads)
            router.commit(
                {"op": "unexpose_port", "sandbox": "doomed", "port": doomed.port}
            )
            first, second = wire.response(), wire.response()
            assert first.json()["code"] == "INVALID_TOKEN"
            assert first.get("Connection") != "close"
            assert second.status == 200
            wire.send(request_bytes(other_host, "/b"))
            assert wire.response().status == 200


def test_connect_timeout_0_is_no_limit(make_router: MakeRouter) -> None:
    # As for every other timeout; it used to time every connect out at once.
    router = make_router(connect_timeout=0)
    with upstream() as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            wire.send(request_bytes(host))
            assert wire.response().status == 200


def test_urls_on_a_second_local_domain_carry_the_port(make_router: MakeRouter) -> None:
    router = make_router(domain=["preview.test", "localhost"])
    exposed = router.expose("sb", 8000, token="tok", hostname="localhost")
    assert exposed["url"] == f"http://8000-sb-tok.localhost:{router.port}/"
    assert router.service.router is not None
    table = router.service.router.table
    [listed] = table.get_exposed_ports("sb", hostname="localhost")
    assert listed["url"] == exposed["url"]
    # A port given with the hostname is kept.
    again = router.expose("sb", 8000, hostname="localhost:9999")
    assert again["url"] == "http://8000-sb-tok.localhost:9999/"


class Listener:
    """A plain TCP listener that keeps every byte it is sent."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        self.connections = 0
        self.received = b""
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.connections += 1
                with conn:
                    conn.settimeout(5)
                    while data := conn.recv(65536):
                        self.received += data

    def close(self) -> None:
        self.sock.close()


def test_a_late_connect_never_carries_the_next_request(
    make_router: MakeRouter,
) -> None:
    # Request 1 is for sandbox B, whose port is down: it gets its 504 while
    # the connect to B is still retrying (a retry window longer than the
    # response timeout).  Request 2, on the same kept-alive connection, is
    # for sandbox C, also down.  B's port then comes up: the old connect
    # reaches it, and must not hand it C's request (nor C's cookie).
    router = make_router(response_timeout=0.3, retry_window=4.0)
    port_b, port_c = free_port(), free_port()
    host_b = router.host(router.expose("sandbox-b", port_b))
    host_c = router.host(router.expose("sandbox-c", port_c))
    with Wire(router.port) as wire:
        wire.send(request_bytes(host_b, "/for-b"))
        first = wire.response()
        assert first.json()["code"] == "UPSTREAM_TIMEOUT"
        wire.send(request_bytes(host_c, "/for-c", headers=[("Cookie", "c=secret")]))
        b_side = Listener(port_b)
        try:
            second = wire.response()
            assert wait_for(lambda: b_side.connections > 0, 3)
        finally:
            b_side.close()
    assert second.status in (502, 504), second
    assert b_side.received == b""


REVOCATIONS: dict[str, Callable[[RouterThread, int], None]] = {
    "unexpose": lambda r, port: r.commit(
        {"op": "unexpose_port", "sandbox": "doomed", "port": port}
    ),
    "rotate": lambda r, port: r.expose("doomed", port, token="rotated"),
    "stop": lambda r, port: r.commit(
        {"op": "set_sandbox", "sandbox": "doomed", "state": "stopped"}
    ),
    "destroy": lambda r, port: r.commit({"op": "destroy_sandbox", "sandbox": "doomed"}),
}


def test_revoked_stream_to_a_client_that_stopped_reading_is_cut(
    make_router: MakeRouter,
) -> None:
    # A close would wait for the router's write buffer to drain, which a
    # client that reads nothing never lets happen: both sockets would be
    # held for ever.  After the grace period they are cut.
    router = make_router(grace=0.5)
    flooded = threading.Event()

    def flood(peer: Peer) -> None:
        peer.read_head()
        peer.send(CHUNKED_HEAD)
        with contextlib.suppress(OSError):
            for sent in range(2000):
                peer.send(chunk(b"x" * 65536))
                if sent > 100:
                    flooded.set()

    with ScriptedUpstream(flood) as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            wire.send(request_bytes(host))
            assert flooded.wait(10), "the upstream never got ahead of the client"
            proxy = router.service.proxy
            assert proxy is not None and len(proxy.clients) == 1
            router.commit({"op": "unexpose_port", "sandbox": "sb", "port": up.port})
            # The grace period (0.5 s), checked by a once-a-second sweep.
            assert wait_for(lambda: not proxy.clients, 5), "connection kept"


@pytest.mark.parametrize("how", list(REVOCATIONS))
def test_streaming_response_is_cut_after_grace(
    make_router: MakeRouter, how: str
) -> None:
    router = make_router(grace=0.5)
    doomed, other = Ticker(), Ticker()
    with ScriptedUpstream(doomed) as up, ScriptedUpstream(other) as up2:
        host = router.host(router.expose("doomed", up.port))
        host2 = router.host(router.expose("other", up2.port))
        with Wire(router.port) as wire, Wire(router.port) as wire2:
            wire.send(request_bytes(host))
            wire2.send(request_bytes(host2))
            read_until(wire, b"tick 1\n")
            read_until(wire2, b"tick 1\n")
            ticks_at_revoke = doomed.ticks
            REVOCATIONS[how](router, up.port)
            # The grace period (0.5 s, checked by a once-a-second sweep).
            assert wire.closed_within(5), "revoked stream not cut"
            assert b"0\r\n\r\n" not in wire.buf
            assert doomed.ticks > ticks_at_revoke, "cut before the grace period"
            assert wait_for(lambda: doomed.cut_at is not None, 3)
            # The other route's stream was never touched.
            seen = other.ticks
            read_until(wire2, b"tick %d\n" % (seen + 2))
            other.finish.set()
            read_until(wire2, b"0\r\n\r\n")
            assert other.cut_at is None
            wire2.send(request_bytes(host2))
            assert not wire2.closed_within(0.2)


# ---------------------------------------------------------------------------
# Framing: pipelining, bodiless responses, 100-continue, HTTP/1.0


def pipeline(host: str) -> bytes:
    return (
        request_bytes(host, "/a")
        + request_bytes(host, "/b", method="POST", body=b"hello")
        + request_bytes(host, "/c", method="HEAD")
        + request_bytes(
            host, "/d", method="PUT", headers=[("Transfer-Encoding", "chunked")]
        )
        + chunk(b"chunked ")
        + chunk(b"body")
        + b"0\r\n\r\n"
        + request_bytes(host, "/e")
    )


@pytest.mark.parametrize("split", ["one-send", "byte-by-byte"])
def test_pipelined_requests_are_answered_in_order(
    make_router: MakeRouter, split: str
) -> None:
    router = make_router()

    def echo(peer: Peer) -> None:
        while head := peer.read_head():
            method, path = head.split(b" ")[:2]
            if b"chunked" in head.lower():
                body = b""
                while not body.endswith(b"0\r\n\r\n"):
                    body += peer.read_exact(1)
            else:
                length = 5 if method == b"POST" else 0
                body = peer.read_exact(length)
            reply = method + b" " + path + b" " + body
            if path == b"/a":
                # The first answer is the slowest: order must still hold.
                time.sleep(0.2)
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(reply))
            if method != b"HEAD":
                peer.send(reply)

    with ScriptedUpstream(echo) as up:
        host = router.host(router.expose("sb", up.port))
        data = pipeline(host)
        with Wire(router.port) as wire:
            if split == "one-send":
                wire.send(data)
            else:
                wire.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for i in range(len(data)):
                    wire.send(data[i : i + 1])
            bodies = [wire.response(head_request=p == "c").body for p in "abcde"]
            assert not wire.closed_within(0.1)
        assert bodies == [
            b"GET /a ",
            b"POST /b hello",
            b"",
            b"PUT /d 8\r\nchunked \r\n4\r\nbody\r\n0\r\n\r\n",
            b"GET /e ",
        ]
        assert up.connections == 1


BODILESS = {
    b"/head": b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nX-Len: 1234\r\n\r\n",
    b"/head-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"/204": b"HTTP/1.1 204 No Content\r\nX-Kind: none\r\n\r\n",
    b"/304": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 99\r\n\r\n',
    b"/after": OK_RESPONSE,
}


def test_head_204_304_carry_no_body_and_keep_the_connection(
    make_router: MakeRouter,
) -> None:
    router = make_router()

    def bodiless(peer: Peer) -> None:
        while head := peer.read_head():
            peer.send(BODILESS[head.split(b" ")[1]])

    with ScriptedUpstream(bodiless) as up:
        host = router.host(router.expose("sb", up.port))
        sequence = [
            ("HEAD", "/head"),
            ("HEAD", "/head-chunked"),
            ("GET", "/204"),
            ("GET", "/304"),
            ("GET", "/after"),
        ]
        with Wire(router.port) as wire:
            # Each on its own, then all pipelined: either way each response
            # ends at its head, and the next one parses right after it.
            for method, path in sequence * 2:
                wire.send(request_bytes(host, path, method=method))
                response = wire.response(head_request=method == "HEAD")
                assert response.body == (b"ok" if path == "/after" else b"")
            wire.send(b"".join(request_bytes(host, p, method=m) for m, p in sequence))
            got = [wire.response(head_request=m == "HEAD") for m, _ in sequence]
            assert [r.status for r in got] == [200, 200, 204, 304, 200]
            assert got[0].get("Content-Length") == "1234"
            assert got[3].get("ETag") == '"v1"'
            assert got[-1].body == b"ok"
            assert not wire.closed_within(0.2) and wire.buf == b""
        assert up.connections == 1

        # curl agrees (it would stall on a body it was not told about).
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "-I",
                "--max-time",
                "5",
                "-H",
                f"Host: {host}",
                f"http://127.0.0.1:{router.port}/head",
            ],
            capture_output=True,
            timeout=10,
            check=True,
        ).stdout
        assert out.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 1234" in out


def continue_sink(peer: Peer) -> None:
    """Answer 103 and 100 to a request expecting 100-continue, then read
    its body and answer with its size and SHA-256."""
    while head := peer.read_head():
        lower = head.lower()
        peer.server.notes.setdefault("expect", []).append(
            b"\r\nexpect: 100-continue\r\n" in lower
        )
        length = int(lower.split(b"content-length: ")[1].split(b"\r\n")[0])
        peer.send(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
        peer.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = peer.read_exact(length)
        out = json.dumps(
            {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        ).encode()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(out) + out)


def test_100_continue_with_curl(make_router: MakeRouter, tmp_path: Any) -> None:
    router = make_router()
    data = os.urandom(3 * 1024 * 1024)
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    with ScriptedUpstream(continue_sink) as up:
        host = router.host(router.expose("sb", up.port))
        done = subprocess.run(
            [
                "curl",
                "-sS",
                "-v",
                "--max-time",
                "20",
                # Far longer than the test may take: curl must get the 100
                # through the router, not give up waiting and send anyway.
                "--expect100-timeout",
                "30",
                "-H",
                f"Host: {host}",
                "-H",
                "Expect: 100-continue",
                "--data-binary",
                f"@{path}",
                f"http://127.0.0.1:{router.port}/upload",
            ],
            capture_output=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert b"< HTTP/1.1 100 Continue" in done.stderr
        assert b"< HTTP/1.1 103 Early Hints" in done.stderr
        result = json.loads(done.stdout)
        assert result == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert up.notes["expect"] == [True]


def test_final_answer_instead_of_100_continue(make_router: MakeRouter) -> None:
    router = make_router()
    refusal = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 4\r\n\r\nbig!"

    def refuse(peer: Peer) -> None:
        peer.read_head()
        peer.send(refusal)
        peer.closed_within(5)

    with ScriptedUpstream(refuse) as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            wire.send(
                request_bytes(
                    host,
                    method="POST",
                    headers=[("Expect", "100-continue"), ("Content-Length", "9999999")],
                )
            )
            response = wire.response()
            assert response.status == 413 and response.body == b"big!"
            # The body it announced was never sent: the connection cannot be
            # reused, so the router ends it, and says so (RFC 9112 §9.6).
            assert response.get("Connection") == "close"
            assert wire.closed_within(3)


def test_early_answer_to_a_spliced_upload_reaches_a_client_still_sending(
    make_router: MakeRouter,
) -> None:
    # An upload big enough to go client -> sandbox in the kernel; the
    # sandbox refuses it a little way in and drains the rest.  The client
    # writes its whole body before reading (Python's http.client does): its
    # writes must all go through, and then it must read the 413, not a reset.
    router = make_router()
    total = 16 * 1024 * 1024

    def refuse_midway(peer: Peer) -> None:
        peer.read_head()
        peer.read_exact(400_000)
        peer.send(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 4\r\n\r\nbig!")
        peer.closed_within(15)

    with ScriptedUpstream(refuse_midway) as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port, timeout=20) as wire:
            wire.send(
                request_bytes(
                    host, method="POST", headers=[("Content-Length", str(total))]
                )
            )
            wire.send(b"a" * total)
            response = wire.response()
            assert response.status == 413 and response.body == b"big!"
            assert response.get("Connection") == "close"
            assert wire.closed_within(8)
        assert router.service.proxy.stats.splices >= 1


def test_bytes_past_a_spliced_body_keep_its_connection_out_of_the_pool(
    make_router: MakeRouter,
) -> None:
    # The upstream sends more than its Content-Length: a second answer
    # behind a body big enough to be spliced.  The relay moves exactly the
    # announced length, so the rest waits in the socket; the pipelined
    # request behind must get its own answer, not that one.
    router = make_router()
    big = b"b" * (1024 * 1024)

    def answers(peer: Peer) -> None:
        while head := peer.read_head():
            if head.startswith(b"GET /1 "):
                peer.send(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big)
                    + big
                    + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"
                )
            else:
                peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nGOOD!")

    with ScriptedUpstream(answers) as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port, timeout=10) as wire:
            wire.send(request_bytes(host, "/1") + request_bytes(host, "/2"))
            first = wire.response()
            assert first.status == 200 and first.body == big
            assert wire.response().body == b"GOOD!"
        assert router.service.proxy.stats.splices >= 1
        assert up.connections == 2


def test_a_spliced_upload_that_stalls_gets_the_response_timeout(
    make_router: MakeRouter,
) -> None:
    # The same 504 as a stalled upload of a size that is not spliced: the
    # response timeout runs from the last body byte either way.
    router = make_router(response_timeout=1)

    def reads_on(peer: Peer) -> None:
        peer.read_head()
        peer.closed_within(15)

    with ScriptedUpstream(reads_on) as up:
        host = router.host(router.expose("sb", up.port))
        for announced, sent in ((200_000, 100_000), (10_000_000, 1_000_000)):
            with Wire(router.port, timeout=10) as wire:
                wire.send(
                    request_bytes(
                        host,
                        method="POST",
                        headers=[("Content-Length", str(announced))],
                    )
                )
                wire.send(b"a" * sent)
                response = wire.response()
                assert response.status == 504
                assert response.json()["code"] == "UPSTREAM_TIMEOUT"
                assert wire.closed_within(8)
        assert router.service.proxy.stats.splices == 1


def test_http10_client_without_keep_alive(make_router: MakeRouter) -> None:
    router = make_router()
    with upstream() as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            wire.send(request_bytes(host, "/ten", version="1.0"))
            response = wire.response()
            assert response.status == 200
            assert response.json()["path"] == "/ten"
            assert wire.closed_within(3)
        # HTTP/1.0 may leave Host out, but nothing can be routed without one
        # (SPEC §1): the same 400 as a 1.1 request without it.
        for version in ("1.0", "1.1"):
            with Wire(router.port) as wire:
                wire.send(f"GET / HTTP/{version}\r\n\r\n".encode())
                response = wire.response()
                assert response.status == 400
                assert response.json() == {
                    "error": "missing Host header",
                    "code": "BAD_REQUEST",
                }
                assert wire.closed_within(3)


def test_http10_client_with_keep_alive(make_router: MakeRouter) -> None:
    router = make_router()
    with upstream() as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            for path in ("/1", "/2"):
                wire.send(
                    request_bytes(
                        host,
                        path,
                        version="1.0",
                        headers=[("Connection", "keep-alive")],
                    )
                )
                response = wire.response()
                assert response.status == 200 and response.json()["path"] == path
                # A 1.0 client reuses the connection only when told to.
                assert response.get("Connection") == "keep-alive"
            # The router's own answers say so too.
            wire.send(
                request_bytes(
                    "1-no-such.localhost",
                    "/",
                    version="1.0",
                    headers=[("Connection", "keep-alive")],
                )
            )
            response = wire.response()
            assert response.status == 404
            assert response.get("Connection") == "keep-alive"
            assert not wire.closed_within(0.2)
        assert [s["path"] for s in up.seen] == ["/1", "/2"]


@pytest.mark.parametrize("keep_alive", [False, True])
def test_http10_client_gets_no_transfer_encoding_on_a_head_answer(
    make_router: MakeRouter, keep_alive: bool
) -> None:
    # The answer to HEAD has no body, but may say how a GET's would come:
    # an HTTP/1.0 client must not be told of a coding it does not have
    # (RFC 9112 §6.1).
    router = make_router()
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Up: 1\r\n\r\n"

    def answers_heads(peer: Peer) -> None:
        while peer.read_head():
            peer.send(answer)

    with ScriptedUpstream(answers_heads) as up:
        host = router.host(router.expose("sb", up.port))
        headers = [("Connection", "keep-alive")] if keep_alive else []
        with Wire(router.port) as wire:
            for _ in range(2 if keep_alive else 1):
                wire.send(
                    request_bytes(host, method="HEAD", version="1.0", headers=headers)
                )
                response = wire.response(head_request=True)
                assert response.status == 200 and response.get("X-Up") == "1"
                assert response.get("Transfer-Encoding") is None
                expected = "keep-alive" if keep_alive else "close"
                assert response.get("Connection") == expected
            if not keep_alive:
                assert wire.closed_within(3)
        # And an HTTP/1.1 client is told as sent.
        with Wire(router.port) as wire:
            wire.send(request_bytes(host, method="HEAD"))
            response = wire.response(head_request=True)
            assert response.get("Transfer-Encoding") == "chunked"


@pytest.mark.parametrize("keep_alive", [False, True])
def test_http10_client_gets_chunked_upstream_body_dechunked(
    make_router: MakeRouter, keep_alive: bool
) -> None:
    router = make_router()
    body = [b"first part, ", b"second part, ", b"last"]
    response = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Up: 1\r\n\r\n"
        + b"".join(chunk(p) for p in body)
        + b"0\r\nX-Trailer: t\r\n\r\n"
    )
    with ScriptedUpstream(answer_with(response)) as up:
        host = router.host(router.expose("sb", up.port))
        headers = [("Connection", "keep-alive")] if keep_alive else []
        with Wire(router.port) as wire:
            wire.send(request_bytes(host, version="1.0", headers=headers))
            # HTTP/1.0 has no chunked coding: the body runs to the close.
            assert wire.closed_within(5)
            head, _, got = wire.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"transfer-encoding" not in head.lower()
        assert b"X-Up: 1" in head
        assert got == b"".join(body)


# ---------------------------------------------------------------------------
# Abuse: slow heads, malformed neighbours


def test_slow_head_flood_does_not_starve_others(make_router: MakeRouter) -> None:
    router = make_router(head_timeout=1.0)
    slow_count = 200
    partial = b"GET / HTTP/1.1\r\nHost: slow.localhost\r\nX-Slow: " + b"s" * 200
    with upstream() as up:
        host = router.host(router.expose("sb", up.port))
        slow = []
        for _ in range(slow_count):
            sock = socket.create_connection(("127.0.0.1", router.port), timeout=5)
            sock.setblocking(False)
            slow.append(sock)
        first_byte: dict[int, float] = {}
        cut: dict[int, float] = {}
        said: dict[int, bytes] = {}
        stop = threading.Event()

        def dribble() -> None:
            # One head byte per connection every 100 ms, bounded in time.
            end = time.monotonic() + 10
            for pos in range(len(partial)):
                if stop.is_set() or time.monotonic() > end or len(cut) == slow_count:
                    return
                for i, sock in enumerate(slow):
                    if i in cut:
                        continue
                    try:
                        data = sock.recv(1024)
                        if data == b"":
                            cut[i] = time.monotonic()
                            continue
                        said[i] = said.get(i, b"") + data
                    except BlockingIOError:
                        pass
                    except OSError:
                        cut[i] = time.monotonic()
                        continue
                    try:
                        sock.send(partial[pos : pos + 1])
                        first_byte.setdefault(i, time.monotonic())
                    except BlockingIOError:
                        pass
                    except OSError:
                        cut[i] = time.monotonic()
                time.sleep(0.1)

        dribbler = threading.Thread(target=dribble)
        dribbler.start()
        try:
            time.sleep(0.3)
            # Ordinary clients meanwhile: every one served.
            for i in range(20):
                conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=5)
                try:
                    conn.request("GET", f"/fast/{i}", headers={"Host": host})
                    response = conn.getresponse()
                    assert response.status == 200
                    assert json.loads(response.read())["path"] == f"/fast/{i}"
                finally:
                    conn.close()
            # Then the slow ones are cut: head_timeout 1 s, swept once a
            # second, so about two seconds after their first byte.
            assert wait_for(lambda: len(cut) == slow_count, 8), (
                f"{slow_count - len(cut)} slow connections still open"
            )
        finally:
            stop.set()
            dribbler.join(15)
            for sock in slow:
                sock.close()
        assert all(cut[i] - first_byte[i] >= 0.9 for i in cut)
        assert len(up.seen) == 20
        # Each slow client was told why before the close (a client that had
        # not sent a byte yet would just be closed).
        for i in range(slow_count):
            status, _, body = said.get(i, b"").partition(b"\r\n\r\n")
            assert status.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), said.get(i)
            assert b"Connection: close" in status
            assert json.loads(body)["code"] == "REQUEST_TIMEOUT"


def test_unfinished_head_gets_408_and_a_head_request_no_body(
    make_router: MakeRouter,
) -> None:
    router = make_router(head_timeout=1.0)
    with upstream() as up:
        host = router.host(router.expose("sb", up.port))
        answers = {}
        for method in ("GET", "HEAD"):
            partial = f"{method} / HTTP/1.1\r\nHost: {host}\r\nX-Half: "
            answers[method] = raw_request(router.port, partial.encode(), timeout=8)
    for method, data in answers.items():
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), data
        assert b"\r\nConnection: close" in head
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        if method == "GET":
            assert json.loads(body)["code"] == "REQUEST_TIMEOUT"
            assert len(body) == length
        else:
            # RFC 9110 §9.3.2: the same head, no body.
            assert body == b""
            assert length > 0
    assert up.seen == []


MALFORMED = {
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 50,
    "cl-and-te": b"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bad-chunk": b"POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
    b"\r\n5\r\nhello\r\nzz\r\n",
    "bare-cr": b"GET / HTTP/1.1\r\nHost: {host}\r\nX: a\rb\r\n\r\n",
    "huge-head": b"GET / HTTP/1.1\r\nHost: {host}\r\nX: " + b"a" * 70000,
    "bad-version": b"GET / HTTP/1.7\r\nHost: {host}\r\n\r\n",
}


def test_malformed_requests_never_disturb_other_connections(
    make_router: MakeRouter,
) -> None:
    router = make_router()
    ticker = Ticker()

    def script(peer: Peer) -> None:
        # Upstream connections are pooled: any one may get either request.
        while head := peer.read_head():
            if b" /stream " in head:
                ticker.stream(peer)
                return
            peer.send(OK_RESPONSE)

    with ScriptedUpstream(script) as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as kept, Wire(router.port) as streaming:
            kept.send(request_bytes(host, "/1"))
            assert kept.response().status == 200
            streaming.send(request_bytes(host, "/stream"))
            read_until(streaming, b"tick 1\n")

            for name, raw in MALFORMED.items():
                with Wire(router.port) as bad:
                    bad.send(raw.replace(b"{host}", host.encode()))
                    response = bad.response()
                    assert response.status in (400, 431), name
                    assert bad.closed_within(3), name
            # A good request then a bad one on one connection: the good one
            # is answered, the bad one gets 400 and the connection closes.
            with Wire(router.port) as mixed:
                mixed.send(request_bytes(host, "/ok") + b"NOT HTTP\r\n\r\n")
                assert mixed.response().status == 200
                assert mixed.response().status == 400
                assert mixed.closed_within(3)

            kept.send(request_bytes(host, "/2"))
            assert kept.response().status == 200
            seen = ticker.ticks
            read_until(streaming, b"tick %d\n" % (seen + 2))
            ticker.finish.set()
            read_until(streaming, b"0\r\n\r\n")
            assert ticker.cut_at is None
        assert not up.errors


def test_http10_client_gets_no_interim_responses(make_router: MakeRouter) -> None:
    router = make_router()
    # RFC 9110 §15.2: a server must not send a 1xx response to an HTTP/1.0
    # client, whatever the upstream (spoken to in HTTP/1.1) sends.
    response = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n" + OK_RESPONSE
    )
    with ScriptedUpstream(answer_with(response)) as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            wire.send(request_bytes(host, method="POST", body=b"x" * 10, version="1.0"))
            assert wire.closed_within(5)
            assert wire.buf.startswith(b"HTTP/1.1 200 OK\r\n")
            assert wire.buf.endswith(b"\r\n\r\nok")
        # An HTTP/1.1 client gets them, in order, before the final answer.
        with Wire(router.port) as wire:
            wire.send(request_bytes(host, method="POST", body=b"x" * 10))
            got = wire.response()
            assert [h.split(b" ")[1] for h in got.interim] == [b"100", b"103"]
            assert got.body == b"ok"


def test_unsolicited_101_is_a_bad_response(make_router: MakeRouter) -> None:
    router = make_router()
    switch = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
    switch += b"Upgrade: websocket\r\n\r\n"
    with ScriptedUpstream(answer_with(switch)) as up:
        host = router.host(router.expose("sb", up.port))
        # RFC 9110 §15.2.2: no switch to a protocol the client did not ask for.
        with Wire(router.port) as wire:
            wire.send(request_bytes(host))
            response = wire.response()
            assert response.status == 502
            assert response.json()["code"] == "UPSTREAM_BAD_RESPONSE"


def test_body_sent_after_a_bodiless_response_is_not_taken_for_the_next(
    make_router: MakeRouter,
) -> None:
    router = make_router()
    requests = 0

    def sloppy(peer: Peer) -> None:
        # Answers HEAD with the body anyway, then GET properly.
        nonlocal requests
        while head := peer.read_head():
            requests += 1
            if head.startswith(b"HEAD "):
                peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            else:
                peer.send(OK_RESPONSE)

    with ScriptedUpstream(sloppy) as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            for _ in range(5):
                wire.send(request_bytes(host, method="HEAD"))
                head = wire.response(head_request=True)
                assert head.status == 200 and head.get("Content-Length") == "5"
                wire.send(request_bytes(host))
                assert wire.response().body == b"ok"
            assert not wire.closed_within(0.1) and wire.buf == b""
        assert requests == 10
