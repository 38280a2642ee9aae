"""The running router: route table, store, listeners, and their lifetimes.

``Router`` owns the ``RouteTable`` and its ``Store`` and is the one way to
change routes at run time (``await router.commit(ops)``): changes are made
one transaction at a time, written to the store off the event loop, and only
then acknowledged, announced to watchers and applied to live connections.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from . import grammar
from .config import Config
from .errors import RouteError
from .routes import RouteTable, Transaction, group_by_sandbox
from .store import Store, check_path, claim

if TYPE_CHECKING:
    from .workers import Follower

log = logging.getLogger("edge_router")


T = TypeVar("T")


async def in_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a thread started for it, which ends with the call.

    Not ``asyncio.to_thread``: its pool keeps its thread for good, and a
    process with a second thread pays on every read and write of the data
    path (see ``router.listeners``).  A thread per store write costs some
    tens of microseconds next to the write's fsync.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if done.done():  # the caller was cancelled meanwhile
            return
        if ok:
            done.set_result(value)
        else:
            done.set_exception(value)

    def run() -> None:
        outcome: tuple[bool, Any]
        try:
            outcome = (True, fn(*args))
        except BaseException as exc:
            outcome = (False, exc)
        # The loop may be gone by now (shut down mid-write): the write is
        # done or failed either way, and nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, *outcome)

    # Not a daemon: an exit in the middle waits for the write to end.
    threading.Thread(target=run, name="edge-router-store").start()
    return await done


# CPython collects its youngest generation after every 700 new containers
# (net).  A batch of route changes makes thousands of records and routes, so
# at that pace the collector took a third of a batch's time, mostly walking
# the table's older objects again; ten thousand keeps it out of the way and
# still bounds how long cyclic garbage lives.
GC_YOUNG_THRESHOLD = 10_000

# A queued ``commit`` call: its ops, whether they are a batch, its answer.
_Request = tuple[list[dict[str, Any]], bool, "asyncio.Future[Any]"]

# Records per step of a snapshot: about 20 ms of work between yields.
SNAPSHOT_STEP = 10_000

# Operations prepared between two turns of the event loop: about 10 ms.
PREPARE_STEP = 1000

# A transaction with more changes than this is logged as one line.
LOG_EACH_CHANGE = 20


def tune_gc() -> None:
    """The collector settings the router and its workers run with."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def load_table(store: Store, table: RouteTable) -> None:
    """Fill an empty ``table`` from ``store``; raise ``StoreError``.

    The forwarding index is built whole, so every URL is served at once;
    each sandbox's route metadata stays in the store until an operation
    needs it (``RouteTable.load_index``).  The rows are millions of objects
    made at once: collecting while they are made only costs time, and
    freezing what is kept keeps every later collection from walking it.
    """
    gc.disable()
    try:
        version, sandboxes, rows = store.load_index()
        table.load_index(version, sandboxes, rows, store)
        del rows
    finally:
        gc.enable()
    gc.freeze()


