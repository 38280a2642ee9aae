"""The route table (SPEC §2): the rules for changing routes, sans IO.

``RouteTable`` holds every route with its full metadata and enforces the
rules of the ports API: token reuse, idempotence, rotation, ``TOKEN_IN_USE``,
``LABEL_CONFLICT``, atomic batches.  Each accepted transaction becomes a list
of *change records*, plain JSON-able dicts; the same records are written to
the store, carried by the control socket's ``watch`` stream, and applied to
a ``ForwardingTable``, the compact view that the data path reads.  A worker
(or another router) that replays the records gets the same table.

Records::

    {"op": "put_sandbox", "sandbox": {"name", "upstream_host", "state"}}
    {"op": "del_sandbox", "name": ...}
    {"op": "put_route", "route": {"sandbox", "port", "token", "name",
                                  "exposedAt", "target", "host", "route_id"}}
    {"op": "del_route", "sandbox": ..., "port": ..., "label": ...,
     "route_id": ...}

Rotation is ``del_route`` of the old label then ``put_route`` of the new one,
so a follower never needs to remember which label a port had.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import os
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import grammar
from .errors import RouteError
from .speedups import labels as _labels

Record = dict[str, Any]

HOST_POLICIES = ("rewrite", "preserve")
SANDBOX_STATES = ("running", "stopped")
DEFAULT_UPSTREAM_HOST = "127.0.0.1"
FLAG_PRESERVE_HOST = 1
# Up to this many ports a sandbox's tokens are found by scanning its ports.
TOKEN_SCAN_LIMIT = 16
_DNS_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


@dataclass(slots=True)
class Route:
    sandbox: str
    port: int
    token: str
    name: str | None
    exposed_at: str
    target: str | None
    host: str
    route_id: int

    @property
    def label(self) -> str:
        return f"{self.port}-{self.sandbox}-{self.token}"

    def to_record(self) -> dict[str, Any]:
        return {
            "sandbox": self.sandbox,
            "port": self.port,
            "token": self.token,
            "name": self.name,
            "exposedAt": self.exposed_at,
            "target": self.target,
            "host": self.host,
            "route_id": self.route_id,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Route:
        return cls(
            rec["sandbox"],
            rec["port"],
            rec["token"],
            rec["name"],
            rec["exposedAt"],
            rec["target"],
            rec["host"],
            rec["route_id"],
        )


@dataclass(slots=True)
class Sandbox:
    name: str
    upstream_host: str = DEFAULT_UPSTREAM_HOST
    state: str = "running"

    def to_record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "upstream_host": self.upstream_host,
            "state": self.state,
        }


@dataclass(slots=True)
class Transaction:
    """Changes applied in memory, not yet acknowledged.

    The IO layer writes ``changes`` to the store, then calls
    ``RouteTable.finish``; if the store refuses, ``RouteTable.rollback``
    puts the table back as it was.
    """

    version: int
    changes: list[Record]
    results: list[Any]
    # What each of ``changes`` replaced, for ``rollback``: the route or
    # sandbox before it, or None.  The objects at hand, not records of
    # them: a refused batch is rare, a bulk change is not.
    undo: list[Route | Sandbox | None] = field(default_factory=list)
    # The ``exposedAt`` of every route the transaction exposes: one batch,
    # one instant (set by its first expose).
    exposed_at: str = ""
    # ``RouteTable.next_route_id`` before the transaction, for ``rollback``.
    first_route_id: int = 0

    def message(self) -> dict[str, Any]:
        """The watch message that announces this transaction."""
        return {"version": self.version, "changes": self.changes}


def now_iso() -> str:
    """The ``exposedAt`` format of the SDK: ISO 8601, UTC, milliseconds."""
    ms = time.time_ns() // 1_000_000
    if _stamp[0] != ms:
        # Formatting costs more than the rest of an expose; a batch made
        # within one millisecond shares the string.
        seconds, milli = divmod(ms, 1000)
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _stamp[:] = [ms, f"{text}.{milli:03d}Z"]
    return str(_stamp[1])


_stamp: list[Any] = [0, ""]


def group_by_sandbox(routes: Iterable[Route]) -> dict[str, dict[int, Route]]:
    """``routes`` as ``RouteTable.adopt`` takes them: by sandbox, then port."""
    grouped: dict[str, dict[int, Route]] = {}
    for route in routes:
        ports = grouped.get(route.sandbox)
        if ports is None:
            ports = grouped[route.sandbox] = {}
        ports[route.port] = route
    return grouped


def parse_target(target: str) -> tuple[str, int] | str:
    """``host:port`` → (host, port); ``unix:/path`` → "/path"."""
    if target.startswith("unix:"):
        path = target[5:]
        if not path.startswith("/") or "\0" in path:
            raise RouteError(
                "INVALID_TARGET", f"Target {target!r} needs an absolute socket path"
            )
        return path
    host, sep, port = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if (
        not sep
        or not host
        or not (port.isascii() and port.isdigit())
        or not 1 <= int(port) <= 65535
        or any(c in host for c in " /\\\0")
    ):
        raise RouteError(
            "INVALID_TARGET",
            f"Target {target!r} must be 'host:port' or 'unix:/path'",
        )
    return host, int(port)


def _reaches_us(host: str, own_hosts: frozenset[str]) -> bool:
    """Whether a connection to ``host`` may land on this machine's listeners.

    That is a loopback or unspecified address in any spelling the resolver
    takes (``::ffff:127.0.0.1``, ``127.1``, ``2130706433``, ``0``), a
    ``localhost`` name, a name ``/etc/hosts`` gives such an address, or an
    address the router listens on.  Names only DNS knows are not looked
    up: that would stall the control loop.
    """
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    bare = bare.rstrip(".").lower()
    if bare == "localhost" or bare.endswith(".localhost") or bare in own_hosts:
        return True
    address = _address(bare)
    if address is None:
        # A name: only the hosts file is asked (the stat behind it is
        # skipped for addresses, which a bulk check has many of).
        found = (_address(a) for a in _etc_hosts().get(bare, ()))
        return any(a is not None and _is_ours(a, own_hosts) for a in found)
    return _is_ours(address, own_hosts)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an address, in any spelling getaddrinfo takes; or None."""
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(
            text
        )
    except ValueError:
        try:
            # The classic IPv4 spellings (127.1, 2130706433, 0x7f000001).
            address = ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _is_ours(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, own_hosts: frozenset[str]
) -> bool:
    return address.is_loopback or address.is_unspecified or str(address) in own_hosts


