"""The control socket end to end: a real server on a real Unix socket.

Mirrors ``router/control.py`` (request checking), ``router/control_server.py``
(framing, auth, watch) and ``router/client.py``.  Each test starts its own
router with a SQLite store in ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from controlkit import (
    Raw,
    RouterThread,
    forwarding_view,
    replay,
    replay_forwarding,
)

from router import client as client_module
from router import control
from router.app import Router
from router.client import (
    AsyncControlClient,
    ControlClient,
    ControlError,
    WatchEvent,
)
from router.config import Config
from router.control_server import ControlServer, parse_loopback
from router.errors import StoreError
from router.routes import RouteTable


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RouterThread]:
    router = RouterThread(tmp_path).start()
    yield router
    router.stop()


@pytest.fixture
def client(server: RouterThread) -> Iterator[ControlClient]:
    with ControlClient(server.path) as c:
        yield c


def event_message(event: WatchEvent) -> dict[str, Any]:
    if event.snapshot is not None:
        return {"version": event.version, "snapshot": event.snapshot}
    return {"version": event.version, "changes": event.changes}


# -- the socket file -------------------------------------------------------------


def test_socket_file_is_mode_0600(server: RouterThread) -> None:
    mode = os.stat(server.path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_stale_socket_is_replaced_and_removed_at_close(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "control.sock"))
    stale.close()  # the file stays, nobody listens: what a crash leaves

    router = RouterThread(tmp_path).start()
    try:
        with ControlClient(router.path) as c:
            assert c.call("ping") == "pong"
    finally:
        router.stop()
    assert not os.path.exists(router.path)


def test_live_socket_and_other_files_are_not_taken_over(tmp_path: Path) -> None:
    first = RouterThread(tmp_path).start()
    try:
        # The same store: refused before the socket is even looked at.
        with pytest.raises(StoreError, match="in use by another edge-router"):
            RouterThread(tmp_path).start()
        # Another store, the same socket path.
        (tmp_path / "other").mkdir()
        second = RouterThread(tmp_path / "other")
        second.path = first.path
        second.config = dataclasses.replace(second.config, control=first.path)
        with pytest.raises(OSError, match="another process"):
            second.start()
        with ControlClient(first.path) as c:
            assert c.call("ping") == "pong"
    finally:
        first.stop()

    (tmp_path / "control.sock").write_text("not a socket")
    with pytest.raises(OSError, match="not a socket"):
        RouterThread(tmp_path).start()


# -- every operation -------------------------------------------------------------


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_every_operation(tmp_path: Path, loop: str) -> None:
    router = RouterThread(tmp_path, loop=loop).start()
    try:
        with ControlClient(router.path) as c:
            check_every_operation(c)
    finally:
        router.stop()


def check_every_operation(c: ControlClient) -> None:
    # expose: a generated token, then idempotent, then a rotation.
    first = c.expose_port("Box-1", 8080, name="web")
    assert first.port == 8080 and first.name == "web"
    assert len(first.token) == 16
    assert first.url == f"http://8080-box-1-{first.token}.localhost/"
    assert c.version == 1
    again = c.expose_port("box-1", 8080)
    assert again == first and c.version == 1
    rotated = c.expose_port("box-1", 8080, token="fresh-1")
    assert rotated.url == "http://8080-box-1-fresh-1.localhost/"
    assert c.version == 2

    # The table's refusals come back with their codes.
    with pytest.raises(ControlError) as info:
        c.expose_port("box-1", 8081, token="fresh-1")
    assert info.value.code == "TOKEN_IN_USE"
    assert info.value.message == "Token 'fresh-1' is already in use by port 8080"
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"port": 80}, "INVALID_PORT"),
        ({"port": 3000}, "RESERVED_PORT"),
        ({"token": "UPPER"}, "INVALID_TOKEN_FORMAT"),
        ({"target": "nowhere"}, "INVALID_TARGET"),
        ({"hostname": "example.com"}, "INVALID_HOSTNAME"),
        ({"host": "keep"}, "INVALID_HOST_POLICY"),
        ({"name": "a\nb"}, "INVALID_NAME"),
    ]
    for kwargs, code in refusals:
        args = {"sandbox": "box-1", "port": 8082, **kwargs}
        with pytest.raises(ControlError) as info:
            c.call("expose_port", **args)
        assert info.value.code == code
    with pytest.raises(ControlError) as info:
        c.expose_port("-bad-", 8080)
    assert info.value.code == "INVALID_SANDBOX_ID"
    with pytest.raises(ControlError) as info:
        c.expose_port("a" * 50, 8080, token="t" * 16)
    assert info.value.code == "LABEL_TOO_LONG"

    # A second port with a target and the preserve policy.
    c.expose_port("box-1", 9000, token="api", target="127.0.0.1:9999", host="preserve")
    ports = c.get_exposed_ports("box-1")
    assert [(p.port, p.status) for p in ports] == [(8080, "active"), (9000, "active")]
    assert ports[1].url == "http://9000-box-1-api.localhost/"

    # validate_port_token is a plain boolean.
    assert c.validate_port_token("box-1", 8080, "fresh-1") is True
    assert c.validate_port_token("box-1", 8080, first.token) is False
    assert c.validate_port_token("box-1", 8081, "fresh-1") is False
    assert c.validate_port_token("nobody", 8080, "fresh-1") is False

    # set_sandbox: stopped ports are listed as stale.
    info_sb = c.set_sandbox("box-1", state="stopped", upstream_host="10.1.2.3")
    assert (info_sb.state, info_sb.upstream_host) == ("stopped", "10.1.2.3")
    assert {p.status for p in c.get_exposed_ports("box-1")} == {"stale"}
    for kwargs, code in [
        ({"state": "paused"}, "INVALID_STATE"),
        ({"upstream_host": "bad host"}, "INVALID_UPSTREAM_HOST"),
    ]:
        with pytest.raises(ControlError) as info:
            c.call("set_sandbox", sandbox="box-1", **kwargs)
        assert info.value.code == code

    # unexpose: idempotent.
    assert c.unexpose_port("box-1", 9000) is True
    assert c.unexpose_port("box-1", 9000) is False

    # batch: results in order.
    results = c.batch(
        [
            {"op": "set_sandbox", "sandbox": "box-2"},
            {"op": "expose_port", "sandbox": "box-2", "port": 5173, "token": "vite"},
            {"op": "unexpose_port", "sandbox": "box-1", "port": 8080},
        ]
    )
    assert results[0] == {
        "name": "box-2",
        "upstream_host": "127.0.0.1",
        "state": "running",
    }
    assert results[1]["url"] == "http://5173-box-2-vite.localhost/"
    assert results[2] == {"port": 8080, "unexposed": True}

    # snapshot: the whole table with its version.
    snap = c.snapshot()
    assert snap["version"] == c.version
    assert [(r["sandbox"], r["port"]) for r in snap["routes"]] == [("box-2", 5173)]
    assert [s["name"] for s in snap["sandboxes"]] == ["box-1", "box-2"]

    # destroy_sandbox takes its routes along.
    assert c.destroy_sandbox("box-2") == {
        "sandbox": "box-2",
        "destroyed": True,
        "routes": 1,
    }
    assert c.get_exposed_ports("box-2") == []

    # stats and ping.
    stats = c.stats()
    assert stats["version"] == c.version
    assert (stats["routes"], stats["sandboxes"]) == (0, 1)
    assert stats["control_clients"] == 1 and stats["watchers"] == 0
    assert c.ping() > 0


def test_stats_hooks_extend_stats(server: RouterThread, client: ControlClient) -> None:
    server.router.stats_hooks.append(lambda: {"proxy_requests": 7})
    assert client.stats()["proxy_requests"] == 7


def test_async_client(server: RouterThread) -> None:
    async def scenario() -> None:
        async with AsyncControlClient(server.path) as c:
            exposed = await c.expose_port("async-box", 8080, token="tok")
            assert exposed.url == "http://8080-async-box-tok.localhost/"
            assert await c.validate_port_token("async-box", 8080, "tok")
            ports = await c.get_exposed_ports("async-box")
            assert [p.port for p in ports] == [8080]
            await c.set_sandbox("async-box", state="stopped")
            assert (
                await c.batch(
                    [{"op": "unexpose_port", "sandbox": "async-box", "port": 8080}]
                )
            )[0]["unexposed"]
            assert (await c.snapshot())["version"] == c.version == 3
            assert (await c.stats())["routes"] == 0
            assert await c.ping() > 0
            assert (await c.destroy_sandbox("async-box"))["destroyed"]
            assert await c.unexpose_port("async-box", 8080) is False

            async with c.watch(0) as events:
                assert (events.version, events.resync) == (4, False)
                seen = [await events.__anext__() for _ in range(4)]
            assert [e.version for e in seen] == [1, 2, 3, 4]

    asyncio.run(scenario())


def test_pipelined_requests_are_answered_in_order(server: RouterThread) -> None:
    lines = []
    for i in range(200):
        if i % 3 == 0:
            req = {
                "id": i,
                "op": "expose_port",
                "sandbox": f"p{i % 7}",
                "port": 8000 + i,
            }
        elif i % 3 == 1:
            req = {"id": i, "op": "get_exposed_ports", "sandbox": f"p{i % 7}"}
        else:
            req = {"id": i, "op": "nonsense"}
        lines.append(orjson.dumps(req) + b"\n")
    with Raw(server.path) as raw:
        raw.send(b"".join(lines))
        ids = [raw.read()["id"] for _ in range(200)]
    assert ids == list(range(200))


# -- bad input -------------------------------------------------------------------


BAD_REQUESTS: list[tuple[Any, str, int | None]] = [
    ([1, 2], "INVALID_REQUEST", None),
    ("ping", "INVALID_REQUEST", None),
    ({"id": 1}, "INVALID_REQUEST", None),
    ({"id": 1, "op": 5}, "INVALID_REQUEST", None),
    ({"id": [1], "op": "ping"}, "INVALID_REQUEST", None),
    ({"id": 1, "op": "expose"}, "UNKNOWN_OP", None),
    ({"id": 1, "op": "auth", "secret": "x"}, "UNKNOWN_OP", None),
    ({"id": 1, "op": "expose_port", "sandbox": "a"}, "MISSING_ARGUMENT", None),
    ({"id": 1, "op": "expose_port", "port": 8080}, "MISSING_ARGUMENT", None),
    (
        {"id": 1, "op": "validate_port_token", "sandbox": "a", "port": 8080},
        "MISSING_ARGUMENT",
        None,
    ),
    (
        {"id": 1, "op": "expose_port", "sandbox": "a", "port": "8080"},
        "INVALID_ARGUMENT",
        None,
    ),
    (
        {"id": 1, "op": "expose_port", "sandbox": "a", "port": 8080.0},
        "INVALID_ARGUMENT",
        None,
    ),
    (
        {"id": 1, "op": "expose_port", "sandbox": "a", "port": True},
        "INVALID_ARGUMENT",
        None,
    ),
    (
        {"id": 1, "op": "expose_port", "sandbox": 7, "port": 8080},
        "INVALID_ARGUMENT",
        None,
    ),
    (
        {"id": 1, "op": "expose_port", "sandbox": None, "port": 8080},
        "INVALID_ARGUMENT",
        None,
    ),
    (
        {"id": 1, "op": "expose_port", "sandbox": "a", "port": 8080, "token": 5},
        "INVALID_ARGUMENT",
        None,
    ),
    (
        {"id": 1, "op": "set_sandbox", "sandbox": "a", "state": ["stopped"]},
        "INVALID_ARGUMENT",
        None,
    ),
    ({"id": 1, "op": "watch", "since": "3"}, "INVALID_ARGUMENT", None),
    ({"id": 1, "op": "watch", "since": -1}, "INVALID_ARGUMENT", None),
    ({"id": 1, "op": "batch", "ops": {"op": "ping"}}, "INVALID_ARGUMENT", None),
    (
        {"id": 1, "op": "expose_port", "sandbox": "a", "port": 8080, "tokn": "x"},
        "UNKNOWN_ARGUMENT",
        None,
    ),
    ({"id": 1, "op": "ping", "verbose": True}, "UNKNOWN_ARGUMENT", None),
    (
        {"id": 1, "op": "batch", "ops": [{"op": "set_sandbox", "sandbox": "a"}, 5]},
        "INVALID_ARGUMENT",
        1,
    ),
    ({"id": 1, "op": "batch", "ops": [{"op": "snapshot"}]}, "INVALID_ARGUMENT", 0),
    (
        {"id": 1, "op": "batch", "ops": [{"op": "batch", "ops": []}]},
        "INVALID_ARGUMENT",
        0,
    ),
    ({"id": 1, "op": "batch", "ops": [{"sandbox": "a"}]}, "INVALID_REQUEST", 0),
    (
        {
            "id": 1,
            "op": "batch",
            "ops": [
                {"op": "set_sandbox", "sandbox": "a"},
                {"op": "expose_port", "sandbox": "a"},
            ],
        },
        "MISSING_ARGUMENT",
        1,
    ),
    (
        {
            "id": 1,
            "op": "batch",
            "ops": [{"op": "expose_port", "sandbox": "a", "port": 8080, "id": 3}],
        },
        "UNKNOWN_ARGUMENT",
        0,
    ),
    ({"id": 1, "op": "batch", "ops": [{"op": "frobnicate"}]}, "UNKNOWN_OP", 0),
]


@pytest.mark.parametrize(("request_obj", "code", "index"), BAD_REQUESTS)
def test_bad_request_is_refused_before_the_table(
    server: RouterThread, request_obj: Any, code: str, index: int | None
) -> None:
    with Raw(server.path) as raw:
        reply = raw.request(request_obj)
        assert reply["ok"] is False
        assert reply["error"]["code"] == code, reply
        assert reply["error"].get("index") == index
        assert reply["error"]["message"]
        # The id comes back whenever it was a usable one.
        expected_id = request_obj.get("id") if isinstance(request_obj, dict) else None
        assert reply["id"] == (expected_id if expected_id == 1 else None)
        # The connection is still good and nothing changed.
        assert raw.request({"id": 2, "op": "ping"}) == {
            "id": 2,
            "ok": True,
            "result": "pong",
        }
    assert server.snapshot() == {"version": 0, "routes": [], "sandboxes": []}


def test_null_optional_arguments_count_as_absent(client: ControlClient) -> None:
    result = client.call("expose_port", sandbox="a", port=8080, token=None)
    assert len(result["token"]) == 16
    with Raw(client.address) as raw:
        reply = raw.request(
            {"id": "x", "op": "get_exposed_ports", "sandbox": "a", "hostname": None}
        )
    assert reply["ok"] and reply["id"] == "x" and len(reply["result"]) == 1


def test_invalid_json_keeps_the_connection(
    server: RouterThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="edge_router.control")
    with Raw(server.path) as raw:
        for junk in [b"{not json}\n", b'{"id": 1, "op": "ping"\n', b"\xff\xfe\n"]:
            raw.send(junk)
            reply = raw.read()
            assert reply["ok"] is False and reply["id"] is None
            assert reply["error"]["code"] == "INVALID_JSON"
        raw.send(b"\n   \n")  # blank lines are skipped, not answered
        assert raw.request({"id": 9, "op": "ping"})["result"] == "pong"
    warnings = [
        r
        for r in caplog.records
        if r.name == "edge_router.control" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 3 and "not valid JSON" in warnings[0].getMessage()
    assert "Request is not UTF-8 (at byte 0)" in warnings[2].getMessage()
    assert any(
        r.levelno == logging.DEBUG and "connected" in r.getMessage()
        for r in caplog.records
    )


def test_a_number_past_64_bits_is_named_as_such(server: RouterThread) -> None:
    with Raw(server.path) as raw:
        raw.send(
            b'{"id": 1, "op": "unexpose_port", "sandbox": "a", "port": 1'
            + b"0" * 20
            + b"}\n"
        )
        reply = raw.read()
    assert reply["error"]["code"] == "INVALID_ARGUMENT"
    assert reply["error"]["message"] == (
        "unexpose_port: 'port' must be an integer, "
        "not a fraction or a number too large for 64 bits"
    )


def test_last_line_without_newline_is_answered(server: RouterThread) -> None:
    with Raw(server.path) as raw:
        raw.send(b'{"id": 1, "op": "ping"}')
        raw.sock.shutdown(socket.SHUT_WR)
        assert raw.read()["result"] == "pong"
        assert raw.at_eof()


@pytest.mark.parametrize("max_line", [None, 4096])
def test_over_long_line_is_refused_and_closed(
    tmp_path: Path, max_line: int | None
) -> None:
    tuning: dict[str, Any] = {} if max_line is None else {"max_line": max_line}
    router = RouterThread(tmp_path, **tuning).start()
    limit = max_line or control.MAX_LINE
    try:
        with Raw(router.path) as raw:
            # A line exactly at the limit is fine ...
            pad = limit - len(b'{"id":1,"op":"ping","x":""}')
            ok_line = b'{"id":1,"op":"ping","x":"' + b"a" * pad + b'"}'
            assert len(ok_line) == limit
            raw.send(ok_line + b"\n")
            assert raw.read()["error"]["code"] == "UNKNOWN_ARGUMENT"

            # ... one byte more is not, and the server hangs up.
            long_line = b'{"id": 2, "op": "expose_port", "name": "' + b"x" * limit
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                raw.send(long_line + b'"}\n{"id": 3, "op": "ping"}\n')
            reply = raw.read()
            assert reply["ok"] is False and reply["id"] is None
            assert reply["error"]["code"] == "LINE_TOO_LONG"
            assert raw.at_eof()
        with ControlClient(router.path) as c:
            assert c.snapshot()["version"] == 0
    finally:
        router.stop()


def test_client_refuses_a_request_the_router_would_not_read(
    server: RouterThread, client: ControlClient
) -> None:
    assert client_module.MAX_LINE == control.MAX_LINE
    ops = [
        {"op": "expose_port", "sandbox": "sb", "port": 10_000 + i}
        for i in range(30_000)
    ]
    with pytest.raises(ControlError) as info:
        client.batch(ops)
    assert info.value.code == "LINE_TOO_LONG"
    assert "split the batch" in info.value.message
    # Nothing was sent: the connection still works, and nothing changed.
    assert client.ping()
    assert client.snapshot()["routes"] == []
    assert len(client.batch(ops[:5000])) == 5000


# -- TCP and its secret ----------------------------------------------------------


def test_tcp_needs_the_secret(tmp_path: Path) -> None:
    router = RouterThread(tmp_path, tcp=True).start()
    try:
        host, port = router.server.tcp_address or ("", 0)
        assert host == "127.0.0.1"

        with ControlClient(router.tcp_address, secret=router.secret) as c:
            assert c.expose_port("tcp-box", 8080, token="t").port == 8080

        with pytest.raises(ControlError) as info:
            ControlClient(router.tcp_address, secret="wrong")
        assert info.value.code == "AUTH_FAILED"

        with Raw.tcp((host, port)) as raw:
            reply = raw.request({"id": 1, "op": "auth", "secret": "nope"})
            assert reply["error"]["code"] == "AUTH_FAILED" and reply["id"] == 1
            assert raw.at_eof()
        with Raw.tcp((host, port)) as raw:
            reply = raw.request(
                {"id": 1, "op": "expose_port", "sandbox": "x", "port": 8081}
            )
            assert reply["error"]["code"] == "AUTH_REQUIRED"
            assert raw.at_eof()
        with Raw.tcp((host, port)) as raw:
            raw.send(b"garbage\n")
            assert raw.read()["error"]["code"] == "INVALID_JSON"
            assert raw.at_eof()
        with Raw.tcp((host, port)) as raw:
            ok = raw.request({"id": "a", "op": "auth", "secret": router.secret})
            assert ok == {"id": "a", "ok": True, "result": {"authenticated": True}}
            assert raw.request({"id": 2, "op": "ping"})["result"] == "pong"

        # Only the authenticated change went through.
        assert [r["sandbox"] for r in router.snapshot()["routes"]] == ["tcp-box"]

        # The Unix socket needs no secret.
        with ControlClient(router.path) as c:
            assert c.call("ping") == "pong"
    finally:
        router.stop()


@pytest.mark.parametrize(
    "address", ["0.0.0.0:9000", "10.1.2.3:9000", "example.com:9000", "[::]:9000"]
)
def test_tcp_must_be_loopback(address: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        parse_loopback(address)


def test_tcp_loopback_forms() -> None:
    assert parse_loopback("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_loopback("localhost:7000") == ("127.0.0.1", 7000)
    assert parse_loopback("[::1]:7000") == ("::1", 7000)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_loopback("127.0.0.1")


def test_tcp_without_secret_is_refused() -> None:
    router = Router(Config())
    with pytest.raises(ValueError, match="--control-tcp needs --control-secret"):
        ControlServer(router, tcp="127.0.0.1:0")
    with pytest.raises(ValueError, match="loopback"):
        ControlServer(router, tcp="0.0.0.0:9000", secret="s")


# -- batches are all or nothing --------------------------------------------------


def test_batch_with_one_invalid_op_changes_nothing(
    server: RouterThread, client: ControlClient
) -> None:
    client.expose_port("keep", 8080, token="k1")
    table_before = server.snapshot()
    store_before = server.stored_snapshot()
    assert store_before == table_before

    ops: list[dict[str, Any]] = [
        {"op": "expose_port", "sandbox": "new", "port": 8080},
        {"op": "unexpose_port", "sandbox": "keep", "port": 8080},
        {"op": "set_sandbox", "sandbox": "keep", "state": "stopped"},
        {"op": "expose_port", "sandbox": "new", "port": 8081, "token": "BAD!"},
        {"op": "destroy_sandbox", "sandbox": "keep"},
    ]
    with pytest.raises(ControlError) as info:
        client.batch(ops)
    assert (info.value.code, info.value.index) == ("INVALID_TOKEN_FORMAT", 3)

    # A rule refusal (TOKEN_IN_USE inside the batch itself) is no different.
    ops[3] = {"op": "expose_port", "sandbox": "new", "port": 8081, "token": "k2"}
    ops.insert(4, {"op": "expose_port", "sandbox": "new", "port": 8082, "token": "k2"})
    with pytest.raises(ControlError) as info:
        client.batch(ops)
    assert (info.value.code, info.value.index) == ("TOKEN_IN_USE", 4)

    assert server.snapshot() == table_before
    assert server.stored_snapshot() == store_before
    assert client.validate_port_token("keep", 8080, "k1")


# -- watch -----------------------------------------------------------------------


def test_watch_without_since_starts_with_a_snapshot(
    server: RouterThread, client: ControlClient
) -> None:
    client.expose_port("w", 8080, token="a")
    events = client.watch()
    try:
        first = next(events)
        assert first.snapshot is not None and not first.resync
        assert first.snapshot == server.snapshot() and first.version == 1
        client.expose_port("w", 8081, token="b")
        second = next(events)
        assert second.version == 2 and second.changes[0]["op"] == "put_route"
    finally:
        events.close()


def test_watch_on_an_unreadable_store_is_answered_and_not_kept(
    server: RouterThread, client: ControlClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A table whose sandbox "late" is still only in a store that now fails.
    def unreadable() -> list[Any]:
        raise StoreError("Route store /gone.db cannot be read: disk I/O error")

    assert server.router.store is not None
    monkeypatch.setattr(server.router.store, "all_routes", unreadable)
    server.router.table.unloaded.add("late")
    with pytest.raises(ControlError) as info:
        client.watch()
    assert info.value.code == "STORE_ERROR"
    assert client.stats()["watchers"] == 0
    with pytest.raises(ControlError) as info:
        client.snapshot()
    assert info.value.code == "STORE_ERROR"

    # And once the store reads again, both work.
    monkeypatch.undo()
    events = client.watch()
    try:
        assert next(events).snapshot is not None
    finally:
        events.close()
    assert client.snapshot()["version"] == 0


def test_a_restarted_router_answers_whole_table_requests_in_full(
    tmp_path: Path,
) -> None:
    router = RouterThread(tmp_path).start()
    try:
        with ControlClient(router.path) as c:
            for i in range(30):
                c.expose_port(f"box-{i % 7}", 8000 + i, name=f"app {i}")
            before = c.snapshot()
    finally:
        router.stop()

    router = RouterThread(tmp_path).start()
    try:
        assert len(router.router.table.unloaded) == 7  # nothing read yet
        with ControlClient(router.path) as c:
            assert c.get_exposed_ports("box-3")[0].name == "app 3"
            assert c.snapshot() == before
            events = c.watch()
            try:
                assert next(events).snapshot == before
            finally:
                events.close()
        assert router.router.table.unloaded == set()
    finally:
        router.stop()


def test_a_snapshot_made_in_steps_holds_one_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Steps of 4 records: a snapshot of this table takes a dozen turns of
    # the event loop, and the changes sent meanwhile must all fall wholly
    # before it or wholly after it.
    monkeypatch.setattr("router.app.SNAPSHOT_STEP", 4)
    router = RouterThread(tmp_path).start()
    try:
        with ControlClient(router.path) as c:
            for i in range(30):
                c.expose_port(f"box-{i % 7}", 8000 + i)
    finally:
        router.stop()

    router = RouterThread(tmp_path).start()
    try:
        changes = [
            {"id": i, "op": "expose_port", "sandbox": f"new-{i}", "port": 3001}
            for i in range(20)
        ]
        with Raw(router.path) as writer, Raw(router.path) as reader:
            writer.send(b"".join(orjson.dumps(c) + b"\n" for c in changes))
            snap = reader.request({"id": "s", "op": "snapshot"})["result"]
            versions = [writer.read()["version"] for _ in changes]
        exposed = {r["sandbox"] for r in snap["routes"]}
        for i, version in enumerate(versions):
            assert (f"new-{i}" in exposed) == (version <= snap["version"])
        assert len(snap["routes"]) == 30 + sum(v <= snap["version"] for v in versions)
        assert snap["routes"] == sorted(
            snap["routes"], key=lambda r: (r["sandbox"], r["port"])
        )
    finally:
        router.stop()


def test_watch_reply_and_framing(server: RouterThread, client: ControlClient) -> None:
    client.expose_port("w", 8080, token="a")
    with Raw(server.path) as raw:
        assert raw.request({"id": 5, "op": "watch", "since": 0}) == {
            "id": 5,
            "ok": True,
            "result": {"version": 1, "resync": False},
        }
        assert raw.read() == server.sync(lambda: server.router.table.log[0])
        # A watching connection takes no more requests.
        reply = raw.request({"id": 6, "op": "ping"})
        assert reply["error"]["code"] == "INVALID_REQUEST" and reply["id"] == 5
        assert raw.at_eof()


def test_watcher_resumes_without_gap_or_repeat(
    server: RouterThread, client: ControlClient
) -> None:
    client.expose_port("r0", 8000)
    events = client.watch(0)
    received = [event_message(next(events))]  # from the backlog
    for i in range(1, 10):
        client.expose_port(f"r{i % 3}", 8000 + i)
    received.extend(event_message(next(events)) for _ in range(5))  # live
    events.close()  # the watcher goes away mid-stream

    for i in range(10, 20):
        client.expose_port(f"r{i % 3}", 8000 + i)
    client.destroy_sandbox("r1")
    last = received[-1]["version"]
    events = client.watch(last)
    try:
        while not received or received[-1]["version"] < client.version:
            received.append(event_message(next(events)))
    finally:
        events.close()

    versions = [m["version"] for m in received]
    assert client.version is not None
    assert versions == list(range(1, client.version + 1))
    assert replay(received).snapshot() == server.snapshot()


def test_watch_resyncs_when_the_log_is_too_short(tmp_path: Path) -> None:
    router = RouterThread(tmp_path, log_size=4).start()
    try:
        with ControlClient(router.path) as c:
            for i in range(10):
                c.expose_port("rs", 8000 + i, token=f"t{i}")
            with Raw(router.path) as raw:
                reply = raw.request({"id": 1, "op": "watch", "since": 2})
                assert reply["result"] == {"version": 10, "resync": True}
                first = raw.read()
                assert first["resync"] is True and first["version"] == 10
                assert first["snapshot"] == router.snapshot()

                c.unexpose_port("rs", 8000)
                live = raw.read()
                assert live["version"] == 11
                assert replay([first, live]).snapshot() == router.snapshot()

            # Within the log there is no resync: just the missing versions.
            events = c.watch(8)
            try:
                assert [next(events).version for _ in range(3)] == [9, 10, 11]
            finally:
                events.close()
            # A version from the future (a replaced store) resyncs too.
            events = c.watch(99)
            try:
                event = next(events)
                assert event.resync and event.snapshot is not None
            finally:
                events.close()
    finally:
        router.stop()


def test_slow_watcher_is_dropped_without_holding_anyone_up(tmp_path: Path) -> None:
    router = RouterThread(tmp_path, watch_buffer=64 << 10).start()
    try:
        with ControlClient(router.path) as c, Raw(router.path) as slow:
            slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            assert slow.request({"id": "slow", "op": "watch", "since": 0})["ok"]
            fast = c.watch(0)
            try:
                # About 1.3 MB of change records; ``slow`` reads none of them.
                for i in range(30):
                    c.batch(
                        [
                            {
                                "op": "expose_port",
                                "sandbox": f"s{i}",
                                "port": p,
                                "name": "n" * 256,
                            }
                            for p in range(8000, 8100)
                        ]
                    )
                    assert next(fast).version == i + 1
                # Dropped at once, inside the commit that overflowed it;
                # the fast one is still there.
                assert c.stats()["watchers"] == 1
            finally:
                fast.close()

            # The dropped watcher gets what fitted, then the reason.
            last = None
            while True:
                message = slow.read()
                if "error" in message:
                    break
                last = message["version"]
            assert message["error"]["code"] == "WATCH_OVERFLOW"
            assert message["id"] == "slow"
            assert message.get("version") == last
            assert slow.at_eof()
    finally:
        router.stop()


# -- many clients at once --------------------------------------------------------


SANDBOXES = [f"sb{i}" for i in range(6)]
PORTS = list(range(8000, 8006))
TOKENS = ["t1", "t2", "t3-x", None, None]


def random_change(rng: random.Random) -> dict[str, Any]:
    sandbox = rng.choice(SANDBOXES)
    roll = rng.random()
    if roll < 0.5:
        op: dict[str, Any] = {
            "op": "expose_port",
            "sandbox": sandbox,
            "port": rng.choice(PORTS),
        }
        token = rng.choice(TOKENS)
        if token:
            op["token"] = token
        if rng.random() < 0.2:
            op["target"] = f"127.0.0.1:{rng.randint(9000, 9003)}"
        return op
    if roll < 0.7:
        return {"op": "unexpose_port", "sandbox": sandbox, "port": rng.choice(PORTS)}
    if roll < 0.85:
        return {
            "op": "set_sandbox",
            "sandbox": sandbox,
            "state": rng.choice(["running", "stopped"]),
            "upstream_host": rng.choice(["127.0.0.1", "10.0.0.2"]),
        }
    return {"op": "destroy_sandbox", "sandbox": sandbox}


def holds_after(table: RouteTable, op: dict[str, Any], result: Any) -> bool:
    """Whether an acknowledged change is visible in ``table``."""
    if op["op"] == "expose_port":
        route = table.routes.get((op["sandbox"], op["port"]))
        return route is not None and route.token == result["token"]
    if op["op"] == "unexpose_port":
        return (op["sandbox"], op["port"]) not in table.routes
    if op["op"] == "set_sandbox":
        sb = table.sandboxes.get(op["sandbox"])
        return sb is not None and sb.to_record() == result
    return op["sandbox"] not in table.sandboxes and not table.sandbox_routes(
        op["sandbox"]
    )


def test_fifty_clients_thousand_changes_replay_to_the_same_table(
    server: RouterThread,
) -> None:
    clients, per_client = 50, 20
    acks: list[tuple[int, dict[str, Any], Any]] = []
    refused: list[str] = []

    async def worker(n: int) -> None:
        rng = random.Random(n)
        async with AsyncControlClient(server.path) as c:
            for _ in range(per_client):
                if rng.random() < 0.15:
                    ops = [random_change(rng) for _ in range(rng.randint(2, 4))]
                    request: dict[str, Any] = {"op": "batch", "ops": ops}
                else:
                    request = random_change(rng)
                try:
                    result = await c.call(**request)
                except ControlError as exc:
                    refused.append(exc.code)
                    continue
                assert c.version is not None
                if request["op"] == "batch":
                    # Each op of a batch holds at the batch's version only
                    # if no later op of the same batch undid it: check the
                    # last op, which nothing in the batch follows.
                    acks.append((c.version, request["ops"][-1], result[-1]))
                else:
                    acks.append((c.version, request, result))

    async def follow(out: list[dict[str, Any]]) -> asyncio.Future[None]:
        """A follower whose watch is registered when this returns."""
        events = AsyncControlClient(server.path).watch(0)
        await events.start()
        starts.append(events.version or 0)

        async def collect() -> None:
            async with events:
                async for event in events:
                    out.append(event_message(event))

        return asyncio.ensure_future(collect())

    async def caught_up(
        task: asyncio.Future[None], out: list[dict[str, Any]], version: int
    ) -> None:
        while not out or out[-1]["version"] < version:
            if task.done():
                task.result()
                raise AssertionError("the watch stream ended early")
            await asyncio.sleep(0.01)

    async def main() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        early: list[dict[str, Any]] = []
        late: list[dict[str, Any]] = []
        live = await follow(early)
        workers = [asyncio.ensure_future(worker(n)) for n in range(clients)]
        # A second follower joins mid-load: backlog, then live, no seam.
        while len(acks) + len(refused) < 300:
            await asyncio.sleep(0.001)
        joined = await follow(late)
        await asyncio.gather(*workers)
        async with AsyncControlClient(server.path) as c:
            version = (await c.stats())["version"]
        try:
            async with asyncio.timeout(20):
                await caught_up(live, early, version)
                await caught_up(joined, late, version)
        finally:
            live.cancel()
            joined.cancel()
            await asyncio.gather(live, joined, return_exceptions=True)
        return early, late

    starts: list[int] = []
    early, late = asyncio.run(main())

    assert len(acks) + len(refused) == clients * per_client
    assert set(refused) <= {"TOKEN_IN_USE", "LABEL_CONFLICT"}, set(refused)
    version = server.snapshot()["version"]
    assert starts[0] == 0 and 0 < starts[1] < version
    for stream in (early, late):
        assert [m["version"] for m in stream] == list(range(1, version + 1))
    assert early == late

    # Replaying the stream gives the router's table, and the store's.
    expected = server.snapshot()
    assert replay(early).snapshot() == expected
    assert server.stored_snapshot() == expected
    server_view = server.sync(lambda: forwarding_view(server.router.table.forwarding))
    assert forwarding_view(replay_forwarding(early)) == server_view

    # Every acknowledged change is in the table at the version it was
    # acknowledged with.
    acks.sort(key=lambda a: a[0])
    table = RouteTable()
    position = 0
    for v, op, result in acks:
        while position < len(early) and early[position]["version"] <= v:
            for rec in early[position]["changes"]:
                table._apply(rec)
            position += 1
        assert holds_after(table, op, result), (v, op, result)


# -- failures on the router's side ---------------------------------------------


def test_store_failure_is_reported_and_rolled_back(
    server: RouterThread, client: ControlClient
) -> None:
    client.expose_port("kept", 8080, token="a")
    before = server.snapshot()
    store = server.router.store
    assert store is not None
    server.sync(store._db.close)  # the disk is gone, as far as SQLite knows

    with pytest.raises(ControlError) as info:
        client.expose_port("lost", 8080)
    assert info.value.code == "STORE_ERROR"
    assert server.snapshot() == before
    assert client.get_exposed_ports("lost") == []


def test_watcher_leaving_mid_backlog_is_quiet(
    server: RouterThread,
    client: ControlClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for i in range(30):
        client.batch(
            [
                {"op": "expose_port", "sandbox": f"q{i}", "port": p, "name": "n" * 200}
                for p in range(8000, 8050)
            ]
        )
    for n in range(5):
        with Raw(server.path) as raw:
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            raw.request({"id": 1, "op": "watch", "since": 0})
            raw.read()
        client.expose_port("after", 9000 + n)  # live changes meet a closing watcher
    assert client.stats()["version"] == 35
    noisy = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING
        and r.name.startswith(("edge_router", "asyncio"))
    ]
    assert noisy == []


def test_stopping_closes_every_client(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    router = RouterThread(tmp_path).start()
    idle = Raw(router.path)
    watching = Raw(router.path)
    try:
        assert watching.request({"id": 1, "op": "watch"})["ok"]
        assert "snapshot" in watching.read()
        assert idle.request({"id": 1, "op": "ping"})["ok"]
        router.stop()
        assert idle.at_eof() and watching.at_eof()
        assert not os.path.exists(router.path)
        # Quietly: a cancelled client task used to log a traceback.
        assert [r.getMessage() for r in caplog.records] == []
    finally:
        idle.close()
        watching.close()


def test_route_changes_are_logged_one_line_each_or_one_per_bulk(
    server: RouterThread, client: ControlClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_router")
    client.expose_port("few", 8080)
    client.batch(
        [
            {"op": "expose_port", "sandbox": f"bulk-{i}", "port": 8080}
            for i in range(500)
        ]
    )
    lines = [r.getMessage() for r in caplog.records if "route change" in r.getMessage()]
    assert lines[:2] == [
        "route change v1: sandbox few running upstream 127.0.0.1",
        "route change v1: expose few:8080 (route 1)",
    ]
    assert lines[2:] == ["route change v2: 1000 changes (500 expose, 500 sandbox set)"]


def test_stats_count_what_is_stored(tmp_path: Path) -> None:
    table = RouteTable(("localhost",))
    table.run([{"op": "expose_port", "sandbox": "a", "port": 8080}])
    txn = table.prepare([{"op": "expose_port", "sandbox": "b", "port": 8080}])
    # Prepared, not yet stored: not counted, like the version.
    counts = control.stats(table)
    assert (counts["version"], counts["routes"], counts["sandboxes"]) == (1, 1, 1)
    table.finish(txn)
    counts = control.stats(table)
    assert (counts["version"], counts["routes"], counts["sandboxes"]) == (2, 2, 2)


def test_a_refusal_caused_by_a_change_the_store_refused_is_not_final(
    tmp_path: Path,
) -> None:
    # Two requests in one group: the second's token is taken by the first,
    # which the store then refuses.  The second is tried again, against
    # the table as stored, and succeeds.
    async def main() -> tuple[object, object]:
        router = Router(Config(state=str(tmp_path / "routes.db")))
        router.open_store()
        assert router.store is not None
        store_commit = router.store.commit_many
        calls: list[int] = []

        def first_write_fails(txns: list[Any]) -> None:
            calls.append(len(txns))
            if len(calls) == 1:
                raise StoreError("Route store: write failed: disk full")
            store_commit(txns)

        router.store.commit_many = first_write_fails  # type: ignore[method-assign]
        try:
            return tuple(
                await asyncio.gather(
                    router.commit(
                        [
                            {
                                "op": "expose_port",
                                "sandbox": "sb",
                                "port": 8080,
                                "token": "t1",
                            }
                        ]
                    ),
                    router.commit(
                        [
                            {
                                "op": "expose_port",
                                "sandbox": "sb",
                                "port": 8081,
                                "token": "t1",
                            }
                        ]
                    ),
                    return_exceptions=True,
                )
            )
        finally:
            router.close()

    first, second = asyncio.run(main())
    assert isinstance(first, StoreError)
    assert not isinstance(second, BaseException)
    assert second.results[0]["port"] == 8081 and second.results[0]["token"] == "t1"


def test_a_group_once_begun_is_seen_through_if_its_task_is_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("router.app.PREPARE_STEP", 1)

    async def main() -> None:
        router = Router(Config(state=str(tmp_path / "routes.db")))
        router.open_store()
        try:
            ops = [
                {"op": "expose_port", "sandbox": "sb", "port": 8000 + i}
                for i in range(5)
            ]
            change = asyncio.ensure_future(router.commit(ops, batch=True))
            while not router.table.pending:
                await asyncio.sleep(0)
            assert router._flusher is not None
            router._flusher.cancel()  # as a loop torn down mid-batch would

            txn = await asyncio.wait_for(change, 5)
            await asyncio.wait_for(router.settled(), 5)
            assert len(txn.results) == 5 and router.table.version == 1
            assert len(router.table.forwarding.index) == 5
            assert router.store is not None
            assert len(router.store.all_routes()) == 5
        finally:
            router.close()

    asyncio.run(main())
