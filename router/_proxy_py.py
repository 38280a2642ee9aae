"""The HTTP/1.1 data path: client connections, upstream pools, revocation.

One ``ClientConnection`` per accepted socket, one ``UpstreamConnection`` per
socket to a sandbox port.  Both are bare asyncio protocols (no streams, no
task per request): on a pooled keep-alive upstream a request is parsed,
routed and written upstream inside one ``data_received`` call, which is what
lets a Python proxy stand next to nginx.  Tasks are made only to connect.

Per request (SPEC §1, §3, §4):

1. parse the head (compiled parser, ``speedups.http``);
2. Host → label → route: one hash lookup, authorisation on every request;
3. take an idle upstream connection of that sandbox and target, or connect;
4. write the rewritten head, then relay the body both ways with
   backpressure, the framing decided by the parser;
5. when both directions are done, the upstream goes back to its pool and
   the next pipelined request (if any) is parsed.

Timers are not per request: a sweeper wakes once a second and checks each
connection's one deadline (head, idle, response, grace).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import math
import socket
import time
from collections.abc import Callable
from typing import Any, cast

from . import answers, grammar
from .config import Config
from .errors import RouteError
from .listeners import hostport
from .quiet import Repeats
from .routes import FLAG_PRESERVE_HOST, ForwardingTable, parse_target, same_socket
from .speedups import http, labels
from .speedups import tunnel as _tunnel
from .splice import SpliceRelay, can_splice, has_more

log = logging.getLogger("edge_router")
access_log = logging.getLogger("edge_router.access")

Address = tuple[str, int] | str

# Client connection states.
HEAD = 0  # waiting for (the rest of) a request head
ACTIVE = 1  # a request is being relayed
TUNNEL = 2  # upgraded: bytes flow both ways untouched
CLOSED = 3
LINGER = 4  # last answer sent and writing ended: what comes in is dropped

# Deadline kinds, checked by the sweeper.
DL_NONE = 0
DL_IDLE = 1
DL_HEAD = 2
DL_RESPONSE = 3
DL_GRACE = 4
DL_TUNNEL_IDLE = 5
DL_LINGER = 6

GOING_AWAY = _tunnel.GOING_AWAY
POLICY_VIOLATION = _tunnel.POLICY_VIOLATION
Tunnel = _tunnel.Tunnel
accept_key = _tunnel.accept_key

# What every request calls: compiled, a typed ``Codec`` whose methods are C
# calls (``_speedups/router/_chttp.pyx``), and the framing kinds are C ints.
codec = http.Codec()

BODY_NONE = http.BODY_NONE
BODY_LENGTH = http.BODY_LENGTH
BODY_CHUNKED = http.BODY_CHUNKED
BODY_CLOSE = http.BODY_CLOSE

HIGH_WATER = 256 * 1024
MAX_IDLE_PER_POOL = 64
UPSTREAM_IDLE_SECONDS = 30.0
# How long a closing connection keeps reading what its client still sends
# (``ClientConnection._close``); nginx's lingering_timeout is 5 s too.
LINGER_SECONDS = 5.0
# UPSTREAM_UNAVAILABLE's message when the port did not refuse: nothing
# answered at all (the default message says it refused).
UNREACHABLE = "The sandbox port could not be reached"


def _where(address: Address) -> str:
    """An upstream address as an operator writes it: host:port, [v6]:port,
    or a socket path."""
    return address if isinstance(address, str) else hostport(*address)


def _shown(value: bytes) -> str:
    """``value`` for a log line: as it is when printable ASCII, else with
    escapes, so that a Host or target sent to us cannot write terminal
    control sequences into an operator's log."""
    text = value.decode("latin-1")
    if text.isascii() and text.isprintable():
        return text
    return ascii(text)[1:-1]


# RFC 9110 §9.2.2: the methods whose requests may be repeated.
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))


def _not_connected(data: bytes) -> None:
    raise RuntimeError("write before connection_made")


def _not_connected_yet() -> bool:
    return True