def _etc_hosts(path: str = "/etc/hosts") -> dict[str, tuple[str, ...]]:
    """Name → addresses of the hosts file (read again when it changes)."""
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        return {}
    cached = _HOSTS_CACHE.get(path)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    names: dict[str, list[str]] = {}
    with contextlib.suppress(OSError, UnicodeDecodeError), open(path) as fh:
        for line in fh:
            fields = line.split("#", 1)[0].split()
            for name in fields[1:]:
                names.setdefault(name.rstrip(".").lower(), []).append(fields[0])
    table = {name: tuple(addrs) for name, addrs in names.items()}
    _HOSTS_CACHE[path] = (mtime, table)
    return table


_HOSTS_CACHE: dict[str, tuple[int, dict[str, tuple[str, ...]]]] = {}


def same_socket(path: str, own: Iterable[str]) -> bool:
    """``path`` is one of ``own``, however spelt (``//``, ``/./``, links)."""
    real = os.path.realpath(path)
    for mine in own:
        if real == os.path.realpath(mine):
            return True
        with contextlib.suppress(OSError):
            if os.path.samefile(path, mine):
                return True
    return False


def check_upstream_host(host: object) -> str:
    """An IP address (IPv6 with or without brackets) or a DNS name."""
    if isinstance(host, str):
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            return str(ipaddress.ip_address(bare))
        except ValueError:
            # A trailing dot (an absolute name) is kept: it tells the
            # resolver not to try the search domains.
            if _DNS_NAME.fullmatch(bare[:-1] if bare.endswith(".") else bare):
                return bare.lower()
    raise RouteError(
        "INVALID_UPSTREAM_HOST",
        f"Upstream host {host!r} must be an IP address or a host name",
    )


