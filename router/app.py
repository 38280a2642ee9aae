"""The running router: route table, store, listeners, and their lifetimes.

``Router`` owns the ``RouteTable`` and its ``Store`` and is the one way to
change routes at run time (``await router.commit(ops)``): changes are made
one transaction at a time, written to the store off the event loop, and only
then acknowledged, announced to watchers and applied to live connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from .config import Config
from .errors import StoreError
from .routes import RouteTable, Transaction
from .store import Store

log = logging.getLogger("edge_router")


class Router:
    def __init__(self, config: Config, public_port: int | None = None) -> None:
        self.config = config
        default_hostname = None
        domains = config.domain or ["localhost"]
        if public_port is not None and domains[0].split(".")[-1] == "localhost":
            # Local URLs are only useful with the port they are served on.
            default_hostname = f"{domains[0]}:{public_port}"
        self.table = RouteTable(
            domains,
            default_hostname=default_hostname,
            reserved_ports=frozenset(config.reserved_ports),
        )
        self.store: Store | None = None
        self._lock = asyncio.Lock()
        self.watchers: set[Callable[[dict[str, Any]], None]] = set()
        # Each hook returns counters that ``stats`` on the control socket
        # merges into its answer (the proxy adds its own here).
        self.stats_hooks: list[Callable[[], dict[str, Any]]] = []
        self.table.listeners.append(self._announce)

    @property
    def lock(self) -> asyncio.Lock:
        """Held from ``prepare`` to ``finish`` of each transaction.

        The table holds a transaction's changes before they are stored, so a
        reader that needs contents and ``version`` to agree (a snapshot, the
        start of a watch) holds this lock while it reads.
        """
        return self._lock

    def open_store(self) -> None:
        """Load the table from ``--state``; raise ``StoreError`` on a bad file."""
        if not self.config.state:
            return
        self.store = Store(self.config.state, self.config.sync)
        version, sandboxes, routes = self.store.load()
        self.table.load(version, sandboxes, routes)
        log.info(
            "route store %s loaded: version %d, %d routes, %d sandboxes",
            self.config.state,
            version,
            len(self.table.routes),
            len(self.table.sandboxes),
        )

    async def commit(
        self, ops: list[dict[str, Any]], batch: bool = False
    ) -> Transaction:
        """Apply ``ops`` atomically and durably; raise ``RouteError``/``StoreError``."""
        async with self._lock:
            txn = self.table.prepare(ops, atomic_index=batch)
            if txn.changes and self.store is not None:
                try:
                    await asyncio.to_thread(self.store.commit, txn)
                except StoreError:
                    self.table.rollback(txn)
                    log.error("route change not stored; rolled back", exc_info=True)
                    raise
            self.table.finish(txn)
        return txn

    def _announce(self, txn: Transaction) -> None:
        for rec in txn.changes:
            log.info("route change v%d: %s", txn.version, _describe(rec))
        msg = txn.message()
        for watcher in list(self.watchers):
            watcher(msg)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


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
