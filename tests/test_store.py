"""The durable route store: what is acknowledged survives, nothing else.

These tests use the label twin chosen by ``router.speedups`` (the store
never touches the index); the two runs of the suite cover both twins.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from router.app import in_own_thread, load_table
from router.errors import RouteError, StoreError
from router.routes import RouteTable, Transaction
from router.store import Store

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ("localhost",)


def open_table(path: Path, synchronous: str = "FULL") -> tuple[Store, RouteTable]:
    """A store and its table, loaded as the router loads them at start-up."""
    store = Store(str(path), synchronous)
    table = RouteTable(DOMAINS)
    load_table(store, table)
    return store, table


def eager_table(path: Path) -> RouteTable:
    """The same store read whole into a table (``RouteTable.load``)."""
    store = Store(str(path))
    try:
        table = RouteTable(DOMAINS)
        table.load(*store.load())
        return table
    finally:
        store.close()


def commit(store: Store, table: RouteTable, ops: list[dict[str, Any]]) -> Transaction:
    """The order the router follows: prepare, store, then acknowledge."""
    txn = table.prepare(ops)
    try:
        store.commit(txn)
    except StoreError:
        table.rollback(txn)
        raise
    table.finish(txn)
    return txn


def stored_rows(path: Path) -> tuple[int, list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """What is in the file, read without the router's code."""
    db = sqlite3.connect(path)
    try:
        version = db.execute("SELECT value FROM meta WHERE key='version'").fetchone()
        routes = db.execute("SELECT * FROM routes ORDER BY sandbox, port").fetchall()
        boxes = db.execute("SELECT * FROM sandboxes ORDER BY name").fetchall()
    finally:
        db.close()
    return version[0], routes, boxes


def routed(table: RouteTable) -> list[tuple[Any, ...]]:
    """The forwarding view, with slots replaced by what they point at."""
    fwd = table.forwarding
    out = []
    for label, (route_id, sb_slot, port, t_slot, flags) in fwd.index.items():
        view = fwd.sandbox_view(sb_slot)
        out.append((label, route_id, view, port, fwd.targets[t_slot], flags))
    return out


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "routes.db"


# -- what survives -----------------------------------------------------


def test_new_store_is_empty_and_in_wal_mode(path: Path) -> None:
    store, table = open_table(path)
    try:
        assert table.snapshot() == {"version": 0, "routes": [], "sandboxes": []}
        mode = store._db.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    finally:
        store.close()


@pytest.mark.parametrize("synchronous", ["FULL", "normal"])
def test_committed_changes_survive_reopen(path: Path, synchronous: str) -> None:
    store, table = open_table(path, synchronous)
    commit(store, table, [{"op": "expose_port", "sandbox": "sb", "port": 8080}])
    commit(
        store,
        table,
        [
            {"op": "set_sandbox", "sandbox": "up", "upstream_host": "10.0.0.9"},
            {
                "op": "expose_port",
                "sandbox": "up",
                "port": 8081,
                "token": "a-b",
                "name": "api",
                "target": "unix:/run/api.sock",
                "host": "preserve",
            },
            {"op": "expose_port", "sandbox": "sb", "port": 9000, "token": "x"},
        ],
    )
    commit(store, table, [{"op": "unexpose_port", "sandbox": "sb", "port": 9000}])
    commit(store, table, [{"op": "set_sandbox", "sandbox": "sb", "state": "stopped"}])
    commit(store, table, [{"op": "set_sandbox", "sandbox": "gone"}])
    commit(store, table, [{"op": "destroy_sandbox", "sandbox": "gone"}])
    snapshot = table.snapshot()
    store.close()

    again, reopened = open_table(path)
    try:
        assert reopened.snapshot() == snapshot
        assert snapshot["version"] == 6
        assert len(snapshot["routes"]) == 2
        assert routed(reopened) == routed(table)
        # New routes get ids after the stored ones.
        commit(again, reopened, [{"op": "expose_port", "sandbox": "sb", "port": 9001}])
        ids = [r["route_id"] for r in reopened.snapshot()["routes"]]
        assert len(set(ids)) == len(ids)
    finally:
        again.close()