class RouteTable:
    """Every route and sandbox, with the rules for changing them."""

    def __init__(
        self,
        domains: Iterable[str] = ("localhost",),
        default_hostname: str | None = None,
        reserved_ports: frozenset[int] = grammar.DEFAULT_RESERVED_PORTS,
        log_size: int = 10_000,
    ) -> None:
        self.domains = tuple(grammar.normalize_domain(d) for d in domains)
        if not self.domains:
            raise ValueError("at least one base domain is needed")
        self.default_hostname = default_hostname or self.domains[0]
        # The public listener's port, once known: URLs on a local hostname
        # given without a port get it (``_hostname``).
        self.public_port = 0
        self.reserved_ports = reserved_ports
        # The router's own listeners (set once they are bound): a route to
        # one of them would reach the router itself, which loops requests
        # or, for the internal entry, lets a public URL skip every token.
        self.own_ports: frozenset[int] = frozenset()
        self.own_hosts: frozenset[str] = frozenset()
        self.own_paths: frozenset[str] = frozenset()
        # Ports of listeners bound to every address (0.0.0.0, ::): any of
        # this machine's addresses reaches them, so any host counts.
        self.own_wildcard_ports: frozenset[int] = frozenset()
        self.version = 0
        # Every route, by sandbox then port: token checks and listings
        # touch one sandbox's ports, never the whole table.  This is the
        # only map of routes kept here; which route holds a label is asked
        # of the forwarding index, which has every label already (a second
        # label → route dict was a sixth of the table's memory and of its
        # load time at a million routes).
        self.by_sandbox: dict[str, dict[int, Route]] = {}
        # Sandboxes whose routes are still only in the store (``load_index``
        # leaves them there), and where to read them from: see ``_ports``.
        self.unloaded: set[str] = set()
        self.source: RouteSource | None = None
        # Token → port of each sandbox with many ports, for the token-in-use
        # check: scanning the ports made a batch of n exposes to one sandbox
        # cost n² steps.  Small sandboxes are scanned (no memory spent).
        self.tokens: dict[str, dict[str, int]] = {}
        self.routes = RoutesView(self)
        self.sandboxes: dict[str, Sandbox] = {}
        self.next_route_id = 1
        # Recent watch messages, for watchers that resume with ``since``.
        # Bounded by the changes they hold, not by their number: ten
        # thousand batches of a thousand changes would be ten million
        # records kept for nothing (and for the cycle collector to walk).
        self.log: deque[dict[str, Any]] = deque()
        self.log_limit = log_size
        self.log_changes = 0
        self.forwarding = ForwardingTable(self.domains)
        # Transactions prepared but not yet finished or rolled back, and
        # the labels they moved, holder or None: the forwarding view (what
        # the data path serves) takes a transaction's changes only in
        # ``finish``, once the store has them, so a change the store then
        # refuses was never served.  Label checks read through this.
        self.pending: set[int] = set()
        self.pending_labels: dict[str, Route | None] = {}
        self.listeners: list[Callable[[Transaction], None]] = []

    # -- loading ---------------------------------------------------------

    def load(
        self,
        version: int,
        sandboxes: Iterable[Sandbox],
        routes_in: Iterable[Route],
    ) -> None:
        """Fill an empty table with every route whole (no change records).

        The router itself starts with ``load_index``; this one holds every
        route in memory from the start (tests compare the two).
        """
        routes = list(routes_in)
        self.by_sandbox.update(group_by_sandbox(routes))
        rows = [
            (
                r.sandbox,
                r.port,
                r.token,
                r.route_id,
                r.target,
                FLAG_PRESERVE_HOST if r.host == "preserve" else 0,
            )
            for r in routes
        ]
        self._fill(version, sandboxes, rows)

    def load_index(
        self,
        version: int,
        sandboxes: Iterable[Sandbox],
        rows: list[tuple[Any, ...]],
        source: RouteSource,
    ) -> None:
        """Fill an empty table for serving; leave route metadata in ``source``.

        ``rows`` are ``RouteSource.load_index`` rows: enough for the
        forwarding index, so every URL is served at once.  A sandbox's
        routes with their names and exposure times are read from
        ``source`` the first time an operation touches that sandbox (one
        indexed query), or all at once for a whole-table answer such as
        ``snapshot``.  At a million routes this halved start-up and left
        the memory of the routes nobody asked about in the store.
        """
        assert not self.sandboxes and not self.routes.count, "load an empty table"
        # The store hands out the flag itself (1: preserve the Host).
        assert FLAG_PRESERVE_HOST == 1
        self._fill(version, sandboxes, rows)
        self.unloaded.update(self.sandboxes)
        self.source = source

    def _fill(
        self, version: int, sandboxes: Iterable[Sandbox], rows: list[tuple[Any, ...]]
    ) -> None:
        """Sandboxes, then the forwarding index from ``load_rows`` rows
        ``(sandbox, port, token, route_id, target, flags)``."""
        forwarding = self.forwarding
        for sb in sandboxes:
            self.sandboxes[sb.name] = sb
            forwarding.put_sandbox(sb)
        top = forwarding.index.load_rows(
            rows, forwarding.sandbox_slots, forwarding._target_slot
        )
        forwarding.index.compact()
        self.routes.count += len(rows)
        self.next_route_id = top + 1
        self.version = version

    def _ports(self, sandbox: str) -> dict[int, Route] | None:
        """The sandbox's routes by port, read from the store if need be.

        Every read of ``by_sandbox`` goes through here.  A sandbox still in
        the store has no change in flight (a change pages it in first), so
        the store's committed rows are exactly its routes.
        """
        ports = self.by_sandbox.get(sandbox)
        if ports is None and sandbox in self.unloaded:
            assert self.source is not None
            # Read first, mark read after: a read that fails (a busy or
            # vanished file, no file descriptor left) raises StoreError and
            # leaves the sandbox to be read again, not taken for empty.
            routes = self.source.routes_of(sandbox)
            self.unloaded.discard(sandbox)
            if routes:
                ports = self.by_sandbox[sandbox] = {r.port: r for r in routes}
        return ports

    def page_in_all(self) -> None:
        """Read every route still in the store (whole-table answers)."""
        if self.unloaded:
            assert self.source is not None
            self.adopt(group_by_sandbox(self.source.routes_of(None)).items())

    def adopt(
        self, sandboxes: Iterable[tuple[str, dict[int, Route]]], complete: bool = True
    ) -> None:
        """Take in the store's routes, read and grouped: ``(name, ports)``.

        They may have been read while the table went on serving (the IO
        layer reads them off the event loop): only the sandboxes still
        unread take theirs, since one read since then has newer routes,
        and one still unread had no change (a change reads it first).
        Grouping is left to the reader, so that what runs here is one step
        per sandbox, not per route; the IO layer may pass them in several
        calls, and says with ``complete`` which one has the last of them.
        """
        unloaded = self.unloaded
        by_sandbox = self.by_sandbox
        for name, ports in sandboxes:
            if name in unloaded:
                by_sandbox[name] = ports
                unloaded.discard(name)
        if complete:
            # Those left had no routes in the store.
            unloaded.clear()

    # -- transactions ----------------------------------------------------

    def prepare(
        self, ops: list[dict[str, Any]], atomic_index: bool = True
    ) -> Transaction:
        """Apply ``ops`` in memory, all or none; raise ``RouteError``.

        ``ops`` are ``{"op": name, **arguments}`` with arguments already of
        the right types (``router.control`` checks them).  On refusal the
        table is exactly as before and the error names the op's index when
        ``atomic_index`` (a batch) is set.
        """
        try:
            next(self.prepare_steps(ops, atomic_index))  # step 0: no pause
        except StopIteration as done:
            txn: Transaction = done.value
            return txn
        raise AssertionError("prepare_steps paused without a step size")

    def prepare_steps(
        self, ops: list[dict[str, Any]], atomic_index: bool = True, step: int = 0
    ) -> Generator[None, None, Transaction]:
        """``prepare`` as a generator that pauses after every ``step`` ops.

        Between steps the IO layer may serve other connections: they see
        nothing of the transaction, since the forwarding view takes it only
        at ``finish`` and readers of the table wait while it is ``pending``.
        The transaction is what the generator returns.
        """
        txn = Transaction(self.version + 1, [], [])
        txn.first_route_id = self.next_route_id
        self.pending.add(id(txn))
        for i, op in enumerate(ops):
            try:
                txn.results.append(self._run(op, txn))
            except RouteError as exc:
                self.rollback(txn)
                if atomic_index:
                    exc.index = i
                raise
            except Exception:
                # A malformed op (one the control layer should have refused)
                # must not leave the ops before it applied.
                self.rollback(txn)
                raise
            if step and (i + 1) % step == 0:
                try:
                    yield
                except BaseException:
                    # Abandoned halfway (its task was cancelled): undone.
                    self.rollback(txn)
                    raise
        if not txn.changes:
            txn.version = self.version
            self._settled(txn)
        return txn

    def rollback(self, txn: Transaction) -> None:
        for rec, old in zip(reversed(txn.changes), reversed(txn.undo), strict=True):
            op = rec["op"]
            if op == "put_route" and old is None:
                r = rec["route"]
                put = self.route(r["sandbox"], r["port"])
                assert put is not None
                self._drop_route(put.sandbox, put.port, put.label)
            elif op in ("put_route", "del_route"):
                assert isinstance(old, Route)
                self._set_route(old, old.label)
            elif old is None:
                del self.sandboxes[rec["sandbox"]["name"]]
            else:
                assert isinstance(old, Sandbox)
                self.sandboxes[old.name] = old
        # Route ids handed out by a refused batch are handed out again.
        self.next_route_id = txn.first_route_id
        txn.undo.clear()
        txn.changes.clear()
        self._settled(txn)

    def finish(self, txn: Transaction) -> None:
        """The store has the transaction: serve it, make it the version."""
        if not txn.changes:
            return
        apply = self.forwarding.apply
        for rec in txn.changes:
            apply(rec)
        self._settled(txn)
        self.version = txn.version
        msg = txn.message()
        self.log.append(msg)
        self.log_changes += len(txn.changes)
        while self.log_changes > self.log_limit and len(self.log) > 1:
            self.log_changes -= len(self.log.popleft()["changes"])
        for listener in self.listeners:
            listener(txn)

    def run(self, ops: list[dict[str, Any]], atomic_index: bool = False) -> Transaction:
        """``prepare`` and ``finish`` for callers with no store (tests)."""
        txn = self.prepare(ops, atomic_index)
        self.finish(txn)
        return txn

    def changes_since(self, since: int) -> list[dict[str, Any]] | None:
        """Watch messages after ``since``, or None when the log lost some."""
        if since == self.version:
            return []
        if since > self.version or not self.log:
            return None
        first = self.log[0]["version"]
        if since < first - 1:
            return None
        return [m for m in self.log if m["version"] > since]

    def snapshot(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "routes": [r for part in self.snapshot_routes() for r in part],
            "sandboxes": [s for part in self.snapshot_sandboxes() for s in part],
        }

    def snapshot_routes(self, step: int = 10_000) -> Iterator[list[dict[str, Any]]]:
        """The snapshot's route records, about ``step`` at a time, in order.

        Steps let an IO layer serve other connections while it writes out
        a million routes.  The table must not change until the last one.
        """
        self.page_in_all()
        by_sandbox = self.by_sandbox
        part: list[dict[str, Any]] = []
        for name in sorted(by_sandbox):
            ports = by_sandbox[name]
            part.extend(ports[port].to_record() for port in sorted(ports))
            if len(part) >= step:
                yield part
                part = []
        if part:
            yield part

    def snapshot_sandboxes(self, step: int = 10_000) -> Iterator[list[dict[str, Any]]]:
        """The snapshot's sandbox records, ``step`` at a time, in order."""
        sandboxes = self.sandboxes
        names = sorted(sandboxes)
        for at in range(0, len(names), step):
            yield [sandboxes[name].to_record() for name in names[at : at + step]]

    # -- the operations --------------------------------------------------

    def _run(self, op: dict[str, Any], txn: Transaction) -> Any:
        # The op's own dict is the keyword arguments, "op" included (each
        # operation takes it and ignores it): copying it without "op" was a
        # tenth of a bulk expose.
        name = op["op"]
        if name == "expose_port":
            return self._expose_port(txn, **op)
        if name == "unexpose_port":
            return self._unexpose_port(txn, **op)
        if name == "set_sandbox":
            return self._set_sandbox(txn, **op)
        if name == "destroy_sandbox":
            return self._destroy_sandbox(txn, **op)
        raise RouteError("UNKNOWN_OP", f"Operation {name!r} cannot change routes")

    def _expose_port(
        self,
        txn: Transaction,
        op: str,
        sandbox: str,
        port: object,
        hostname: str | None = None,
        name: str | None = None,
        token: str | None = None,
        target: str | None = None,
        host: str | None = None,
    ) -> dict[str, Any]:
        # 1. Every part is checked before anything changes.
        sandbox = self._check_sandbox(sandbox)
        port = grammar.check_port(port, self.reserved_ports)
        url_host = self._hostname(hostname)
        if token is not None:
            token = grammar.check_token(token)
        if name is not None:
            grammar.check_name(name)
        if target is not None and target != "":
            parse_target(target)
        if host is not None and host not in HOST_POLICIES:
            raise RouteError(
                "INVALID_HOST_POLICY",
                f"Host policy must be 'rewrite' or 'preserve', not {host!r}",
            )
        ports = self._ports(sandbox)
        current = ports.get(port) if ports else None
        if self.own_ports or self.own_paths:
            self._check_not_own(sandbox, port, current, target)

        # 2. Token: the given one, else the port's current one, else new.
        if token is None:
            token = current.token if current else self._fresh_token(sandbox, port)
        label = grammar.make_label(port, sandbox, token)
        clash = self._token_owner(sandbox, token, ports)
        if clash is not None and clash != port:
            raise RouteError(
                "TOKEN_IN_USE", f"Token '{token}' is already in use by port {clash}"
            )
        holder = self.label_holder(label)
        if holder is not None and holder != (sandbox, port):
            raise RouteError(
                "LABEL_CONFLICT",
                f"Label '{label}' is already the label of sandbox "
                f"'{holder[0]}' port {holder[1]}; choose another token",
            )

        # 3. Same token: idempotent, or an update of name/target/host.
        if current is not None and current.token == token:
            changed = Route(
                sandbox,
                port,
                token,
                current.name if name is None else name,
                current.exposed_at,
                current.target if target is None else target or None,
                current.host if host is None else host,
                current.route_id,
            )
            if changed != current:
                self._put_route(txn, changed, label, current)
            return self._exposed(changed, label, url_host)

        # 4. New route, or rotation (the old label dies in the same step).
        if sandbox not in self.sandboxes:
            self._put_sandbox(txn, Sandbox(sandbox))
        if current is not None:
            # A rotation changes the URL, not where it leads: what the call
            # leaves out is kept, as for a re-expose with the same token.
            self._del_route(txn, current)
            name = current.name if name is None else name
            target = current.target if target is None else target
            host = current.host if host is None else host
        route = Route(
            sandbox,
            port,
            token,
            name,
            txn.exposed_at or self._stamp(txn),
            target or None,  # "" clears a target: the sandbox's own port again
            host or "rewrite",
            self.next_route_id,
        )
        self._put_route(txn, route, label, None)
        return self._exposed(route, label, url_host)

    def _unexpose_port(
        self, txn: Transaction, op: str, sandbox: str, port: object
    ) -> dict[str, Any]:
        sandbox = self._check_sandbox(sandbox)
        port = grammar.check_port(port, frozenset())
        current = self.route(sandbox, port)
        if current is not None:
            self._del_route(txn, current)
        return {"port": port, "unexposed": current is not None}

    def _set_sandbox(
        self,
        txn: Transaction,
        op: str,
        sandbox: str,
        upstream_host: str | None = None,
        state: str | None = None,
    ) -> dict[str, Any]:
        sandbox = grammar.check_sandbox(sandbox)
        if upstream_host is not None:
            upstream_host = check_upstream_host(upstream_host)
        if state is not None and state not in SANDBOX_STATES:
            raise RouteError(
                "INVALID_STATE", f"State must be 'running' or 'stopped', not {state!r}"
            )
        current = self.sandboxes.get(sandbox) or Sandbox(sandbox)
        if upstream_host is not None and self.own_ports:
            for route in self.sandbox_routes(sandbox):
                if route.target is None:
                    self._refuse_own(upstream_host, route.port)
        updated = Sandbox(
            sandbox,
            current.upstream_host if upstream_host is None else upstream_host,
            current.state if state is None else state,
        )
        if sandbox not in self.sandboxes or updated != current:
            self._put_sandbox(txn, updated)
        return updated.to_record()

    def _destroy_sandbox(
        self, txn: Transaction, op: str, sandbox: str
    ) -> dict[str, Any]:
        sandbox = self._check_sandbox(sandbox)
        doomed = self.sandbox_routes(sandbox)
        for route in doomed:
            self._del_route(txn, route)
        existed = sandbox in self.sandboxes
        if existed:
            self._del_sandbox(txn, sandbox)
        return {"sandbox": sandbox, "destroyed": existed, "routes": len(doomed)}

    def _check_not_own(
        self, sandbox: str, port: int, current: Route | None, target: str | None
    ) -> None:
        """Refuse a route whose upstream would be one of our own listeners."""
        if target is None and current is not None:
            target = current.target  # a re-expose keeps the target
        sb = self.sandboxes.get(sandbox)
        host = sb.upstream_host if sb else DEFAULT_UPSTREAM_HOST
        self._check_target_or_host(port, target, host)

    def _check_target_or_host(self, port: int, target: str | None, host: str) -> None:
        if target:
            where = parse_target(target)
            if isinstance(where, str):
                if same_socket(where, self.own_paths):
                    raise RouteError(
                        "OWN_LISTENER",
                        f"Target {target!r} is this router's own socket; "
                        "a route to it would bypass the router's checks",
                    )
                return
            self._refuse_own(where[0], where[1])
            return
        self._refuse_own(host, port)

    def leads_to_own(self, port: int, target: str | None, host: str) -> bool:
        """Whether a route (its port, target, sandbox host) reaches one of
        the router's own listeners."""
        try:
            self._check_target_or_host(port, target, host)
        except RouteError:
            return True
        return False

    def _refuse_own(self, host: str, port: int) -> None:
        if port in self.own_ports and (
            port in self.own_wildcard_ports or _reaches_us(host, self.own_hosts)
        ):
            raise RouteError(
                "OWN_LISTENER",
                f"Port {port} on {host} is one of this router's own listeners; "
                "a route to it would send requests back into the router",
            )

    # -- queries (no transaction) ----------------------------------------

    def get_exposed_ports(
        self, sandbox: str, hostname: str | None = None
    ) -> list[dict[str, Any]]:
        sandbox = grammar.check_sandbox(sandbox)
        url_host = self._hostname(hostname)
        sb = self.sandboxes.get(sandbox)
        status = "stale" if sb is not None and sb.state == "stopped" else "active"
        out = []
        for route in self.sandbox_routes(sandbox):
            item = self._exposed(route, route.label, url_host)
            del item["token"]
            item["status"] = status
            out.append(item)
        return out

    def validate_port_token(self, sandbox: str, port: object, token: str) -> bool:
        """True when ``token`` opens ``port``; compared in constant time."""
        try:
            sandbox = grammar.check_sandbox(sandbox)
            port = grammar.check_port(port, frozenset())
        except RouteError:
            return False
        route = self.route(sandbox, port)
        expected = route.token if route is not None else "\0" * grammar.MAX_TOKEN
        given = token if isinstance(token, str) else ""
        match = hmac.compare_digest(expected.encode(), given.encode())
        return match and route is not None

    def route(self, sandbox: str, port: int) -> Route | None:
        ports = self._ports(sandbox)
        return ports.get(port) if ports else None

    def label_holder(self, label: str) -> tuple[str, int] | None:
        """(sandbox, port) of the route whose label is ``label``."""
        if label in self.pending_labels:
            held = self.pending_labels[label]
            return None if held is None else (held.sandbox, held.port)
        forwarding = self.forwarding
        hit = forwarding.index.lookup(label.encode())
        if hit is None:
            return None
        name = forwarding.sandbox_names[hit[1]]
        assert name is not None
        return name, hit[2]

    def sandbox_routes(self, sandbox: str) -> list[Route]:
        """The sandbox's routes, sorted by port."""
        ports = self._ports(sandbox) or {}
        return [ports[p] for p in sorted(ports)]

    # -- helpers ---------------------------------------------------------

    @staticmethod
    def _stamp(txn: Transaction) -> str:
        txn.exposed_at = now_iso()
        return txn.exposed_at

    def _check_sandbox(self, sandbox: object) -> str:
        # A sandbox the table has is a valid, lower-case id: its check is
        # skipped, a fifth of the cost of a bulk expose.
        if type(sandbox) is str and sandbox in self.sandboxes:
            return sandbox
        return grammar.check_sandbox(sandbox)

    def _hostname(self, hostname: str | None) -> str:
        if hostname is None:
            return self.default_hostname
        host = grammar.check_hostname(hostname, self.domains)
        if self.public_port and ":" not in host and grammar.is_local_hostname(host):
            # Browsers reach a local name on the port it is served on, not
            # on 80: the URL carries the router's port, as the default does.
            return f"{host}:{self.public_port}"
        return host

    def _exposed(self, route: Route, label: str, url_host: str) -> dict[str, Any]:
        return {
            "port": route.port,
            "url": grammar.build_url(label, url_host),
            "name": route.name,
            "token": route.token,
            "exposedAt": route.exposed_at,
        }

    def _token_owner(
        self, sandbox: str, token: str, ports: dict[int, Route] | None
    ) -> int | None:
        """The port of ``sandbox`` that has ``token``; ``ports`` are its routes."""
        if ports is None:
            return None
        if len(ports) <= TOKEN_SCAN_LIMIT:
            for route in ports.values():
                if route.token == token:
                    return route.port
            return None
        tokens = self.tokens.get(sandbox)
        if tokens is None:
            tokens = self.tokens[sandbox] = {r.token: p for p, r in ports.items()}
        return tokens.get(token)

    def _fresh_token(self, sandbox: str, port: int) -> str:
        while True:
            token = grammar.generate_token()
            label = grammar.make_label(port, sandbox, token)
            if (
                self.label_holder(label) is None
                and self._token_owner(sandbox, token, self._ports(sandbox)) is None
            ):
                return token

    def _del_record(self, route: Route) -> Record:
        return {
            "op": "del_route",
            "sandbox": route.sandbox,
            "port": route.port,
            "label": route.label,
            "route_id": route.route_id,
        }

    # Each change is made three ways at once: the record for the store and
    # the watch stream, what it replaced (for ``rollback``), and the change
    # to the table's own maps.  The objects at hand are used as they are: a
    # bulk change spends half its time here.

    def _put_route(
        self, txn: Transaction, route: Route, label: str, old: Route | None
    ) -> None:
        """Route ``route`` (its label is ``label``) in place of ``old``,
        the port's route with the same label, or of no route."""
        txn.undo.append(old)
        txn.changes.append({"op": "put_route", "route": route.to_record()})
        self._set_route(route, label)

    def _del_route(self, txn: Transaction, route: Route) -> None:
        rec = self._del_record(route)
        txn.undo.append(route)
        txn.changes.append(rec)
        self._drop_route(route.sandbox, route.port, rec["label"])

    def _put_sandbox(self, txn: Transaction, sb: Sandbox) -> None:
        txn.undo.append(self.sandboxes.get(sb.name))
        txn.changes.append({"op": "put_sandbox", "sandbox": sb.to_record()})
        self.sandboxes[sb.name] = sb

    def _del_sandbox(self, txn: Transaction, name: str) -> None:
        txn.undo.append(self.sandboxes.pop(name))
        txn.changes.append({"op": "del_sandbox", "name": name})

    def _apply(self, rec: Record) -> None:
        """A change record on the table's own maps, as a follower replays
        the watch stream (the rules were enforced where it was made).

        The forwarding view follows in ``finish`` (``ForwardingTable.apply``);
        until then the labels moved here are noted in ``pending_labels``.
        """
        op = rec["op"]
        if op == "put_route":
            route = Route.from_record(rec["route"])
            self._set_route(route, route.label)
        elif op == "del_route":
            self._drop_route(rec["sandbox"], rec["port"], rec["label"])
        elif op == "put_sandbox":
            sb = rec["sandbox"]
            self.sandboxes[sb["name"]] = Sandbox(
                sb["name"], sb["upstream_host"], sb["state"]
            )
        else:
            del self.sandboxes[rec["name"]]

    def _set_route(self, route: Route, label: str) -> None:
        ports = self._ports(route.sandbox)
        if ports is None:
            ports = self.by_sandbox[route.sandbox] = {}
        old = ports.get(route.port)
        if old is None:
            self.routes.count += 1
        ports[route.port] = route
        tokens = self.tokens.get(route.sandbox)
        if tokens is not None:
            if old is not None:
                del tokens[old.token]
            tokens[route.token] = route.port
        if route.route_id >= self.next_route_id:
            self.next_route_id = route.route_id + 1
        self.pending_labels[label] = route

    def _drop_route(self, sandbox: str, port: int, label: str) -> None:
        ports = self._ports(sandbox)
        assert ports is not None
        gone = ports.pop(port)
        self.routes.count -= 1
        tokens = self.tokens.get(sandbox)
        if tokens is not None:
            del tokens[gone.token]
        if not ports:
            del self.by_sandbox[sandbox]
            self.tokens.pop(sandbox, None)
        self.pending_labels[label] = None

    def _settled(self, txn: Transaction) -> None:
        # With nothing left in flight the forwarding view is the whole
        # truth again, and the notes of moved labels can go.
        self.pending.discard(id(txn))
        if not self.pending:
            self.pending_labels.clear()


