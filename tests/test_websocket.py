"""WebSocket tunnels through a real router (SPEC §5, revocation of §2, §4).

A real client (``websockets``) talks to a real router (``RouterThread``),
which relays to a real upstream (``WsUpstream``, or ``RawUpstream`` where
the upstream has to misbehave).  Everything is on 127.0.0.1 and every wait
is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop
from harness import RouterThread
from websockets.exceptions import InvalidStatus
from ws_harness import (
    OP_BINARY,
    OP_CLOSE,
    OP_TEXT,
    TIMEOUT,
    FrameReader,
    RawUpstream,
    WsUpstream,
    closed_code,
    echo,
    encode_frame,
    header,
    http_request,
    raw_upgrade,
    read_head,
    read_to_eof,
    router_maker,
    switching_protocols,
    upgrade_request,
    ws_connect,
)

from router import speedups
from router.speedups import FORCED_PURE


@pytest.fixture(params=["asyncio", "uvloop"])
def make_router(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., RouterThread]]:
    yield from router_maker(request.param)


@pytest.fixture
def router(make_router: Callable[..., RouterThread]) -> RouterThread:
    return make_router()


@pytest.fixture
def upstream() -> Iterator[WsUpstream]:
    with WsUpstream(subprotocol="chat.v2") as up:
        yield up


def public_host(router: RouterThread, upstream_port: int, **args: Any) -> str:
    return router.host(router.expose("alpha", upstream_port, **args))


def close_payload(payload: bytes) -> tuple[int, str]:
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode()


# -- messages, control frames and closes pass through untouched ---------------


def test_text_and_one_mebibyte_binary_round_trip(
    router: RouterThread, upstream: WsUpstream
) -> None:
    host = public_host(router, upstream.port)
    big = os.urandom(1 << 20)
    with ws_connect(router.port, host) as ws:
        echo(ws, "hello, tunnel")
        echo(ws, big)
        echo(ws, "still framed after a large message")


def test_ping_and_pong_both_ways(router: RouterThread, upstream: WsUpstream) -> None:
    host = public_host(router, upstream.port)
    with ws_connect(router.port, host) as ws:
        assert ws.ping(b"from client").wait(TIMEOUT)
    # The upstream pings; the client's automatic pong must reach it.
    with ws_connect(router.port, host, "/ping") as ws:
        assert ws.recv(TIMEOUT) == "pong seen"


def test_close_code_and_reason_from_client(
    router: RouterThread, upstream: WsUpstream
) -> None:
    host = public_host(router, upstream.port)
    with ws_connect(router.port, host) as ws:
        echo(ws)
        ws.close(4000, "client says bye")
        # The upstream's reply to the close comes back through the tunnel.
        assert ws.protocol.close_rcvd.code == 4000
    [ended] = upstream.wait_ended(1)
    assert (ended.code, ended.reason) == (4000, "client says bye")


def test_close_code_and_reason_from_upstream(
    router: RouterThread, upstream: WsUpstream
) -> None:
    host = public_host(router, upstream.port)
    with ws_connect(router.port, host, "/close") as ws:
        ws.send("go")
        assert closed_code(ws) == 4001
        assert ws.protocol.close_rcvd.reason == "upstream says bye"


# -- the handshake ------------------------------------------------------------


def test_subprotocol_chosen_by_upstream_reaches_client(
    router: RouterThread, upstream: WsUpstream
) -> None:
    host = public_host(router, upstream.port)
    # The upstream prefers chat.v2 although the client lists it second.
    with ws_connect(router.port, host, subprotocols=["chat.v1", "chat.v2"]) as ws:
        assert ws.subprotocol == "chat.v2"
        echo(ws)


def test_firefox_style_upgrade_headers(
    router: RouterThread, upstream: WsUpstream
) -> None:
    """``Connection: keep-alive, Upgrade`` and ``Upgrade: WebSocket``."""
    host = public_host(router, upstream.port)
    key = b"x3JJHMbDL1EzLkh9GBhXDw=="
    with raw_upgrade(
        router.port,
        host,
        connection="keep-alive, Upgrade",
        upgrade="WebSocket",
        key=key,
    ) as (head, reader, sock):
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert header(head, b"sec-websocket-accept") == speedups.tunnel.accept_key(key)
        sock.sendall(encode_frame(OP_TEXT, b"firefox", mask=True))
        assert reader.frame() == (OP_TEXT, b"firefox")
        sock.sendall(encode_frame(OP_CLOSE, struct.pack("!H", 1000), mask=True))
        opcode, payload = reader.frame()
        assert opcode == OP_CLOSE
        assert close_payload(payload)[0] == 1000


def test_end_to_end_headers_reach_upstream(
    router: RouterThread, upstream: WsUpstream
) -> None:
    host = public_host(router, upstream.port)
    sent = {
        "Cookie": "session=abc; theme=dark",
        "Authorization": "Bearer t0k3n",
        "X-Custom-Thing": "kept as is",
    }
    with ws_connect(
        router.port,
        host,
        "/echo?q=1",
        origin="http://app.example",
        subprotocols=["chat.v1", "chat.v2"],
        additional_headers=sent,
    ) as ws:
        echo(ws)
    upstream.wait_requests(1)
    path, seen = upstream.requests[0]
    assert path == "/echo?q=1"
    for name, value in sent.items():
        assert seen[name] == value
    assert seen["Origin"] == "http://app.example"
    assert seen["Sec-WebSocket-Protocol"] == "chat.v1, chat.v2"
    assert seen["Sec-WebSocket-Extensions"].startswith("permessage-deflate")
    assert seen["Sec-WebSocket-Version"] == "13"
    assert seen["Upgrade"].lower() == "websocket"


@pytest.mark.parametrize("policy", ["rewrite", "preserve"])
def test_page_and_its_upgrade_see_the_same_host(
    router: RouterThread, upstream: WsUpstream, policy: str
) -> None:
    """SPEC §4: one Host policy for plain requests and upgrades alike."""
    target = f"127.0.0.1:{upstream.port}"
    host = router.host(router.expose("alpha", 8080, target=target, host=policy))
    status, _, body = http_request(router.port, host, "/page")
    assert status == 200
    page_host = json.loads(body)["host"]
    with ws_connect(router.port, host) as ws:
        echo(ws)
    upstream.wait_requests(2)
    upgrade_host = upstream.requests[1][1]["Host"]
    expected = "localhost:8080" if policy == "rewrite" else host
    assert page_host == upgrade_host == expected


def test_non_101_answer_is_relayed(router: RouterThread, upstream: WsUpstream) -> None:
    host = public_host(router, upstream.port)
    with pytest.raises(InvalidStatus) as info, ws_connect(router.port, host, "/deny"):
        pass
    assert info.value.response.status_code == 403
    assert info.value.response.body == b"nope"


def test_101_with_wrong_accept_key_is_502(router: RouterThread) -> None:
    def bad_accept(sock: socket.socket) -> None:
        head, _ = read_head(sock)
        sock.sendall(switching_protocols(head, accept=b"bm90IHRoZSByaWdodCBrZXk="))
        # The router must hang up on us rather than relay frames.
        assert sock.recv(1) == b""

    with RawUpstream(bad_accept) as up:
        host = public_host(router, up.port)
        with pytest.raises(InvalidStatus) as info, ws_connect(router.port, host):
            pass
    assert info.value.response.status_code == 502
    assert b"UPSTREAM_BAD_RESPONSE" in info.value.response.body


H2C_REQUEST = (
    "GET /h2 HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
)


def test_an_upgrade_to_another_protocol_goes_as_a_plain_request(
    router: RouterThread,
) -> None:
    """Only WebSocket is tunnelled: h2c reaches the upstream without its
    Upgrade, and the client gets the upstream's ordinary answer."""
    heads: list[bytes] = []

    def plain(sock: socket.socket) -> None:
        head, _ = read_head(sock)
        heads.append(head)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nh1")

    with RawUpstream(plain) as up:
        host = public_host(router, up.port)
        with socket.create_connection(("127.0.0.1", router.port), TIMEOUT) as sock:
            sock.sendall(H2C_REQUEST.format(host=host).encode())
            head, rest = read_head(sock)
            while len(rest) < 2:
                rest += sock.recv(100)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert rest == b"h1"
    assert header(heads[0], b"upgrade") is None
    assert b"upgrade" not in (header(heads[0], b"connection") or b"").lower()
    # HTTP2-Settings was listed in Connection: hop-by-hop, so dropped too.
    assert header(heads[0], b"http2-settings") is None