def test_a_reopened_table_reads_each_sandbox_when_first_touched(path: Path) -> None:
    store, table = open_table(path)
    commit(
        store,
        table,
        [
            {"op": "expose_port", "sandbox": "a", "port": 8080, "token": "b-c"},
            {"op": "expose_port", "sandbox": "a", "port": 8081, "name": "api"},
            {"op": "expose_port", "sandbox": "b", "port": 8080, "token": "t3"},
            {"op": "expose_port", "sandbox": "c", "port": 8080, "token": "sesame"},
            {"op": "expose_port", "sandbox": "d", "port": 8080},
            {"op": "expose_port", "sandbox": "d", "port": 8081},
            {"op": "set_sandbox", "sandbox": "e"},
        ],
    )
    listed = table.get_exposed_ports("a")
    store.close()

    store, table = open_table(path)
    try:
        # 1. Serving needs nothing from the store: every URL routes, and no
        #    sandbox's routes were read yet.
        assert table.unloaded == {"a", "b", "c", "d", "e"}
        assert len(table.routes) == 6
        assert routed(table) == routed(eager_table(path))
        assert table.unloaded == {"a", "b", "c", "d", "e"}

        # 2. Each operation reads the sandbox it touches, and only that one.
        assert table.get_exposed_ports("a") == listed
        assert table.unloaded == {"b", "c", "d", "e"}
        with pytest.raises(RouteError) as info:
            table.prepare(
                [{"op": "expose_port", "sandbox": "b", "port": 8082, "token": "t3"}]
            )
        assert info.value.code == "TOKEN_IN_USE"
        assert info.value.message == "Token 't3' is already in use by port 8080"
        assert table.validate_port_token("c", 8080, "sesame")
        assert not table.validate_port_token("c", 8080, "sesamE")
        assert table.unloaded == {"d", "e"}

        # 3. A label clash with a sandbox still in the store is found from
        #    the index ("8080-a-b-c" is sandbox a's label).
        with pytest.raises(RouteError) as info:
            table.prepare(
                [{"op": "expose_port", "sandbox": "a-b", "port": 8080, "token": "c"}]
            )
        assert info.value.code == "LABEL_CONFLICT"

        # 4. Destroying an unread sandbox removes the routes it had.
        txn = commit(store, table, [{"op": "destroy_sandbox", "sandbox": "d"}])
        assert txn.results == [{"sandbox": "d", "destroyed": True, "routes": 2}]
        assert len(table.routes) == 4
        snapshot = table.snapshot()
        assert table.unloaded == set()
    finally:
        store.close()
    assert eager_table(path).snapshot() == snapshot
    assert [r["sandbox"] for r in snapshot["routes"]] == ["a", "a", "b", "c"]


