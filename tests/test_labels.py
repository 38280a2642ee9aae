"""The label twins: Host → label parsing and the label index.

Every test runs on the compiled twin and on the pure one (the ``twin``
fixture); the property tests at the end hold the two to the same answers.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router import speedups

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = (b"localhost", b"example.com")


# -- which twin is in use ---------------------------------------------


def test_compiled_twins_loaded() -> None:
    """Fails when the build silently fell back to the pure twins."""
    if speedups.FORCED_PURE:
        assert not speedups.COMPILED
        assert speedups.proxy.__name__ == "router._proxy_py"
        assert "EDGE_ROUTER_PURE" in speedups.describe()
    else:
        assert speedups.COMPILED, speedups.FALLBACK_REASON
        assert speedups.labels.__name__ == "router._clabels"
        assert speedups.proxy.__name__ == "router._cproxy"
        # The .pxd was applied, not just the file compiled: the protocols
        # are extension types (not heap types) with C fields.
        heap_type = 1 << 9  # Py_TPFLAGS_HEAPTYPE
        assert not speedups.proxy.ClientConnection.__flags__ & heap_type
        assert not speedups.proxy.UpstreamConnection.__flags__ & heap_type
        assert speedups.describe() == "compiled hot path (Cython)"


def _compiled_flag(pure: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "EDGE_ROUTER_PURE"}
    if pure is not None:
        env["EDGE_ROUTER_PURE"] = pure
    out = subprocess.run(
        [sys.executable, "-c", "import router.speedups as s; print(s.COMPILED)"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip()


@pytest.mark.parametrize("value", ["1", "true", "Yes", "on"])
def test_pure_forced_by_environment(value: str) -> None:
    assert _compiled_flag(value) == "False"


def test_zero_does_not_force_pure() -> None:
    """The false spellings of the other boolean settings, and unset."""
    if speedups.FORCED_PURE:
        pytest.skip("the pure run need not have the compiled twins built")
    for value in ("0", "false", "No", "off", "", None):
        assert _compiled_flag(value) == "True", value


# -- host_label --------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "label"),
    [
        (b"8080-sb-tok.localhost", b"8080-sb-tok"),
        (b"8080-SB-Tok.LocalHost", b"8080-sb-tok"),
        (b"8080-sb-tok.localhost.", b"8080-sb-tok"),
        (b"8080-sb-tok.localhost:8787", b"8080-sb-tok"),
        (b"8080-sb-tok.localhost.:8787", b"8080-sb-tok"),
        (b"8080-sb-tok.localhost:", b"8080-sb-tok"),
        (b"8080-a-b-c-d.example.com", b"8080-a-b-c-d"),
        (b"8080-sb-t_k.EXAMPLE.COM:443", b"8080-sb-t_k"),
        # Any number of leading zeros, more than int() takes at once.
        (b"8080-sb-tok.localhost:" + b"0" * 5000 + b"80", b"8080-sb-tok"),
    ],
)
def test_host_label_found(twin: ModuleType, host: bytes, label: bytes) -> None:
    assert twin.host_label(host, DOMAINS) == label


@pytest.mark.parametrize(
    "host",
    [
        b"",
        b"localhost",
        b"localhost:8787",
        b"localhost.",
        b"example.com",
        b".localhost",
        b"a.b.localhost",
        b"a.b.example.com:80",
        b"a.example.org",
        b"a.notlocalhost",
        b"a.localhost..",
        b"a.localhostx",
        b"127.0.0.1",
        b"127.0.0.1:8080",
        b"[::1]",
        b"[::1]:8080",
        b"[::1]:",
        b"[2001:DB8::1]:8080",
        b"[::ffff:127.0.0.1]",
        b"[fe80::1%25eth0]:80",
        b"[v1.fe80::a+en1]",
    ],
)
def test_host_label_not_a_preview_host(twin: ModuleType, host: bytes) -> None:
    assert twin.host_label(host, DOMAINS) is None


@pytest.mark.parametrize(
    "host",
    [
        b"a.localhost:80a",
        b"a.localhost:-1",
        b"a.localhost: 80",
        b"a.localhost:\xd9\xa1",
        b"[::1]x",
        b"[::1]:8a",
        b"[::1",
        b"[2001:db8::1].localhost",
        # No TCP port is past 65535, however many digits it is written in.
        b"a.localhost:65536",
        b"a.localhost:99999999999999999999",
        b"a.localhost:0065536",
        b"a.localhost:" + b"9" * 5000,
        b"[::1]:70000",
    ],
)
def test_host_label_bad_port_refused(twin: ModuleType, host: bytes) -> None:
    with pytest.raises(ValueError):
        twin.host_label(host, DOMAINS)


@pytest.mark.parametrize(
    "host",
    [
        b"a b.localhost",
        b"8080-sb-tok.localhost ",
        b"8080-sb-tok\t.localhost",
        b"8080-sb-t\xc3\xb6k.localhost",
        b"8080-sb-tok.localhost\x00",
        b"8080-sb-tok.localhost/",
        b"user@8080-sb-tok.localhost",
        b"a:b.localhost:80",
        b"a.localhost:8080:",
        b"a]b.localhost",
        b"a.example.org\x7f",
    ],
)
def test_host_label_not_a_host_refused(twin: ModuleType, host: bytes) -> None:
    # Not a host by RFC 3986, preview-shaped or not: 400, not 404.
    with pytest.raises(ValueError, match="bad character in Host"):
        twin.host_label(host, DOMAINS)


@pytest.mark.parametrize(
    "host", [b"[]", b"[evil.com]", b"[[::1]", b"[::1::2]", b"[v1.]", b"[vx.1]"]
)
def test_host_label_bad_ip_literal_refused(twin: ModuleType, host: bytes) -> None:
    # What the brackets hold must be an address (RFC 3986 §3.2.2), or a
    # fallback upstream would get "[evil.com]" as a Host.
    with pytest.raises(ValueError, match="bad IP literal in Host"):
        twin.host_label(host, DOMAINS)


def test_host_label_longer_than_any_label(twin: ModuleType) -> None:
    # Still recognised as meant for us, so a lookup misses (not a fallback).
    label = b"L" * 70
    found = twin.host_label(label + b".localhost", DOMAINS)
    assert found == label.lower()
    assert twin.LabelIndex().lookup(found) is None


def test_host_label_needs_bytes(twin: ModuleType) -> None:
    with pytest.raises(TypeError):
        twin.host_label(None, DOMAINS)


# -- LabelIndex --------------------------------------------------------


def test_index_set_lookup_remove(twin: ModuleType) -> None:
    index = twin.LabelIndex()
    assert len(index) == 0
    assert index.lookup(b"8080-a-b") is None

    # ``set`` answers with the target slot it replaced: None for a new label.
    assert index.set(b"8080-a-b", 7, 1, 8080, 0, 1) is None
    assert len(index) == 1
    assert b"8080-a-b" in index
    assert b"8080-a-c" not in index
    assert index.lookup(b"8080-a-b") == (7, 1, 8080, 0, 1)
    # Repeated hits give the same answer.
    assert index.lookup(b"8080-a-b") == (7, 1, 8080, 0, 1)

    assert index.set(b"8080-a-b", 8, 2, 8080, 3, 0) == 0
    assert len(index) == 1
    assert index.lookup(b"8080-a-b") == (8, 2, 8080, 3, 0)
    assert index.set(b"8080-a-b", 8, 2, 8080, 5, 0) == 3

    assert index.remove(b"8080-a-b") is True
    assert index.remove(b"8080-a-b") is False
    assert index.lookup(b"8080-a-b") is None
    assert len(index) == 0


def test_index_tells_apart_labels_one_byte_apart_at_every_length(
    twin: ModuleType,
) -> None:
    # The compiled twin hashes and compares labels a word at a time, the
    # last word overlapping the one before, and labels under eight bytes
    # byte by byte: a byte missed at any length or place would make two
    # labels one.  Grown from empty, the table also moves its arrays many
    # times on the way.
    index = twin.LabelIndex()
    labels = {}
    for n in range(1, 64):
        base = bytes(b"abcdefghijklmnopqrstuvwxyz0123456789"[i % 36] for i in range(n))
        variants = [base] + [base[:p] + b"-" + base[p + 1 :] for p in range(n)]
        # Not found yet, though their prefixes one byte shorter are there.
        for label in variants:
            assert index.lookup(label) is None
        for label in variants:
            labels[label] = len(labels) + 1
            assert index.set(label, labels[label], n, 8000, 0, 0) is None
    assert len(index) == len(labels) == sum(n + 1 for n in range(1, 64))
    assert all(index.lookup(k) == (v, len(k), 8000, 0, 0) for k, v in labels.items())

    # Half removed (each removal moves the last entry into the hole), then
    # the spare room given back: the other half is still found, unchanged.
    gone = list(labels)[::2]
    for label in gone:
        assert index.remove(label) is True
    index.compact()
    for label in gone:
        assert index.lookup(label) is None
    kept = {k: v for k, v in labels.items() if k not in set(gone)}
    assert len(index) == len(kept)
    assert all(index.lookup(k) == (v, len(k), 8000, 0, 0) for k, v in kept.items())
    assert dict((k, v[0]) for k, v in index.items()) == kept


def test_index_compares_whole_labels_that_share_a_hash(twin: ModuleType) -> None:
    if not hasattr(twin.LabelIndex, "hash_of"):
        pytest.skip("the pure twin's index is a dict, which compares keys itself")

    # Labels of 5 bytes (compared byte by byte) and of 43 and 63 (where
    # the last bytes are only in the overlapping last word), alike but for
    # their last three bytes: a birthday search finds two with one hash
    # in about 80,000 tries.
    index = twin.LabelIndex()
    for n in (5, 43, 63):
        prefix = b"p" * (n - 3)
        seen: dict[int, bytes] = {}
        for i in range(1 << 24):
            label = prefix + i.to_bytes(3, "big")
            other = seen.setdefault(index.hash_of(label), label)
            if other != label:
                break
        assert index.hash_of(label) == index.hash_of(other)

        index.set(other, 1, n, 8000, 0, 0)
        assert index.lookup(label) is None
        index.set(label, 2, n, 8000, 0, 0)
        assert index.lookup(other) == (1, n, 8000, 0, 0)
        assert index.lookup(label) == (2, n, 8000, 0, 0)
        assert index.remove(other) is True
        assert index.lookup(other) is None
        assert index.lookup(label) == (2, n, 8000, 0, 0)


def test_index_lookup_into_fills_the_hit_it_is_given(twin: ModuleType) -> None:
    # What the data path calls: the same answer as ``lookup``, in fields.
    index = twin.LabelIndex()
    index.set(b"8080-a-b", 2**40, 7, 8080, 3, 1)
    index.set(b"3000-a-c", 5, 8, 3000, 0, 0)
    hit = twin.Hit()
    assert index.lookup_into(b"8080-a-b", hit) is True
    assert (hit.route_id, hit.sandbox_slot, hit.port, hit.target_slot, hit.flags) == (
        2**40,
        7,
        8080,
        3,
        1,
    )
    assert index.lookup_into(b"3000-a-c", hit) is True
    assert (hit.route_id, hit.port, hit.flags) == (5, 3000, 0)
    # A miss leaves the last hit's fields alone and says so.
    assert index.lookup_into(b"3000-a-d", hit) is False
    assert hit.route_id == 5
    with pytest.raises(TypeError):
        index.lookup_into(b"3000-a-c", None)


def test_index_reserve_sizes_once_and_keeps_what_is_there(twin: ModuleType) -> None:
    index = twin.LabelIndex()
    index.set(b"1-sb-tok", 1, 1, 8000, 0, 0)
    index.reserve(5000)
    room = index.memory_bytes()
    for i in range(2, 5001):
        index.set(b"%d-sb-tok" % i, i, 1, 8000, 0, 0)
    if twin.__name__ == "router._clabels":
        # Its arrays were sized up front: no growth since.
        assert index.memory_bytes() == room
    assert len(index) == 5000
    assert all(
        index.lookup(b"%d-sb-tok" % i) == (i, 1, 8000, 0, 0) for i in range(1, 5001)
    )

    # Less than is there already is no shrink, and nothing is lost.
    index.reserve(10)
    index.reserve(0)
    assert len(index) == 5000 and index.lookup(b"1-sb-tok") == (1, 1, 8000, 0, 0)
    with pytest.raises(ValueError):
        index.reserve(-1)


def test_index_load_rows_is_set_for_each_row(twin: ModuleType) -> None:
    rows = [
        ("sb", 8080, "tok", 7, None, 1),
        ("a-b", 0, "c", 3, "unix:/run/x.sock", 0),
        ("a", 65535, "b-c", 12, None, 0),
        ("x" * 40, 1, "y" * 16, 2, "127.0.0.1:9", 0),
    ]
    slots = {"sb": 1, "a-b": 2, "a": 3, "x" * 40: 4}
    targets: list[str] = []

    def target_slot(target: str) -> int:
        targets.append(target)
        return len(targets)

    bulk = twin.LabelIndex()
    bulk.set(b"1-old-one", 1, 9, 1, 0, 0)
    assert bulk.load_rows(rows, slots, target_slot) == 12
    assert targets == ["unix:/run/x.sock", "127.0.0.1:9"]

    one_by_one = twin.LabelIndex()
    one_by_one.set(b"1-old-one", 1, 9, 1, 0, 0)
    for (sandbox, port, token, route_id, _target, flags), t in zip(
        rows, [0, 1, 0, 2], strict=True
    ):
        label = f"{port}-{sandbox}-{token}".encode()
        one_by_one.set(label, route_id, slots[sandbox], port, t, flags)
    assert bulk.items() == one_by_one.items()

    # The checks of ``set`` hold for every row.
    for bad, error in [
        (("sb", 70000, "tok", 1, None, 0), ValueError),
        (("sb", 8080, "t" * 60, 1, None, 0), ValueError),
        (("sb", 8080, "tok", -1, None, 0), ValueError),
        (("nobody", 8080, "tok", 1, None, 0), KeyError),
    ]:
        with pytest.raises(error):
            twin.LabelIndex().load_rows([bad], slots, target_slot)


def test_index_put_route_is_set_for_one_route_record(twin: ModuleType) -> None:
    # What a change applies: a route record straight into the index.
    slots = {"sb": 1, "a-b": 2}
    targets: list[str] = []

    def target_slot(target: str) -> int:
        targets.append(target)
        return len(targets) + 4

    def record(**changed: Any) -> dict[str, Any]:
        route = {
            "sandbox": "sb",
            "port": 8080,
            "token": "tok",
            "name": "web",
            "exposedAt": "2026-01-01T00:00:00.000Z",
            "target": None,
            "host": "rewrite",
            "route_id": 7,
        }
        return {**route, **changed}

    index = twin.LabelIndex()
    assert index.put_route(record(), slots, target_slot) is None
    assert index.lookup(b"8080-sb-tok") == (7, 1, 8080, 0, 0)
    # A replacement answers with the target slot it replaced.
    again = record(target="127.0.0.1:9", host="preserve", route_id=8)
    assert index.put_route(again, slots, target_slot) == 0
    assert index.lookup(b"8080-sb-tok") == (8, 1, 8080, 5, 1)
    assert index.put_route(record(target=""), slots, target_slot) == 5
    assert index.lookup(b"8080-sb-tok") == (7, 1, 8080, 0, 0)
    assert targets == ["127.0.0.1:9"]
    index.put_route(record(sandbox="a-b", port=0, token="c"), slots, target_slot)
    assert index.lookup(b"0-a-b-c") == (7, 2, 0, 0, 0)

    for bad, error in [
        (record(port=70000), ValueError),
        (record(token="t" * 60), ValueError),
        (record(route_id=-1), ValueError),
        (record(sandbox="nobody"), KeyError),
    ]:
        with pytest.raises(error):
            index.put_route(bad, slots, target_slot)
    assert len(index) == 2


def test_index_compact_keeps_every_route_and_can_grow_again(
    twin: ModuleType,
) -> None:
    index = twin.LabelIndex()
    labels = [b"%d-sb-tok" % i for i in range(1000)]
    for i, label in enumerate(labels):
        index.set(label, i + 1, 1, 8000, 0, 0)
    spare = getattr(index, "memory_bytes", lambda: 0)()
    index.compact()
    assert getattr(index, "memory_bytes", lambda: 0)() <= spare
    assert all(
        index.lookup(label) == (i + 1, 1, 8000, 0, 0) for i, label in enumerate(labels)
    )

    # Changes after a compact: removals move records, inserts grow again.
    for label in labels[::2]:
        assert index.remove(label)
    for i in range(1000, 1600):
        index.set(b"%d-sb-tok" % i, i + 1, 1, 8000, 0, 0)
    index.compact()
    index.compact()
    assert len(index) == 1100
    assert index.lookup(labels[0]) is None
    assert index.lookup(labels[1]) == (2, 1, 8000, 0, 0)
    assert index.lookup(b"1599-sb-tok") == (1600, 1, 8000, 0, 0)
    empty = twin.LabelIndex()
    empty.compact()
    empty.set(b"a", 1, 1, 1, 1, 1)
    assert empty.lookup(b"a") == (1, 1, 1, 1, 1)


def test_index_extreme_values(twin: ModuleType) -> None:
    index = twin.LabelIndex()
    top = (2**63 - 1, 2**32 - 1, 65535, 2**32 - 1, 65535)
    index.set(b"x" * 63, *top)
    index.set(b"y", 0, 0, 0, 0, 0)
    assert index.lookup(b"x" * 63) == top
    assert index.items() == [(b"x" * 63, top), (b"y", (0, 0, 0, 0, 0))]


@pytest.mark.parametrize(
    "args",
    [
        (b"", 1, 1, 1, 1, 1),
        (b"x" * 64, 1, 1, 1, 1, 1),
        (b"x", -1, 1, 1, 1, 1),
        (b"x", 2**63, 1, 1, 1, 1),
        (b"x", 1, 2**32, 1, 1, 1),
        (b"x", 1, 1, 1, -1, 1),
        (b"x", 1, 1, 65536, 1, 1),
        (b"x", 1, 1, 1, 1, 65536),
    ],
)
def test_index_refuses_out_of_range(twin: ModuleType, args: tuple[object]) -> None:
    index = twin.LabelIndex()
    with pytest.raises(ValueError):
        index.set(*args)
    assert len(index) == 0
    assert index.items() == []


def test_index_label_must_be_bytes(twin: ModuleType) -> None:
    with pytest.raises(TypeError):
        twin.LabelIndex().set("8080-a-b", 1, 1, 1, 1, 1)


def test_index_misses_long_and_empty_labels(twin: ModuleType) -> None:
    index = twin.LabelIndex()
    index.set(b"a", 1, 1, 1, 1, 1)
    assert index.lookup(b"") is None
    assert index.lookup(b"a" * 64) is None
    assert b"" not in index
    assert index.remove(b"a" * 200) is False


def test_index_clear(twin: ModuleType) -> None:
    index = twin.LabelIndex()
    for i in range(100):
        index.set(b"label-%d" % i, i, 1, 1, 1, 1)
        index.lookup(b"label-%d" % i)
    index.clear()
    assert len(index) == 0
    assert index.items() == []
    assert index.lookup(b"label-5") is None
    index.set(b"label-5", 5, 0, 0, 0, 0)
    assert index.items() == [(b"label-5", (5, 0, 0, 0, 0))]


def test_index_memory_bytes(twin: ModuleType) -> None:
    index = twin.LabelIndex()
    empty = index.memory_bytes()
    for i in range(1000):
        index.set(b"%d-sandbox-token" % i, i, 1, 8080, 0, 0)
    assert index.memory_bytes() > empty > 0


def test_index_agrees_with_dict_under_churn(twin: ModuleType) -> None:
    """Many inserts and removals: growth and deletion keep every answer."""
    rng = random.Random(1)
    index = twin.LabelIndex()
    model: dict[bytes, tuple[int, int, int, int, int]] = {}
    labels = [b"%d-sb%d-%x" % (1024 + i % 64000, i % 97, i) for i in range(6000)]
    for step in range(30000):
        label = rng.choice(labels)
        if rng.random() < 0.55:
            value = (step, step % 5, 1024 + step % 1000, step % 3, step % 2)
            index.set(label, *value)
            model[label] = value
        else:
            assert index.remove(label) == (model.pop(label, None) is not None)
        if step % 7 == 0:
            probe = rng.choice(labels)
            assert index.lookup(probe) == model.get(probe)
    assert len(index) == len(model)
    assert index.items() == sorted(model.items())
    for label in labels:
        assert index.lookup(label) == model.get(label)


# -- the twins agree (properties) --------------------------------------

_label_bytes = st.sampled_from(
    [b"a", b"b", b"a-b", b"8080-a-b-c", b"8080-a-b", b"x" * 63, b"x" * 62 + b"y"]
    + [b"%d-s-t" % i for i in range(24)]
) | st.binary(min_size=0, max_size=65)
_value = st.tuples(
    st.integers(-1, 2**63),
    st.integers(0, 2**32),
    st.integers(0, 65536),
    st.integers(0, 2**32),
    st.integers(0, 65536),
)
_index_op = st.one_of(
    st.tuples(st.just("set"), _label_bytes, _value),
    st.tuples(st.just("remove"), _label_bytes),
    st.tuples(st.just("lookup"), _label_bytes),
    st.tuples(st.just("lookup_into"), _label_bytes),
    st.tuples(st.just("__contains__"), _label_bytes),
    st.tuples(st.just("clear")),
)


def _outcome(call: object, *args: object) -> object:
    assert callable(call)
    try:
        return ("ok", call(*args))
    except (ValueError, TypeError) as exc:
        return (type(exc).__name__,)


def _fields(hit: object) -> tuple[object, ...]:
    names = ("route_id", "sandbox_slot", "port", "target_slot", "flags")
    return tuple(getattr(hit, name) for name in names)


@settings(deadline=None, max_examples=300)
@given(st.lists(_index_op, max_size=120))
def test_index_twins_agree(
    twins: tuple[ModuleType, ModuleType], ops: list[tuple[object, ...]]
) -> None:
    c_index = twins[0].LabelIndex()
    py_index = twins[1].LabelIndex()
    for op in ops:
        name, *args = op
        if name == "set":
            label, value = args
            assert isinstance(value, tuple)
            args = [label, *value]
        if name == "lookup_into":
            c_hit, py_hit = twins[0].Hit(), twins[1].Hit()
            c_out = _outcome(c_index.lookup_into, *args, c_hit)
            py_out = _outcome(py_index.lookup_into, *args, py_hit)
            assert _fields(c_hit) == _fields(py_hit), op
        else:
            c_out = _outcome(getattr(c_index, str(name)), *args)
            py_out = _outcome(getattr(py_index, str(name)), *args)
        assert c_out == py_out, op
        assert len(c_index) == len(py_index)
    assert c_index.items() == py_index.items()


_host_piece = st.sampled_from(
    [
        b"8080-sb-tok",
        b"8080-SB-Tok",
        b"a",
        b"-",
        b"_",
        b".",
        b"..",
        b":",
        b"8787",
        b"0",
        b"[",
        b"]",
        b"::1",
        b"localhost",
        b"LOCALHOST",
        b"example.com",
        b"Example.Com",
        b"org",
        b"x" * 64,
        b" ",
        b"\x00",
        b"\xff",
        b"\xd9\xa1",
    ]
)
_hosts = st.lists(_host_piece, max_size=8).map(b"".join) | st.binary(max_size=40)


@settings(deadline=None, max_examples=1500)
@given(_hosts)
def test_host_label_twins_agree(
    twins: tuple[ModuleType, ModuleType], host: bytes
) -> None:
    def answer(module: ModuleType) -> object:
        try:
            return ("ok", module.host_label(host, DOMAINS))
        except ValueError as exc:
            return ("ValueError", str(exc))

    assert answer(twins[0]) == answer(twins[1])