def test_a_101_to_another_protocol_is_502(router: RouterThread) -> None:
    def switch_anyway(sock: socket.socket) -> None:
        read_head(sock)
        sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
            b"Upgrade: h2c\r\n\r\n"
        )
        assert sock.recv(1) == b""

    with RawUpstream(switch_anyway) as up:
        host = public_host(router, up.port)
        with socket.create_connection(("127.0.0.1", router.port), TIMEOUT) as sock:
            sock.sendall(H2C_REQUEST.format(host=host).encode())
            head, body = read_head(sock)
            while len(body) < int(header(head, b"content-length") or 0):
                body += sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 502 ")
    assert json.loads(body)["code"] == "UPSTREAM_BAD_RESPONSE"


def test_frames_on_either_side_of_the_101_are_relayed(router: RouterThread) -> None:
    """A frame in the same read as the 101, and one the client sends before
    the 101 arrives: both go through, in order."""

    def greet_then_echo(sock: socket.socket) -> None:
        head, rest = read_head(sock)
        sock.sendall(switching_protocols(head) + encode_frame(OP_TEXT, b"hi", False))
        reader = FrameReader(sock, rest)
        opcode, payload = reader.frame()
        sock.sendall(encode_frame(opcode, payload, mask=False))

    with RawUpstream(greet_then_echo) as up:
        host = public_host(router, up.port)
        with socket.create_connection(("127.0.0.1", router.port), TIMEOUT) as sock:
            sock.sendall(
                upgrade_request(host) + encode_frame(OP_TEXT, b"early", mask=True)
            )
            head, rest = read_head(sock)
            assert head.startswith(b"HTTP/1.1 101 ")
            reader = FrameReader(sock, rest)
            assert reader.frame() == (OP_TEXT, b"hi")
            assert reader.frame() == (OP_TEXT, b"early")