class FlakySource:
    """The store, whose first read fails (a moment without a free file
    descriptor, a busy disk)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.failures = 1

    def routes_of(self, sandbox: str | None) -> list[Any]:
        if self.failures:
            self.failures -= 1
            raise StoreError(f"Route store {self.store.path} cannot be read: EMFILE")
        return self.store.routes_of(sandbox)


def test_a_failed_first_read_is_tried_again(path: Path) -> None:
    store, table = open_table(path)
    commit(store, table, [{"op": "expose_port", "sandbox": "a", "port": 8080}])
    listed = table.get_exposed_ports("a")
    store.close()

    store = Store(str(path))
    try:
        table = RouteTable(DOMAINS)
        table.load_index(*store.load_index(), FlakySource(store))
        with pytest.raises(StoreError):
            table.get_exposed_ports("a")
        # Not taken for a sandbox without routes: read again, and right.
        assert table.get_exposed_ports("a") == listed
        txn = commit(
            store, table, [{"op": "unexpose_port", "sandbox": "a", "port": 8080}]
        )
        assert txn.results == [{"port": 8080, "unexposed": True}]
        assert routed(table) == []
    finally:
        store.close()


def test_group_commit_stores_the_highest_version(path: Path) -> None:
    store, table = open_table(path)
    first = table.prepare([{"op": "expose_port", "sandbox": "a", "port": 8080}])
    table.finish(first)
    second = table.prepare([{"op": "expose_port", "sandbox": "b", "port": 8080}])
    table.finish(second)
    store.commit_many([first, second])
    store.close()
    version, routes, _ = stored_rows(path)
    assert version == 2
    assert [(r[0], r[1]) for r in routes] == [("a", 8080), ("b", 8080)]


def test_a_transaction_without_changes_writes_nothing(path: Path) -> None:
    store, table = open_table(path)
    commit(store, table, [{"op": "expose_port", "sandbox": "a", "port": 8080}])
    before = stored_rows(path)
    txn = commit(store, table, [{"op": "unexpose_port", "sandbox": "a", "port": 9999}])
    assert txn.changes == []
    assert stored_rows(path) == before
    store.close()


# -- what is refused writes nothing ------------------------------------


def test_a_refused_change_writes_nothing(path: Path) -> None:
    store, table = open_table(path)
    commit(
        store,
        table,
        [{"op": "expose_port", "sandbox": "a", "port": 8080, "token": "shared"}],
    )
    before = stored_rows(path)
    with pytest.raises(RouteError) as info:
        commit(
            store,
            table,
            [
                {"op": "expose_port", "sandbox": "b", "port": 8080},
                {"op": "expose_port", "sandbox": "a", "port": 8081, "token": "shared"},
            ],
        )
    assert info.value.code == "TOKEN_IN_USE"
    assert stored_rows(path) == before
    store.close()


def test_a_write_that_fails_half_way_writes_nothing(path: Path) -> None:
    store, table = open_table(path)
    commit(store, table, [{"op": "expose_port", "sandbox": "a", "port": 8080}])
    before = stored_rows(path)
    snapshot = table.snapshot()

    # The database refuses the route's row, after the sandbox's row went in.
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON routes WHEN NEW.sandbox = 'b'"
        " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
    )
    db.commit()
    db.close()
    txn = table.prepare([{"op": "expose_port", "sandbox": "b", "port": 8080}])
    assert [rec["op"] for rec in txn.changes] == ["put_sandbox", "put_route"]
    with pytest.raises(StoreError, match="refused by the test"):
        store.commit(txn)
    table.rollback(txn)
    assert stored_rows(path) == before
    assert table.snapshot() == snapshot

    # The store is still usable, and the table goes on from where it was.
    commit(store, table, [{"op": "expose_port", "sandbox": "c", "port": 8080}])
    assert stored_rows(path)[0] == snapshot["version"] + 1
    store.close()


# -- files that must stop startup --------------------------------------


def test_garbage_file_refused(path: Path) -> None:
    path.write_bytes(os.urandom(3000) + b"not a database" * 100)
    with pytest.raises(StoreError, match=str(path)) as info:
        Store(str(path))
    assert "cannot be read" in info.value.message


@pytest.mark.parametrize("where", ["all-but-first", "last-leaves"])
def test_corrupt_pages_refused(path: Path, where: str) -> None:
    store, table = open_table(path)
    for port in range(8080, 8380):
        commit(store, table, [{"op": "expose_port", "sandbox": "sb", "port": port}])
    store.close()
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 6 * page
    if where == "all-but-first":
        # The header stays valid; no page after it does.
        data[page:] = b"\xa5" * (len(data) - page)
    else:
        # The schema and meta pages stay valid, so only a full check (or
        # reading every route) notices the damage.
        for start in range(len(data) - 3 * page, len(data), page):
            data[start + 100 : start + 4000] = b"\xa5" * 3900
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=str(path)):
        open_table(path)


def test_directory_as_path_refused(tmp_path: Path) -> None:
    target = tmp_path / "a-directory"
    target.mkdir()
    with pytest.raises(StoreError, match=str(target)):
        Store(str(target))


def test_missing_directory_refused(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "routes.db"
    with pytest.raises(StoreError, match=str(target)) as info:
        Store(str(target))
    assert "does not exist" in info.value.message


def test_a_directory_given_as_the_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as info:
        Store(str(tmp_path))
    assert info.value.message == (
        f"Route store {tmp_path} is a directory; --state takes a file, "
        f"such as {tmp_path / 'routes.db'}"
    )


def test_a_file_where_the_directory_should_be_is_refused(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("not a directory")
    target = tmp_path / "index.html" / "routes.db"
    with pytest.raises(StoreError) as info:
        Store(str(target))
    assert info.value.message.endswith(f"{tmp_path / 'index.html'} is not a directory")


def test_other_schema_refused(path: Path) -> None:
    Store(str(path)).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value=99 WHERE key='schema'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema 99"):
        Store(str(path))


# Schema 1, as routers before schema 2 wrote it: the same tables with rowids.
SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE sandboxes (
    name TEXT PRIMARY KEY, upstream_host TEXT NOT NULL, state TEXT NOT NULL
);
CREATE TABLE routes (
    sandbox TEXT NOT NULL, port INTEGER NOT NULL, token TEXT NOT NULL, name TEXT,
    exposed_at TEXT NOT NULL, target TEXT, host TEXT NOT NULL,
    route_id INTEGER NOT NULL, PRIMARY KEY (sandbox, port)
);
INSERT INTO meta VALUES ('schema', 1), ('version', 7);
INSERT INTO sandboxes VALUES
    ('sb1', '127.0.0.1', 'stopped'), ('sb2', '10.0.0.2', 'running');
INSERT INTO routes VALUES
    ('sb1', 8080, 'tok-one', 'web', '2026-01-02T03:04:05.006Z', NULL, 'rewrite', 3),
    ('sb2', 5173, 'tok-two', NULL, '2026-01-02T03:04:05.007Z', '127.0.0.1:9000',
     'preserve', 5);
"""


