"""The router's own answers (SPEC §3), Host matching (§1) and forwarding (§4).

Every test runs a real ``Service`` on 127.0.0.1 (``RouterThread``) in front
of real upstream servers, and talks to it with real clients: raw sockets
where the exact bytes matter, ``http.client`` and curl elsewhere.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import (
    Peer,
    RouterThread,
    ScriptedUpstream,
    Wire,
    answer_with,
    free_port,
    request_bytes,
    router_factory,
    upstream,
)

from router.client import ControlClient

INVALID_TOKEN_MESSAGE = "Access denied: Invalid token or port not exposed"

MakeRouter = Callable[..., RouterThread]


@pytest.fixture
def make_router() -> Iterator[MakeRouter]:
    with router_factory() as make:
        yield make


def get(router: RouterThread, host: str, path: str = "/", **kw: Any) -> Any:
    """One request on a fresh connection; the parsed response."""
    with Wire(router.port) as wire:
        wire.send(request_bytes(host, path, **kw))
        return wire.response(head_request=kw.get("method") == "HEAD")


def assert_answer(response: Any, status: int, code: str) -> dict[str, Any]:
    """The shape every answer of SPEC §3 has."""
    assert response.status == status, response
    assert response.get("Content-Type") == "application/json", response
    body = response.json()
    assert set(body) == {"error", "code"}, body
    assert body["code"] == code
    assert isinstance(body["error"], str) and body["error"]
    return dict(body)


def recorded_headers(seen: dict[str, Any]) -> dict[str, list[str]]:
    """What a ``Recorder`` upstream received, by lower-case name."""
    out: dict[str, list[str]] = {}
    for name, value in seen["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


# ---------------------------------------------------------------------------
# SPEC §3: the answers


def test_not_a_preview_host_is_404_not_found(make_router: MakeRouter) -> None:
    router = make_router()
    for host in ("example.com", "localhost", f"localhost:{router.port}"):
        assert_answer(get(router, host), 404, "NOT_FOUND")


def test_invalid_token_never_says_which_part_was_wrong(
    make_router: MakeRouter,
) -> None:
    router = make_router()
    with upstream() as up, upstream() as other:
        good = router.expose("sb", up.port, token="tok")
        router.expose("sb", other.port, token="tok2")
        router.expose("gone", other.port, token="tok")
        router.commit({"op": "unexpose_port", "sandbox": "sb", "port": other.port})
        router.commit({"op": "destroy_sandbox", "sandbox": "gone"})
        domain = router.host(good).split(".", 1)[1]
        hosts = {
            "unknown label": f"9999-nobody-abc.{domain}",
            "wrong token": f"{up.port}-sb-wrong.{domain}",
            "unexposed": f"{other.port}-sb-tok2.{domain}",
            "destroyed": f"{other.port}-gone-tok.{domain}",
        }
        bodies = set()
        for case, host in hosts.items():
            response = get(router, host)
            body = assert_answer(response, 404, "INVALID_TOKEN")
            assert body["error"] == INVALID_TOKEN_MESSAGE, case
            bodies.add(response.body)
        # Byte-identical whatever was wrong.
        assert len(bodies) == 1
        assert get(router, router.host(good)).status == 200
        assert len(up.seen) == 1 and not other.seen


def test_stopped_sandbox_is_410(make_router: MakeRouter) -> None:
    router = make_router()
    with upstream() as up:
        exposed = router.expose("sb", up.port)
        router.commit({"op": "set_sandbox", "sandbox": "sb", "state": "stopped"})
        assert_answer(get(router, router.host(exposed)), 410, "STALE_PREVIEW_URL")
        router.commit({"op": "set_sandbox", "sandbox": "sb", "state": "running"})
        assert get(router, router.host(exposed)).status == 200


def test_nothing_listening_is_502_unavailable(make_router: MakeRouter) -> None:
    router = make_router(retry_window=0.3)
    exposed = router.expose("sb", free_port())
    assert_answer(get(router, router.host(exposed)), 502, "UPSTREAM_UNAVAILABLE")


def test_access_lines_name_each_request_and_escape_what_the_client_sent(
    make_router: MakeRouter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_router.access")
    router = make_router(access_log=True)
    with upstream() as up:
        host = router.host(router.expose("sb", up.port))
        assert get(router, host, "/page?x=1").status == 200
        # A Host holding terminal escapes is refused, and logged escaped:
        # the operator's terminal must not run what a client wrote.
        assert_answer(get(router, "a\x1b[31mred\xe9.localhost"), 400, "BAD_REQUEST")
    lines = [r.getMessage() for r in caplog.records if r.name == "edge_router.access"]
    assert len(lines) == 2, lines
    assert (
        lines[0].startswith("127.0.0.1") and '"GET /page?x=1 HTTP/1.1" 200' in lines[0]
    )
    assert f"host={host} " in lines[0]
    assert "\x1b" not in lines[1] and "\xe9" not in lines[1]
    assert " 400 host=a\\x1b[31mred\\xe9.localhost " in lines[1]


def test_an_upstream_host_that_does_not_resolve_is_502_not_refused(
    make_router: MakeRouter, caplog: pytest.LogCaptureFixture
) -> None:
    # ".invalid" never resolves (RFC 6761).  The answer must not claim a
    # refusal, nor tell a public client the sandbox's host.
    router = make_router(retry_window=0.3)
    router.commit(
        {"op": "set_sandbox", "sandbox": "far", "upstream_host": "nowhere.invalid"}
    )
    exposed = router.expose("far", 8080)
    body = assert_answer(get(router, router.host(exposed)), 502, "UPSTREAM_UNAVAILABLE")
    assert body["error"] == "The sandbox port could not be reached"
    assert "nowhere" not in body["error"]
    # The operator's one line names the URL's label, the address and why.
    label = router.host(exposed).partition(".")[0]
    lines = [r.getMessage() for r in caplog.records if r.name == "edge_router"]
    assert any(
        line.startswith(
            f"upstream for {label}: UPSTREAM_UNAVAILABLE (nowhere.invalid:8080: "
        )
        for line in lines
    ), lines
    refused = router.expose("sb", free_port())
    body = assert_answer(get(router, router.host(refused)), 502, "UPSTREAM_UNAVAILABLE")
    assert body["error"] == "The sandbox port refused the connection"


def test_a_sandbox_that_stays_down_is_one_warning_not_one_per_request(
    make_router: MakeRouter, caplog: pytest.LogCaptureFixture
) -> None:
    # A load test or a retrying page against a dead port must not fill the
    # log: the first failure of each route is told, the rest counted.
    caplog.set_level(logging.WARNING, logger="edge_router")
    router = make_router(retry_window=0)
    down = router.host(router.expose("sb", free_port()))
    other = router.host(router.expose("sb2", free_port()))
    for _ in range(20):
        assert_answer(get(router, down), 502, "UPSTREAM_UNAVAILABLE")
    assert_answer(get(router, other), 502, "UPSTREAM_UNAVAILABLE")
    lines = [r.getMessage() for r in caplog.records if r.name == "edge_router"]
    for host in (down, other):
        label = host.partition(".")[0]
        told = [line for line in lines if line.startswith(f"upstream for {label}:")]
        assert len(told) == 1, lines
        assert "UPSTREAM_UNAVAILABLE (127.0.0.1:" in told[0]
    # The other 19 are told when the window ends (at a sweep, every second).
    router.service.proxy.repeats.window = 0.5
    label = down.partition(".")[0]
    summary = (
        f"upstream for {label}: UPSTREAM_UNAVAILABLE: repeated 19 more times"
        " within 0.5 s"
    )
    deadline = time.monotonic() + 5
    while summary not in [r.getMessage() for r in caplog.records]:
        assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
        time.sleep(0.1)
    assert len(router.service.proxy.repeats) == 0


def test_repeats_still_counted_when_the_router_stops_are_told(
    make_router: MakeRouter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_router")
    router = make_router(retry_window=0)
    down = router.host(router.expose("sb", free_port()))
    for _ in range(5):
        assert_answer(get(router, down), 502, "UPSTREAM_UNAVAILABLE")
    router.call(router.service.drain())
    label = down.partition(".")[0]
    lines = [r.getMessage() for r in caplog.records if r.name == "edge_router"]
    assert (
        f"upstream for {label}: UPSTREAM_UNAVAILABLE: repeated 4 more times within 10 s"
    ) in lines


def test_a_fallback_failure_is_not_told_under_the_last_routes_name(
    make_router: MakeRouter, caplog: pytest.LogCaptureFixture
) -> None:
    # One kept-alive connection: a preview request, then one for a host
    # that goes to the fallback upstream, which is down.  The warning must
    # name the fallback, not the route the connection used before (which
    # would also hide that route's own failures for the window).
    caplog.set_level(logging.WARNING, logger="edge_router")
    router = make_router(retry_window=0, fallback=f"127.0.0.1:{free_port()}")
    with upstream() as up, Wire(router.port) as wire:
        host = router.host(router.expose("sb", up.port))
        wire.send(request_bytes(host))
        assert wire.response().status == 200
        wire.send(request_bytes("elsewhere.example"))
        assert_answer(wire.response(), 502, "UPSTREAM_UNAVAILABLE")
    lines = [r.getMessage() for r in caplog.records if r.name == "edge_router"]
    assert [line.partition(" (")[0] for line in lines if "upstream" in line] == [
        "upstream for fallback: UPSTREAM_UNAVAILABLE"
    ]


def test_port_that_starts_inside_the_retry_window_is_served(
    make_router: MakeRouter,
) -> None:
    router = make_router(retry_window=3.0)
    port = free_port()
    exposed = router.expose("sb", port)
    result: list[Any] = []
    client = threading.Thread(
        target=lambda: result.append(get(router, router.host(exposed)))
    )
    client.start()
    # The request is waiting on refused connects when the port opens.
    time.sleep(0.4)
    with ScriptedUpstream(answer_with(OK_RESPONSE), port=port):
        client.join(10)
    assert result and result[0].status == 200
    assert result[0].body == b"ok"


OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_upstream_that_never_answers_is_504(make_router: MakeRouter) -> None:
    router = make_router(response_timeout=0.3)

    def silent(peer: Peer) -> None:
        peer.read_head()
        # Hold the connection open until the router gives up on it.
        peer.closed_within(8)

    with ScriptedUpstream(silent) as up:
        exposed = router.expose("sb", up.port)
        started = time.monotonic()
        with Wire(router.port, timeout=8) as wire:
            wire.send(request_bytes(router.host(exposed)))
            assert_answer(wire.response(), 504, "UPSTREAM_TIMEOUT")
        # The sweeper wakes once a second: 0.3 s becomes at most ~1.3 s.
        assert time.monotonic() - started < 5
        assert len(up.heads) == 1


def test_upstream_closing_before_a_head_is_502_closed(
    make_router: MakeRouter,
) -> None:
    router = make_router()

    def hang_up(peer: Peer) -> None:
        peer.read_head()

    with ScriptedUpstream(hang_up) as up:
        exposed = router.expose("sb", up.port)
        assert_answer(get(router, router.host(exposed)), 502, "UPSTREAM_CLOSED")

    def half_a_head(peer: Peer) -> None:
        peer.read_head()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Le")

    with ScriptedUpstream(half_a_head) as up:
        exposed = router.expose("sb", up.port)
        assert_answer(get(router, router.host(exposed)), 502, "UPSTREAM_CLOSED")


@pytest.mark.parametrize(
    "request_",
    [
        b"GET / HTTP/1.1\r\nHost: x.localhost\r\nBad Header: 1\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: x.localhost\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x.localhost\r\nX: a\r\n b\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x.localhost\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x.localhost\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x.localhost\r\nX: \x00\r\n\r\n",
    ],
    ids=[
        "space-in-name",
        "no-target",
        "http2",
        "obs-fold",
        "cl-and-te",
        "neg-cl",
        "nul",
    ],
)
def test_malformed_request_is_400(make_router: MakeRouter, request_: bytes) -> None:
    router = make_router()
    with Wire(router.port) as wire:
        wire.send(request_)
        assert_answer(wire.response(), 400, "BAD_REQUEST")
        # The stream cannot be trusted after a bad message: the router closes.
        assert wire.closed_within(3)


def test_head_over_max_head_is_431(make_router: MakeRouter) -> None:
    router = make_router(max_head=4096)
    with upstream() as up:
        host = router.host(router.expose("sb", up.port))
        big = request_bytes(host, headers=[("X-Big", "a" * 5000)])
        with Wire(router.port) as wire:
            wire.send(big)
            assert_answer(wire.response(), 431, "HEADERS_TOO_LARGE")
        # Sent in pieces, never completed: refused once past the limit.
        with Wire(router.port) as wire:
            wire.send(big[:3000])
            time.sleep(0.1)
            wire.send(b"X-More: " + b"b" * 3000)
            assert_answer(wire.response(), 431, "HEADERS_TOO_LARGE")
        assert not up.seen


def test_body_over_max_body_is_413(make_router: MakeRouter) -> None:
    router = make_router(max_body=1000)
    with upstream() as up:
        host = router.host(router.expose("sb", up.port))
        # Announced by Content-Length: refused before anything goes upstream.
        with Wire(router.port) as wire:
            wire.send(request_bytes(host, method="POST", body=b"x" * 5000))
            assert_answer(wire.response(), 413, "BODY_TOO_LARGE")
            assert wire.closed_within(3)
        assert not up.seen
        # Chunked: refused once the running total passes the limit.  Head
        # and chunk go in one write: this upstream answers a chunked request
        # on its head alone, and with two writes its 200 could come back
        # before the router had the chunk (a race seen under a loaded run).
        with Wire(router.port) as wire:
            wire.send(
                request_bytes(
                    host, method="POST", headers=[("Transfer-Encoding", "chunked")]
                )
                + b"400\r\n"
                + b"y" * 1024
                + b"\r\n"
            )
            assert_answer(wire.response(), 413, "BODY_TOO_LARGE")
            assert wire.closed_within(3)
        # At the limit is fine, with either framing: the limit counts
        # payload bytes, not the chunk-size lines around them.
        with Wire(router.port) as wire:
            wire.send(request_bytes(host, method="POST", body=b"z" * 1000))
            response = wire.response()
            assert response.status == 200
            assert response.json()["body"] == "z" * 1000
        with ScriptedUpstream(chunked_sink) as sink:
            host = router.host(router.expose("sb", sink.port))
            with Wire(router.port) as wire:
                wire.send(
                    request_bytes(
                        host, method="POST", headers=[("Transfer-Encoding", "chunked")]
                    )
                )
                wire.send(b"1f4\r\n" + b"a" * 500 + b"\r\n")
                wire.send(b"1f4\r\n" + b"b" * 500 + b"\r\n0\r\n\r\n")
                response = wire.response()
                assert response.status == 200 and response.body == b"1000"


def test_a_refused_body_sent_whole_before_reading_still_gets_its_413(
    make_router: MakeRouter,
) -> None:
    # Python's http.client (like many scripts) writes the whole body before
    # it reads, so it is still sending when the 413 goes out.  The router
    # reads and drops the rest instead of closing on it: a close with bytes
    # unread answers them with a reset, which throws the 413 away, and the
    # client saw "connection reset by peer" instead of the answer.
    router = make_router(max_body=1000)
    with upstream() as up:
        host = router.host(router.expose("sb", up.port))
        for _ in range(3):
            conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)
            try:
                conn.request("POST", "/", body=b"x" * 5_000_000, headers={"Host": host})
                response = conn.getresponse()
                assert response.status == 413
                assert json.loads(response.read())["code"] == "BODY_TOO_LARGE"
            finally:
                conn.close()
        assert not up.seen


def test_a_chunked_body_refused_partway_still_gets_its_413(
    make_router: MakeRouter,
) -> None:
    # A chunked upload passes the limit partway: the 413 goes out while the
    # client is still writing chunks, which it does to the end before it
    # reads.  It must then read the 413 and the end of the stream.
    router = make_router(max_body=1000)
    chunk = b"%x\r\n%s\r\n" % (65536, b"c" * 65536)
    with upstream() as up:
        host = router.host(router.expose("sb", up.port))
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", router.port), 10) as sock:
                head = request_bytes(
                    host, method="POST", headers=[("Transfer-Encoding", "chunked")]
                )
                sock.sendall(head + chunk * 80 + b"0\r\n\r\n")
                received = []
                while data := sock.recv(65536):
                    received.append(data)
            answer = b"".join(received)
            assert answer.startswith(b"HTTP/1.1 413 "), answer[:80]
            assert b'"code":"BODY_TOO_LARGE"' in answer


@pytest.mark.parametrize(
    "body",
    [
        b"5;a\rb\r\nhello\r\n0\r\n\r\n",  # a bare CR in an extension
        b"5;\x00\r\nhello\r\n0\r\n\r\n",  # a NUL in one
        b"5\r\nhello\r\n0\r\nX: y\n\n",  # trailers ended by bare LFs
        b"5\r\nhello\r\n0\r\nX: y\r\n z\r\n\r\n",  # a folded trailer
    ],
)
def test_a_chunked_body_a_sandbox_could_misread_is_refused(
    make_router: MakeRouter, body: bytes
) -> None:
    # A chunked body goes upstream as it came, framing lines and all, so a
    # line RFC 9112 lets no recipient pass on must not reach the sandbox: a
    # server stricter or laxer than the router could take its end elsewhere.
    router = make_router()
    received: list[bytes] = []

    def records(peer: Peer) -> None:
        peer.read_head()
        peer.closed_within(5)
        received.append(peer.buf)

    with ScriptedUpstream(records) as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            head = request_bytes(
                host, method="POST", headers=[("Transfer-Encoding", "chunked")]
            )
            wire.send(head + body)
            assert_answer(wire.response(), 400, "BAD_REQUEST")
            assert wire.closed_within(3)
        time.sleep(0.3)
        assert all(b"hello" not in got for got in received)


def test_a_closing_connection_stops_reading_after_its_linger_time(
    make_router: MakeRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The router reads what a client still sends after the last answer for
    # LINGER_SECONDS at most: a client that announces a body, gets its 413,
    # and then neither sends nor closes is not kept for ever.
    from router import speedups

    monkeypatch.setattr(speedups.proxy, "LINGER_SECONDS", 0.5)
    router = make_router(max_body=1000)
    with upstream() as up, Wire(router.port) as wire:
        host = router.host(router.expose("sb", up.port))
        head = request_bytes(host, method="POST", headers=[("Content-Length", "99999")])
        wire.send(head)
        assert_answer(wire.response(), 413, "BODY_TOO_LARGE")
        assert wire.closed_within(3)  # the router's end of writing
        proxy = router.service.proxy
        assert router.call(_client_count(proxy)) == 1  # still reading
        deadline = time.monotonic() + 5
        while router.call(_client_count(proxy)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert router.call(_client_count(proxy)) == 0


async def _client_count(proxy: Any) -> int:
    return len(proxy.clients)


def chunked_sink(peer: Peer) -> None:
    """Read chunked requests and answer each with its payload size."""
    while peer.read_head():
        size = 0
        while True:
            line = b""
            while not line.endswith(b"\r\n"):
                line += peer.read_exact(1)
            length = int(line, 16)
            if length == 0:
                peer.read_exact(2)
                break
            size += len(peer.read_exact(length))
            peer.read_exact(2)
        out = str(size).encode()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(out) + out)


def test_drain_answers_503_with_connection_close(make_router: MakeRouter) -> None:
    router = make_router(grace=5.0)
    release = threading.Event()

    def slow(peer: Peer) -> None:
        while peer.read_request() is not None:
            release.wait(5)
            peer.send(OK_RESPONSE)

    with ScriptedUpstream(slow) as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            # Two pipelined requests; the drain starts while the first is
            # with the upstream, so the second arrives during the drain.
            wire.send(request_bytes(host, "/1") + request_bytes(host, "/2"))
            deadline = time.monotonic() + 5
            while not up.heads and time.monotonic() < deadline:
                time.sleep(0.01)
            drained = router.begin_drain()
            time.sleep(0.1)
            release.set()
            first = wire.response()
            assert first.status == 200 and first.body == b"ok"
            second = wire.response()
            assert_answer(second, 503, "SHUTTING_DOWN")
            assert second.get("Connection") == "close"
            assert wire.closed_within(3)
        drained.result(10)
        assert len(up.heads) == 1


# ---------------------------------------------------------------------------
# SPEC §1: Host matching


def test_host_matching_forms(make_router: MakeRouter) -> None:
    router = make_router(domain=["preview.test", "localhost"])
    with upstream() as up:
        exposed = router.expose("sb", up.port, token="tok")
        label = f"{up.port}-sb-tok"
        for host in (
            f"{label}.preview.test",
            f"{label}.PREVIEW.TEST",
            f"{label.upper()}.Preview.Test",
            f"{label}.preview.test.",
            f"{label}.preview.test:{router.port}",
            f"{label}.preview.test.:{router.port}",
            f"{label}.preview.test:",
            f"{label}.localhost",
            router.host(exposed),
        ):
            response = get(router, host)
            assert response.status == 200, host
        assert len(up.seen) == 9

        for host in (
            f"deeper.{label}.preview.test",
            f"{label}.preview.test.evil",
            f"{label}.other.test",
            f"{label}.preview.test..",
            "preview.test",
            "127.0.0.1",
            "[::1]:80",
        ):
            assert_answer(get(router, host), 404, "NOT_FOUND")

        for host in (
            f"{label}.preview.test:http",
            f"{label}.preview.test: 80",
            f"{label}.preview.test:65536",
            f"{label}.preview.test:99999999999999999999",
            "[::1]x",
            # Not a host at all (RFC 9112 §3.2: 400), preview-shaped or not:
            # only the last ``:digits`` is a port, and no host holds a space.
            f"{label}.preview.test:80:80",
            f"a b.preview.test:{router.port}",
            f"{label}.preview.test/x",
        ):
            assert_answer(get(router, host), 400, "BAD_REQUEST")
        assert len(up.seen) == 9


def test_missing_or_repeated_host_is_400(make_router: MakeRouter) -> None:
    router = make_router()
    with upstream() as up:
        host = router.host(router.expose("sb", up.port))
        cases = [
            b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n",
            f"GET / HTTP/1.1\r\nHost: {host}\r\nHost: {host}\r\n\r\n".encode(),
            f"GET / HTTP/1.1\r\nHost: {host}\r\nhost: other.localhost\r\n\r\n".encode(),
            # Absolute-form whose authority disagrees with Host.
            f"GET http://other.localhost/ HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(),
        ]
        for case in cases:
            with Wire(router.port) as wire:
                wire.send(case)
                assert_answer(wire.response(), 400, "BAD_REQUEST")
        # Absolute-form that agrees is routed.
        with Wire(router.port) as wire:
            wire.send(
                f"GET http://{host}/abs HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            )
            assert wire.response().status == 200
        assert len(up.seen) == 1


def test_fallback_upstream_takes_what_is_not_a_preview_host(
    make_router: MakeRouter,
) -> None:
    with upstream() as fallback, upstream() as up:
        router = make_router(fallback=f"127.0.0.1:{fallback.port}")
        host = router.host(router.expose("sb", up.port, token="tok"))
        label = f"{up.port}-sb-tok"
        for other in ("example.com", f"deeper.{label}.localhost", "localhost"):
            response = get(router, other, "/fb")
            assert response.status == 200, other
        assert [recorded_headers(s)["host"] for s in fallback.seen] == [
            ["example.com"],
            [f"deeper.{label}.localhost"],
            ["localhost"],
        ]
        # Preview hosts still go by the table, wrong tokens included.
        assert get(router, host).status == 200
        wrong = host.replace("-tok.", "-bad.")
        assert_answer(get(router, wrong), 404, "INVALID_TOKEN")
        assert len(up.seen) == 1 and len(fallback.seen) == 3


# ---------------------------------------------------------------------------
# SPEC §4: forwarding


def test_host_rewrite_and_preserve(make_router: MakeRouter) -> None:
    router = make_router()
    with upstream() as up, upstream() as kept:
        rewritten = router.host(router.expose("sb", up.port))
        preserved = router.host(router.expose("sb", kept.port, host="preserve"))
        shouted = preserved.upper()
        get(router, rewritten)
        get(router, shouted)
        assert recorded_headers(up.seen[0])["host"] == [f"localhost:{up.port}"]
        assert recorded_headers(kept.seen[0])["host"] == [shouted]
        # X-Forwarded-Host is the Host exactly as received, either way.
        assert recorded_headers(up.seen[0])["x-forwarded-host"] == [rewritten]
        assert recorded_headers(kept.seen[0])["x-forwarded-host"] == [shouted]


def test_host_rewrite_names_the_exposed_port_not_the_target(
    make_router: MakeRouter,
) -> None:
    router = make_router()
    with upstream() as up:
        port = free_port()
        host = router.host(router.expose("sb", port, target=f"127.0.0.1:{up.port}"))
        assert get(router, host).status == 200
        assert recorded_headers(up.seen[0])["host"] == [f"localhost:{port}"]


SPOOFED = [
    ("X-Forwarded-For", "203.0.113.9"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "spoofed.example"),
    ("X-Forwarded-Port", "443"),
    ("x-forwarded-for", "198.51.100.7"),
]


def test_forwarded_headers_are_set_and_spoofs_replaced(
    make_router: MakeRouter,
) -> None:
    router = make_router()
    with upstream() as up:
        host = router.host(router.expose("sb", up.port))
        get(router, host)
        get(router, host, headers=SPOOFED)
        for seen in up.seen:
            headers = recorded_headers(seen)
            assert headers["x-forwarded-for"] == ["127.0.0.1"]
            assert headers["x-forwarded-proto"] == ["http"]
            assert headers["x-forwarded-host"] == [host]
            assert headers["x-forwarded-port"] == [str(router.port)]


def test_trusted_proxy_values_are_kept_and_appended(
    make_router: MakeRouter,
) -> None:
    router = make_router(trusted_proxy=["127.0.0.0/8"])
    with upstream() as up:
        host = router.host(router.expose("sb", up.port))
        get(router, host, headers=SPOOFED[:4])
        headers = recorded_headers(up.seen[0])
        assert headers["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"]
        assert headers["x-forwarded-proto"] == ["https"]
        assert headers["x-forwarded-host"] == ["spoofed.example"]
        assert headers["x-forwarded-port"] == ["443"]
        # Two X-Forwarded-For lines are one list (RFC 9110 §5.3).
        get(router, host, headers=[SPOOFED[0], SPOOFED[4]])
        headers = recorded_headers(up.seen[1])
        assert headers["x-forwarded-for"] == ["203.0.113.9, 198.51.100.7, 127.0.0.1"]
        # Without client values the router's own are set.
        get(router, host)
        headers = recorded_headers(up.seen[2])
        assert headers["x-forwarded-for"] == ["127.0.0.1"]
        assert headers["x-forwarded-proto"] == ["http"]
        assert headers["x-forwarded-host"] == [host]
        assert headers["x-forwarded-port"] == [str(router.port)]


def test_untrusted_peer_gets_no_trust(make_router: MakeRouter) -> None:
    router = make_router(trusted_proxy=["10.0.0.0/8"])
    with upstream() as up:
        host = router.host(router.expose("sb", up.port))
        get(router, host, headers=SPOOFED[:4])
        headers = recorded_headers(up.seen[0])
        assert headers["x-forwarded-for"] == ["127.0.0.1"]
        assert headers["x-forwarded-proto"] == ["http"]
        assert headers["x-forwarded-host"] == [host]


def test_hop_by_hop_request_headers_stay_on_their_hop(
    make_router: MakeRouter,
) -> None:
    router = make_router()
    with ScriptedUpstream(answer_with(OK_RESPONSE)) as up:
        host = router.host(router.expose("sb", up.port))
        get(
            router,
            host,
            headers=[
                ("Connection", "keep-alive, X-Hop-One, x-hop-two"),
                ("X-Hop-One", "1"),
                ("X-HOP-TWO", "2"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Connection", "keep-alive"),
                ("TE", "trailers"),
                ("X-End-To-End", "3"),
            ],
        )
        head = up.heads[0].lower()
        for name in (b"connection", b"x-hop-one", b"x-hop-two", b"keep-alive"):
            assert b"\r\n" + name + b":" not in head, name
        assert b"\r\nproxy-connection:" not in head
        assert b"\r\nte:" not in head
        assert b"\r\nx-end-to-end: 3\r\n" in head


def test_hop_by_hop_response_headers_stay_on_their_hop(
    make_router: MakeRouter,
) -> None:
    router = make_router()
    response = (
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: X-Up-Hop\r\n"
        b"X-Up-Hop: secret\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"X-Stays: yes\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    with ScriptedUpstream(answer_with(response)) as up:
        host = router.host(router.expose("sb", up.port))
        got = get(router, host)
        assert got.status == 200 and got.body == b"ok"
        names = {k.lower() for k, _ in got.headers}
        assert not names & {b"x-up-hop", b"keep-alive", b"proxy-connection"}
        assert got.get("Connection") is None
        assert got.get("X-Stays") == "yes"


def test_end_to_end_request_headers_pass_byte_exact(make_router: MakeRouter) -> None:
    router = make_router()
    with ScriptedUpstream(answer_with(OK_RESPONSE)) as up:
        host = router.host(router.expose("sb", up.port))
        lines = [
            b"Authorization: Bearer abc.DEF-123",
            b'Cookie: a=1; B=two; session="x y"',
            b"Origin: https://app.example",
            b"x-MiXeD-CaSe:   spaced  value\t",
            b"Accept-Encoding: gzip, br",
            b"X-Repeat: one",
            b"X-Repeat: two",
            b"Access-Control-Request-Method: PUT",
        ]
        raw = (
            f"POST /p?q=1&r=%20 HTTP/1.1\r\nHost: {host}\r\n".encode()
            + b"\r\n".join(lines)
            + b"\r\nContent-Length: 4\r\n\r\nbody"
        )
        with Wire(router.port) as wire:
            wire.send(raw)
            assert wire.response().status == 200
        head = up.heads[0]
        assert head.startswith(b"POST /p?q=1&r=%20 HTTP/1.1\r\n")
        # Each line unchanged (value whitespace trimmed as RFC 9112 §5 says
        # a field value is), in the order sent.
        trimmed = [ln.rstrip(b" \t").replace(b":   ", b": ") for ln in lines]
        positions = [head.index(b"\r\n" + ln + b"\r\n") for ln in trimmed]
        assert positions == sorted(positions)


def test_end_to_end_response_headers_pass_byte_exact(make_router: MakeRouter) -> None:
    router = make_router()
    response = (
        b"HTTP/1.1 307 Temporary Redirect\r\n"
        b"Location: http://localhost:5173/elsewhere?x=1\r\n"
        b"Set-Cookie: a=1; Path=/; HttpOnly\r\n"
        b"Set-Cookie: b=2; Domain=example.com; SameSite=None; Secure\r\n"
        b"set-cookie: c=3\r\n"
        b"Access-Control-Allow-Origin: https://app.example\r\n"
        b"Access-Control-Allow-Credentials: true\r\n"
        b"X-Custom-CASE: Value\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    with ScriptedUpstream(answer_with(response)) as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            wire.send(request_bytes(host, headers=[("Accept-Encoding", "gzip")]))
            got = wire.response()
        assert got.status == 307 and got.reason == b"Temporary Redirect"
        expected = response.split(b"\r\n")[1:-3]
        assert got.head.split(b"\r\n")[1 : 1 + len(expected)] == expected
        # Nothing added: no CORS, no compression, no redirect followed.
        assert got.get_all("Access-Control-Allow-Origin") == ["https://app.example"]
        assert got.get("Content-Encoding") is None
        assert len(up.heads) == 1

        # curl sees the redirect as sent and (without -L) does not follow it.
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "-i",
                "--max-time",
                "5",
                "-H",
                f"Host: {host}",
                f"http://127.0.0.1:{router.port}/",
            ],
            capture_output=True,
            timeout=10,
            check=True,
        ).stdout
        assert b"\r\nLocation: http://localhost:5173/elsewhere?x=1\r\n" in out
        assert out.lower().count(b"\r\nset-cookie: ") == 3
        assert len(up.heads) == 2


def test_http_client_round_trip(make_router: MakeRouter) -> None:
    router = make_router()
    with upstream() as up:
        host = router.host(router.expose("sb", up.port))
        conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=5)
        try:
            for i in range(3):
                conn.request("PUT", f"/item/{i}", body=b"v" * i, headers={"Host": host})
                response = conn.getresponse()
                seen = json.loads(response.read())
                assert response.status == 200
                assert seen["path"] == f"/item/{i}" and seen["body"] == "v" * i
            sock = conn.sock
            assert sock is not None
            # One connection for all three (keep-alive to the client).
            assert sock.fileno() >= 0
        finally:
            conn.close()


def test_upstream_pool_is_per_sandbox(make_router: MakeRouter) -> None:
    router = make_router()
    peers: list[tuple[int, int]] = []

    def note(peer: Peer) -> None:
        while peer.read_request() is not None:
            peers.append(peer.sock.getpeername())
            peer.send(OK_RESPONSE)

    with ScriptedUpstream(note) as up:
        one = router.host(router.expose("one", up.port))
        two = router.host(router.expose("two", up.port))
        for host in (one, one, two, two, one):
            assert get(router, host).status == 200
        by_sandbox: dict[str, set[Any]] = {}
        for host, peer in zip((one, one, two, two, one), peers, strict=True):
            by_sandbox.setdefault(host, set()).add(peer)
        # Pooled: each sandbox reuses its own upstream connection, and no
        # connection ever carries requests of both.
        assert not by_sandbox[one] & by_sandbox[two]
        assert up.connections == 2


def test_a_client_that_alternates_sandboxes_never_shares_their_connections(
    make_router: MakeRouter,
) -> None:
    # One kept-alive client, its requests going back and forth between two
    # sandboxes on one upstream server: each request is routed afresh, and
    # an upstream connection carries one sandbox's requests only.
    router = make_router()
    seen: list[tuple[bytes, Any]] = []

    def note(peer: Peer) -> None:
        while (request := peer.read_request()) is not None:
            seen.append((request[0].partition(b" HTTP")[0], peer.sock.getpeername()))
            peer.send(OK_RESPONSE)

    with ScriptedUpstream(note) as up, Wire(router.port) as wire:
        one = router.host(router.expose("one", up.port))
        two = router.host(router.expose("two", up.port))
        for i, host in enumerate((one, one, two, one, two, two, one)):
            wire.send(request_bytes(host, f"/{host[:9]}/{i}"))
            assert wire.response().body == b"ok"
    assert len(seen) == 7
    by_sandbox: dict[str, set[Any]] = {}
    for target, peer in seen:
        by_sandbox.setdefault(target.split(b"/")[1].decode(), set()).add(peer)
    assert len(by_sandbox) == 2
    first, second = by_sandbox.values()
    assert not first & second
    assert up.connections == 2


def test_a_route_changed_in_place_sends_its_next_request_to_the_new_upstream(
    make_router: MakeRouter,
) -> None:
    # The data path keeps, per route, where its last request went, so that
    # a request builds and hashes no pool key.  A route re-exposed with the
    # same token and another target (same label, same URL) must not be
    # served from that: the next request on the same kept-alive connection
    # goes to the new target, and back again.
    router = make_router()
    port = free_port()
    with upstream() as first, upstream() as second, Wire(router.port) as wire:
        for up in (first, second, first, first, second):
            exposed = router.expose(
                "sb", port, token="stable-token", target=f"127.0.0.1:{up.port}"
            )
            wire.send(request_bytes(router.host(exposed), f"/to-{up.port}"))
            assert wire.response().status == 200
        assert [seen["path"] for seen in first.seen] == [f"/to-{first.port}"] * 3
        assert [seen["path"] for seen in second.seen] == [f"/to-{second.port}"] * 2


def test_requests_go_on_after_the_sweeper_drops_a_pool(
    make_router: MakeRouter,
) -> None:
    # Idle upstream connections are closed after about 30 s, and an empty
    # pool is then dropped: the route that remembered that pool must get
    # the new one, and its connections be pooled there.
    router = make_router()
    with ScriptedUpstream(answer_with(OK_RESPONSE)) as up, Wire(router.port) as wire:
        host = router.host(router.expose("sb", up.port))
        proxy = router.service.proxy
        for round_ in range(3):
            wire.send(request_bytes(host, f"/{round_}"))
            assert wire.response().body == b"ok"
            router.call(_sweep_as_if_idle_for_an_hour(proxy))
            assert not proxy.pools
        assert up.connections == 3
        for path in ("/again", "/and-again", "/and-once-more"):
            wire.send(request_bytes(host, path))
            assert wire.response().body == b"ok"
        assert up.connections == 4
        assert router.call(_pool_sizes(proxy)) == [1]


def test_a_connection_busy_when_its_pool_is_dropped_is_pooled_again(
    make_router: MakeRouter,
) -> None:
    # A sweep while a request is in flight finds that route's pool empty
    # (its one connection is in use) and drops it.  When the response ends,
    # the connection must go to the pool the next request looks in, not to
    # the dropped one: one upstream connection for every request.
    router = make_router()
    release = threading.Event()

    def slow_first(peer: Peer) -> None:
        while peer.read_request() is not None:
            release.wait(5)
            peer.send(OK_RESPONSE)

    with ScriptedUpstream(slow_first) as up, Wire(router.port) as wire:
        host = router.host(router.expose("sb", up.port))
        proxy = router.service.proxy
        wire.send(request_bytes(host, "/slow"))
        deadline = time.monotonic() + 5
        while up.connections == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        router.call(_sweep_as_if_idle_for_an_hour(proxy))
        assert not proxy.pools
        release.set()
        assert wire.response().body == b"ok"
        for i in range(3):
            wire.send(request_bytes(host, f"/{i}"))
            assert wire.response().body == b"ok"
        assert up.connections == 1


async def _pool_sizes(proxy: Any) -> list[int]:
    # Read on the loop's thread, once the callback that answered is over.
    return [len(pool) for pool in proxy.pools.values()]


async def _sweep_as_if_idle_for_an_hour(proxy: Any) -> None:
    # One sweep now, in place of the next scheduled one.
    for pool in proxy.pools.values():
        for up in pool:
            up.idle_since = proxy.loop.time() - 3600
    proxy._sweeper.cancel()
    proxy._sweep()


@pytest.mark.parametrize(
    "op",
    [
        {"op": "set_sandbox", "sandbox": "sb", "state": "stopped"},
        {"op": "destroy_sandbox", "sandbox": "sb"},
    ],
    ids=["stopped", "destroyed"],
)
def test_idle_upstream_connections_close_when_their_sandbox_stops_or_goes(
    make_router: MakeRouter, op: dict[str, Any]
) -> None:
    # Pooled connections of a sandbox that stopped or was destroyed carry
    # nothing more: the upstream sees them closed at once, not after the
    # 30 s an idle connection otherwise stays.  Another sandbox's stay.
    router = make_router()
    ended: dict[str, float] = {}

    def note_end(peer: Peer) -> None:
        path = b""
        while (request := peer.read_request()) is not None:
            path = request[0].split(b" ")[1]
            peer.send(OK_RESPONSE)
        ended[path.decode()] = time.monotonic()

    with ScriptedUpstream(note_end) as up:
        for name in ("sb", "other"):
            assert (
                get(
                    router, router.host(router.expose(name, up.port)), f"/{name}"
                ).status
                == 200
            )
        began = time.monotonic()
        router.commit(op)
        while "/sb" not in ended and time.monotonic() < began + 5:
            time.sleep(0.01)
        assert ended["/sb"] - began < 1.0
        time.sleep(0.3)
        assert "/other" not in ended
        assert up.connections == 2


def test_idle_kept_alive_clients_tie_up_no_upstream_connection(
    make_router: MakeRouter,
) -> None:
    # Seventy clients stay connected after one request each, one after the
    # other: an upstream connection goes back to the pool when its response
    # ends, so every request reuses the same one.  (A connection reserved
    # for each idle client would make the 65th and later open and close
    # a connection per request.)
    router = make_router()
    with ScriptedUpstream(answer_with(OK_RESPONSE)) as up:
        host = router.host(router.expose("sb", up.port))
        wires = [Wire(router.port) for _ in range(70)]
        try:
            for round_ in range(2):
                for wire in wires:
                    wire.send(request_bytes(host, f"/{round_}"))
                    assert wire.response().body == b"ok"
        finally:
            for wire in wires:
                wire.close()
        assert up.connections == 1


def test_answers_on_later_requests_of_a_kept_alive_connection(
    make_router: MakeRouter,
) -> None:
    # Each failure comes after a successful request on the same connection:
    # what the router answers must not depend on what came before.
    router = make_router(response_timeout=0.3, retry_window=0.2)

    def silent(peer: Peer) -> None:
        peer.read_head()
        peer.closed_within(8)

    def hang_up(peer: Peer) -> None:
        peer.read_head()

    with (
        ScriptedUpstream(answer_with(OK_RESPONSE)) as ok,
        ScriptedUpstream(silent) as quiet,
        ScriptedUpstream(hang_up) as rude,
    ):
        good = router.host(router.expose("sb", ok.port))
        cases = [
            (router.host(router.expose("sb", quiet.port)), 504, "UPSTREAM_TIMEOUT"),
            (router.host(router.expose("sb", rude.port)), 502, "UPSTREAM_CLOSED"),
            (
                router.host(router.expose("sb", free_port())),
                502,
                "UPSTREAM_UNAVAILABLE",
            ),
        ]
        with Wire(router.port, timeout=8) as wire:
            for host, status, code in cases:
                wire.send(request_bytes(good))
                assert wire.response().body == b"ok"
                wire.send(request_bytes(host))
                assert_answer(wire.response(), status, code)
            wire.send(request_bytes(good))
            assert wire.response().body == b"ok"


def test_pooled_connection_closed_by_the_upstream_is_retried(
    make_router: MakeRouter,
) -> None:
    router = make_router()

    def one_and_done(peer: Peer) -> None:
        # Keep-alive in name only: the upstream closes after each answer,
        # racing the router's reuse of the pooled connection.
        if peer.read_request() is not None:
            peer.send(OK_RESPONSE)

    with ScriptedUpstream(one_and_done) as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            for _ in range(30):
                wire.send(request_bytes(host))
                assert wire.response().body == b"ok"
        assert up.connections >= 30


def test_a_long_pipeline_of_requests_the_router_answers_itself(
    make_router: MakeRouter,
) -> None:
    # Each is answered while the one before is still being read: 3,000 in
    # one write must all get their answer, in order, on a connection that
    # stays open (the pure twin used to nest a call per request and fail
    # on Python's recursion limit).
    router = make_router()
    count = 3000
    with Wire(router.port, timeout=20) as wire:
        wire.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n" * count)
        for _ in range(count):
            assert_answer(wire.response(), 404, "NOT_FOUND")
        wire.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert_answer(wire.response(), 404, "NOT_FOUND")


def test_bytes_after_a_bodiless_answer_keep_its_connection_out_of_the_pool(
    make_router: MakeRouter,
) -> None:
    # A 304 has no body, so what follows it on the wire is nothing the
    # router can frame: the connection is not reused for the next request,
    # whose answer those bytes would otherwise start.
    router = make_router()

    def answers(peer: Peer) -> None:
        while peer.read_request() is not None:
            peer.send(b"HTTP/1.1 304 Not Modified\r\n\r\nstray")

    with ScriptedUpstream(answers) as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            for _ in range(3):
                wire.send(request_bytes(host))
                response = wire.response()
                assert response.status == 304 and response.body == b""
        assert up.connections == 3


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_a_request_that_may_not_be_repeated_is_sent_once(
    make_router: MakeRouter, method: str
) -> None:
    # The second request on a pooled connection is read, then the sandbox
    # dies without a word: to the router that looks like a stale pooled
    # connection, but it may have charged a card (RFC 9112 §9.3.1).
    router = make_router()

    def answers_then_dies(peer: Peer) -> None:
        if peer.read_request() is not None:
            peer.send(OK_RESPONSE)
            peer.read_request()

    with ScriptedUpstream(answers_then_dies) as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            wire.send(request_bytes(host, "/first"))
            assert wire.response().body == b"ok"
            wire.send(request_bytes(host, "/charge", method=method))
            assert_answer(wire.response(), 502, "UPSTREAM_CLOSED")
        charges = [h for h in up.heads if h.startswith(method.encode() + b" ")]
        assert len(charges) == 1


def test_first_request_with_a_body_reaches_a_new_upstream(
    make_router: MakeRouter,
) -> None:
    # Head and body in one packet, and no pooled connection yet: the whole
    # request is in hand before the upstream connect completes.
    router = make_router()
    with upstream() as up:
        for i in range(5):
            host = router.host(router.expose(f"sb{i}", up.port))
            with Wire(router.port) as wire:
                wire.send(request_bytes(host, f"/{i}", method="POST", body=b"b" * 100))
                response = wire.response()
                assert response.status == 200
                assert response.json()["body"] == "b" * 100


def test_absolute_form_goes_upstream_in_origin_form(make_router: MakeRouter) -> None:
    router = make_router()
    with ScriptedUpstream(answer_with(OK_RESPONSE)) as up:
        host = router.host(router.expose("sb", up.port))
        # RFC 9112 §3.2.1: a request to an origin server is in origin-form.
        with Wire(router.port) as wire:
            wire.send(
                f"GET http://{host}/abs?q=1 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            )
            assert wire.response().status == 200
        assert up.heads[0].startswith(b"GET /abs?q=1 HTTP/1.1\r\n")


def test_idle_keep_alive_connection_is_closed(make_router: MakeRouter) -> None:
    router = make_router(idle_timeout=0.5)
    with upstream() as up:
        host = router.host(router.expose("sb", up.port))
        with Wire(router.port) as wire:
            wire.send(request_bytes(host))
            assert wire.response().status == 200
            # 0.5 s, checked by the once-a-second sweep.
            assert wire.closed_within(4)
            assert wire.buf == b""


def test_a_change_is_served_and_read_only_once_stored(
    make_router: MakeRouter, tmp_path: Path
) -> None:
    state = tmp_path / "routes.db"
    control_path = str(tmp_path / "control.sock")
    router = make_router(state=str(state), control=control_path)
    with upstream() as up:
        old = router.host(router.expose("sb", up.port, token="old"))
        new = old.replace("-old.", "-new.")

        # Another process holds the store's write lock, so the rotation
        # waits for it between prepare and commit.
        blocker = sqlite3.connect(state, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        assert router.service.router is not None
        op = {"op": "expose_port", "sandbox": "sb", "port": up.port, "token": "new"}
        rotating = asyncio.run_coroutine_threadsafe(
            router.service.router.commit([op]), router.loop
        )
        read: list[bool] = []
        try:
            table = router.service.router.table
            deadline = time.monotonic() + 5
            while getattr(table.route("sb", up.port), "token", None) != "new":
                assert time.monotonic() < deadline, "the change was not prepared"
                time.sleep(0.01)

            # Not stored, so not served, and not read back either.
            assert get(router, old).status == 200
            assert_answer(get(router, new), 404, "INVALID_TOKEN")

            def validate() -> None:
                with ControlClient(control_path) as c:
                    read.append(c.validate_port_token("sb", up.port, "new"))

            reader = threading.Thread(target=validate)
            reader.start()
            reader.join(0.3)
            assert read == []
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        rotating.result(10)
        reader.join(10)
        assert read == [True]
        assert get(router, new).status == 200
        assert_answer(get(router, old), 404, "INVALID_TOKEN")