def test_revocation_before_the_101_is_an_http_answer(router: RouterThread) -> None:
    """SPEC §3: errors before a 101 are ordinary responses, upgrades too."""
    asked = threading.Event()
    revoked = threading.Event()

    def slow_switch(sock: socket.socket) -> None:
        head, _ = read_head(sock)
        asked.set()
        if revoked.wait(TIMEOUT):
            with contextlib.suppress(OSError):
                sock.sendall(switching_protocols(head))

    with RawUpstream(slow_switch) as up:
        host = public_host(router, 8001, target=f"127.0.0.1:{up.port}")
        with socket.create_connection(("127.0.0.1", router.port), TIMEOUT) as sock:
            sock.sendall(upgrade_request(host))
            assert asked.wait(TIMEOUT)
            _unexpose(router, "")
            revoked.set()
            head, rest = read_head(sock)
            assert head.startswith(b"HTTP/1.1 404 "), head
            assert b"INVALID_TOKEN" in rest + read_to_eof(sock)


# -- revocation (SPEC §2) -----------------------------------------------------


def _unexpose(router: RouterThread, target: str) -> None:
    router.commit({"op": "unexpose_port", "sandbox": "alpha", "port": 8001})


def _rotate(router: RouterThread, target: str) -> None:
    router.expose("alpha", 8001, target=target, token="rotated")


def _stop(router: RouterThread, target: str) -> None:
    router.commit({"op": "set_sandbox", "sandbox": "alpha", "state": "stopped"})


def _destroy(router: RouterThread, target: str) -> None:
    router.commit({"op": "destroy_sandbox", "sandbox": "alpha"})


REVOCATIONS: dict[str, tuple[Callable[[RouterThread, str], None], bool]] = {
    # name: (the change, whether alpha's other port dies with it)
    "unexpose": (_unexpose, False),
    "rotate": (_rotate, False),
    "stop": (_stop, True),
    "destroy": (_destroy, True),
}