def test_schema_1_store_is_moved_to_schema_2_with_every_route(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_1)
    # Enough rows that the copy's free pages would show in the file's size.
    db.executemany(
        "INSERT INTO routes VALUES (?, ?, 't', NULL, 'x', NULL, 'rewrite', ?)",
        [(f"bulk{i // 4}", 8000 + i % 4, 100 + i) for i in range(20_000)],
    )
    db.executemany(
        "INSERT INTO sandboxes VALUES (?, '127.0.0.1', 'running')",
        [(f"bulk{n}",) for n in range(5_000)],
    )
    db.commit()
    db.close()
    size_1 = path.stat().st_size

    store, table = open_table(path)
    # Compacted after the move: no bigger than it was, no big log beside it.
    assert path.stat().st_size <= size_1
    assert Path(f"{path}-wal").stat().st_size < size_1 // 10
    assert table.version == 7
    assert table.routes[("sb1", 8080)].name == "web"
    assert table.routes[("sb2", 5173)].target == "127.0.0.1:9000"
    assert table.routes[("sb2", 5173)].host == "preserve"
    assert table.sandboxes["sb1"].state == "stopped"
    assert table.forwarding.index.lookup(b"8080-sb1-tok-one") is not None

    # It keeps working as a schema 2 store: a change, a reopen.
    txn = table.prepare([{"op": "expose_port", "sandbox": "sb1", "port": 3001}])
    store.commit(txn)
    table.finish(txn)
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == (2,)
    tables = db.execute("SELECT sql FROM sqlite_master WHERE type='table'").fetchall()
    db.close()
    assert all("WITHOUT ROWID" in sql for (sql,) in tables if "meta" not in sql)
    again = eager_table(path)
    assert len(again.routes) == 20_003
    assert {("sb1", 3001), ("sb1", 8080), ("sb2", 5173)} <= set(again.routes)
    assert again.version == 8