class Router:
    def __init__(self, config: Config, public_port: int | None = None) -> None:
        self.config = config
        default_hostname = None
        domains = [grammar.normalize_domain(d) for d in config.domain or ["localhost"]]
        if public_port is not None and domains[0].split(".")[-1] == "localhost":
            # Local URLs are only useful with the port they are served on.
            default_hostname = f"{domains[0]}:{public_port}"
        self.table = RouteTable(
            domains,
            default_hostname=default_hostname,
            reserved_ports=frozenset(config.reserved_ports),
        )
        self.store: Store | None = None
        self._claim: int | None = None  # the store's lock file (store.claim)
        self._lock = asyncio.Lock()
        self._pending: list[_Request] = []
        self._flusher: asyncio.Task[None] | None = None
        # Set while no transaction is between prepare and finish: reads of
        # routes wait for it, so that they never see a change the store may
        # still refuse (``settled``).
        self._settled = asyncio.Event()
        self._settled.set()
        self.watchers: set[Callable[[dict[str, Any]], None]] = set()
        # Each hook returns counters that ``stats`` on the control socket
        # merges into its answer (the proxy adds its own here).
        self.stats_hooks: list[Callable[[], dict[str, Any]]] = []
        # Worker processes that must apply a change before it is
        # acknowledged (``router.workers.Follower``).
        self.followers: list[Follower] = []
        self.table.listeners.append(self._announce)

    @property
    def lock(self) -> asyncio.Lock:
        """Held from ``prepare`` to ``finish`` of each transaction.

        The table holds a transaction's changes before they are stored, so a
        reader that needs contents and ``version`` to agree (a snapshot, the
        start of a watch) holds this lock while it reads.  (The data path
        sees a change only at ``finish``; see ``RouteTable.pending``.)
        """
        return self._lock

    def open_store(self) -> None:
        """Load the table from ``--state``; raise ``StoreError`` on a bad file."""
        if not self.config.state:
            return
        # Claimed before it is opened: opening may write (a new file's
        # schema), which is for the one router that holds the store.
        check_path(self.config.state)
        self._claim = claim(self.config.state)
        try:
            self.store = Store(self.config.state, self.config.sync)
            load_table(self.store, self.table)
        except BaseException:
            self.close()
            raise
        log.info(
            "route store %s loaded: version %d, %d routes, %d sandboxes",
            self.config.state,
            self.table.version,
            len(self.table.routes),
            len(self.table.sandboxes),
        )

    async def page_in(self) -> None:
        """Read every route still only in the store, off the event loop.

        For whole-table answers (a snapshot, a watch from scratch), under
        ``lock``: a million routes take seconds to read and group, which
        would otherwise stop every connection of this process meanwhile.
        """
        if self.table.unloaded and self.store is not None:
            store = self.store
            # As at start-up (``load_table``): a million new objects would
            # set off full collections, each holding the event loop for a
            # quarter of a second; once kept, they are frozen out of later
            # ones.  This happens once in a process's life (the table is
            # whole afterwards); what else is frozen with them is only kept
            # from cycle collection, still freed when its last user lets go.
            gc.disable()
            try:
                grouped = await in_own_thread(
                    lambda: list(group_by_sandbox(store.all_routes()).items())
                )
                for at in range(0, len(grouped), SNAPSHOT_STEP):
                    self.table.adopt(grouped[at : at + SNAPSHOT_STEP], False)
                    await asyncio.sleep(0)
                self.table.adopt((), complete=True)
            finally:
                gc.enable()
            gc.freeze()

    async def snapshot(self) -> dict[str, Any]:
        """``table.snapshot()``, made without holding up this process.

        Under ``lock``, so the table stays at one version throughout.  The
        records are encoded a step at a time with a yield to the event
        loop after each: at a million routes, building and encoding them
        in one go held every connection of the process for two seconds.
        The encoded routes go into the reply as one ``orjson.Fragment``.
        """
        await self.page_in()
        table = self.table
        version = table.version
        routes = [b"["]
        for part in table.snapshot_routes(SNAPSHOT_STEP):
            if len(routes) > 1:
                routes.append(b",")
            routes.append(orjson.dumps(part)[1:-1])
            await asyncio.sleep(0)
        routes.append(b"]")
        sandboxes: list[dict[str, Any]] = []
        for records in table.snapshot_sandboxes(SNAPSHOT_STEP):
            sandboxes += records
            await asyncio.sleep(0)
        assert table.version == version, "the table changed during a snapshot"
        joined = orjson.Fragment(b"".join(routes))
        await asyncio.sleep(0)  # the reply's encoding copies it once more
        return {"version": version, "routes": joined, "sandboxes": sandboxes}

    async def commit(
        self, ops: list[dict[str, Any]], batch: bool = False
    ) -> Transaction:
        """Apply ``ops`` atomically and durably; raise ``RouteError``/``StoreError``.

        Callers that arrive while a store write is under way are grouped
        into the next write (group commit): each keeps its own transaction,
        version and answer, but they share one fsync, which is what bounds
        the change rate of many concurrent orchestrator clients.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Transaction] = loop.create_future()
        self._pending.append((ops, batch, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush(), name="route-commit")
        return await done

    async def settled(self) -> None:
        """Wait until the table holds only stored changes.

        For reads of routes (``get_exposed_ports``, ``validate_port_token``):
        between prepare and finish the table already holds a transaction
        that the store may still refuse.
        """
        while self.table.pending:
            await self._settled.wait()

    async def _flush(self) -> None:
        while self._pending:
            group, self._pending = self._pending, []
            # Shielded: a group once begun is seen through (stored and
            # served, or rolled back) even if this task is cancelled, since
            # its store write, in a thread, would go on regardless.
            await asyncio.shield(self._commit_locked(group))
            # Readers woken just now run before the next group is prepared,
            # or a steady stream of changes would keep them waiting.
            await asyncio.sleep(0)

    async def _commit_locked(self, group: list[_Request]) -> None:
        async with self._lock:
            self._settled.clear()
            try:
                await self._commit_group(group)
            except Exception as exc:
                # A fault of the router itself, not of the request: every
                # caller still gets an answer instead of waiting forever.
                log.exception("route commit failed")
                for _, _, done in group:
                    _settle(done, exc=exc)
            finally:
                if not self.table.pending:
                    self._settled.set()

    async def _commit_group(self, group: list[_Request]) -> None:
        # 1. Prepare each in turn, each against the table as the ones before
        #    it left it; a refused one is rolled back on its own.  A refusal
        #    that may come of an earlier one not yet stored (its token, its
        #    label) is not final: that request goes again in the next group,
        #    against the table as stored.
        prepared: list[tuple[Transaction, asyncio.Future[Any]]] = []
        again: list[_Request] = []
        version = self.table.version
        try:
            for ops, batch, done in group:
                try:
                    txn = await self._prepare(ops, batch)
                except RouteError as exc:
                    if any(t.changes for t, _ in prepared):
                        again.append((ops, batch, done))
                    else:
                        _settle(done, exc=exc)
                    continue
                except Exception as exc:
                    _settle(done, exc=exc)
                    continue
                if txn.changes:
                    version += 1
                txn.version = version
                prepared.append((txn, done))
        except BaseException:
            self._roll_back(prepared)
            raise
        finally:
            self._pending[:0] = again

        # 2. One durable write for all of them, or none of them.
        changed = [txn for txn, _ in prepared if txn.changes]
        if changed and self.store is not None:
            try:
                await in_own_thread(self.store.commit_many, changed)
            except Exception as exc:
                # StoreError, or anything else the write raised: either way
                # nothing may be acknowledged that the store does not hold.
                self._roll_back(prepared)
                log.error("route changes not stored; rolled back: %s", exc)
                for _, done in prepared:
                    _settle(done, exc=exc)
                return

        # 3. Acknowledge in version order, once every worker process has the
        #    changes too (a revoked URL must be dead in all of them).
        for txn, _ in prepared:
            self.table.finish(txn)
        if changed and self.followers:
            await self._sync_followers(max(txn.version for txn in changed))
        for txn, done in prepared:
            _settle(done, result=txn)

    def _roll_back(self, prepared: list[tuple[Transaction, Any]]) -> None:
        for txn, _ in reversed(prepared):
            self.table.rollback(txn)

    async def _prepare(self, ops: list[dict[str, Any]], batch: bool) -> Transaction:
        """``table.prepare``, letting the event loop run every PREPARE_STEP ops.

        A batch of 60,000 exposes is half a second of work; done in one go
        it held up every connection of the process that long.  Proxying
        goes on between the steps on the table as stored.
        """
        steps = self.table.prepare_steps(ops, batch, PREPARE_STEP)
        try:
            while True:
                try:
                    next(steps)
                except StopIteration as done:
                    txn: Transaction = done.value
                    return txn
                await asyncio.sleep(0)
        finally:
            steps.close()  # cancelled between steps: the ops so far undone

    async def _sync_followers(self, version: int) -> None:
        followers = list(self.followers)
        results = await asyncio.gather(
            *(f.synced(version) for f in followers), return_exceptions=True
        )
        for follower, result in zip(followers, results, strict=True):
            if isinstance(result, BaseException):
                # Late or gone: it cannot be trusted to have the change, so
                # it is replaced by one started from the current table.
                log.error(
                    "worker %d did not apply version %d (%r); restarting it",
                    follower.number,
                    version,
                    result,
                )
                await self._restart_follower(follower)

    async def replace_follower(self, follower: Follower) -> None:
        """A worker process exited on its own: start a new one now."""
        async with self._lock:
            if follower in self.followers and not follower.alive:
                await self._restart_follower(follower)

    async def _restart_follower(self, follower: Follower) -> None:
        # Under the lock: the snapshot and the stream after it must agree.
        self.watchers.discard(follower.forward)
        await follower.stop()
        follower.stopping = False
        try:
            await follower.start(self.table)
        except (OSError, TimeoutError, ConnectionError) as exc:
            log.error("worker %d could not restart: %r", follower.number, exc)
            await follower.stop()
            self.followers.remove(follower)
            return
        self.watchers.add(follower.forward)

    def _announce(self, txn: Transaction) -> None:
        changes = txn.changes
        if len(changes) <= LOG_EACH_CHANGE:
            for rec in changes:
                log.info("route change v%d: %s", txn.version, _describe(rec))
        else:
            # A bulk change gets one line: a line per change (a hundred
            # thousand of them, written on the event loop) stalled every
            # request for most of a second.  Each is still there at debug.
            kinds = collections.Counter(_KINDS[rec["op"]] for rec in changes)
            log.info(
                "route change v%d: %d changes (%s)",
                txn.version,
                len(changes),
                ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())),
            )
            if log.isEnabledFor(logging.DEBUG):
                for rec in changes:
                    log.debug("route change v%d: %s", txn.version, _describe(rec))
        msg = txn.message()
        for watcher in list(self.watchers):
            # One broken follower or watcher must not stop the others, nor
            # the acknowledgement of a change that is already stored.
            try:
                watcher(msg)
            except Exception:
                log.exception("route change not passed to %r", watcher)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._claim is not None:
            os.close(self._claim)
            self._claim = None


_KINDS = {
    "put_route": "expose",
    "del_route": "revoke",
    "put_sandbox": "sandbox set",
    "del_sandbox": "sandbox destroyed",
}


def _describe(rec: dict[str, Any]) -> str:
    op = rec["op"]
    if op == "put_route":
        r = rec["route"]
        return f"expose {r['sandbox']}:{r['port']} (route {r['route_id']})"
    if op == "del_route":
        return f"revoke {rec['sandbox']}:{rec['port']} (route {rec['route_id']})"
    if op == "put_sandbox":
        sb = rec["sandbox"]
        return f"sandbox {sb['name']} {sb['state']} upstream {sb['upstream_host']}"
    return f"sandbox {rec['name']} destroyed"


def _settle(
    done: asyncio.Future[Any], result: Any = None, exc: BaseException | None = None
) -> None:
    if done.done():  # the caller gave up waiting; the change stands
        return
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(result)
