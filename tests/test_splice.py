"""Large bodies moved by ``os.splice`` (router/splice.py), end to end.

Bodies with a known length of at least ``MIN_SPLICE`` bytes leave Python's
hands: the router hands both sockets to the kernel.  These tests check what
a user would: the bytes arrive intact, in both directions, on both event
loops, and a client that leaves mid-body still frees the upstream.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
import uvloop
from harness import Peer, RouterThread, ScriptedUpstream, Wire, router_factory

from router.splice import AVAILABLE, CHUNK, MIN_SPLICE, PIPES, PipeBudget

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="os.splice is Linux-only")

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
SIZE = 3 * 1024 * 1024 + 17  # not a multiple of any buffer size


@pytest.fixture(params=list(LOOPS))
def make_router(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., RouterThread]]:
    with router_factory(loop_factory=LOOPS[request.param]) as make:
        yield make


def serve_body(body: bytes) -> Callable[[Peer], None]:
    def script(peer: Peer) -> None:
        while peer.read_request() is not None:
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            peer.send(body)

    return script


def test_large_download_is_spliced_and_intact(
    make_router: Callable[..., RouterThread],
) -> None:
    body = os.urandom(SIZE)
    with ScriptedUpstream(serve_body(body)) as up:
        router = make_router()
        host = router.host(router.expose("big", up.port, token="dl"))
        with Wire(router.port, timeout=10) as wire:
            for _ in range(2):  # the kept-alive connection stays usable
                wire.send(b"GET /big HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
                response = wire.response()
                assert response.status == 200
                assert (
                    hashlib.sha256(response.body).digest()
                    == hashlib.sha256(body).digest()
                )
        assert router.service.proxy is not None
        assert router.service.proxy.stats.splices >= 2


@pytest.mark.parametrize("budget", [0, 64 * 1024 * 1024])
def test_downloads_at_once_are_intact_with_or_without_big_pipes(
    make_router: Callable[..., RouterThread],
    monkeypatch: pytest.MonkeyPatch,
    budget: int,
) -> None:
    # Eight downloads at the same time, with no room for enlarged pipes and
    # with room for all: the bytes are the same, and every enlarged pipe
    # is given back when its relay ends.
    monkeypatch.setattr(PIPES, "limit", budget)
    assert PIPES.used == 0
    body = os.urandom(SIZE)
    with ScriptedUpstream(serve_body(body)) as up:
        router = make_router()
        host = router.host(router.expose("big", up.port, token="dl"))
        wires = [Wire(router.port, timeout=10) for _ in range(8)]
        try:
            for wire in wires:
                wire.send(b"GET /big HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
            for wire in wires:
                response = wire.response()
                assert response.status == 200
                assert hashlib.sha256(response.body).digest() == (
                    hashlib.sha256(body).digest()
                )
        finally:
            for wire in wires:
                wire.close()
        assert router.service.proxy is not None
        assert router.service.proxy.stats.splices >= 8
    assert PIPES.used == 0


def test_pipe_budget_enlarges_pipes_while_it_lasts() -> None:
    budget = PipeBudget(2 * CHUNK)
    pipes = [os.pipe() for _ in range(3)]
    try:
        assert [budget.enlarge(w) for _, w in pipes] == [True, True, False]
        sizes = [fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) for _, w in pipes]
        assert sizes[:2] == [CHUNK, CHUNK] and sizes[2] < CHUNK
        budget.give_back()
        assert budget.used == CHUNK and budget.enlarge(pipes[2][1])
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_large_upload_is_spliced_and_intact(
    make_router: Callable[..., RouterThread],
) -> None:
    body = os.urandom(SIZE)
    seen: list[bytes] = []

    def sink(peer: Peer) -> None:
        while (request := peer.read_request()) is not None:
            seen.append(hashlib.sha256(request[1]).digest())
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    with ScriptedUpstream(sink) as up:
        router = make_router()
        host = router.host(router.expose("big", up.port, token="ul"))
        with Wire(router.port, timeout=10) as wire:
            head = b"POST /up HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (
                host.encode(),
                len(body),
            )
            wire.send(head + body[:1000])
            wire.send(body[1000:])
            assert wire.response().status == 200
            # And the connection carries the next request normally.
            wire.send(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
            assert wire.response().body == b"ok"
        assert seen[0] == hashlib.sha256(body).digest()
        assert router.service.proxy is not None
        assert router.service.proxy.stats.splices >= 1


def test_client_leaving_mid_splice_closes_the_upstream(
    make_router: Callable[..., RouterThread],
) -> None:
    closed = threading.Event()

    def stalls(peer: Peer) -> None:
        # Announce a large body, send a little of it, then go quiet: the
        # relay is left waiting on the upstream, with nothing to write.
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (8 * MIN_SPLICE))
        peer.send(b"x" * 1000)
        if peer.closed_within(5):
            closed.set()

    with ScriptedUpstream(stalls) as up:
        router = make_router()
        host = router.host(router.expose("big", up.port, token="cut"))
        sock = socket.create_connection(("127.0.0.1", router.port), timeout=5)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
        sock.recv(65536)
        sock.close()
        # The relay holds duplicates of the upstream socket: closing the
        # transport alone would leave it open.  It must close promptly.
        assert closed.wait(6)


def test_large_websocket_frames_are_spliced_and_stay_framed(
    make_router: Callable[..., RouterThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ws_harness import WsUpstream, echo, ws_connect

    from router import speedups

    # The tunnel module in use (compiled or pure) looks SpliceRelay up among
    # its globals, so counting it there counts the relays it starts.
    tunnel = speedups.tunnel
    made: list[int] = []
    real = tunnel.SpliceRelay

    def counting(*args: object) -> object:
        made.append(int(args[3]))  # type: ignore[call-overload]
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(tunnel, "SpliceRelay", counting)
    with WsUpstream() as upstream:
        proxy = make_router()
        host = proxy.host(proxy.expose("ws", upstream.port, token="big"))
        big = os.urandom(2 * 1024 * 1024 + 3)
        with ws_connect(proxy.port, host) as ws:
            echo(ws, "before")
            echo(ws, big)  # both directions carry one 2 MiB frame
            echo(ws, "after: the frame boundaries were kept")
            echo(ws, big[::-1])
    # Each large frame's payload went through the kernel, in both directions.
    assert len(made) >= 4
    assert all(size >= MIN_SPLICE for size in made)