def test_schema_1_store_that_cannot_be_moved_is_left_as_it_was(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_1)
    # A leftover table with the name the move needs: it fails halfway.
    db.execute("CREATE TABLE routes_2 (x)")
    db.execute("INSERT INTO routes_2 VALUES (1)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="cannot move it from schema 1"):
        Store(str(path))
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == (1,)
    assert db.execute("SELECT count(*) FROM routes").fetchone() == (2,)
    assert db.execute("SELECT count(*) FROM sandboxes").fetchone() == (2,)
    db.close()


def test_someone_elses_database_refused(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match=str(path)):
        Store(str(path))
    db = sqlite3.connect(path)
    tables = db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    db.close()
    assert tables == [("invoices",)]


def test_synchronous_mode_checked(path: Path) -> None:
    with pytest.raises(ValueError):
        Store(str(path), "OFF")


# -- kill -9 in the middle of a stream of changes ----------------------

CHILD = textwrap.dedent(
    """
    import sys

    from router.routes import RouteTable
    from router.store import Store

    store = Store(sys.argv[1], sys.argv[2])
    table = RouteTable(("localhost",))
    version, sandboxes, routes = store.load()
    table.load(version, sandboxes, routes)
    port = int(sys.argv[3])
    while True:
        port += 1
        op = {"op": "expose_port", "sandbox": f"sb{port % 7}", "port": port,
              "token": f"t{port}"}
        txn = table.prepare([op])
        store.commit(txn)
        table.finish(txn)
        # Acknowledge only after the store has the change.
        print(txn.version, port, flush=True)
    """
)


def run_and_kill(
    path: Path, synchronous: str, first_port: int, acks: int
) -> list[tuple[int, int]]:
    """Start a writer, read ``acks`` acknowledgements, then SIGKILL it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), synchronous, str(first_port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acked: list[tuple[int, int]] = []
    try:
        assert proc.stdout is not None
        while len(acked) < acks:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else "writer died"
            version, port = line.split()
            acked.append((int(version), int(port)))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return acked


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_acknowledged_changes_survive_kill_9(path: Path, synchronous: str) -> None:
    first = run_and_kill(path, synchronous, 4000, 150)
    assert [v for v, _ in first] == list(range(1, 151))
    # A second writer loads what the first left, which may include a change
    # stored but killed before it was acknowledged, and dies too.
    second = run_and_kill(path, synchronous, 20000, 100)
    start = second[0][0]
    assert start > 150
    assert [v for v, _ in second] == list(range(start, start + 100))
    acked = first + second

    store, table = open_table(path)
    try:
        assert table.version >= acked[-1][0]
        for _, port in acked:
            assert table.validate_port_token(f"sb{port % 7}", port, f"t{port}")
        # Whatever was written but not yet acknowledged is whole, too.
        assert len(table.routes) == table.version
    finally:
        store.close()


def test_store_writes_run_in_a_thread_of_their_own_that_ends() -> None:
    # ``in_own_thread`` (the store's writes): the result or the error comes
    # back to the loop, the thread is gone afterwards, and a caller that
    # gave up meanwhile makes no noise when the write ends.
    def write(fail: bool) -> str:
        time.sleep(0.05)
        if fail:
            raise StoreError("disk full")
        return threading.current_thread().name

    async def main() -> list[object]:
        loop = asyncio.get_running_loop()
        troubles: list[object] = []
        loop.set_exception_handler(lambda _, context: troubles.append(context))
        name = await in_own_thread(write, False)
        with pytest.raises(StoreError, match="disk full"):
            await in_own_thread(write, True)
        abandoned = asyncio.ensure_future(in_own_thread(write, False))
        await asyncio.sleep(0.01)
        abandoned.cancel()
        await asyncio.sleep(0.2)  # the write ends after its caller left
        assert abandoned.cancelled()
        assert name == "edge-router-store" and name != threading.current_thread().name
        assert not [t for t in threading.enumerate() if t.name == name]
        return troubles

    assert asyncio.run(main()) == []