class Stats:
    __slots__ = (
        "connections",
        "errors",
        "requests",
        "revoked",
        "splices",
        "upstream_connects",
    )

    def __init__(self) -> None:
        self.splices = 0
        self.connections = 0
        self.requests = 0
        self.errors = 0
        self.revoked = 0
        self.upstream_connects = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Proxy:
    """Everything the connections of one listener share."""

    def __init__(
        self,
        config: Config,
        table: ForwardingTable,
        loop: asyncio.AbstractEventLoop,
        internal: bool = False,
    ) -> None:
        self.config = config
        # The trusted internal entry (SPEC §6) routes by X-Sandbox-Id and
        # X-Sandbox-Port instead of the Host label; the public one never.
        self.internal = internal
        # Reserved ports (SPEC §1) are not valid ports there either.
        self.reserved_ports = frozenset(config.reserved_ports)
        self.table = table
        # What a request reads of the table, held here so that the lookup
        # is one step (the table keeps these objects for its lifetime).
        self.index = table.index
        self.hit = labels.Hit()
        self.sandbox_names = table.sandbox_names
        self.sandbox_hosts = table.sandbox_hosts
        self.sandbox_stopped = table.sandbox_stopped
        self.targets = table.targets
        self.loop = loop
        self.now = loop.time
        self.head_timeout = config.head_timeout
        self.idle_timeout = config.idle_timeout
        self.response_timeout = config.response_timeout
        self.grace = config.grace
        self.domains = table.domains
        self.max_head = config.max_head
        self.max_body = config.max_body
        self.access_log = config.access_log and access_log.isEnabledFor(logging.INFO)
        self.trusted = config.trusted_networks()
        self.fallback: Address | None = (
            parse_target(config.fallback) if config.fallback else None
        )
        # The router's own Unix sockets, checked at each connect to a path:
        # what a path leads to can change after its route was made (a
        # link put there later), and a route into the internal entry or
        # the control socket would skip every check.
        self.own_sockets = config.unix_listeners()
        self.pools: dict[tuple[str, Address], list[UpstreamConnection]] = {}
        # Bumped when a pool list is dropped (an upstream connection made
        # before holds a list no one takes from any more) and when routes
        # change (``route_pools`` below, and the connections' copies of its
        # entries, no longer hold).
        self.pool_epoch = 0
        # route id → what its requests were last sent to, the pool of that,
        # and the Host it gets: (sandbox name, target, upstream host, port,
        # pool key, pool, ``localhost:{port}``).
        # A request whose route still says the same (the same objects from
        # the table) neither builds the key nor hashes it.
        self.route_pools: dict[int, tuple[Any, ...]] = {}
        self.local_hosts: dict[int, bytes] = {}
        self.clients: set[ClientConnection] = set()
        # route_id → connections whose last request was on that route (the
        # ones relaying one right now have that ``route_id`` too).  A
        # connection stays listed between requests, so that a kept-alive
        # client of one route costs no set insert and removal per request.
        self.by_route: dict[int, set[ClientConnection]] = {}
        self.draining = False
        self.tunnel_idle = config.tunnel_idle_timeout
        self.stats = Stats()
        # Upstream warnings, one line a cause every ten seconds.
        self.repeats = Repeats()
        self._sweeper: asyncio.TimerHandle | None = None

    def local_host(self, port: int) -> bytes:
        """``localhost:{port}``, the rewritten Host, made once per port."""
        host = self.local_hosts[port] = b"localhost:%d" % port
        return host

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    def begin_drain(self) -> None:
        """Shutdown: idle connections close, tunnels get 1001 both ways.

        Requests in flight finish (new ones on kept-alive connections get
        503 ``SHUTTING_DOWN``); ``stop`` cuts whatever is left.
        """
        self.draining = True
        for conn in list(self.clients):
            if conn.tunnel is not None:
                conn.end_tunnel(GOING_AWAY, GOING_AWAY, "router shutting down")
            elif conn.state == HEAD and not conn.buf:
                conn._close()

    def stop(self) -> None:
        for conn in list(self.clients):
            conn._close(linger=False)
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._tell_repeats(math.inf)
        for pool in self.pools.values():
            for up in pool:
                up.close()
        self._drop_pools(list(self.pools))

    def protocol(self) -> asyncio.Protocol:
        # Compiled, the connections are extension types, which cannot
        # subclass asyncio.Protocol; the loop needs only their methods.
        return cast(asyncio.Protocol, ClientConnection(self))

    def _sweep(self) -> None:
        now = self.loop.time()
        idle = self.tunnel_idle
        for conn in list(self.clients):
            deadline = conn.deadline
            if deadline < 0:
                # Armed since the last sweep by ``_arm_from_sweep``: it
                # starts now.
                conn.deadline = now - deadline
            elif deadline and now >= deadline:
                conn.deadline_passed()
            elif idle and conn.tunnel is not None and now - conn.last_active > idle:
                conn.end_tunnel(GOING_AWAY, GOING_AWAY, "tunnel idle")
        for rid in [rid for rid, conns in self.by_route.items() if not conns]:
            del self.by_route[rid]
        for pool in self.pools.values():
            keep = []
            for up in pool:
                if up.idle_since < 0:  # given back since the last sweep
                    up.idle_since = now
                if now - up.idle_since < UPSTREAM_IDLE_SECONDS:
                    keep.append(up)
                else:
                    up.close()
            # In place: connections in use and cached routes hold this list.
            pool[:] = keep
        self._drop_pools([key for key, pool in self.pools.items() if not pool])
        if len(self.repeats):
            self._tell_repeats(now)
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    def _tell_repeats(self, now: float) -> None:
        for cause, held in self.repeats.ended(now):
            self._repeated(cause, held)

    def _repeated(self, cause: object, held: int) -> None:
        window = self.repeats.window
        log.warning("%s: repeated %d more times within %g s", cause, held, window)

    def warn(self, cause: str, detail: str = "") -> None:
        """A warning about an upstream, at most once a window per ``cause``.

        The ones held back are counted, and the count is told when the
        window ends, or before the cause's next line if that comes first.
        """
        held = self.repeats.let_through(cause, self.loop.time())
        if held is None:
            return
        if held:
            self._repeated(cause, held)
        log.warning("%s%s", cause, detail)

    # -- revocation (SPEC §2) -------------------------------------------

    def revoke_routes(
        self, route_ids: set[int], sandboxes: set[str], stopped: set[str]
    ) -> None:
        """Routes died or sandboxes stopped or went: end what they relay.

        Requests not yet started re-check the table anyway; this handles
        the ones in flight.  Other routes' connections are not touched.  A
        request still waiting for its response gets the answer a new one
        would: 410 when only its sandbox stopped, else 404.
        """
        doomed: set[ClientConnection] = set()
        for rid in route_ids:
            for conn in self.by_route.get(rid, ()):
                if conn.route_id == rid:
                    doomed.add(conn)
        if sandboxes:
            for conn in self.clients:
                if conn.sandbox in sandboxes and conn.state in (ACTIVE, TUNNEL):
                    doomed.add(conn)
        for conn in doomed:
            self.stats.revoked += 1
            stale = conn.sandbox in stopped and conn.route_id not in route_ids
            conn.revoke("STALE_PREVIEW_URL" if stale else "INVALID_TOKEN")

    def on_change(self, message: dict[str, Any]) -> None:
        """Watch message from the route table (applied already).

        What is revoked is what the whole message changed: a batch that
        deletes a label and puts it back (unexpose and expose with the same
        token, a rotation there and back) or stops a sandbox and starts it
        again never made a URL stop working, so nothing in flight on it
        ends.  Such a label's connections go on under its new route id,
        where a later revocation finds them.
        """
        # Per label touched: the (route id, sandbox) of the first record on
        # it, and of the last (None if that deleted it).  Only routes that
        # were there before the message have connections, so a first record
        # that made a route names one with none; an update in place keeps
        # its route's id.  One label can be two sandboxes' (``a-b`` token
        # ``c``, ``a`` token ``b-c``): a label handed to another sandbox is
        # a revocation, not a move.
        self.route_pools.clear()
        self.pool_epoch += 1  # and the connections' copies
        before: dict[str, tuple[int, str]] = {}
        after: dict[str, tuple[int, str] | None] = {}
        final: dict[str, str] = {}  # each sandbox's state at the end
        for rec in message["changes"]:
            op = rec["op"]
            if op == "del_route":
                label = rec["label"]
                before.setdefault(label, (rec["route_id"], rec["sandbox"]))
                after[label] = None
            elif op == "put_route":
                route = rec["route"]
                label = grammar.make_label(
                    route["port"], route["sandbox"], route["token"]
                )
                now = (route["route_id"], route["sandbox"])
                before.setdefault(label, now)
                after[label] = now
            elif op == "put_sandbox":
                final[rec["sandbox"]["name"]] = rec["sandbox"]["state"]
            elif op == "del_sandbox":
                final[rec["name"]] = "destroyed"
        route_ids: set[int] = set()
        for label, (old, owner) in before.items():
            last = after[label]
            if last is None or last[1] != owner:
                route_ids.add(old)
            elif last[0] != old:
                self._move_route(old, last[0])
        stopped = {name for name, state in final.items() if state == "stopped"}
        sandboxes = {name for name, state in final.items() if state != "running"}
        if route_ids or sandboxes:
            self.revoke_routes(route_ids, sandboxes, stopped)
        if sandboxes:
            self._close_pools_of(sandboxes)

    def _move_route(self, old: int, new: int) -> None:
        conns = self.by_route.pop(old, None)
        if not conns:
            return
        for conn in conns:
            conn.listed_route = new
            if conn.route_id == old:
                conn.route_id = new
                if conn.tunnel is not None:
                    conn.tunnel.route_id = new
        moved = self.by_route.get(new)
        if moved is None:
            self.by_route[new] = conns
        else:
            moved |= conns

    # -- upstream pool ---------------------------------------------------

    def pool_of(self, key: tuple[str, Address]) -> list[UpstreamConnection]:
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = []
        return pool

    def _close_pools_of(self, sandboxes: set[str]) -> None:
        """Idle connections to sandboxes that stopped or went are closed now,
        not when their 30 s are up: nothing will be sent on them, and they
        hold a socket (and a server's slot) each on both sides."""
        keys = [key for key in self.pools if key[0] in sandboxes]
        for key in keys:
            for up in self.pools[key]:
                up.close()
        self._drop_pools(keys)

    def _drop_pools(self, keys: list[tuple[str, Address]]) -> None:
        if not keys:
            return
        for key in keys:
            del self.pools[key]
        self.pool_epoch += 1
        self.route_pools.clear()

    def take(self, pool: list[UpstreamConnection]) -> UpstreamConnection | None:
        while pool:
            up = pool.pop()
            if up.transport is not None and not up.is_closing():
                return up
        return None

    def give_back(self, up: UpstreamConnection) -> None:
        pool = up.pool
        if up.pool_epoch != self.pool_epoch:
            pool = up.pool = self.pool_of(up.key)
            up.pool_epoch = self.pool_epoch
        if len(pool) >= MAX_IDLE_PER_POOL or self.draining:
            up.close()
            return
        # Idle from the next sweep on (see ``_arm_from_sweep``): about 30 s
        # is as good as 30 s here, and a clock read per request is not free.
        up.idle_since = -1.0
        pool.append(up)

    def forget(self, up: UpstreamConnection) -> None:
        pool = self.pools.get(up.key)
        if pool and up in pool:
            pool.remove(up)

    async def connect(self, key: tuple[str, Address]) -> UpstreamConnection:
        """Connect to a sandbox port, retrying refusals for a short window.

        A port that is just starting refuses for a moment; the SDK's users
        expect the first request after ``exposePort`` to work, so refused
        connects are retried with backoff before answering 502.
        """
        address = key[1]
        if isinstance(address, str) and same_socket(address, self.own_sockets):
            raise PermissionError(f"{address} is this router's own socket")
        deadline = self.loop.time() + self.config.retry_window
        delay = 0.02
        while True:
            try:
                up = UpstreamConnection(self, key)
                factory = _factory(up)
                if isinstance(address, str):
                    coro = self.loop.create_unix_connection(factory, address)
                else:
                    coro = self.loop.create_connection(factory, address[0], address[1])
                # 0 is no limit, as for the other timeouts.
                timeout = self.config.connect_timeout or None
                await asyncio.wait_for(coro, timeout)
                self.stats.upstream_connects += 1
                return up
            except (ConnectionRefusedError, FileNotFoundError):
                if self.loop.time() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.25)
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                    if self.loop.time() + delay > deadline:
                        raise ConnectionRefusedError(str(exc)) from exc
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.25)
                    continue
                raise