@pytest.mark.parametrize("change", list(REVOCATIONS))
def test_revocation_closes_only_its_own_tunnels(
    router: RouterThread, upstream: WsUpstream, change: str
) -> None:
    """Two tunnels on each of three routes; one route (or sandbox) revoked.

    The revoked tunnels get 1008 at the client and 1001 at the upstream;
    every other tunnel keeps echoing.
    """
    revoke, sibling_dies = REVOCATIONS[change]
    target = f"127.0.0.1:{upstream.port}"
    routes = {
        "victim": router.expose("alpha", 8001, target=target),
        "sibling": router.expose("alpha", 8002, target=target),
        "other": router.expose("beta", 8001, target=target),
    }
    doomed = {"victim", "sibling"} if sibling_dies else {"victim"}
    with contextlib.ExitStack() as stack:
        tunnels = {
            (name, i): stack.enter_context(
                ws_connect(router.port, router.host(exposed), f"/echo-{name}-{i}")
            )
            for name, exposed in routes.items()
            for i in range(2)
        }
        for ws in tunnels.values():
            echo(ws)

        revoke(router, target)

        for (name, _), ws in tunnels.items():
            if name in doomed:
                assert closed_code(ws) == 1008
        ended = upstream.wait_ended(2 * len(doomed))
        assert sorted(e.path for e in ended) == sorted(
            f"/echo-{name}-{i}" for name in doomed for i in range(2)
        )
        assert {e.code for e in ended} == {1001}
        for (name, _), ws in tunnels.items():
            if name not in doomed:
                echo(ws, f"{name} lives on")
                echo(ws, os.urandom(70000))
        assert len(upstream.ended) == 2 * len(doomed)

    # New upgrades get the new answer, as plain requests do.
    old_host = router.host(routes["victim"])
    expected = {"unexpose": 404, "rotate": 404, "stop": 410, "destroy": 404}[change]
    with pytest.raises(InvalidStatus) as info, ws_connect(router.port, old_host):
        pass
    assert info.value.response.status_code == expected
    if change == "rotate":
        fresh = router.host(router.expose("alpha", 8001, target=target))
        assert "rotated" in fresh
        with ws_connect(router.port, fresh) as ws:
            echo(ws)


class HalfFrameUpstream:
    """A raw upstream that stops halfway through a 1000-byte binary frame.

    With ``complete`` it finishes the frame once ``finish`` is set.  It
    records the frames the router sends it and whether the router then hung
    up.
    """

    def __init__(self, complete: bool) -> None:
        self.complete = complete
        self.payload = os.urandom(1000)
        self.frame = encode_frame(OP_BINARY, self.payload, mask=False)
        self.half_sent = threading.Event()
        self.finish = threading.Event()
        self.done = threading.Event()
        self.got: list[tuple[int, bytes]] = []
        self.eof = False

    def __call__(self, sock: socket.socket) -> None:
        head, rest = read_head(sock)
        sock.sendall(switching_protocols(head))
        sock.sendall(self.frame[:500])
        self.half_sent.set()
        reader = FrameReader(sock, rest)
        try:
            self.got.append(reader.frame())
            if self.complete and self.finish.wait(TIMEOUT):
                sock.sendall(self.frame[500:])
            self.eof = reader.at_eof()
        finally:
            self.done.set()