class RouteSource(Protocol):
    """Where a table loaded with ``RouteTable.load_index`` reads its routes."""

    def routes_of(self, sandbox: str | None) -> list[Route]:
        """One sandbox's stored routes, or every stored route for None."""
        ...


class RoutesView(Mapping[tuple[str, int], Route]):
    """Every route by ``(sandbox, port)``, read-only, over the table's."""

    __slots__ = ("count", "table")

    def __init__(self, table: RouteTable) -> None:
        self.table = table
        self.count = 0  # kept by RouteTable, which makes every change

    def __getitem__(self, key: tuple[str, int]) -> Route:
        try:
            sandbox, port = key
        except (TypeError, ValueError):
            # Not a (sandbox, port) pair: absent, as from a dict.
            raise KeyError(key) from None
        route = self.table.route(sandbox, port)
        if route is None:
            raise KeyError(key)
        return route

    def __iter__(self) -> Iterator[tuple[str, int]]:
        self.table.page_in_all()
        for name, ports in self.table.by_sandbox.items():
            for port in ports:
                yield name, port

    def __len__(self) -> int:
        return self.count


@dataclass(slots=True)
class SandboxView:
    name: str
    upstream_host: str
    stopped: bool


class ForwardingTable:
    """What the data path reads: label → upstream, as compact as it gets.

    Built only from change records (or a snapshot), so a worker process that
    follows the watch stream holds the same table as the router that made
    the changes.  ``resolve`` is the per-request call.
    """

    def __init__(self, domains: tuple[str, ...]) -> None:
        self.domains = tuple(d.encode() for d in domains)
        self.index = _labels.LabelIndex()
        # A sandbox is a slot in three parallel arrays rather than an object
        # of its own: at a million routes an object per sandbox was a tenth
        # of a worker's table.  Slot 0 is never used (``None``).
        self.sandbox_names: list[str | None] = []
        self.sandbox_hosts: list[str | None] = []
        self.sandbox_stopped = bytearray()
        self.sandbox_slots: dict[str, int] = {}
        self._free_sandbox_slots: list[int] = []
        # Upstream host → the one copy of it the sandboxes share, and how
        # many use it: a host no sandbox uses any more is dropped (with an
        # IP per sandbox, a churn of sandboxes would otherwise keep every
        # address ever used).
        self._hosts: dict[str, str] = {}
        self._host_refs: dict[str, int] = {}
        # Slot 0 means "the sandbox's upstream host, same port".
        self.targets: list[tuple[str, int] | str | None] = []
        self.target_slots: dict[str, int] = {}
        self.target_refs: list[int] = []
        # slot → the target as exposed, so a freed slot's key is found
        # without scanning ``target_slots``.
        self.target_names: list[str | None] = []
        self._free_target_slots: list[int] = []
        self._empty()

    def _empty(self) -> None:
        """Back to no sandboxes and no routes, in place, never replaced:
        the data path holds on to the index and the lists
        (``router.speedups.proxy.Proxy``)."""
        self.index.clear()
        self.sandbox_names[:] = [None]
        self.sandbox_hosts[:] = [None]
        self.sandbox_stopped[:] = bytes(1)
        self.sandbox_slots.clear()
        self._free_sandbox_slots.clear()
        self._hosts.clear()
        self._host_refs.clear()
        self.targets[:] = [None]
        self.target_slots.clear()
        self.target_refs[:] = [0]
        self.target_names[:] = [None]
        self._free_target_slots.clear()

    def apply(self, rec: Record) -> None:
        op = rec["op"]
        if op == "put_route":
            self.put_route(rec["route"])
        elif op == "del_route":
            self.del_route(rec["label"])
        elif op == "put_sandbox":
            sb = rec["sandbox"]
            self._put_sandbox(sb["name"], sb["upstream_host"], sb["state"] == "stopped")
        else:
            self.del_sandbox(rec["name"])

    def put_sandbox(self, sb: Sandbox) -> None:
        self._put_sandbox(sb.name, sb.upstream_host, sb.state == "stopped")

    def _put_sandbox(self, name: str, upstream_host: str, stopped: bool) -> None:
        # Nearly every sandbox has the same upstream host; a snapshot read
        # from JSON would otherwise hold one copy of it per sandbox.
        host = self._hosts.setdefault(upstream_host, upstream_host)
        self._host_refs[host] = self._host_refs.get(host, 0) + 1
        slot = self.sandbox_slots.get(name)
        if slot is not None:
            self._release_host(self.sandbox_hosts[slot])
        else:
            if self._free_sandbox_slots:
                slot = self._free_sandbox_slots.pop()
            else:
                slot = len(self.sandbox_names)
                self.sandbox_names.append(None)
                self.sandbox_hosts.append(None)
                self.sandbox_stopped.append(0)
            self.sandbox_slots[name] = slot
        self.sandbox_names[slot] = name
        self.sandbox_hosts[slot] = host
        self.sandbox_stopped[slot] = stopped

    def del_sandbox(self, name: str) -> None:
        slot = self.sandbox_slots.pop(name)
        self._release_host(self.sandbox_hosts[slot])
        self.sandbox_names[slot] = None
        self.sandbox_hosts[slot] = None
        self.sandbox_stopped[slot] = 0
        self._free_sandbox_slots.append(slot)

    def _release_host(self, host: str | None) -> None:
        assert host is not None
        refs = self._host_refs[host] - 1
        if refs:
            self._host_refs[host] = refs
        else:
            del self._host_refs[host]
            del self._hosts[host]

    def sandbox_view(self, slot: int) -> SandboxView | None:
        """The sandbox in ``slot`` as one object (tests, slow paths)."""
        name = self.sandbox_names[slot]
        host = self.sandbox_hosts[slot]
        if name is None or host is None:
            return None
        return SandboxView(name, host, bool(self.sandbox_stopped[slot]))

    def put_route(self, route: Record) -> None:
        """A route record (``Route.to_record``) in, straight into the index.

        The label is made there, not here: this runs for every change, in
        the router and in each worker.  The index's flag 1 is
        ``FLAG_PRESERVE_HOST``.
        """
        old = self.index.put_route(route, self.sandbox_slots, self._target_slot)
        if old is not None:
            # Released after the new target is taken: a route that keeps
            # its target keeps its slot.
            self._release_target(old)

    def del_route(self, label: str) -> None:
        key = label.encode()
        old = self.index.lookup(key)
        if old is not None:
            self._release_target(old[3])
            self.index.remove(key)

    def _target_slot(self, target: str) -> int:
        slot = self.target_slots.get(target)
        if slot is None:
            parsed = parse_target(target)
            # Free slots are reused last-freed first, as for sandboxes: the
            # undo records of a refused batch then give every slot back as
            # it was, and a follower replaying the changes numbers them alike.
            if self._free_target_slots:
                slot = self._free_target_slots.pop()
                self.targets[slot] = parsed
                self.target_names[slot] = target
            else:
                slot = len(self.targets)
                self.targets.append(parsed)
                self.target_names.append(target)
                self.target_refs.append(0)
            self.target_slots[target] = slot
        self.target_refs[slot] += 1
        return slot

    def _release_target(self, slot: int) -> None:
        if slot == 0:
            return
        self.target_refs[slot] -= 1
        if self.target_refs[slot] == 0:
            name = self.target_names[slot]
            assert name is not None
            del self.target_slots[name]
            self.targets[slot] = None
            self.target_names[slot] = None
            self._free_target_slots.append(slot)

    # -- a worker's copy, streamed ----------------------------------------
    #
    # A worker process starts from this table alone (never from route names
    # and exposure times, which the router may still have only in its store:
    # ``RouteTable.load_index``): first the sandboxes and the route count,
    # then the routes in chunks, so that neither side ever holds a million
    # of them as Python objects at once.

    def export_sandboxes(self) -> list[list[Any]]:
        """Every sandbox as ``[name, upstream_host, stopped]``."""
        names, hosts, stopped = (
            self.sandbox_names,
            self.sandbox_hosts,
            self.sandbox_stopped,
        )
        return [
            [names[slot], hosts[slot], bool(stopped[slot])]
            for slot in range(1, len(names))
            if names[slot] is not None
        ]

    def export_routes(self, size: int) -> Iterator[list[list[Any]]]:
        """Every route as a ``LabelIndex.load_rows`` row, ``[sandbox, port,
        token, route_id, target, flags]``, ``size`` at a time.  The table
        must not change until the end."""
        names, targets = self.sandbox_names, self.target_names
        chunk: list[list[Any]] = []
        for label, (route_id, sb, port, t, flags) in self.index.iter_items():
            sandbox = names[sb]
            assert sandbox is not None
            # The label is "{port}-{sandbox}-{token}"; names are ASCII.
            token = label[len(str(port)) + len(sandbox) + 2 :].decode()
            chunk.append([sandbox, port, token, route_id, targets[t], flags])
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def import_sandboxes(self, sandboxes: list[list[Any]], routes: int) -> None:
        """Start over from ``export_sandboxes``, with room for ``routes``."""
        self._empty()
        for name, host, stopped in sandboxes:
            self.put_sandbox(Sandbox(name, host, "stopped" if stopped else "running"))
        self.index.reserve(routes)

    def import_routes(self, chunk: list[list[Any]]) -> None:
        """One chunk of ``export_routes``."""
        self.index.load_rows(chunk, self.sandbox_slots, self._target_slot)

    def load_snapshot(self, snap: dict[str, Any]) -> None:
        self._empty()
        for sb in snap["sandboxes"]:
            self.put_sandbox(Sandbox(sb["name"], sb["upstream_host"], sb["state"]))
        self.index.reserve(len(snap["routes"]))
        for r in snap["routes"]:
            self.put_route(r)
        self.index.compact()
