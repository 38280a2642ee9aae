"""The trusted internal entry (SPEC §6): routing by X-Sandbox-Id/-Port.

The internal listener reaches any valid port of a known sandbox without a
token, for HTTP and WebSocket alike; the public listener never honours
those headers.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import Recorder, RouterThread, UpstreamServer, free_port, serve_refused
from websockets.exceptions import InvalidStatus
from ws_harness import (
    TIMEOUT,
    WsUpstream,
    closed_code,
    echo,
    http_request,
    router_maker,
    ws_connect,
    ws_connect_unix,
)

from router.errors import RouteError


@pytest.fixture(params=["asyncio", "uvloop"])
def make_router(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., RouterThread]]:
    yield from router_maker(request.param, internal="127.0.0.1:0")


@pytest.fixture
def router(make_router: Callable[..., RouterThread]) -> RouterThread:
    r = make_router()
    # "alpha" is known by set_sandbox alone: it has no route at all.
    r.commit({"op": "set_sandbox", "sandbox": "alpha", "upstream_host": "127.0.0.1"})
    return r


@pytest.fixture
def recorder() -> Iterator[UpstreamServer]:
    server = UpstreamServer(Recorder)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ws_upstream() -> Iterator[WsUpstream]:
    with WsUpstream() as up:
        yield up


def sandbox_headers(sandbox: str, port: int | str) -> str:
    return f"X-Sandbox-Id: {sandbox}\r\nX-Sandbox-Port: {port}\r\n"


def internal_get(
    router: RouterThread, sandbox: str, port: int | str, path: str = "/"
) -> tuple[int, bytes]:
    status, _, body = http_request(
        router.service.internal_port,
        "orchestrator.internal",
        path,
        sandbox_headers(sandbox, port),
    )
    return status, body


def error_code(body: bytes) -> str:
    return str(json.loads(body)["code"])


# -- routing by header ----------------------------------------------------------


def test_http_reaches_an_unexposed_port_without_token(
    router: RouterThread, recorder: UpstreamServer
) -> None:
    status, body = internal_get(router, "alpha", recorder.port, "/status?x=1")
    assert status == 200
    seen = json.loads(body)
    assert seen["path"] == "/status?x=1"
    headers = dict(seen["headers"])
    assert headers["Host"] == f"localhost:{recorder.port}"


def test_sandbox_known_by_a_route_on_another_port(
    router: RouterThread, recorder: UpstreamServer
) -> None:
    router.expose("beta", 8080)
    # Sandbox ids are case-insensitive (SPEC §1).
    status, _ = internal_get(router, "BETA", recorder.port)
    assert status == 200


def test_websocket_through_the_internal_entry(
    router: RouterThread, ws_upstream: WsUpstream
) -> None:
    headers = {"X-Sandbox-Id": "alpha", "X-Sandbox-Port": str(ws_upstream.port)}
    port = router.service.internal_port
    with ws_connect(port, "orchestrator.internal", additional_headers=headers) as ws:
        echo(ws)
        echo(ws, b"\x00" * 100_000)
    ws_upstream.wait_requests(1)
    assert ws_upstream.requests[0][1]["Host"] == f"localhost:{ws_upstream.port}"


def test_each_sandbox_down_behind_the_internal_entry_has_its_own_warning(
    make_router: Callable[..., RouterThread], caplog: pytest.LogCaptureFixture
) -> None:
    # The internal entry has no preview label: warnings name the sandbox
    # and port, so that one sandbox down does not hide another for the
    # ten seconds in which repeats are only counted.
    caplog.set_level(logging.WARNING, logger="edge_router")
    router = make_router(retry_window=0)
    for name in ("sbx", "sby"):
        router.commit(
            {"op": "set_sandbox", "sandbox": name, "upstream_host": "127.0.0.1"}
        )
    ports = {"sbx": free_port(), "sby": free_port()}
    for name in ("sbx", "sby", "sbx"):
        status, body = internal_get(router, name, ports[name])
        assert (status, error_code(body)) == (502, "UPSTREAM_UNAVAILABLE")
    lines = [r.getMessage() for r in caplog.records if r.name == "edge_router"]
    told = sorted(line.partition(" (127")[0] for line in lines if "upstream" in line)
    assert told == [
        f"upstream for sbx:{ports['sbx']} (internal): UPSTREAM_UNAVAILABLE",
        f"upstream for sby:{ports['sby']} (internal): UPSTREAM_UNAVAILABLE",
    ]


def test_unknown_sandbox_is_404(router: RouterThread, recorder: UpstreamServer) -> None:
    status, body = internal_get(router, "nobody", recorder.port)
    assert status == 404
    assert error_code(body) == "NOT_FOUND"
    # Destroyed: no longer known.
    router.commit({"op": "destroy_sandbox", "sandbox": "alpha"})
    status, body = internal_get(router, "alpha", recorder.port)
    assert status == 404


@pytest.mark.parametrize("port", ["abc", "80", "08080", "70000", "3000", "-1", ""])
def test_bad_port_is_400(router: RouterThread, port: str) -> None:
    status, body = internal_get(router, "alpha", port)
    assert status == 400
    assert error_code(body) == "BAD_REQUEST"


def test_missing_headers_are_400(router: RouterThread) -> None:
    status, _, _ = http_request(
        router.service.internal_port, "x", "/", "X-Sandbox-Id: alpha\r\n"
    )
    assert status == 400


def test_repeated_sandbox_headers_are_400(
    router: RouterThread, recorder: UpstreamServer
) -> None:
    router.commit({"op": "set_sandbox", "sandbox": "alpha"})
    for extra in (
        f"X-Sandbox-Port: {recorder.port}\r\n",
        "X-Sandbox-Id: beta\r\n",
    ):
        status, _, body = http_request(
            router.service.internal_port,
            "x",
            "/",
            sandbox_headers("alpha", recorder.port) + extra,
        )
        assert status == 400 and error_code(body) == "BAD_REQUEST"
        assert b"must each appear once" in body
    assert not recorder.seen


def test_configured_reserved_ports_are_400(
    make_router: Callable[..., RouterThread],
) -> None:
    router = make_router(reserved_ports=[3000, 9229])
    router.commit({"op": "set_sandbox", "sandbox": "alpha"})
    status, _ = internal_get(router, "alpha", 9229)
    assert status == 400


# -- routes that would lead back into the router ----------------------------------


def _refused(router: RouterThread, *ops: dict[str, object]) -> str:
    try:
        router.commit(*ops)
    except RouteError as exc:
        return f"{exc.code}: {exc.message}"
    raise AssertionError(f"{ops} was accepted")


def test_own_listeners_cannot_be_exposed(
    make_router: Callable[..., RouterThread], tmp_path: Path
) -> None:
    # A public URL to the internal entry would reach any sandbox without a
    # token; one to the public listener loops requests through the router.
    control = str(tmp_path / "control.sock")
    router = make_router(admin="127.0.0.1:0", control=control)
    service = router.service
    own = {
        "public": service.public_port,
        "internal": service.internal_port,
        "admin": service.admin_port,
    }
    for which, port in own.items():
        message = _refused(router, {"op": "expose_port", "sandbox": "sb", "port": port})
        assert message.startswith(f"OWN_LISTENER: Port {port} on 127.0.0.1"), which
        spellings = (
            "127.0.0.1",
            "localhost",
            "LocalHost.",
            "[::]",
            "[::ffff:127.0.0.1]",
            "127.1",
            "2130706433",
            "0",
        )
        for target in (f"{host}:{port}" for host in spellings):
            op = {"op": "expose_port", "sandbox": "sb", "port": 8000, "target": target}
            assert _refused(router, op).startswith("OWN_LISTENER: "), target
    for path in (control, f"/{control}", control.replace("/control", "/./control")):
        target = f"unix:{path}"
        op = {"op": "expose_port", "sandbox": "sb", "port": 8000, "target": target}
        assert "own socket" in _refused(router, op), path

    # The same port on another machine is someone else's: allowed, until
    # its sandbox is moved to this machine.
    router.commit(
        {"op": "set_sandbox", "sandbox": "far", "upstream_host": "10.9.8.7"},
        {"op": "expose_port", "sandbox": "far", "port": own["internal"]},
        batch=True,
    )
    moved = {"op": "set_sandbox", "sandbox": "far", "upstream_host": "127.0.0.1"}
    assert _refused(router, moved).startswith("OWN_LISTENER: ")

    # Nor can the internal entry itself be pointed at them.
    router.commit({"op": "set_sandbox", "sandbox": "alpha"})
    for port in own.values():
        status, body = internal_get(router, "alpha", port)
        assert (status, error_code(body)) == (400, "BAD_REQUEST")


@pytest.mark.parametrize(
    ("listen", "every_address"),
    [("0:0", True), ("0.0.0.0:0", True), ("127.0.0.1:0", False), ("[::1]:0", False)],
)
def test_a_listener_on_every_address_is_known_by_what_was_bound(
    make_router: Callable[..., RouterThread], listen: str, every_address: bool
) -> None:
    # "0" is 0.0.0.0 to the system, not to a parser of address text: the
    # router listens on every address of the machine, so its port is ours
    # whatever local address a route's target names.
    if "::" in listen and not socket.has_ipv6:
        pytest.skip("no IPv6")
    router = make_router(listen=listen, admin=listen)
    table = router.service.router.table
    ours = {router.service.public_port, router.service.admin_port}
    assert table.own_wildcard_ports == (ours if every_address else set())


def test_a_path_made_into_an_own_socket_later_is_refused_at_connect(
    make_router: Callable[..., RouterThread],
    tmp_path: Path,
    recorder: UpstreamServer,
) -> None:
    # Accepted while nothing is there; then the path becomes a link to the
    # internal entry, which would let the public URL skip every token.
    internal = tmp_path / "internal.sock"
    router = make_router(internal=f"unix:{internal}")
    router.commit({"op": "set_sandbox", "sandbox": "victim"})
    app = tmp_path / "sandbox" / "app.sock"
    app.parent.mkdir()
    host = router.host(router.expose("attacker", 5000, target=f"unix:{app}"))
    app.symlink_to(internal)
    status, _, body = http_request(
        router.port, host, "/", sandbox_headers("victim", recorder.port)
    )
    assert (status, error_code(body)) == (502, "UPSTREAM_UNAVAILABLE")
    assert not recorder.seen


def test_stored_routes_into_a_later_runs_listeners_are_unexposed(
    make_router: Callable[..., RouterThread],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Made when nothing of the router listened there; the next run has its
    # internal entry and its admin listener on those very ports.
    state = str(tmp_path / "routes.db")
    internal, admin = free_port(), free_port()
    first = make_router(state=state)
    first.expose("victim", 8000, token="direct")
    first.expose("s", internal, token="t")
    first.expose("s", 8001, token="u", target=f"127.0.0.1:{admin}")
    first.stop()

    with caplog.at_level(logging.ERROR, logger="edge_router"):
        second = make_router(
            state=state, internal=f"127.0.0.1:{internal}", admin=f"127.0.0.1:{admin}"
        )
    assert second.service.router is not None
    table = second.service.router.table
    assert table.sandbox_routes("s") == []
    assert [r.port for r in table.sandbox_routes("victim")] == [8000]
    logged = [r.getMessage() for r in caplog.records]
    assert any(f"sandbox s port {internal} leads into" in m for m in logged), logged
    assert any("sandbox s port 8001 leads into" in m for m in logged), logged


def test_stopped_sandbox_is_410(
    router: RouterThread, recorder: UpstreamServer, ws_upstream: WsUpstream
) -> None:
    router.commit({"op": "set_sandbox", "sandbox": "alpha", "state": "stopped"})
    status, body = internal_get(router, "alpha", recorder.port)
    assert status == 410
    assert error_code(body) == "STALE_PREVIEW_URL"
    headers = {"X-Sandbox-Id": "alpha", "X-Sandbox-Port": str(ws_upstream.port)}
    with (
        pytest.raises(InvalidStatus) as info,
        ws_connect(router.service.internal_port, "x", additional_headers=headers),
    ):
        pass
    assert info.value.response.status_code == 410


# -- live internal tunnels ------------------------------------------------------


def test_internal_tunnel_ends_when_its_sandbox_stops(
    router: RouterThread, ws_upstream: WsUpstream
) -> None:
    router.expose("alpha", ws_upstream.port)
    headers = {"X-Sandbox-Id": "alpha", "X-Sandbox-Port": str(ws_upstream.port)}
    port = router.service.internal_port
    with ws_connect(port, "x", "/echo-1", additional_headers=headers) as ws:
        echo(ws)
        # Unexposing the public URL does not touch the internal tunnel: it
        # never went through that route.
        router.commit(
            {"op": "unexpose_port", "sandbox": "alpha", "port": ws_upstream.port}
        )
        echo(ws, "unexposed, still reachable inside")
        router.commit({"op": "set_sandbox", "sandbox": "alpha", "state": "stopped"})
        assert closed_code(ws) == 1008
    [ended] = ws_upstream.wait_ended(1)
    assert ended.code == 1001


def test_drain_sends_going_away_on_internal_tunnels(
    router: RouterThread, ws_upstream: WsUpstream
) -> None:
    headers = {"X-Sandbox-Id": "alpha", "X-Sandbox-Port": str(ws_upstream.port)}
    port = router.service.internal_port
    with ws_connect(port, "x", additional_headers=headers) as ws:
        echo(ws)
        router.stop()
        assert closed_code(ws) == 1001
    [ended] = ws_upstream.wait_ended(1)
    assert ended.code == 1001


# -- the public listener ignores the headers -------------------------------------


def test_public_listener_ignores_sandbox_headers(
    router: RouterThread, recorder: UpstreamServer
) -> None:
    exposed = router.expose("beta", 8080, target=f"127.0.0.1:{recorder.port}")
    host = router.host(exposed)
    steer = sandbox_headers("alpha", recorder.port)

    # A known label: routed by the label, whatever the headers say.
    status, _, body = http_request(router.port, host, "/", sandbox_headers("beta", 1))
    assert status == 200
    assert json.loads(body)["path"] == "/"

    # An unknown label stays 404, even with headers naming a real sandbox
    # and port.
    unknown = host.replace("beta", "gamma")
    status, _, body = http_request(router.port, unknown, "/", steer)
    assert status == 404
    assert error_code(body) == "INVALID_TOKEN"

    # Not a preview host at all: 404 NOT_FOUND, not a route to alpha.
    status, _, body = http_request(router.port, "example.com", "/", steer)
    assert status == 404
    assert error_code(body) == "NOT_FOUND"
    assert len(recorder.seen) == 1


def test_public_websocket_ignores_sandbox_headers(
    router: RouterThread, ws_upstream: WsUpstream
) -> None:
    headers = {"X-Sandbox-Id": "alpha", "X-Sandbox-Port": str(ws_upstream.port)}
    with (
        pytest.raises(InvalidStatus) as info,
        ws_connect(router.port, "example.com", additional_headers=headers),
    ):
        pass
    assert info.value.response.status_code == 404
    assert ws_upstream.requests == []


# -- where the listener may be ----------------------------------------------------


def test_unix_socket_internal_listener(
    make_router: Callable[..., RouterThread],
    tmp_path: Path,
    recorder: UpstreamServer,
    ws_upstream: WsUpstream,
) -> None:
    path = str(tmp_path / "internal.sock")
    router = make_router(internal=f"unix:{path}")
    assert router.service.internal_port == 0
    # The entry skips token checks: only the router's own user may use it.
    assert os.stat(path).st_mode & 0o777 == 0o600
    router.commit({"op": "set_sandbox", "sandbox": "alpha"})

    status, _, body = http_request(
        path, "x", "/over-unix", sandbox_headers("alpha", recorder.port)
    )
    assert status == 200
    seen = json.loads(body)
    assert seen["path"] == "/over-unix"
    # No peer address on a Unix socket: the header still has a value.
    assert dict(seen["headers"])["X-Forwarded-For"]

    headers = {"X-Sandbox-Id": "alpha", "X-Sandbox-Port": str(ws_upstream.port)}
    with ws_connect_unix(path, "x", additional_headers=headers) as ws:
        echo(ws)


def test_ipv6_loopback_internal_listener(
    make_router: Callable[..., RouterThread], recorder: UpstreamServer
) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        router = make_router(internal="[::1]:0")
    except OSError as exc:
        pytest.skip(f"cannot bind ::1: {exc}")
    router.commit({"op": "set_sandbox", "sandbox": "alpha"})
    with socket.create_connection(
        ("::1", router.service.internal_port), timeout=TIMEOUT
    ) as sock:
        sock.sendall(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            + sandbox_headers("alpha", recorder.port).encode()
            + b"\r\n"
        )
        assert sock.recv(12) == b"HTTP/1.1 200"


@pytest.mark.parametrize(
    "address", ["0.0.0.0:0", "[::]:0", "192.0.2.1:8788", "example.com:8788"]
)
def test_non_loopback_internal_address_is_refused(address: str) -> None:
    stderr = serve_refused("--no-demo", "--internal", address)
    assert "--internal must be a loopback address or unix:PATH" in stderr