def test_revocation_waits_for_the_frame_in_flight(
    make_router: Callable[..., RouterThread],
) -> None:
    """A close frame is never put inside a frame (the point of FrameTracker).

    The upstream is halfway through a frame when the route is revoked: the
    upstream gets its 1001 at once, but the client gets the rest of the
    frame first, then 1008.  The client's socket is closed once it answers
    (RFC 6455 §7.1.1), and the upstream's with it.
    """
    # A grace period longer than the test's waits: a socket that closes
    # was closed by the answer, not cut by the timer.
    router = make_router(grace=60.0)
    up_behaviour = HalfFrameUpstream(complete=True)
    with RawUpstream(up_behaviour) as up:
        host = public_host(router, 8001, target=f"127.0.0.1:{up.port}")
        with raw_upgrade(router.port, host) as (head, reader, sock):
            assert head.startswith(b"HTTP/1.1 101 ")
            assert up_behaviour.half_sent.wait(TIMEOUT)
            time.sleep(0.1)  # let the half frame reach the router
            _unexpose(router, "")
            up_behaviour.finish.set()
            assert reader.frame() == (OP_BINARY, up_behaviour.payload)
            opcode, payload = reader.frame()
            assert (opcode, close_payload(payload)[0]) == (OP_CLOSE, 1008)
            sock.sendall(encode_frame(OP_CLOSE, payload, mask=True))
            assert reader.at_eof()
        assert up_behaviour.done.wait(TIMEOUT)
    [(opcode, payload)] = up_behaviour.got
    assert (opcode, close_payload(payload)[0]) == (OP_CLOSE, 1001)
    assert up_behaviour.eof


def test_revoked_tunnel_stuck_mid_frame_is_cut_after_grace(
    make_router: Callable[..., RouterThread],
) -> None:
    router = make_router(grace=0.5)
    up_behaviour = HalfFrameUpstream(complete=False)
    with RawUpstream(up_behaviour) as up:
        host = public_host(router, 8001, target=f"127.0.0.1:{up.port}")
        with raw_upgrade(router.port, host) as (_, reader, sock):
            assert up_behaviour.half_sent.wait(TIMEOUT)
            time.sleep(0.1)
            _unexpose(router, "")
            started = time.monotonic()
            # The frame never ends: the client's socket is cut without a
            # close frame (one would land inside the frame).
            with pytest.raises(EOFError):
                reader.frame()
            assert time.monotonic() - started < 0.5 + 1.5
            sock.close()
        assert up_behaviour.done.wait(TIMEOUT)
    [(opcode, _)] = up_behaviour.got
    assert opcode == OP_CLOSE
    assert up_behaviour.eof


def test_revoked_client_that_never_answers_is_cut_after_grace(
    make_router: Callable[..., RouterThread], upstream: WsUpstream
) -> None:
    router = make_router(grace=0.5)
    host = public_host(router, 8001, target=f"127.0.0.1:{upstream.port}")
    with raw_upgrade(router.port, host) as (head, reader, _):
        assert head.startswith(b"HTTP/1.1 101 ")
        _unexpose(router, "")
        opcode, payload = reader.frame()
        assert (opcode, close_payload(payload)[0]) == (OP_CLOSE, 1008)
        started = time.monotonic()
        # No answer from this client: the socket is kept for the grace
        # period only (the sweeper looks once a second).
        assert reader.at_eof()
        assert time.monotonic() - started < 0.5 + 1.5
    [ended] = upstream.wait_ended(1)
    assert ended.code == 1001


# -- a peer that dies ---------------------------------------------------------


def test_upstream_socket_closed_without_close_frame(router: RouterThread) -> None:
    dropped = threading.Event()
    dropped_at: list[float] = []

    def drop_after_one_message(sock: socket.socket) -> None:
        head, _ = read_head(sock)
        sock.sendall(switching_protocols(head))
        sock.recv(65536)
        dropped_at.append(time.monotonic())
        sock.close()
        dropped.set()

    with RawUpstream(drop_after_one_message) as up:
        host = public_host(router, up.port)
        with raw_upgrade(router.port, host) as (_, reader, sock):
            sock.sendall(encode_frame(OP_TEXT, b"last words", mask=True))
            assert dropped.wait(TIMEOUT)
            opcode, payload = reader.frame()
            assert (opcode, close_payload(payload)[0]) == (OP_CLOSE, 1011)
            assert reader.at_eof()
            assert time.monotonic() - dropped_at[0] < 1.0


UPSTREAM_PROCESS = """
import sys
from websockets.sync.server import serve

def handler(ws):
    for message in ws:
        ws.send(message)

with serve(handler, "127.0.0.1", 0, ping_interval=None) as server:
    print(server.socket.getsockname()[1], flush=True)
    server.serve_forever()
"""


