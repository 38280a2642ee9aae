"""The route table of SPEC §2: one test per operation, then properties.

The ``table`` fixture builds each ``RouteTable`` on the label twin of the
run (compiled, then pure), so the forwarding view is checked on both.
"""

from __future__ import annotations

import copy
import re
from types import ModuleType
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router import routes
from router.errors import RouteError
from router.routes import ForwardingTable, RouteTable, Sandbox

DOMAINS = ("example.com", "localhost")
EXPOSED_AT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def labels(twin: ModuleType, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The label twin that every ``ForwardingTable`` of the test uses."""
    monkeypatch.setattr(routes, "_labels", twin)
    return twin


@pytest.fixture
def table(labels: ModuleType) -> RouteTable:
    return RouteTable(DOMAINS)


def one(table: RouteTable, op: str, **args: Any) -> Any:
    """Run one operation and return its result."""
    return table.run([{"op": op, **args}]).results[0]


def expose(table: RouteTable, sandbox: str, port: int, **args: Any) -> Any:
    return one(table, "expose_port", sandbox=sandbox, port=port, **args)


def refused(code: str, table: RouteTable, ops: list[dict[str, Any]]) -> RouteError:
    """Run ``ops`` expecting refusal with ``code``; the table must not move."""
    before = table.snapshot()
    items = table.forwarding.index.items()
    next_id = table.next_route_id
    with pytest.raises(RouteError) as info:
        table.run(ops, atomic_index=True)
    assert info.value.code == code, info.value.message
    assert table.snapshot() == before
    assert table.forwarding.index.items() == items
    # Not a gap in the route ids for every refused batch.
    assert table.next_route_id == next_id
    return info.value


def resolve(table: RouteTable, host: bytes) -> tuple[Any, ...] | None:
    """What the data path does per request: Host → label → entry."""
    fwd = table.forwarding
    label = routes._labels.host_label(host, fwd.domains)
    if label is None:
        return None
    entry = fwd.index.lookup(label)
    if entry is None:
        return None
    _, sandbox_slot, port, target_slot, flags = entry
    view = fwd.sandbox_view(sandbox_slot)
    assert view is not None
    target = fwd.targets[target_slot]
    return (view.name, port, target, flags, view.stopped, view.upstream_host)


# -- expose_port -------------------------------------------------------


def test_expose_returns_the_sdk_shape(table: RouteTable) -> None:
    result = expose(table, "sb", 8080, name="web")
    assert set(result) == {"port", "url", "name", "token", "exposedAt"}
    assert result["port"] == 8080
    assert result["name"] == "web"
    assert re.fullmatch(r"[a-z0-9]{16}", result["token"])
    assert EXPOSED_AT.fullmatch(result["exposedAt"])
    # The first configured domain, not a localhost name: https.
    assert result["url"] == f"https://8080-sb-{result['token']}.example.com/"


def test_expose_url_on_a_localhost_hostname(table: RouteTable) -> None:
    result = expose(table, "sb", 8080, token="tok", hostname="localhost:8787")
    assert result["url"] == "http://8080-sb-tok.localhost:8787/"


def test_expose_hostname_must_be_a_configured_domain(table: RouteTable) -> None:
    op = {"op": "expose_port", "sandbox": "sb", "port": 8080, "hostname": "x.org"}
    refused("INVALID_HOSTNAME", table, [op])


def test_expose_sandbox_id_normalised(table: RouteTable) -> None:
    result = expose(table, "My-SandBox", 8080, token="tok")
    assert result["url"] == "https://8080-my-sandbox-tok.example.com/"
    assert ("my-sandbox", 8080) in table.routes
    assert resolve(table, b"8080-My-Sandbox-tok.Example.com")
    # ``routes`` answers like a dict for keys that are not (sandbox, port).
    assert ("My-SandBox", 8080) not in table.routes
    assert "my-sandbox" not in table.routes
    assert table.routes.get(("my-sandbox",)) is None


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ({"port": "08080"}, "INVALID_PORT"),
        ({"port": 1023}, "INVALID_PORT"),
        ({"port": 65536}, "INVALID_PORT"),
        ({"port": 3000}, "RESERVED_PORT"),
        ({"sandbox": "-sb"}, "INVALID_SANDBOX_ID"),
        ({"token": "t" * 17}, "INVALID_TOKEN_FORMAT"),
        ({"token": "T!"}, "INVALID_TOKEN_FORMAT"),
        ({"sandbox": "s" * 41, "port": 10000, "token": "t" * 16}, "LABEL_TOO_LONG"),
        ({"target": "nowhere"}, "INVALID_TARGET"),
        ({"target": "unix:relative.sock"}, "INVALID_TARGET"),
        # A digit to str.isdigit, not to int(): was an INTERNAL_ERROR.
        ({"target": "127.0.0.1:\u00b2"}, "INVALID_TARGET"),
        ({"host": "keep"}, "INVALID_HOST_POLICY"),
        ({"name": "\x1b[31mred"}, "INVALID_NAME"),
        ({"name": "n" * 257}, "INVALID_NAME"),
    ],
)
def test_expose_refusals(table: RouteTable, args: dict[str, Any], code: str) -> None:
    expose(table, "other", 9000)
    op = {"op": "expose_port", "sandbox": "sb", "port": 8080, **args}
    refused(code, table, [op])
    assert "sb" not in table.sandboxes


def test_own_listener_ports_by_host(table: RouteTable) -> None:
    # 8787 is a listener on one address, 9787 one on every address: a
    # sandbox on another machine may use 8787, no host may use 9787.
    table.own_ports = frozenset({8787, 9787})
    table.own_hosts = frozenset({"127.0.0.1"})
    table.own_wildcard_ports = frozenset({9787})
    far = {"op": "set_sandbox", "sandbox": "far", "upstream_host": "192.0.2.5"}
    table.run([far])
    expose(table, "far", 8787)
    refused(
        "OWN_LISTENER", table, [{"op": "expose_port", "sandbox": "far", "port": 9787}]
    )
    op = {"op": "expose_port", "sandbox": "near", "port": 8787}
    refused("OWN_LISTENER", table, [op])


def test_expose_label_too_long_names_the_label(table: RouteTable) -> None:
    op = {"op": "expose_port", "sandbox": "s" * 41, "port": 10000, "token": "t" * 16}
    error = refused("LABEL_TOO_LONG", table, [op])
    assert "64 characters" in error.message


def test_expose_reuses_the_ports_token(table: RouteTable) -> None:
    first = expose(table, "sb", 8080)
    version = table.version
    txn = table.run([{"op": "expose_port", "sandbox": "sb", "port": 8080}])
    assert txn.results[0] == first
    assert txn.changes == []
    assert table.version == version


def test_expose_same_token_is_idempotent(table: RouteTable) -> None:
    first = expose(table, "sb", 8080, token="tok", name="web")
    version = table.version
    again = table.run(
        [{"op": "expose_port", "sandbox": "sb", "port": 8080, "token": "tok"}]
    )
    assert again.results[0] == first
    assert again.changes == []
    assert table.version == version


def test_expose_same_token_updates_name_target_host(table: RouteTable) -> None:
    first = expose(table, "sb", 8080, token="tok", name="web")
    second = expose(
        table,
        "sb",
        8080,
        token="tok",
        name="api",
        target="10.0.0.7:81",
        host="preserve",
    )
    assert second["exposedAt"] == first["exposedAt"]
    assert second["url"] == first["url"]
    assert second["name"] == "api"
    assert resolve(table, b"8080-sb-tok.example.com") == (
        "sb",
        8080,
        ("10.0.0.7", 81),
        routes.FLAG_PRESERVE_HOST,
        False,
        "127.0.0.1",
    )


def test_expose_new_token_rotates_and_kills_the_old_url(table: RouteTable) -> None:
    expose(table, "sb", 8080, token="old")
    assert resolve(table, b"8080-sb-old.example.com")
    txn = table.run(
        [{"op": "expose_port", "sandbox": "sb", "port": 8080, "token": "new"}]
    )
    assert txn.results[0]["url"] == "https://8080-sb-new.example.com/"
    # The old label is gone from the data path in the same step.
    assert [c["op"] for c in txn.changes] == ["del_route", "put_route"]
    assert txn.changes[0]["label"] == "8080-sb-old"
    assert table.forwarding.index.lookup(b"8080-sb-old") is None
    assert resolve(table, b"8080-sb-old.example.com") is None
    assert resolve(table, b"8080-sb-new.example.com")
    assert not table.validate_port_token("sb", 8080, "old")
    assert table.validate_port_token("sb", 8080, "new")


def test_rotation_keeps_name_target_and_host_unless_given(table: RouteTable) -> None:
    expose(
        table,
        "sb",
        8080,
        token="first",
        name="web",
        target="127.0.0.1:9999",
        host="preserve",
    )
    expose(table, "sb", 8080, token="second")
    route = table.route("sb", 8080)
    assert route is not None and route.token == "second"
    assert (route.name, route.target, route.host) == (
        "web",
        "127.0.0.1:9999",
        "preserve",
    )
    hit = table.forwarding.index.lookup(b"8080-sb-second")
    assert hit is not None and table.forwarding.targets[hit[3]] == ("127.0.0.1", 9999)

    expose(table, "sb", 8080, token="third", name="api", host="rewrite")
    route = table.route("sb", 8080)
    assert route is not None
    assert (route.name, route.target, route.host) == (
        "api",
        "127.0.0.1:9999",
        "rewrite",
    )


def test_an_empty_target_sends_the_port_back_to_its_sandbox(table: RouteTable) -> None:
    expose(table, "sb", 8080, token="tok", target="127.0.0.1:9999", name="web")
    assert resolve(table, b"8080-sb-tok.example.com") == (
        "sb",
        8080,
        ("127.0.0.1", 9999),
        0,
        False,
        "127.0.0.1",
    )

    # Same token: the route stays (no revocation), only where it leads.
    txn = table.run(
        [
            {
                "op": "expose_port",
                "sandbox": "sb",
                "port": 8080,
                "token": "tok",
                "target": "",
            }
        ]
    )
    assert [c["op"] for c in txn.changes] == ["put_route"]
    route = table.route("sb", 8080)
    assert route is not None and (route.target, route.name) == (None, "web")
    assert resolve(table, b"8080-sb-tok.example.com") == (
        "sb",
        8080,
        None,
        0,
        False,
        "127.0.0.1",
    )

    # And with a rotation, or on a new route.
    expose(table, "sb", 8081, token="a", target="127.0.0.1:9998")
    expose(table, "sb", 8081, token="b", target="")
    expose(table, "sb", 8082, target="")
    for port in (8081, 8082):
        route = table.route("sb", port)
        assert route is not None and route.target is None


def test_expose_rotation_to_a_generated_token_is_not_possible(
    table: RouteTable,
) -> None:
    # Without a token the current one is kept: rotation needs a new one.
    first = expose(table, "sb", 8080)
    assert expose(table, "sb", 8080)["token"] == first["token"]


def test_expose_token_in_use_by_another_port(table: RouteTable) -> None:
    expose(table, "sb", 8080, token="shared")
    op = {"op": "expose_port", "sandbox": "sb", "port": 8081, "token": "shared"}
    error = refused("TOKEN_IN_USE", table, [op])
    assert error.message == "Token 'shared' is already in use by port 8080"


def test_expose_token_reused_by_other_sandboxes(table: RouteTable) -> None:
    a = expose(table, "sb-a", 8080, token="shared")
    b = expose(table, "sb-b", 8080, token="shared")
    assert a["url"] != b["url"]
    assert resolve(table, b"8080-sb-a-shared.example.com")[0] == "sb-a"
    assert resolve(table, b"8080-sb-b-shared.example.com")[0] == "sb-b"


def test_expose_label_conflict(table: RouteTable) -> None:
    expose(table, "a-b", 8080, token="c")
    op = {"op": "expose_port", "sandbox": "a", "port": 8080, "token": "b-c"}
    error = refused("LABEL_CONFLICT", table, [op])
    assert "'8080-a-b-c'" in error.message
    assert "'a-b'" in error.message
    # The same pair on another port has another label: no conflict.
    expose(table, "a", 8081, token="b-c")
    assert resolve(table, b"8080-a-b-c.example.com")[0] == "a-b"
    assert resolve(table, b"8081-a-b-c.example.com")[0] == "a"


def test_expose_label_conflict_the_other_way_round(table: RouteTable) -> None:
    expose(table, "a", 8080, token="b-c")
    op = {"op": "expose_port", "sandbox": "a-b", "port": 8080, "token": "c"}
    refused("LABEL_CONFLICT", table, [op])


def test_hyphenated_tokens_found_whole(labels: ModuleType, table: RouteTable) -> None:
    expose(table, "my-box", 8080, token="a-b_c-")
    expose(table, "my", 8080, token="box-a-b")
    label = labels.host_label(b"8080-My-Box-a-b_c-.localhost:8787", (b"localhost",))
    assert label == b"8080-my-box-a-b_c-"
    entry = table.forwarding.index.lookup(label)
    assert entry is not None
    assert table.forwarding.sandbox_view(entry[1]).name == "my-box"
    assert resolve(table, b"8080-my-box-a-b.localhost.")[0] == "my"


def test_expose_target_default_and_override(table: RouteTable) -> None:
    one(table, "set_sandbox", sandbox="sb", upstream_host="10.1.2.3")
    expose(table, "sb", 8080, token="a")
    expose(table, "sb", 8081, token="b", target="backend:9000")
    expose(table, "sb", 8082, token="c", target="unix:/run/app.sock")
    expose(table, "sb", 8083, token="d", target="[::1]:9001")
    # Slot 0: the sandbox's upstream host and the same port.
    assert resolve(table, b"8080-sb-a.example.com") == (
        "sb",
        8080,
        None,
        0,
        False,
        "10.1.2.3",
    )
    assert resolve(table, b"8081-sb-b.example.com")[2] == ("backend", 9000)
    assert resolve(table, b"8082-sb-c.example.com")[2] == "/run/app.sock"
    assert resolve(table, b"8083-sb-d.example.com")[2] == ("::1", 9001)


def test_expose_default_upstream_host(table: RouteTable) -> None:
    expose(table, "sb", 8080, token="a")
    assert resolve(table, b"8080-sb-a.example.com")[5] == "127.0.0.1"
    assert table.sandboxes["sb"].to_record() == {
        "name": "sb",
        "upstream_host": "127.0.0.1",
        "state": "running",
    }


def test_shared_targets_are_counted(table: RouteTable) -> None:
    expose(table, "sb", 8080, token="a", target="h:1")
    expose(table, "sb", 8081, token="b", target="h:1")
    fwd = table.forwarding
    slot = fwd.target_slots["h:1"]
    assert fwd.target_refs[slot] == 2
    one(table, "unexpose_port", sandbox="sb", port=8080)
    assert resolve(table, b"8081-sb-b.example.com")[2] == ("h", 1)
    one(table, "unexpose_port", sandbox="sb", port=8081)
    assert "h:1" not in fwd.target_slots


# -- unexpose_port -----------------------------------------------------


def test_unexpose_kills_the_url_and_is_idempotent(table: RouteTable) -> None:
    expose(table, "sb", 8080, token="a")
    expose(table, "sb", 8081, token="b")
    assert one(table, "unexpose_port", sandbox="sb", port=8080) == {
        "port": 8080,
        "unexposed": True,
    }
    assert resolve(table, b"8080-sb-a.example.com") is None
    assert resolve(table, b"8081-sb-b.example.com")
    version = table.version
    txn = table.run([{"op": "unexpose_port", "sandbox": "sb", "port": 8080}])
    assert txn.results[0] == {"port": 8080, "unexposed": False}
    assert txn.changes == []
    assert table.version == version
    assert one(table, "unexpose_port", sandbox="nobody", port="8080") == {
        "port": 8080,
        "unexposed": False,
    }


# -- get_exposed_ports -------------------------------------------------


def test_get_exposed_ports_sorted_with_status(table: RouteTable) -> None:
    for port in (9000, 8080, 8500):
        expose(table, "sb", port, token=f"t{port}", name=f"n{port}")
    expose(table, "other", 8000, token="x")
    ports = table.get_exposed_ports("SB", hostname="localhost:8787")
    assert [p["port"] for p in ports] == [8080, 8500, 9000]
    first = ports[0]
    assert set(first) == {"port", "url", "name", "exposedAt", "status"}
    assert first["url"] == "http://8080-sb-t8080.localhost:8787/"
    assert first["name"] == "n8080"
    assert EXPOSED_AT.fullmatch(first["exposedAt"])
    assert {p["status"] for p in ports} == {"active"}

    one(table, "set_sandbox", sandbox="sb", state="stopped")
    assert {p["status"] for p in table.get_exposed_ports("sb")} == {"stale"}
    assert table.get_exposed_ports("sb")[0]["url"].startswith("https://")
    assert table.get_exposed_ports("nobody") == []


# -- validate_port_token -----------------------------------------------


def test_validate_port_token(table: RouteTable) -> None:
    expose(table, "sb", 8080, token="right")
    expose(table, "sb", 8081, token="other")
    assert table.validate_port_token("sb", 8080, "right") is True
    assert table.validate_port_token("SB", "8080", "right") is True
    assert table.validate_port_token("sb", 8080, "wrong") is False
    assert table.validate_port_token("sb", 8080, "other") is False
    assert table.validate_port_token("sb", 8082, "right") is False
    assert table.validate_port_token("nobody", 8080, "right") is False
    assert table.validate_port_token("sb", "08080", "right") is False
    assert table.validate_port_token("-sb", 8080, "right") is False
    assert table.validate_port_token("sb", 8080, None) is False  # type: ignore[arg-type]
    assert table.validate_port_token("sb", 8080, "") is False
    assert table.validate_port_token("nobody", 8080, "\0" * 16) is False


# -- set_sandbox -------------------------------------------------------


def test_set_sandbox_stopped_and_running(table: RouteTable) -> None:
    expose(table, "sb", 8080, token="a")
    assert one(table, "set_sandbox", sandbox="sb", state="stopped") == {
        "name": "sb",
        "upstream_host": "127.0.0.1",
        "state": "stopped",
    }
    # The route stays (it answers 410), flagged stopped in the data path.
    assert resolve(table, b"8080-sb-a.example.com")[4] is True
    one(table, "set_sandbox", sandbox="sb", state="running")
    assert resolve(table, b"8080-sb-a.example.com")[4] is False


def test_set_sandbox_creates_and_updates(table: RouteTable) -> None:
    result = one(table, "set_sandbox", sandbox="New", upstream_host="[fd00::1]")
    assert result == {"name": "new", "upstream_host": "fd00::1", "state": "running"}
    view = table.forwarding.sandbox_view(table.forwarding.sandbox_slots["new"])
    assert view is not None
    assert (view.upstream_host, view.stopped) == ("fd00::1", False)

    version = table.version
    txn = table.run([{"op": "set_sandbox", "sandbox": "new"}])
    assert txn.changes == []
    assert table.version == version

    one(table, "set_sandbox", sandbox="new", upstream_host="Box.Internal")
    assert table.sandboxes["new"].upstream_host == "box.internal"
    one(table, "set_sandbox", sandbox="new", upstream_host="LOCALHOST.")
    assert table.sandboxes["new"].upstream_host == "localhost."


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ({"state": "paused"}, "INVALID_STATE"),
        ({"upstream_host": "not a host"}, "INVALID_UPSTREAM_HOST"),
        ({"upstream_host": ""}, "INVALID_UPSTREAM_HOST"),
        ({"upstream_host": "."}, "INVALID_UPSTREAM_HOST"),
        ({"upstream_host": "a.."}, "INVALID_UPSTREAM_HOST"),
        ({"sandbox": "a_b"}, "INVALID_SANDBOX_ID"),
    ],
)
def test_set_sandbox_refusals(
    table: RouteTable, args: dict[str, Any], code: str
) -> None:
    refused(code, table, [{"op": "set_sandbox", "sandbox": "sb", **args}])


# -- destroy_sandbox ---------------------------------------------------


def test_destroy_sandbox_removes_all_its_routes(table: RouteTable) -> None:
    expose(table, "sb", 8080, token="a", target="h:1")
    expose(table, "sb", 8081, token="b")
    expose(table, "keep", 8080, token="a")
    assert one(table, "destroy_sandbox", sandbox="SB") == {
        "sandbox": "sb",
        "destroyed": True,
        "routes": 2,
    }
    assert resolve(table, b"8080-sb-a.example.com") is None
    assert resolve(table, b"8081-sb-b.example.com") is None
    assert resolve(table, b"8080-keep-a.example.com")
    assert "sb" not in table.sandboxes
    assert "sb" not in table.forwarding.sandbox_slots
    assert table.get_exposed_ports("sb") == []
    assert [label for label, _ in table.forwarding.index.items()] == [b"8080-keep-a"]

    txn = table.run([{"op": "destroy_sandbox", "sandbox": "sb"}])
    assert txn.results[0] == {"sandbox": "sb", "destroyed": False, "routes": 0}
    assert txn.changes == []


# -- batch -------------------------------------------------------------


def test_batch_applies_all_in_one_version(table: RouteTable) -> None:
    version = table.version
    txn = table.run(
        [
            {"op": "set_sandbox", "sandbox": "sb", "upstream_host": "10.0.0.1"},
            {"op": "expose_port", "sandbox": "sb", "port": 8080, "token": "a"},
            {"op": "expose_port", "sandbox": "sb", "port": 8081, "token": "b"},
            {"op": "unexpose_port", "sandbox": "sb", "port": 8080},
        ],
        atomic_index=True,
    )
    assert table.version == txn.version == version + 1
    assert [r.get("port") for r in txn.results] == [None, 8080, 8081, 8080]
    assert resolve(table, b"8080-sb-a.example.com") is None
    assert resolve(table, b"8081-sb-b.example.com")[5] == "10.0.0.1"


def test_ports_a_batch_exposes_share_one_exposed_at(
    table: RouteTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A clock that moves on at every reading.
    ticks = iter(f"2026-01-01T00:00:0{n}.000Z" for n in range(10))
    monkeypatch.setattr(routes, "now_iso", lambda: next(ticks))
    txn = table.run(
        [
            {"op": "expose_port", "sandbox": "sb", "port": 8080},
            {"op": "expose_port", "sandbox": "sb", "port": 8081},
            {"op": "expose_port", "sandbox": "other", "port": 8080},
        ],
        atomic_index=True,
    )
    assert {r["exposedAt"] for r in txn.results} == {"2026-01-01T00:00:00.000Z"}
    later = expose(table, "sb", 8082)
    assert later["exposedAt"] == "2026-01-01T00:00:01.000Z"


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        ({"op": "expose_port", "sandbox": "sb", "port": 3000}, "RESERVED_PORT"),
        # Refused because of an earlier op of the same batch.
        (
            {"op": "expose_port", "sandbox": "sb", "port": 9001, "token": "a"},
            "TOKEN_IN_USE",
        ),
        (
            {"op": "expose_port", "sandbox": "x", "port": 9000, "token": "sb-b"},
            "LABEL_CONFLICT",
        ),
        ({"op": "set_sandbox", "sandbox": "sb", "state": "gone"}, "INVALID_STATE"),
        ({"op": "snapshot"}, "UNKNOWN_OP"),
    ],
)
def test_batch_is_all_or_none(
    table: RouteTable, bad: dict[str, Any], code: str
) -> None:
    expose(table, "keep", 8080, token="k", target="h:1")
    expose(table, "old", 8080, token="o")
    ops = [
        {"op": "expose_port", "sandbox": "sb", "port": 9000, "token": "a"},
        {"op": "expose_port", "sandbox": "x-sb", "port": 9000, "token": "b"},
        {"op": "expose_port", "sandbox": "keep", "port": 8080, "token": "rot"},
        {"op": "expose_port", "sandbox": "keep", "port": 8081, "target": "h:1"},
        {"op": "set_sandbox", "sandbox": "keep", "state": "stopped"},
        {"op": "destroy_sandbox", "sandbox": "old"},
        bad,
    ]
    version = table.version
    error = refused(code, table, ops)
    assert table.pending_labels == {}
    assert error.index == len(ops) - 1
    assert error.to_dict()["index"] == len(ops) - 1
    assert table.version == version
    assert resolve(table, b"8080-keep-k.example.com")[2:5] == (("h", 1), 0, False)
    assert resolve(table, b"8080-old-o.example.com")
    assert resolve(table, b"9000-sb-a.example.com") is None


def test_batch_refusal_names_the_first_bad_op(table: RouteTable) -> None:
    ops = [
        {"op": "expose_port", "sandbox": "sb", "port": 9000},
        {"op": "expose_port", "sandbox": "sb", "port": 80},
        {"op": "expose_port", "sandbox": "sb", "port": 3000},
    ]
    assert refused("INVALID_PORT", table, ops).index == 1


def test_batch_malformed_op_rolls_back(table: RouteTable) -> None:
    # Arguments are checked by the control layer; should one slip through,
    # the batch must still be all or none.
    expose(table, "keep", 8080, token="k")
    before = table.snapshot()
    items = table.forwarding.index.items()
    ops = [
        {"op": "expose_port", "sandbox": "sb", "port": 9000},
        {"op": "expose_port", "sandbox": "sb", "port": 9001, "colour": "red"},
    ]
    with pytest.raises(TypeError):
        table.run(ops, atomic_index=True)
    assert table.snapshot() == before
    assert table.forwarding.index.items() == items


# -- snapshot and watch ------------------------------------------------


def test_snapshot(table: RouteTable) -> None:
    assert table.snapshot() == {"version": 0, "routes": [], "sandboxes": []}
    expose(table, "b", 8081, token="t", name="api")
    expose(table, "a", 8080, token="t")
    one(table, "set_sandbox", sandbox="c", state="stopped")
    snap = table.snapshot()
    assert snap["version"] == 3
    assert [(r["sandbox"], r["port"]) for r in snap["routes"]] == [
        ("a", 8080),
        ("b", 8081),
    ]
    assert set(snap["routes"][1]) == {
        "sandbox",
        "port",
        "token",
        "name",
        "exposedAt",
        "target",
        "host",
        "route_id",
    }
    assert snap["routes"][1]["name"] == "api"
    assert [s["name"] for s in snap["sandboxes"]] == ["a", "b", "c"]
    assert snap["sandboxes"][2]["state"] == "stopped"


def test_changes_since(table: RouteTable) -> None:
    assert table.changes_since(0) == []
    first = table.run([{"op": "expose_port", "sandbox": "sb", "port": 8080}])
    second = table.run([{"op": "unexpose_port", "sandbox": "sb", "port": 8080}])
    assert table.version == 2
    assert table.changes_since(0) == [first.message(), second.message()]
    assert table.changes_since(1) == [second.message()]
    assert table.changes_since(2) == []
    assert table.changes_since(3) is None
    assert second.message() == {"version": 2, "changes": second.changes}
    assert [c["op"] for c in first.changes] == ["put_sandbox", "put_route"]


def test_resume_log_is_bounded_by_changes_not_messages() -> None:
    table = RouteTable(log_size=4)
    batch = [
        {"op": "expose_port", "sandbox": "sb", "port": 8080},
        {"op": "expose_port", "sandbox": "sb", "port": 8081},
    ]
    table.run(batch)  # version 1: put_sandbox + 2 put_route
    table.run([{"op": "unexpose_port", "sandbox": "sb", "port": 8080}])
    assert table.changes_since(0) is not None  # 4 changes kept

    table.run([{"op": "unexpose_port", "sandbox": "sb", "port": 8081}])
    # 5 changes would be over the limit of 4: version 1 went.
    assert table.changes_since(0) is None
    assert [m["version"] for m in table.changes_since(1) or []] == [2, 3]

    # A batch larger than the limit is still kept whole, alone.
    big = [{"op": "expose_port", "sandbox": "big", "port": 9000 + i} for i in range(8)]
    table.run(big)
    assert [m["version"] for m in table.changes_since(3) or []] == [4]
    assert table.changes_since(2) is None


def test_changes_since_after_log_overflow(labels: ModuleType) -> None:
    table = RouteTable(DOMAINS, log_size=3)
    for port in range(8080, 8085):
        table.run([{"op": "expose_port", "sandbox": "sb", "port": port}])
    assert table.version == 5
    # The log holds versions 3-5: a watcher at 2 gets them all, one at 1
    # has lost version 2 and must start again from a snapshot.
    assert [m["version"] for m in table.changes_since(2) or []] == [3, 4, 5]
    assert table.changes_since(1) is None
    assert table.changes_since(0) is None
    assert table.changes_since(5) == []


def test_changes_since_of_a_loaded_table(labels: ModuleType) -> None:
    source = RouteTable(DOMAINS)
    expose(source, "sb", 8080, token="a")
    loaded = RouteTable(DOMAINS)
    loaded.load(
        source.version,
        list(source.sandboxes.values()),
        list(source.routes.values()),
    )
    assert loaded.snapshot() == source.snapshot()
    assert loaded.changes_since(loaded.version) == []
    assert loaded.changes_since(0) is None
    # Route ids continue after the loaded ones.
    route_id = loaded.routes[("sb", 8080)].route_id
    expose(loaded, "sb", 8081)
    assert loaded.routes[("sb", 8081)].route_id > route_id


def test_listeners_hear_each_transaction(table: RouteTable) -> None:
    heard: list[int] = []
    table.listeners.append(lambda txn: heard.append(txn.version))
    expose(table, "sb", 8080)
    expose(table, "sb", 8080)  # no change: not announced
    one(table, "unexpose_port", sandbox="sb", port=8080)
    assert heard == [1, 2]


# -- replaying change records (properties) -----------------------------

SANDBOXES = ["a", "a-b", "b"]
PORTS = [8080, 8081, 9000]
TOKENS = [None, "c", "b-c", "t", "x-y"]
TARGETS = [None, "h:1", "h:2", "unix:/s"]

_expose = st.builds(
    lambda sb, port, token, target, host: {
        "op": "expose_port",
        "sandbox": sb,
        "port": port,
        "token": token,
        "target": target,
        "host": host,
    },
    st.sampled_from(SANDBOXES),
    st.sampled_from([*PORTS, *PORTS, 3000]),
    st.sampled_from(TOKENS),
    st.sampled_from(TARGETS),
    st.sampled_from([None, "rewrite", "preserve"]),
)
_op = st.one_of(
    _expose,
    _expose,
    _expose,
    st.builds(
        lambda sb, port: {"op": "unexpose_port", "sandbox": sb, "port": port},
        st.sampled_from(SANDBOXES),
        st.sampled_from(PORTS),
    ),
    st.builds(
        lambda sb, state, up: {
            "op": "set_sandbox",
            "sandbox": sb,
            "state": state,
            "upstream_host": up,
        },
        st.sampled_from(SANDBOXES),
        st.sampled_from([None, "running", "stopped"]),
        st.sampled_from([None, "127.0.0.1", "10.0.0.2"]),
    ),
    st.builds(
        lambda sb: {"op": "destroy_sandbox", "sandbox": sb},
        st.sampled_from(SANDBOXES),
    ),
)


def _resolved(fwd: ForwardingTable) -> list[tuple[Any, ...]]:
    """The forwarding view with slots replaced by what they point at."""
    out = []
    for label, (route_id, sb_slot, port, t_slot, flags) in fwd.index.items():
        view = fwd.sandbox_view(sb_slot)
        assert view is not None
        out.append((label, route_id, view, port, fwd.targets[t_slot], flags))
    return out


def _views(fwd: ForwardingTable) -> dict[str, Any]:
    return {name: fwd.sandbox_view(slot) for name, slot in fwd.sandbox_slots.items()}


def test_upstream_hosts_no_sandbox_uses_are_forgotten(table: RouteTable) -> None:
    # An IP per sandbox, sandboxes made and destroyed: the forwarding view
    # must not keep every address it ever saw.
    for n in range(50):
        table.run(
            [
                {
                    "op": "set_sandbox",
                    "sandbox": f"sb{n}",
                    "upstream_host": f"10.0.0.{n}",
                },
                {
                    "op": "set_sandbox",
                    "sandbox": "shared",
                    "upstream_host": f"10.1.0.{n}",
                },
                {"op": "set_sandbox", "sandbox": "same", "upstream_host": "10.9.9.9"},
            ],
            atomic_index=True,
        )
        table.run([{"op": "destroy_sandbox", "sandbox": f"sb{n}"}])
    fwd = table.forwarding
    assert fwd._hosts == {"10.1.0.49": "10.1.0.49", "10.9.9.9": "10.9.9.9"}
    assert fwd._host_refs == {"10.1.0.49": 1, "10.9.9.9": 1}
    view = fwd.sandbox_view(fwd.sandbox_slots["shared"])
    assert view is not None and view.upstream_host == "10.1.0.49"


@settings(
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(batches=st.lists(st.lists(_op, min_size=1, max_size=4), max_size=25))
def test_replayed_changes_rebuild_the_forwarding_table(
    labels: ModuleType, batches: list[list[dict[str, Any]]]
) -> None:
    table = RouteTable(DOMAINS)
    follower = ForwardingTable(table.domains)
    for ops in batches:
        before = table.snapshot()
        items = table.forwarding.index.items()
        try:
            txn = table.run(copy.deepcopy(ops), atomic_index=True)
        except RouteError as exc:
            assert exc.index is not None
            assert table.snapshot() == before
            assert table.forwarding.index.items() == items
            continue
        for rec in copy.deepcopy(txn.changes):
            follower.apply(rec)
        assert follower.index.items() == table.forwarding.index.items()

    assert _resolved(follower) == _resolved(table.forwarding)
    assert _views(follower) == _views(table.forwarding)

    # A table rebuilt from the snapshot answers the same way.
    fresh = ForwardingTable(table.domains)
    fresh.load_snapshot(table.snapshot())
    assert _resolved(fresh) == _resolved(table.forwarding)
    assert _views(fresh) == _views(table.forwarding)

    # So does a table that already held routes (a worker resyncing), and it
    # keeps its index and lists, which the data path holds on to.
    held = (fresh.index, fresh.sandbox_names, fresh.sandbox_stopped, fresh.targets)
    fresh.put_sandbox(Sandbox("stray", "127.0.0.1", "running"))
    fresh.load_snapshot(table.snapshot())
    assert all(
        a is b
        for a, b in zip(
            held,
            (fresh.index, fresh.sandbox_names, fresh.sandbox_stopped, fresh.targets),
            strict=True,
        )
    )
    assert _resolved(fresh) == _resolved(table.forwarding)
    assert _views(fresh) == _views(table.forwarding)

    # A worker's table, from the forwarding table alone (through JSON, as
    # the pipe carries it), over whatever it held before.
    worker = ForwardingTable(table.domains)
    worker.put_sandbox(Sandbox("stray", "127.0.0.1", "running"))
    source = table.forwarding
    sandboxes = orjson.loads(orjson.dumps(source.export_sandboxes()))
    worker.import_sandboxes(sandboxes, len(source.index))
    for chunk in source.export_routes(3):
        assert 0 < len(chunk) <= 3
        worker.import_routes(orjson.loads(orjson.dumps(chunk)))
    assert _resolved(worker) == _resolved(table.forwarding)
    assert _views(worker) == _views(table.forwarding)

    # The table's own indexes agree with its routes: every route's label
    # leads back to it, and no label is left over.
    routes = dict(table.routes.items())
    assert len(routes) == len(table.routes) == len(table.forwarding.index)
    for key, route in routes.items():
        assert (route.sandbox, route.port) == key
        assert table.label_holder(route.label) == key
    assert {r.sandbox for r in table.routes.values()} <= set(table.sandboxes)


def test_token_rules_hold_in_a_sandbox_with_many_ports(table: RouteTable) -> None:
    # Past TOKEN_SCAN_LIMIT ports a sandbox's tokens are kept in a map; it
    # must follow every change, refused batches included.
    for i in range(40):
        expose(table, "big", 9000 + i, token=f"t{i}")
    error = refused(
        "TOKEN_IN_USE",
        table,
        [{"op": "expose_port", "sandbox": "big", "port": 8000, "token": "t7"}],
    )
    assert error.message == "Token 't7' is already in use by port 9007"

    # Rotation frees the old token and takes the new one.
    expose(table, "big", 9007, token="new7")
    expose(table, "big", 8001, token="t7")
    refused(
        "TOKEN_IN_USE",
        table,
        [{"op": "expose_port", "sandbox": "big", "port": 8002, "token": "new7"}],
    )

    # Unexposing frees it; a refused batch gives back what it took.
    one(table, "unexpose_port", sandbox="big", port=9008)
    refused(
        "INVALID_PORT",
        table,
        [
            {"op": "expose_port", "sandbox": "big", "port": 8003, "token": "t8"},
            {"op": "unexpose_port", "sandbox": "big", "port": 9009},
            {"op": "expose_port", "sandbox": "big", "port": 80},
        ],
    )
    refused(
        "TOKEN_IN_USE",
        table,
        [{"op": "expose_port", "sandbox": "big", "port": 8004, "token": "t9"}],
    )
    expose(table, "big", 8003, token="t8")

    # Destroyed and made again: nothing remembered from before.
    one(table, "destroy_sandbox", sandbox="big")
    for i in range(20):
        expose(table, "big", 9100 + i, token=f"t{i}")
    assert expose(table, "big", 9200, token="t30")["token"] == "t30"
    assert table.tokens["big"] == {
        **{f"t{i}": 9100 + i for i in range(20)},
        "t30": 9200,
    }


def test_the_forwarding_view_takes_a_change_only_at_finish(table: RouteTable) -> None:
    expose(table, "sb", 8080, token="old")
    rotate = {"op": "expose_port", "sandbox": "sb", "port": 8080, "token": "new"}
    first = table.prepare([rotate, {**rotate, "sandbox": "a-b", "token": "c"}])
    # Prepared, not stored: the data path still serves the old URL ...
    assert resolve(table, b"8080-sb-old.example.com")
    assert resolve(table, b"8080-sb-new.example.com") is None
    assert resolve(table, b"8080-a-b-c.example.com") is None
    # ... while the rules already see the new ones: a transaction prepared
    # behind it cannot take a label it takes.
    assert table.label_holder("8080-sb-new") == ("sb", 8080)
    assert table.label_holder("8080-sb-old") is None
    with pytest.raises(RouteError) as info:
        table.prepare([{**rotate, "sandbox": "a", "token": "b-c"}])
    assert info.value.code == "LABEL_CONFLICT"
    assert table.pending == {id(first)}

    table.finish(first)
    assert resolve(table, b"8080-sb-old.example.com") is None
    assert resolve(table, b"8080-sb-new.example.com")
    assert resolve(table, b"8080-a-b-c.example.com")
    assert table.pending == set() and table.pending_labels == {}


def test_a_rolled_back_transaction_was_never_served(table: RouteTable) -> None:
    expose(table, "sb", 8080, token="keep")
    items = table.forwarding.index.items()
    txn = table.prepare(
        [
            {"op": "unexpose_port", "sandbox": "sb", "port": 8080},
            {"op": "expose_port", "sandbox": "other", "port": 9090, "token": "t"},
            {"op": "set_sandbox", "sandbox": "sb", "state": "stopped"},
        ]
    )
    assert table.forwarding.index.items() == items
    assert resolve(table, b"8080-sb-keep.example.com")
    table.rollback(txn)
    assert table.forwarding.index.items() == items
    assert table.label_holder("8080-sb-keep") == ("sb", 8080)
    assert table.label_holder("9090-other-t") is None
    assert table.pending == set() and table.pending_labels == {}


def test_prepare_in_steps_pauses_and_can_be_abandoned(table: RouteTable) -> None:
    ops = [{"op": "expose_port", "sandbox": "sb", "port": 8000 + i} for i in range(5)]
    steps = table.prepare_steps(ops, True, step=2)
    assert next(steps) is None and next(steps) is None
    with pytest.raises(StopIteration) as done:
        next(steps)
    txn = done.value.value
    assert len(txn.results) == 5 and table.pending == {id(txn)}
    table.finish(txn)
    assert len(table.routes) == 5 and table.pending == set()

    # Closed after a step (its task was cancelled): nothing of it is left.
    before = table.snapshot()
    more = [{**op, "sandbox": "other"} for op in ops]
    steps = table.prepare_steps(more, True, step=2)
    next(steps)
    assert table.route("other", 8000) is not None
    steps.close()
    assert table.snapshot() == before
    assert table.pending == set() and table.pending_labels == {}