class ClientConnection:
    """One client socket: requests in, responses out, in order."""

    __slots__ = (
        "body_unread",
        "buf",
        "deadline",
        "deadline_kind",
        "forwarded",
        "forwarded_block",
        "forwarded_for",
        "forwarded_host",
        "head",
        "keep_alive",
        "label",
        "last_active",
        "listed_route",
        "paused",
        "peer",
        "pending_body",
        "proxy",
        "read_again",
        "reading",
        "req_done",
        "req_framer",
        "req_framing",
        "req_remaining",
        "route_id",
        "sandbox",
        "seen_host",
        "seen_label",
        "sent",
        "sent_epoch",
        "sent_to",
        "serial",
        "started",
        "state",
        "status",
        "transport",
        "tunnel",
        "upstream",
        "write",
    )

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        # ``transport.write``, looked up once (as ``UpstreamConnection``'s).
        self.write: Callable[[bytes], None] = _not_connected
        self.peer = ""
        self.forwarded = b""
        self.forwarded_for = b""
        self.forwarded_host = b""
        self.forwarded_block = b""
        # The last Host seen and its label (``_read_request``); the domains
        # that label depends on are the proxy's for its whole life.
        self.seen_host: bytes | None = None
        self.seen_label: bytes | None = None
        # The last request's entry of ``Proxy.route_pools``, and the
        # ``Proxy.pool_epoch`` it was taken at.
        self.sent_to: tuple[Any, ...] | None = None
        self.sent_epoch = -1
        self.buf = b""
        self.state = HEAD
        self.deadline = 0.0
        self.deadline_kind = DL_NONE
        self.head: Any = None
        self.upstream: UpstreamConnection | None = None
        self.route_id = 0
        # The route whose ``Proxy.by_route`` set holds this connection.
        self.listed_route = 0
        self.sandbox = ""
        self.req_framing = 0
        self.req_remaining = 0
        self.req_framer: Any = None
        self.req_done = True
        self.pending_body: list[bytes] = []
        self.paused = False
        self.keep_alive = True
        self.started = 0.0
        self.status = 0
        self.sent = 0
        self.label = b""
        self.tunnel: Tunnel | None = None
        self.last_active = 0.0
        # A body this connection will not read may still be on its way: its
        # end waits for the client (``_close``).
        self.body_unread = False
        # ``_next_request`` is running, and has another request to read.
        self.reading = False
        self.read_again = False
        # Requests begun on this connection, to tell a late connect's
        # result from the current request's (``_connect``).
        self.serial = 0

    # -- asyncio callbacks -----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = transport  # type: ignore[assignment]
        self.write = self.transport.write  # type: ignore[union-attr]
        proxy = self.proxy
        proxy.clients.add(self)
        proxy.stats.connections += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # A Unix socket (internal listener) has no Nagle to turn off.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peername = transport.get_extra_info("peername")
        sockname = transport.get_extra_info("sockname")
        self.peer = peername[0] if isinstance(peername, tuple) else "unix"
        port = sockname[1] if isinstance(sockname, tuple) else 0
        # X-Forwarded-Proto and -Port depend only on the listener; -For on
        # the peer.  Built once per connection, not per request.
        self.forwarded = b"X-Forwarded-Proto: http\r\nX-Forwarded-Port: %d\r\n" % port
        self.forwarded_for = b"X-Forwarded-For: " + self.peer.encode() + b"\r\n"
        self._arm_from_sweep(DL_IDLE, proxy.idle_timeout)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == TUNNEL:
            tunnel = self.tunnel
            if tunnel is not None:
                tunnel.from_client(data)
                if self.proxy.tunnel_idle:
                    self.last_active = self.proxy.now()
            return
        if state == ACTIVE and not self.req_done:
            self._request_body(data)
            return
        if state == LINGER:
            return
        if self.buf:
            self.buf += data
        else:
            self.buf = data
        if state == HEAD:
            self._next_request()
        elif len(self.buf) > self.proxy.max_head and self.transport is not None:
            # Pipelined requests waiting behind a slow response: stop reading
            # rather than buffer without bound.
            self._pause_client()

    def eof_received(self) -> bool:
        # TCP cannot tell a client that shut down writing from one that went
        # away.  A whole request that said it was the last (HTTP/1.0, or
        # ``Connection: close``), then shutdown, is taken as a half-close
        # that still wants its answer (``nc -N``, RFC 9112 §9.6).  Any other
        # EOF mid-request is a client gone, and its upstream request must
        # end now, not when the sandbox next writes (SPEC §4: within a
        # second; nginx aborts such requests the same way).
        head = self.head
        return (
            self.state == ACTIVE
            and self.req_done
            and head is not None
            and (head.version == 10 or not head.keep_alive)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        self.proxy.clients.discard(self)
        self._unregister()
        if self.tunnel is not None:
            self.tunnel.peer_lost("client")
        up = self.upstream
        self.upstream = None
        if up is not None:
            # The client went away mid-request: the upstream connection is
            # in an unknown state, so it is cut, not pooled (SPEC §4); what
            # it still had to write is for nobody now.
            up.client = None
            up.close(abort=True)

    def pause_writing(self) -> None:
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.resume_reading()

    # -- requests --------------------------------------------------------

    def _next_request(self) -> None:
        # A request the router answers itself (a 404, a 400) ends inside
        # ``_read_request``, and ``_request_finished`` then starts the next
        # pipelined one: called from here, that would nest one call deeper
        # per request, as deep as a client cares to pipeline.  It is taken
        # by this loop instead.
        if self.reading:
            self.read_again = True
            return
        self.reading = True
        try:
            self._read_request()
            while self.read_again:
                self.read_again = False
                self._read_request()
        finally:
            self.reading = False

    def _read_request(self) -> None:
        proxy = self.proxy
        try:
            head = codec.parse_request(self.buf, proxy.max_head)
        except http.ParseError as exc:
            self._fail(exc.code, exc.message)
            return
        if head is None:
            if self.deadline_kind != DL_HEAD:
                self._arm(DL_HEAD, proxy.head_timeout)
            return
        # Most reads hold one whole head and nothing more: no slice then.
        end = head.head_len
        self.buf = self.buf[end:] if end < len(self.buf) else b""
        self.head = head
        self.state = ACTIVE
        self.serial += 1
        # No response yet: every "nothing sent, answer it ourselves" test
        # (502, 504, revocation, the stale-pool retry) reads this, and a
        # kept-alive connection must not carry the last request's status.
        self.status = 0
        self.deadline_kind = DL_NONE
        self.deadline = 0.0
        self.started = time.monotonic() if proxy.access_log else 0.0
        proxy.stats.requests += 1
        if proxy.draining:
            self.keep_alive = False
            self._reply("SHUTTING_DOWN", close=True)
            return

        if proxy.internal:
            self._route_internal(head)
            return

        # 1. Route: Host → label → one lookup.  The requests of a connection
        #    nearly always name one Host, so its label is kept.  HTTP/1.0
        #    may leave Host out (the parser takes it, as h11 does), but a
        #    preview router cannot route without one (SPEC §1).
        if head.host is None:
            self._reply("BAD_REQUEST", "missing Host header")
            return
        host = head.host
        if host == self.seen_host:
            label = self.seen_label
        else:
            try:
                label = codec.host_label(host, proxy.domains)
            except ValueError:
                self._reply("BAD_REQUEST", "Invalid Host header")
                return
            self.seen_host = host
            self.seen_label = label
        if label is None:
            if proxy.fallback is None:
                self._reply("NOT_FOUND")
                return
            self.label = b""  # logged as "fallback"
            self.route_id = 0
            self.sandbox = ""
            self._dispatch(("", proxy.fallback), head.host or b"")
            return
        hit = proxy.hit
        if not proxy.index.lookup_into(label, hit):
            self._reply("INVALID_TOKEN")
            return
        route_id = hit.route_id
        sandbox_slot = hit.sandbox_slot
        port = hit.port
        target_slot = hit.target_slot
        flags = hit.flags
        if proxy.sandbox_stopped[sandbox_slot]:
            self._reply("STALE_PREVIEW_URL")
            return
        # A route's sandbox slot is always filled: the table drops routes
        # before their sandbox.
        name = proxy.sandbox_names[sandbox_slot]
        assert name is not None
        self.label = label
        self.route_id = route_id
        self.sandbox = name
        target = proxy.targets[target_slot] if target_slot else None
        upstream_host = proxy.sandbox_hosts[sandbox_slot]
        # What this connection's last request (on ``listed_route``) was sent
        # to, if the route and the pools are still those (else the proxy's
        # entry for the route): no dict lookup on a kept-alive connection.
        sent_to = self.sent_to
        if self.listed_route != route_id or self.sent_epoch != proxy.pool_epoch:
            sent_to = proxy.route_pools.get(route_id)
            self.sent_epoch = proxy.pool_epoch
        if (
            sent_to is None
            or sent_to[0] is not name
            or sent_to[1] is not target
            or sent_to[2] is not upstream_host
            or sent_to[3] != port
        ):
            if target is not None:
                address = target
            else:
                assert upstream_host is not None
                address = (upstream_host, port)
            key = (name, address)
            local = proxy.local_hosts.get(port) or proxy.local_host(port)
            sent_to = (
                name,
                target,
                upstream_host,
                port,
                key,
                proxy.pool_of(key),
                local,
            )
            proxy.route_pools[route_id] = sent_to
        self.sent_to = sent_to
        if self.listed_route != route_id:
            self._unlist()
            conns = proxy.by_route.get(route_id)
            if conns is None:
                proxy.by_route[route_id] = {self}
            else:
                conns.add(self)
            self.listed_route = route_id

        # 2. Host sent upstream: the public one as received (``host`` still),
        #    or what dev servers accept.
        if not flags & FLAG_PRESERVE_HOST:
            host = sent_to[6]
        self._dispatch(sent_to[4], host, sent_to[5])

    def _route_internal(self, head: Any) -> None:
        """SPEC §6: any valid port of a known sandbox, no token."""
        sandbox_id = head.get(b"x-sandbox-id")
        port_raw = head.get(b"x-sandbox-port")
        if sandbox_id is None or port_raw is None:
            self._reply(
                "BAD_REQUEST", "X-Sandbox-Id and X-Sandbox-Port headers are required"
            )
            return
        names = [name.lower() for name, _ in head.headers]
        if names.count(b"x-sandbox-id") > 1 or names.count(b"x-sandbox-port") > 1:
            # Two answers to "where to?": refused, as a repeated Host is.
            self._reply(
                "BAD_REQUEST", "X-Sandbox-Id and X-Sandbox-Port must each appear once"
            )
            return
        table = self.proxy.table
        name = sandbox_id.decode("latin-1").lower()
        try:
            port = grammar.check_port(
                port_raw.decode("latin-1"), self.proxy.reserved_ports
            )
        except RouteError as exc:
            self._reply("BAD_REQUEST", exc.message)
            return
        slot = table.sandbox_slots.get(name)
        sandbox = table.sandbox_view(slot) if slot is not None else None
        if sandbox is None:
            self._reply("NOT_FOUND", f"Sandbox '{name}' is not known to this router")
            return
        if sandbox.stopped:
            self._reply("STALE_PREVIEW_URL")
            return
        self.label = b"%s:%d (internal)" % (sandbox.name.encode(), port)
        self.route_id = 0
        self.sandbox = sandbox.name
        self._dispatch(
            (sandbox.name, (sandbox.upstream_host, port)), b"localhost:%d" % port
        )

    def _dispatch(
        self,
        key: tuple[str, Address],
        host: bytes,
        pool: list[UpstreamConnection] | None = None,
    ) -> None:
        head = self.head
        proxy = self.proxy

        # 1. Body framing and limits, decided before anything goes upstream.
        self.req_framing = head.framing
        self.keep_alive = head.keep_alive
        if head.framing == BODY_LENGTH:
            if proxy.max_body and head.content_length > proxy.max_body:
                self._reply("BODY_TOO_LARGE", close=True)
                return
            self.req_remaining = head.content_length
            self.req_done = head.content_length == 0
        elif head.framing == BODY_CHUNKED:
            self.req_framer = http.ChunkedFramer()
            self.req_remaining = 0
            self.req_done = False
        else:
            self.req_done = True

        # 2. The head as the upstream sees it.
        out = codec.render_request(head, host, self._forwarded_for(head))
        up = proxy.take(pool if pool is not None else proxy.pool_of(key))
        if up is not None:
            up.start(self, out, head.method == b"HEAD")
        else:
            self.pending_body = [out]
            self._start_connect(key)
        self._arm_from_sweep(DL_RESPONSE, proxy.response_timeout)

        # 3. Body bytes that came with the head.
        if not self.req_done and self.buf:
            rest, self.buf = self.buf, b""
            self._request_body(rest)

    def _forwarded_for(self, head: Any) -> bytes:
        host = head.host if head.host is not None else b""
        if self.proxy.trusted and self._trusted():
            return self._forwarded_trusted(head, self.peer.encode(), host)
        # The requests of a connection nearly always name one Host: the
        # block is joined again only when it changes.
        if host != self.forwarded_host or not self.forwarded_block:
            self.forwarded_host = host
            self.forwarded_block = b"".join(
                (
                    self.forwarded,
                    b"X-Forwarded-Host: ",
                    host,
                    b"\r\n",
                    self.forwarded_for,
                )
            )
        return self.forwarded_block

    def _forwarded_trusted(self, head: Any, peer: bytes, host: bytes) -> bytes:
        # SPEC §4: a trusted proxy in front (a TLS terminator, a balancer)
        # knows the scheme, host and port the browser used, so its values
        # are kept; the X-Forwarded-For chain (every line of it, RFC 9110
        # §5.3) gets this peer appended.
        chain = [v for n, v in head.headers if n.lower() == b"x-forwarded-for" and v]
        chain.append(peer)
        sockname = self.transport.get_extra_info("sockname") if self.transport else 0
        port = b"%d" % sockname[1] if isinstance(sockname, tuple) else b"0"
        return b"".join(
            [
                b"X-Forwarded-Proto: ",
                head.get(b"x-forwarded-proto") or b"http",
                b"\r\nX-Forwarded-Port: ",
                head.get(b"x-forwarded-port") or port,
                b"\r\nX-Forwarded-Host: ",
                head.get(b"x-forwarded-host") or host,
                b"\r\nX-Forwarded-For: ",
                b", ".join(chain),
                b"\r\n",
            ]
        )

    def _trusted(self) -> bool:
        try:
            addr = ipaddress.ip_address(self.peer)
        except ValueError:
            return False
        return any(addr in net for net in self.proxy.trusted)

    def _start_connect(self, key: tuple[str, Address]) -> None:
        # The request's serial is taken now, not when the task first runs:
        # by then a timer may have ended this request and begun the next.
        self.proxy.loop.create_task(self._connect(key, self.serial))

    async def _connect(self, key: tuple[str, Address], serial: int) -> None:
        # The connect is for this request only.  The request may end while
        # it is under way (a 504 from the response timer, a revocation) and
        # the next one on this connection may be for another sandbox: what
        # the connect brings then, a socket or a failure, is not the next
        # request's (a socket would carry its head to the wrong upstream).
        try:
            up = await self.proxy.connect(key)
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            if serial == self.serial:
                cause = f"{_where(key[1])}: {exc}"
                self._upstream_failed("UPSTREAM_UNAVAILABLE", None, cause)
            return
        except TimeoutError:
            if serial == self.serial:
                self._upstream_failed("UPSTREAM_TIMEOUT")
            return
        except OSError as exc:
            # Not a refusal: a name that does not resolve, no route to the
            # host, this router's own socket.  The log names the cause; the
            # client is not told the sandbox's host, only that it failed.
            if serial == self.serial:
                cause = f"{_where(key[1])}: {exc}"
                self._upstream_failed("UPSTREAM_UNAVAILABLE", UNREACHABLE, cause)
            return
        if serial != self.serial or self.state != ACTIVE or self.transport is None:
            up.close()
            return
        first, *body = self.pending_body
        self.pending_body = []
        up.start(self, first, self.head.method == b"HEAD")
        for chunk in body:
            up.transport.write(chunk)  # type: ignore[union-attr]
        if self.paused and up.transport is not None:
            self._resume_client()

    def _request_body(self, data: bytes) -> None:
        """Relay request body bytes; keep what belongs to the next request."""
        framing = self.req_framing
        if framing == BODY_LENGTH:
            n = self.req_remaining
            if len(data) > n:
                data, self.buf = data[:n], data[n:]
            self.req_remaining = n - len(data)
            done = self.req_remaining == 0
        else:
            max_body = self.proxy.max_body
            try:
                if max_body:
                    # The limit is on payload bytes, not on the chunk-size
                    # lines around them, so the payload is counted.
                    used, pieces = self.req_framer.decode(data)
                    self.req_remaining += sum(map(len, pieces))
                else:
                    used = self.req_framer.feed(data)
            except http.ParseError as exc:
                self._fail(exc.code, exc.message)
                return
            if max_body and self.req_remaining > max_body:
                self._fail("BODY_TOO_LARGE")
                return
            if used < len(data):
                data, self.buf = data[:used], data[used:]
            done = self.req_framer.done
        if self.status == 0 and data:
            # The response-head timeout runs from the last request byte: an
            # upload slower than it is progress, not an upstream timeout.
            self._arm_from_sweep(DL_RESPONSE, self.proxy.response_timeout)
        up = self.upstream
        if up is not None and up.transport is not None:
            if data:
                up.transport.write(data)
            if (
                not done
                and framing == BODY_LENGTH
                and up.relay is None
                and self.transport is not None
                and can_splice(self.transport, up.transport, self.req_remaining)
            ):
                self._splice_upload(up)
                return
        elif data:
            # Still connecting: hold the body, and stop reading beyond a
            # modest amount so that a large upload waits instead of filling
            # memory.
            self.pending_body.append(data)
            if sum(map(len, self.pending_body)) > HIGH_WATER:
                self._pause_client()
        if done:
            self.req_done = True
            self.req_framer = None
            self._maybe_finish()

    def _splice_upload(self, up: UpstreamConnection) -> None:
        """The rest of a large upload goes client → upstream in the kernel."""
        assert self.transport is not None and up.transport is not None

        # No bytes pass through Python now: the response-head timer, which
        # body chunks push back, is pushed back by the relay's progress
        # instead when it fires (``deadline_passed``).
        if self.status == 0:
            self._arm(DL_RESPONSE, self.proxy.response_timeout)

        def spliced(ok: bool) -> None:
            up.relay = None
            if not ok:
                up.close()
                self._close()
                return
            self.req_remaining = 0
            self.req_done = True
            if self.status == 0 and self.state == ACTIVE:
                self._arm_from_sweep(DL_RESPONSE, self.proxy.response_timeout)
            self._maybe_finish()

        self.proxy.stats.splices += 1
        up.relay = SpliceRelay(
            self.proxy.loop, self.transport, up.transport, self.req_remaining, spliced
        )

    # -- responses -------------------------------------------------------

    def response_started(self, status: int) -> None:
        self.status = status
        if self.deadline_kind == DL_RESPONSE:
            self.deadline_kind = DL_NONE
            self.deadline = 0.0

    def response_done(self, reusable: bool) -> None:
        """The upstream finished its response (called by the upstream)."""
        up = self.upstream
        if up is not None and not self.req_done:
            # The upstream answered before the body was complete (e.g. an
            # early 413).  The rest of the body can no longer be framed on
            # this connection: close it once the answer is out.
            self.keep_alive = False
            reusable = False
        self.upstream = None
        if up is not None:
            up.client = None
            if reusable:
                self.proxy.give_back(up)
            else:
                up.close()
        self._request_finished()

    def _maybe_finish(self) -> None:
        # No upstream yet but a held head means the connect is still under
        # way: the request has not reached the sandbox, so it is not over.
        if self.pending_body:
            return
        if self.req_done and self.upstream is None and self.state == ACTIVE:
            self._request_finished()

    def _request_finished(self) -> None:
        if self.proxy.access_log and self.head is not None:
            self._log_access()
        # Still listed under its route (see ``Proxy.by_route``), but no
        # longer relaying on it.
        self.route_id = 0
        self.head = None
        self.sandbox = ""
        if not self.keep_alive or self.transport is None:
            self._close()
            return
        self.state = HEAD
        self.req_done = True
        self._arm_from_sweep(DL_IDLE, self.proxy.idle_timeout)
        if self.paused:
            self._resume_client()
        if self.buf:
            self._next_request()

    def _log_access(self) -> None:
        head = self.head
        access_log.info(
            '%s "%s %s HTTP/%s" %d host=%s %.1fms',
            self.peer,
            head.method.decode("latin-1"),
            _shown(head.target),
            "1.1" if head.version == 11 else "1.0",
            self.status,
            _shown(head.host or b"-"),
            (time.monotonic() - self.started) * 1000,
        )

    def _unregister(self) -> None:
        self.route_id = 0
        self._unlist()

    def _unlist(self) -> None:
        rid = self.listed_route
        if rid:
            # An emptied set stays until the sweeper drops it: on a route
            # whose clients come and go it would otherwise be made and
            # dropped again and again.
            conns = self.proxy.by_route.get(rid)
            if conns is not None:
                conns.discard(self)
            self.listed_route = 0

    # -- the router's own answers ---------------------------------------

    def _reply(
        self, code: str, message: str | None = None, close: bool = False
    ) -> None:
        """Answer the current request ourselves, then carry on or close."""
        head = self.head
        self.status = answers.status_of(code)
        if head is not None:
            is_head = head.method == b"HEAD"
        else:
            # No parsed head (a timeout or a malformed one), but the
            # request line may say HEAD: its answer has no body either
            # (RFC 9110 §9.3.2).
            is_head = self.buf.startswith(b"HEAD ")
        if head is not None and head.framing != BODY_NONE:
            # We will not read the body it announced: the stream cannot be
            # resynchronised, so this is the last answer on the connection.
            close = True
            self.body_unread = True
        if head is not None and not head.keep_alive:
            close = True
        if self.transport is not None:
            if message is None:
                data = answers.cached(code, close, is_head)
            else:
                data = answers.answer(code, message, close, is_head)
            if not close and head is not None and head.version == 10:
                # As for relayed answers: a 1.0 client must be told to stay.
                end = data.index(b"\r\n\r\n")
                data = data[:end] + b"\r\nConnection: keep-alive" + data[end:]
            self.transport.write(data)
        self.keep_alive = not close
        self.req_done = True
        self.upstream = None
        self.pending_body = []
        self._request_finished()

    def _fail(self, code: str, message: str | None = None) -> None:
        """A malformed request: answer it and close this connection only."""
        self.proxy.stats.errors += 1
        log.info("bad request from %s: %s", self.peer, message or code)
        up = self.upstream
        if up is not None:
            up.client = None
            up.close()
            self.upstream = None
        if self.status == 0 or self.state == HEAD:
            self.head = self.head if self.state == ACTIVE else None
            self._reply(code, message, close=True)
        else:
            self._close()

    def _upstream_failed(
        self, code: str, message: str | None = None, cause: object = None
    ) -> None:
        """No response head came: answer 502/504 if nothing was sent yet.

        ``cause``, the connect's error, goes in the log line, not the answer.
        """
        if self.state != ACTIVE:
            return
        self.proxy.stats.errors += 1
        label = self.label.decode() or "fallback"
        self.proxy.warn(
            f"upstream for {label}: {code}", "" if cause is None else f" ({cause})"
        )
        if self.status == 0:
            self.upstream = None
            self._reply(code, message, close=not self.req_done)
        else:
            self._close()

    # -- timers and revocation -------------------------------------------

    def _arm(self, kind: int, seconds: float) -> None:
        self.deadline_kind = kind
        self.deadline = self.proxy.now() + seconds if seconds > 0 else 0.0

    def _arm_from_sweep(self, kind: int, seconds: float) -> None:
        """``_arm`` for the deadlines every request sets and nearly always
        clears again: the idle and response timeouts.

        Their time starts at the sweeper's next round instead of now, so
        the request pays for no clock read: such a deadline passes 0-1 s
        later than one armed by ``_arm``, and is noticed within another
        second, as all of them are.
        """
        self.deadline_kind = kind
        self.deadline = -seconds if seconds > 0 else 0.0

    def deadline_passed(self) -> None:
        kind = self.deadline_kind
        self.deadline = 0.0
        self.deadline_kind = DL_NONE
        if kind == DL_RESPONSE and self.status == 0:
            up = self.upstream
            if up is not None and up.relay is not None:
                # A spliced upload: the time runs from the last bytes the
                # relay moved, as it runs from the last body chunk otherwise.
                due = up.relay.moved_at + self.proxy.response_timeout
                if due > self.proxy.now():
                    self.deadline_kind = DL_RESPONSE
                    self.deadline = due
                    return
            if up is not None:
                up.client = None
                up.close()
            self._upstream_failed("UPSTREAM_TIMEOUT")
        elif kind == DL_HEAD and self.buf:
            # A request head begun but never finished.  SPEC §3 has no row
            # for it; a 408 (RFC 9110 §15.5.9) with the usual JSON body
            # tells a slow but honest client what happened, where a bare
            # close looks like a crash.  An idle connection (no bytes of a
            # next request) is closed silently below, as RFC 9112 §9.6 lets
            # a server do.
            log.info("request head timeout from %s", self.peer)
            self.proxy.stats.errors += 1
            self.head = None
            self._reply("REQUEST_TIMEOUT", close=True)
        elif kind in (DL_GRACE, DL_LINGER):
            # Cut, not closed: a close waits for the write buffer to drain,
            # and a peer that stopped reading would hold the socket (and
            # the sandbox's, see ``connection_lost``) for ever.
            self._close(abort=True)
        else:
            self._close()

    def revoke(self, answer: str = "INVALID_TOKEN") -> None:
        """This connection's route was revoked while it was relaying.

        ``answer`` is for a request that has had no response yet.
        """
        if self.state == TUNNEL:
            if self.tunnel is not None:
                self.end_tunnel(POLICY_VIOLATION, GOING_AWAY, "route revoked")
            else:
                self._close()
        elif self.state == ACTIVE:
            if self.status == 0:
                # Nothing sent yet: the client gets the new answer now.  A
                # whole request leaves the connection in step, so it stays
                # open for the requests pipelined behind this one, which may
                # be for routes that are still there.  Not after an upgrade
                # request: its client may already be sending frames.
                up = self.upstream
                if up is not None:
                    up.client = None
                    up.close()
                self.upstream = None
                head = self.head
                whole = self.req_done and head is not None and head.upgrade is None
                self._reply(answer, close=not whole)
            else:
                # The response under way is cut after the grace period,
                # and the connection with it.
                self.keep_alive = False
                self._arm(DL_GRACE, self.proxy.grace)

    def end_tunnel(self, client_code: int, upstream_code: int, reason: str) -> None:
        """Close this tunnel with close frames, or cut it after ``--grace``.

        The close frames wait for the frames in flight to end; a peer that
        stops halfway through a frame must not keep a revoked tunnel open,
        so the sweeper cuts whatever is left when the grace period is over.
        """
        assert self.tunnel is not None
        if self.tunnel.closing is not None:
            # Already ending, on its own clock: the sweeper finds an idle
            # tunnel idle again each second, and re-arming would put off the
            # cut for ever.
            return
        self.tunnel.end(client_code, upstream_code, reason)
        if self.transport is not None and not self.transport.is_closing():
            self._arm(DL_GRACE, self.proxy.grace)

    # -- flow control ----------------------------------------------------

    def _pause_client(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def _resume_client(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def _close(self, abort: bool = False, linger: bool = True) -> None:
        transport = self.transport
        if (
            linger
            and not abort
            and (self.body_unread or self.buf or not self.req_done)
            and self.state != LINGER
            and self.state != CLOSED
            and transport is not None
            and not transport.is_closing()
        ):
            # The client is still sending: a body that will not be read (a
            # 413, an early answer, a refused request) or requests behind the
            # last answer.  Closed now, the socket would answer those bytes
            # with a reset, and a reset throws away what is still queued for
            # the client, this answer included: a client that writes its
            # whole body before reading would see "connection reset", never
            # the 413.  So, as nginx does, writing ends (a FIN after the
            # answer) and reading goes on, dropping everything, until the
            # client closes or LINGER_SECONDS pass.
            self._unregister()
            self.state = LINGER
            self.buf = b""
            self.req_done = True
            self._arm(DL_LINGER, LINGER_SECONDS)
            transport.write_eof()
            if self.paused:
                self._resume_client()
            return
        self.state = CLOSED
        self.deadline = 0.0
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()


class UpstreamConnection:
    """One socket to a sandbox port, reused for sequential requests."""

    __slots__ = (
        "buf",
        "client",
        "dechunk",
        "framer",
        "framing",
        "got_bytes",
        "head_request",
        "idle_since",
        "is_closing",
        "key",
        "pool",
        "pool_epoch",
        "proxy",
        "relay",
        "remaining",
        "reusable",
        "sent_head",
        "state",
        "transport",
        "uses",
        "write",
    )

    def __init__(self, proxy: Proxy, key: tuple[str, Address]) -> None:
        self.proxy = proxy
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.client: ClientConnection | None = None
        self.buf = b""
        self.state = HEAD
        self.framing = 0
        self.remaining = 0
        self.framer: Any = None
        self.head_request = False
        self.dechunk = False
        self.reusable = False
        self.idle_since = 0.0
        self.got_bytes = False
        self.uses = 0
        # The idle list it goes back to (``Proxy.give_back``).
        self.pool = proxy.pool_of(key)
        self.pool_epoch = proxy.pool_epoch
        self.sent_head = b""
        self.relay: SpliceRelay | None = None
        # ``transport.write`` and ``is_closing``, looked up once: the hot
        # path calls them on every request, and a method lookup is not free.
        self.write: Callable[[bytes], None] = _not_connected
        self.is_closing: Callable[[], bool] = _not_connected_yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = transport  # type: ignore[assignment]
        self.write = self.transport.write  # type: ignore[union-attr]
        self.is_closing = transport.is_closing
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def start(self, client: ClientConnection, head: bytes, head_request: bool) -> None:
        self.client = client
        client.upstream = self
        self.state = HEAD
        self.buf = b""
        self.head_request = head_request
        self.got_bytes = False
        self.uses += 1
        self.sent_head = head
        assert self.transport is not None
        self.write(head)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None or client.transport is None:
            # Bytes from an idle pooled connection: not HTTP we can frame.
            self.close()
            return
        self.got_bytes = True
        if self.state == TUNNEL:
            if client.tunnel is not None:
                client.tunnel.from_upstream(data)
                # Idle means no frames either way: a tunnel that only
                # pushes to the client (a log tail, a feed) is in use.
                if self.proxy.tunnel_idle:
                    client.last_active = self.proxy.now()
        elif self.state == ACTIVE:
            self._body(client, data)
        else:
            self.buf = self.buf + data if self.buf else data
            self._head(client)

    def _head(self, client: ClientConnection) -> None:
        assert client.transport is not None
        end = 0
        while True:
            try:
                head = codec.parse_response(self.buf, 65536, self.head_request)
            except http.ParseError as exc:
                self.proxy.warn(
                    f"upstream {_where(self.key[1])} sent a bad response",
                    f": {exc.message}",
                )
                self.client = None
                client.upstream = None
                self.close()
                client._upstream_failed("UPSTREAM_BAD_RESPONSE")
                return
            if head is None:
                return
            end = head.head_len
            status = head.status
            if 100 <= status < 200 and status != 101:
                # Interim answers (100 Continue, 103 Early Hints) pass
                # through; the final head follows on the same connection.
                # Never to an HTTP/1.0 client, which cannot read them (RFC
                # 9110 §15.2).
                self.buf = self.buf[end:] if end < len(self.buf) else b""
                request = client.head
                if request is None or request.version != 10:
                    client.write(codec.render_response(head, False))
                continue
            break

        # What follows the head is left in ``buf`` from ``end`` on, not cut
        # off: a small answer's body is copied once, into the client's bytes.
        buf = self.buf
        self.buf = b""

        client.response_started(status)
        if status == 101:
            self.buf = buf[end:]
            self._upgrade(client, head)
            return

        # Framing towards the client: HTTP/1.0 clients cannot take chunked,
        # so the chunks are decoded and the connection closes at the end.
        self.framing = head.framing
        self.reusable = head.keep_alive
        # An answer before the whole request body (an early 413, a refusal)
        # ends the connection with it (``response_done``): RFC 9112 §9.6
        # wants the client told so.
        close = not client.keep_alive or not client.req_done
        self.dechunk = False
        if head.framing == BODY_CLOSE:
            close = True
        elif head.framing == BODY_CHUNKED:
            self.framer = http.ChunkedFramer()
            if client.head is not None and client.head.version == 10:
                self.dechunk = True
                close = True
        if close:
            client.keep_alive = False
        # ``out`` is left empty when the head goes as rendered: it is then
        # rendered below, with the body bytes that came with it when any.
        out = b""
        request = client.head
        if request is not None and request.version == 10:
            # HTTP/1.0 has no Transfer-Encoding (RFC 9112 §6.1): it goes,
            # from a de-chunked body's head and from a bodiless one's (the
            # answer to HEAD, a 304) alike.
            if self.dechunk or (
                head.framing == BODY_NONE and head.get(b"transfer-encoding") is not None
            ):
                out = _drop_transfer_encoding(codec.render_response(head, close))
            if not close:
                # An HTTP/1.0 client keeps the connection only when told so
                # (RFC 9112 §9.3); ``ab -k`` and other 1.0 load tools rely
                # on it.
                out = out or codec.render_response(head, close)
                out = out[:-2] + b"Connection: keep-alive\r\n\r\n"
        client.sent = 0

        if head.framing == BODY_NONE or (
            head.framing == BODY_LENGTH and head.content_length == 0
        ):
            if len(buf) > end:
                # Bytes after a response that has no body: whatever they
                # are, they would be read as the next request's answer.
                self.reusable = False
            client.write(out or codec.render_response(head, close))
            self._done(client)
            return
        self.remaining = head.content_length
        self.state = ACTIVE
        given = len(buf) - end
        if head.framing == BODY_LENGTH and given > 0:
            # The head and the body bytes that came with it leave in one
            # write: for small responses that is the whole answer in one
            # system call instead of two (what nginx's writev achieves).
            n = self.remaining
            if given > n:
                # More than the announced length: never reuse this socket.
                buf = buf[end : end + n]
                end = 0
                given = n
                self.reusable = False
            if out:
                client.write(out + buf[end:])
            else:
                client.write(codec.render_response(head, close, buf, end))
            self.remaining = n - given
            if self.remaining == 0:
                self._done(client)
            else:
                self._maybe_splice(client)
            return
        client.write(out or codec.render_response(head, close))
        if given > 0:
            self._body(client, buf[end:])
        elif head.framing == BODY_LENGTH:
            self._maybe_splice(client)

    def _maybe_splice(self, client: ClientConnection) -> None:
        """Hand a large remaining body to the kernel (``router.splice``)."""
        src, dst = self.transport, client.transport
        if (
            self.relay is not None  # an upload is being spliced the other way
            or src is None
            or dst is None
            or not can_splice(src, dst, self.remaining)
        ):
            return
        self.proxy.stats.splices += 1
        self.relay = SpliceRelay(
            self.proxy.loop, src, dst, self.remaining, self._spliced
        )

    def _spliced(self, ok: bool) -> None:
        self.relay = None
        client = self.client
        if client is None:
            self.close()
            return
        if ok:
            self.remaining = 0
            if self.transport is None or has_more(self.transport):
                # More than the announced length, behind the spliced body:
                # the next request on this socket would read it as its
                # answer, so the socket is not reused.
                self.reusable = False
            self._done(client)
        else:
            self._abort(client)

    def _body(self, client: ClientConnection, data: bytes) -> None:
        transport = client.transport
        assert transport is not None
        framing = self.framing
        if framing == BODY_LENGTH:
            n = self.remaining
            if len(data) > n:
                # More than the announced length: never reuse this socket.
                data = data[:n]
                self.reusable = False
            transport.write(data)
            self.remaining = n - len(data)
            if self.remaining == 0:
                self._done(client)
        elif framing == BODY_CHUNKED:
            try:
                if self.dechunk:
                    used, pieces = self.framer.decode(data)
                    for piece in pieces:
                        transport.write(piece)
                else:
                    used = self.framer.feed(data)
                    transport.write(data if used == len(data) else data[:used])
            except http.ParseError as exc:
                self.proxy.warn(
                    f"upstream {_where(self.key[1])}: bad chunked body",
                    f": {exc.message}",
                )
                self._abort(client)
                return
            if self.framer.done:
                if used < len(data):
                    self.reusable = False
                self._done(client)
        else:
            transport.write(data)

    def _done(self, client: ClientConnection) -> None:
        self.state = HEAD
        self.framer = None
        client.response_done(self.reusable)

    def _upgrade(self, client: ClientConnection, head: Any) -> None:
        assert client.transport is not None and self.transport is not None
        request = client.head
        if request is None or request.upgrade is None:
            # RFC 9110 §15.2.2: a server switches only to a protocol the
            # client asked for; this client would read the new protocol's
            # bytes as a response body.
            self._bad_switch(client, "101 to a request without Upgrade")
            return
        if request.upgrade == b"websocket":
            # An upstream that answers 101 with the wrong accept key is not
            # speaking WebSocket to us (RFC 6455 §4.1): the browser would
            # fail the handshake anyway, so it gets a clear 502 instead.
            key = request.get(b"sec-websocket-key") or b""
            if head.get(b"sec-websocket-accept") != accept_key(key):
                self._bad_switch(client, "101 with a bad accept key")
                return
        client.transport.write(codec.render_response(head, False))
        client.state = TUNNEL
        self.state = TUNNEL
        self.reusable = False
        client.deadline = 0.0
        client.deadline_kind = DL_NONE
        client.last_active = self.proxy.now()
        tunnel = client.tunnel = Tunnel(
            client.transport, self.transport, client.route_id, self.proxy.loop
        )
        if self.buf:
            tunnel.from_upstream(self.buf)
            self.buf = b""
        if client.buf:
            tunnel.from_client(client.buf)
            client.buf = b""

    def _bad_switch(self, client: ClientConnection, why: str) -> None:
        self.proxy.warn(f"upstream {_where(self.key[1])}: {why}")
        self.client = None
        client.upstream = None
        self.close()
        client.status = 0
        client._upstream_failed("UPSTREAM_BAD_RESPONSE")

    def _abort(self, client: ClientConnection) -> None:
        self.client = None
        client.upstream = None
        self.close()
        client._close()

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        # The sandbox reads slower than the client sends (a large upload,
        # a busy tunnel): stop reading the client until it catches up.
        client = self.client
        if client is not None and client.transport is not None:
            client.transport.pause_reading()

    def resume_writing(self) -> None:
        client = self.client
        if client is not None and client.transport is not None and not client.paused:
            client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.cancel()
        transport, self.transport = self.transport, None
        del transport
        self.proxy.forget(self)
        client = self.client
        self.client = None
        if client is None:
            return
        client.upstream = None
        if self.state == TUNNEL:
            if client.tunnel is not None:
                client.tunnel.peer_lost("upstream")
            else:
                client._close()
        elif self.state == ACTIVE and self.framing == BODY_CLOSE:
            client.keep_alive = False
            client.response_done(False)
        elif self.state == HEAD and client.status == 0:
            request = client.head
            if (
                self.uses > 1
                and not self.got_bytes
                and client.req_framing == 0
                and request is not None
                and request.method in IDEMPOTENT
            ):
                # Most likely a pooled connection the upstream had closed
                # as the request went out, but a sandbox that read it and
                # then died looks the same from here.  So only a request
                # that may be repeated (RFC 9110 §9.2.2; RFC 9112 §9.3.1
                # forbids retrying any other) is sent again on a fresh
                # connection, and only a bodiless one: a body may be half
                # gone.
                client.pending_body = [self.sent_head]
                client._start_connect(self.key)
                return
            client._upstream_failed("UPSTREAM_CLOSED")
        else:
            # Mid-body: the client must not mistake a cut body for a whole
            # one, so its connection is closed too (SPEC §4).
            client._close()

    def close(self, abort: bool = False) -> None:
        relay = self.relay
        if relay is not None:
            # The relay holds duplicates of the socket: without this the
            # connection would outlive its transport.
            self.relay = None
            relay.cancel()
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()


def _factory(up: UpstreamConnection) -> Callable[[], asyncio.Protocol]:
    # The loop wants a protocol factory; the caller keeps the one protocol
    # it hands out, to use once the connect succeeds.
    return lambda: cast(asyncio.Protocol, up)


def _drop_transfer_encoding(head: bytes) -> bytes:
    lines = head.split(b"\r\n")
    kept = [ln for ln in lines if not ln.lower().startswith(b"transfer-encoding:")]
    return b"\r\n".join(kept)