def test_upstream_process_killed(router: RouterThread) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", UPSTREAM_PROCESS], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        host = public_host(router, port)
        with ws_connect(router.port, host) as ws:
            echo(ws)
            proc.kill()
            killed = time.monotonic()
            assert closed_code(ws) == 1011
            assert time.monotonic() - killed < 1.0
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_client_death_closes_upstream(
    router: RouterThread, upstream: WsUpstream, how: str
) -> None:
    host = public_host(router, upstream.port)
    with raw_upgrade(router.port, host) as (head, reader, sock):
        assert head.startswith(b"HTTP/1.1 101 ")
        sock.sendall(encode_frame(OP_TEXT, b"hi", mask=True))
        assert reader.frame() == (OP_TEXT, b"hi")
        if how == "reset":
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        sock.close()
        gone = time.monotonic()
    [ended] = upstream.wait_ended(1)
    # No close frame reached the upstream: its socket was just closed.
    assert ended.code == 1006
    assert ended.at - gone < 1.0


# -- shutdown and timers ------------------------------------------------------


def test_drain_sends_going_away_both_ways(
    router: RouterThread, upstream: WsUpstream
) -> None:
    host = public_host(router, upstream.port)
    with (
        ws_connect(router.port, host, "/echo-1") as one,
        ws_connect(router.port, host, "/echo-2") as two,
    ):
        echo(one)
        echo(two)
        started = time.monotonic()
        router.stop()
        assert time.monotonic() - started < 3.0
        assert closed_code(one) == 1001
        assert closed_code(two) == 1001
    ended = upstream.wait_ended(2)
    assert [e.code for e in ended] == [1001, 1001]


@pytest.mark.slow
@pytest.mark.skipif(
    FORCED_PURE,
    reason="90 s of idling tests the IO layer, not the twins; it runs once, "
    "in the compiled pass",
)
def test_tunnel_idle_for_90_seconds_still_echoes(upstream: WsUpstream) -> None:
    """No default timeout on a tunnel (SPEC §4): not the keep-alive idle
    timeout (60 s), not the upstream pool's (30 s).  Once, on uvloop."""
    router = RouterThread(loop_factory=uvloop.new_event_loop)
    try:
        host = public_host(router, upstream.port)
        with ws_connect(router.port, host) as ws:
            echo(ws)
            time.sleep(90)
            echo(ws, "after 90 s")
            echo(ws, os.urandom(1 << 16))
    finally:
        router.stop()


def test_idle_tunnel_whose_client_never_answers_is_cut_after_grace(
    make_router: Callable[..., RouterThread], upstream: WsUpstream
) -> None:
    # A grace period longer than the sweeper's second: the tunnel is found
    # idle again at sweeps before its grace period is over.
    router = make_router(tunnel_idle_timeout=0.5, grace=1.5)
    host = public_host(router, upstream.port)
    with raw_upgrade(router.port, host) as (head, reader, _):
        assert head.startswith(b"HTTP/1.1 101 ")
        opcode, payload = reader.frame()
        assert (opcode, close_payload(payload)) == (OP_CLOSE, (1001, "tunnel idle"))
        # No answer: the tunnel is cut once the grace period is over (the
        # socket's timeout is 5 s).
        assert reader.at_eof()


def test_tunnel_idle_timeout_closes_only_idle_tunnels(
    make_router: Callable[..., RouterThread], upstream: WsUpstream
) -> None:
    router = make_router(tunnel_idle_timeout=1.0)
    host = public_host(router, upstream.port)
    with (
        ws_connect(router.port, host, "/echo-idle") as idle,
        ws_connect(router.port, host, "/echo-chatty") as chatty,
        ws_connect(router.port, host, "/push") as pushed,
    ):
        echo(idle)
        ticks = 0
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            echo(chatty)
            with contextlib.suppress(TimeoutError):
                while pushed.recv(0.01) == "tick":
                    ticks += 1
            time.sleep(0.2)
        assert closed_code(idle, timeout=2.0) == 1001
        # Traffic in either direction keeps a tunnel alive.
        echo(chatty, "still here")
        assert ticks >= 5
        assert pushed.recv(TIMEOUT) == "tick"
    [ended] = [e for e in upstream.wait_ended(1) if e.path == "/echo-idle"]
    assert ended.code == 1001
