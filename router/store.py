"""The durable route store: SQLite in WAL mode.

A transaction is committed here before the control socket acknowledges it,
so an acknowledged change survives ``kill -9`` of the router (and, with the
default ``synchronous=FULL``, a power cut).  The store keeps the current
table, not its history: the watch log lives in memory.

Opening refuses a file that is not a route store or cannot be read, naming
the file: starting on a silently empty table would revoke every URL.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import operator
import os
import sqlite3
from collections.abc import Callable
from typing import Any

from .errors import StoreError
from .routes import DEFAULT_UPSTREAM_HOST, Route, Sandbox, Transaction

log = logging.getLogger("edge_router")

SCHEMA_VERSION = 2

# Schema 2 keeps each table in the B-tree of its primary key (WITHOUT
# ROWID): one tree to update per written row instead of two, which took
# 0.4 of the 10 µs a change costs in a bulk batch.  Schema 1, the same
# tables with rowids, is moved over when opened (``_migrate``).
_TABLES = """
CREATE TABLE {new}{sandboxes} (
    name TEXT PRIMARY KEY,
    upstream_host TEXT NOT NULL,
    state TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE {new}{routes} (
    sandbox TEXT NOT NULL,
    port INTEGER NOT NULL,
    token TEXT NOT NULL,
    name TEXT,
    exposed_at TEXT NOT NULL,
    target TEXT,
    host TEXT NOT NULL,
    route_id INTEGER NOT NULL,
    PRIMARY KEY (sandbox, port)
) WITHOUT ROWID;
"""
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
    + _TABLES.format(new="IF NOT EXISTS ", sandboxes="sandboxes", routes="routes")
)
# Schema 1 to 2, all or nothing: copied into new tables, which then take
# the old ones' names.
_MIGRATE_1 = (
    "BEGIN IMMEDIATE;"
    + _TABLES.format(new="", sandboxes="sandboxes_2", routes="routes_2")
    + """
INSERT INTO sandboxes_2 SELECT name, upstream_host, state FROM sandboxes;
INSERT INTO routes_2 SELECT sandbox, port, token, name, exposed_at, target, host,
    route_id FROM routes;
DROP TABLE sandboxes;
DROP TABLE routes;
ALTER TABLE sandboxes_2 RENAME TO sandboxes;
ALTER TABLE routes_2 RENAME TO routes;
UPDATE meta SET value = 2 WHERE key = 'schema';
COMMIT;
"""
)


def claim(path: str) -> int:
    """Take ``path``'s store for this process; the lock file's descriptor.

    Two routers writing one store would each hold a table the other does
    not see, and a router that reads routes from its store after start-up
    (``RouteTable.load_index``) would mix the two.  The claim is a
    ``flock`` on ``path + ".lock"``, released by ``os.close`` or when the
    process ends (``kill -9`` included).
    """
    lock_path = path + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"Route store {path}: cannot open {lock_path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreError(
            f"Route store {path} is in use by another edge-router (pid {holder}); "
            "stop it first, or give this one another --state"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise StoreError(f"Route store {path}: cannot lock {lock_path}: {exc}") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def check_path(path: str) -> None:
    """Refuse a ``--state`` path that cannot be a store, saying why.

    SQLite's own word for all of these is "unable to open database file".
    """
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise StoreError(
            f"Route store {path} is a directory; --state takes a file, "
            f"such as {os.path.join(path, 'routes.db')}"
        )
    if not os.path.exists(directory):
        raise StoreError(f"Route store {path}: directory {directory} does not exist")
    if not os.path.isdir(directory):
        raise StoreError(f"Route store {path}: {directory} is not a directory")
    # The WAL and lock files live beside the store, so even an existing
    # store needs a directory this process may write in.
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StoreError(
            f"Route store {path}: directory {directory} is not writable by this user"
        )


def _create_private(path: str) -> None:
    """Make a new store file readable by its owner only.

    It holds every token in clear, as the control socket (also 0600) does;
    SQLite gives the ``-wal`` and ``-shm`` files it makes beside it the
    same mode.  An existing file keeps the mode its owner chose.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise StoreError(f"Route store {path} cannot be created: {exc}") from exc
    os.close(fd)


class Store:
    """One SQLite file holding the route table."""

    def __init__(self, path: str, synchronous: str = "FULL") -> None:
        self.path = path
        self._db = self._open(path, synchronous)
        # Reads made while the router runs (a sandbox's routes, fetched the
        # first time it is touched) use a connection of their own: the
        # writer commits from another thread, and a reader beside it sees
        # only committed rows (WAL), never half of a write.
        try:
            self._reader = sqlite3.connect(path, check_same_thread=False)
            self._reader.execute("PRAGMA query_only=ON")
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"Route store {path} cannot be read: {exc}") from exc

    def _open(self, path: str, synchronous: str) -> sqlite3.Connection:
        if synchronous.upper() not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be FULL or NORMAL")
        check_path(path)
        _create_private(path)
        db = None
        try:
            # The control layer serialises writers and hands commits to a
            # thread, so the connection is shared across threads on purpose.
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            # Tables but no ``meta``: another program's database, given by a
            # mistaken --state.  Checked before anything is written to it.
            tables = [
                name
                for (name,) in db.execute(
                    "SELECT name FROM sqlite_master WHERE type='table'"
                )
            ]
            if tables and "meta" not in tables:
                raise StoreError(
                    f"Route store {path} is not a route store "
                    f"(it holds tables {', '.join(sorted(tables))})"
                )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO meta VALUES ('schema', ?), ('version', 0)",
                    (SCHEMA_VERSION,),
                )
            elif row[0] == 1:
                self._migrate(db)
            elif row[0] != SCHEMA_VERSION:
                raise StoreError(
                    f"Route store {path} has schema {row[0]}; "
                    f"this router reads schema {SCHEMA_VERSION}"
                )
        except (sqlite3.Error, StoreError) as exc:
            if db is not None:
                db.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"Route store {path} cannot be read: {exc}") from exc
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Move a schema 1 store to schema 2, in one SQLite transaction."""
        try:
            db.executescript(_MIGRATE_1)
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StoreError(
                f"Route store {self.path}: cannot move it from schema 1 to "
                f"schema {SCHEMA_VERSION}: {exc}"
            ) from exc
        # The copy left the old tables' pages free in the file and the new
        # ones in the write-ahead log: give both back to the disk.  Best
        # effort: the move itself is done and stored.
        try:
            db.execute("VACUUM")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning(
                "route store %s: moved to schema 2, but not compacted: %s",
                self.path,
                exc,
            )
        log.info("route store %s moved from schema 1 to 2", self.path)

    def load(self) -> tuple[int, list[Sandbox], list[Route]]:
        """The stored version, sandboxes and routes.

        Every row is read here, inside the error mapping: a damaged page
        anywhere in the tables stops startup with a ``StoreError`` naming
        the file.  That full read is also the integrity check (a separate
        ``PRAGMA quick_check`` doubled the start-up time of a large store).
        """
        try:
            version, sandboxes = self._version_and_sandboxes()
        except sqlite3.Error as exc:
            raise StoreError(f"Route store {self.path} cannot be read: {exc}") from exc
        return version, sandboxes, self._routes(self._db)

    def load_index(self) -> tuple[int, list[Sandbox], list[tuple[Any, ...]]]:
        """What serving needs: the version, sandboxes, and per route the
        row ``(sandbox, port, token, route_id, target, flags)``.

        ``flags`` is 1 for a route that preserves the Host header and 0 for
        one that rewrites it (``routes.FLAG_PRESERVE_HOST``).  Names and
        exposure times stay in the store until ``routes_of`` asks: reading
        them for a million routes at start-up would double its time.
        """
        try:
            version, sandboxes = self._version_and_sandboxes()
            rows = self._db.execute(
                "SELECT sandbox, port, token, route_id, target, host = 'preserve'"
                " FROM routes"
            ).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"Route store {self.path} cannot be read: {exc}") from exc
        return version, sandboxes, rows

    def routes_of(self, sandbox: str | None) -> list[Route]:
        """One sandbox's routes, or every route for ``None`` (committed ones)."""
        return self._routes(self._reader, sandbox)

    def routes_that_may_reach(
        self, ports: frozenset[int]
    ) -> list[tuple[str, int, str | None, str]]:
        """(sandbox, port, target, upstream host) of every stored route on
        one of ``ports`` or with a target: the candidates for leading into
        one of the router's own listeners (``Service``)."""
        marks = ",".join("?" * len(ports))
        try:
            rows = self._reader.execute(
                "SELECT r.sandbox, r.port, r.target, s.upstream_host "
                "FROM routes r LEFT JOIN sandboxes s ON s.name = r.sandbox "
                f"WHERE r.port IN ({marks}) OR r.target IS NOT NULL",
                sorted(ports),
            ).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"Route store {self.path} cannot be read: {exc}") from exc
        return [
            (sandbox, port, target, host or DEFAULT_UPSTREAM_HOST)
            for sandbox, port, target, host in rows
        ]

    def all_routes(self) -> list[Route]:
        """Every committed route, on a connection of its own: for a thread
        of its own, while ``routes_of`` may run on the event loop."""
        try:
            db = sqlite3.connect(self.path)
        except sqlite3.Error as exc:
            raise StoreError(f"Route store {self.path} cannot be read: {exc}") from exc
        try:
            return self._routes(db)
        finally:
            db.close()

    def _routes(
        self, db: sqlite3.Connection, sandbox: str | None = None
    ) -> list[Route]:
        """Route rows read whole, through ``db``; all, or one sandbox's.

        Every row is read inside the error mapping, so a damaged page
        anywhere raises ``StoreError`` naming the file.
        """
        query = (
            "SELECT sandbox, port, token, name, exposed_at, target, host, route_id"
            " FROM routes"
        )
        try:
            if sandbox is None:
                cursor = db.execute(query)
            else:
                cursor = db.execute(query + " WHERE sandbox = ?", (sandbox,))
            return list(itertools.starmap(Route, cursor))
        except sqlite3.Error as exc:
            raise StoreError(f"Route store {self.path} cannot be read: {exc}") from exc

    def _version_and_sandboxes(self) -> tuple[int, list[Sandbox]]:
        version = self._db.execute(
            "SELECT value FROM meta WHERE key='version'"
        ).fetchone()[0]
        sandboxes = list(
            itertools.starmap(
                Sandbox,
                self._db.execute("SELECT name, upstream_host, state FROM sandboxes"),
            )
        )
        return version, sandboxes

    def commit(self, txn: Transaction) -> None:
        """Write a transaction's records atomically; raise ``StoreError``."""
        self.commit_many([txn])

    def commit_many(self, txns: list[Transaction]) -> None:
        """Write several transactions in one SQLite transaction (group commit)."""
        if not any(t.changes for t in txns):
            return
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                # The two tables share no key, so only the order within
                # each table matters: a batch that exposes a port on each
                # of many new sandboxes is two runs, not two per sandbox.
                # Runs of one kind then go to SQLite as one executemany.
                records = [rec for txn in txns for rec in txn.changes]
                sandboxes = [r for r in records if r["op"] in _SANDBOX_OPS]
                routes = [r for r in records if r["op"] not in _SANDBOX_OPS]
                for op, run in itertools.groupby(sandboxes + routes, key=_OP):
                    sql, params = _STATEMENTS[op]
                    db.executemany(sql, map(params, run))
                db.execute(
                    "UPDATE meta SET value=? WHERE key='version'",
                    (max(t.version for t in txns),),
                )
                db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (busy, disk full) may leave the transaction
                # open, and the next BEGIN would fail on it.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"Route store {self.path}: write failed: {exc}") from exc

    def close(self) -> None:
        self._reader.close()
        self._db.close()


_OP = operator.itemgetter("op")
_SANDBOX_OPS = frozenset(("put_sandbox", "del_sandbox"))


# The routes table's columns, in order, from a route record (one C call).
_ROUTE_COLUMNS = operator.itemgetter(
    "sandbox", "port", "token", "name", "exposedAt", "target", "host", "route_id"
)


def _route_row(rec: dict[str, Any]) -> tuple[Any, ...]:
    row: tuple[Any, ...] = _ROUTE_COLUMNS(rec["route"])
    return row


def _sandbox_row(rec: dict[str, Any]) -> tuple[Any, ...]:
    sb = rec["sandbox"]
    return (sb["name"], sb["upstream_host"], sb["state"])


# op → (statement, parameters of one record)
_STATEMENTS: dict[str, tuple[str, Callable[[dict[str, Any]], tuple[Any, ...]]]] = {
    "put_route": (
        "INSERT OR REPLACE INTO routes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        _route_row,
    ),
    "del_route": (
        "DELETE FROM routes WHERE sandbox=? AND port=?",
        lambda rec: (rec["sandbox"], rec["port"]),
    ),
    "put_sandbox": ("INSERT OR REPLACE INTO sandboxes VALUES (?, ?, ?)", _sandbox_row),
    "del_sandbox": ("DELETE FROM sandboxes WHERE name=?", lambda rec: (rec["name"],)),
}
