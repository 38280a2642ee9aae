"""The control socket (SPEC §7): newline-delimited JSON over Unix and TCP.

This is the IO layer around ``router.control``: it frames lines, runs each
request through ``Router.commit`` or the table, writes replies, and streams
``watch`` messages.  The listeners:

* a Unix socket, mode 0600, the normal way in (its file permissions are the
  authentication);
* optionally TCP on a loopback address, where the first line must be
  ``{"op": "auth", "secret": ...}``.

Each connection is served by one task that answers its requests in order,
one at a time, so replies come back in request order.  Nothing here blocks
the event loop: store writes run in a thread inside ``Router.commit``, and a
slow reader only ever fills its own bounded buffer.

Over-long lines close the connection (after a ``LINE_TOO_LONG`` reply):
the request's id is unknown, and finding the next newline would mean
reading on without a bound from a peer that is not speaking the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import itertools
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from typing import Any

from . import control
from .app import Router
from .config import Config
from .control import Kind, Request, RequestError, RequestId
from .errors import RouteError, RouterError, StoreError
from .listeners import hostport, tcp_server
from .routes import Transaction

log = logging.getLogger("edge_router.control")

WATCH_BUFFER = 4 << 20
"""Bytes a watcher may fall behind before it is dropped."""

AUTH_TIMEOUT = 10.0
"""Seconds a TCP client has to authenticate."""

CLOSE_GRACE = 5.0
"""Seconds a closing connection has to take its last bytes before an abort."""

# Above this many unsent bytes the backlog of a watch waits for the peer.
_HIGH_WATER = 256 << 10


class ControlSetupError(RouterError, ValueError):
    """A control setting the server cannot start with."""

    code = "CONTROL_SETUP"


async def start_control(
    router: Router, config: Config | None = None, **tuning: Any
) -> ControlServer:
    """Start the control listeners that ``config`` (default: the router's) asks
    for; ``tuning`` goes to ``ControlServer``."""
    cfg = config or router.config
    server = ControlServer(
        router, cfg.control, cfg.control_tcp, cfg.control_secret, **tuning
    )
    await server.start()
    return server


class ControlServer:
    """Serve the control protocol for one ``Router``.

    ``path`` is the Unix socket, ``tcp`` a loopback ``HOST:PORT`` (port 0
    picks a free one; see ``tcp_address``) that needs ``secret``.  The
    constructor raises ``ControlSetupError`` on bad settings; ``start``
    raises ``OSError`` when a listener cannot be opened, for instance
    because another router is serving ``path``.
    """

    def __init__(
        self,
        router: Router,
        path: str | None = None,
        tcp: str | None = None,
        secret: str | None = None,
        *,
        max_line: int = control.MAX_LINE,
        watch_buffer: int = WATCH_BUFFER,
    ) -> None:
        if path is None and tcp is None:
            raise ControlSetupError(
                "the control server needs a Unix path or a TCP address"
            )
        if tcp is not None and not secret:
            raise ControlSetupError(
                "--control-tcp needs --control-secret: a TCP port is open to every "
                "local user, unlike the 0600 Unix socket"
            )
        self.router = router
        self.path = path
        self.tcp = parse_loopback(tcp) if tcp is not None else None
        self._secret = secret.encode() if secret else b""
        self.max_line = max_line
        self.watch_buffer = watch_buffer

        self._servers: list[asyncio.Server] = []
        self._unix_id: tuple[int, int] | None = None
        self._clients: set[asyncio.Task[Any]] = set()
        self._watches: set[_Watch] = set()
        self._commits: set[asyncio.Task[Transaction]] = set()
        self._numbers = itertools.count(1)
        self._closing = False

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """The bound TCP address, once started."""
        for server in self._servers:
            for sock in server.sockets:
                if sock.family != socket.AF_UNIX:
                    name = sock.getsockname()
                    return name[0], name[1]
        return None

    # -- lifetime ------------------------------------------------------------

    async def start(self) -> None:
        # Follow the table before the first client can ask to watch it.
        self.router.watchers.add(self._announce)
        # Its own counters go wherever the router's go (the admin /stats too).
        self.router.stats_hooks.append(self._counters)
        try:
            if self.path is not None:
                sock = _bind_unix(self.path)
                st = os.stat(self.path)
                self._unix_id = (st.st_dev, st.st_ino)
                try:
                    server = await asyncio.start_unix_server(
                        self._serve_unix, sock=sock, limit=self.max_line, backlog=512
                    )
                except BaseException:
                    sock.close()
                    raise
                self._servers.append(server)
                log.info("control socket listening on %s", self.path)
            if self.tcp is not None:
                host, port = self.tcp
                self._servers.append(
                    await tcp_server(
                        functools.partial(asyncio.start_server, self._serve_tcp),
                        host,
                        port,
                        limit=self.max_line,
                        backlog=512,
                    )
                )
                bound = self.tcp_address or self.tcp
                log.info("control TCP listening on %s", hostport(*bound[:2]))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop listening and drop every client.

        A change already handed to ``Router.commit`` still completes (and
        stays durable) even though its client may not get the reply.
        """
        self._closing = True
        self.router.watchers.discard(self._announce)
        with contextlib.suppress(ValueError):
            self.router.stats_hooks.remove(self._counters)
        for server in self._servers:
            server.close()
        for task in self._clients:
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        await asyncio.gather(*self._commits, return_exceptions=True)
        self._remove_unix()

    def _remove_unix(self) -> None:
        # Only our own socket file: after a restart race it may be another's.
        if self.path is None or self._unix_id is None:
            return
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._unix_id:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._unix_id = None

    # -- connections ---------------------------------------------------------

    async def _serve_unix(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self._serve(reader, writer, authenticate=False)

    async def _serve_tcp(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self._serve(reader, writer, authenticate=True)

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        authenticate: bool,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._closing:
            # Accepted just before ``close`` stopped the listener.
            writer.transport.abort()
            return
        self._clients.add(task)
        peer = f"#{next(self._numbers)} ({_describe_peer(writer)})"
        log.debug("control client %s connected", peer)
        try:
            if authenticate and not await self._authenticate(reader, writer, peer):
                return
            await self._serve_requests(reader, writer, peer)
        except (ConnectionError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # ``close`` cancels every client and waits for them.  Ended
            # quietly: asyncio's stream server (3.11) logs a traceback for
            # a client task that ends cancelled.
            pass
        except Exception:
            log.exception("control client %s: unexpected failure", peer)
        finally:
            self._clients.discard(task)
            await _close(writer)
            log.debug("control client %s disconnected", peer)

    async def _authenticate(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> bool:
        rid: RequestId = None
        try:
            async with asyncio.timeout(AUTH_TIMEOUT):
                line = await self._read_line(reader)
            if line is None:
                return False
            obj = control.decode(line)
            rid = control.request_id(obj)
            rid = control.check_auth(obj, self._secret)
        except TimeoutError:
            log.warning("control client %s did not authenticate in time", peer)
            return False
        except RequestError as exc:
            log.warning("control client %s refused: %s", peer, exc.message)
            writer.write(control.encode(control.error(rid, exc)))
            return False
        writer.write(control.encode(control.ok(rid, {"authenticated": True})))
        await writer.drain()
        return True

    async def _serve_requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        while True:
            # 1. One line; EOF ends the connection, an over-long one too.
            try:
                line = await self._read_line(reader)
            except RequestError as exc:
                log.warning("control client %s: %s", peer, exc.message)
                writer.write(control.encode(control.error(None, exc)))
                return
            if line is None:
                return
            if not line.strip():
                continue

            # 2. Decode and check it; a bad request costs only its reply.
            rid: RequestId = None
            try:
                obj = control.decode(line)
                rid = control.request_id(obj)
                request = control.parse_request(obj)
            except RequestError as exc:
                log.warning("control client %s: %s", peer, exc.message)
                writer.write(control.encode(control.error(rid, exc)))
                await writer.drain()
                continue

            # 3. Act on it.  A watch keeps the connection to itself.
            if request.kind is Kind.WATCH:
                await self._watch(request, reader, writer, peer)
                return
            writer.write(await self._answer(request, peer))
            await writer.drain()

    async def _read_line(self, reader: asyncio.StreamReader) -> bytes | None:
        """The next line, or None at EOF; a last line may lack its newline."""
        try:
            return await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial or None
        except asyncio.LimitOverrunError:
            raise RequestError(
                "LINE_TOO_LONG",
                f"Request line is longer than {self.max_line} bytes; closing",
            ) from None

    # -- requests ------------------------------------------------------------

    async def _answer(self, request: Request, peer: str) -> bytes:
        rid = request.id
        try:
            if request.kind in (Kind.CHANGE, Kind.BATCH):
                txn = await self._commit(request)
                result = control.change_result(request, txn)
                return control.encode(control.ok(rid, result, txn.version))
            if request.kind is Kind.STATS:
                return control.encode(control.ok(rid, self.stats()))
            if request.op == "snapshot":
                # A transaction in flight is already in the table but not
                # in its version: read between transactions.
                async with self.router.lock:
                    snap = await self.router.snapshot()
                return control.encode(control.ok(rid, snap))
            if request.op != "ping":
                await self.router.settled()
            result = control.run_query(self.router.table, request)
            return control.encode(control.ok(rid, result))
        except RouteError as exc:
            # A refusal by the route rules is an answer, not a fault here.
            log.debug("control client %s: %s refused: %s", peer, request.op, exc.code)
            return control.encode(control.error(rid, exc))
        except StoreError as exc:
            log.warning("control client %s: %s failed: %s", peer, request.op, exc)
            return control.encode(control.error(rid, exc))
        except Exception:
            log.exception("control client %s: %s failed", peer, request.op)
            fault = RouterError(
                "Internal error; see the router's log", "INTERNAL_ERROR"
            )
            return control.encode(control.error(rid, fault))

    async def _commit(self, request: Request) -> Transaction:
        # Shielded: a client that hangs up (or a shutdown) must not cancel a
        # transaction between prepare and finish.  ``close`` waits for it.
        commit = self.router.commit(request.changes, batch=request.kind is Kind.BATCH)
        task = asyncio.ensure_future(commit)
        self._commits.add(task)
        task.add_done_callback(self._commit_done)
        return await asyncio.shield(task)

    def _commit_done(self, task: asyncio.Task[Transaction]) -> None:
        self._commits.discard(task)
        # Its client may be gone; fetch the outcome so it is never reported
        # as an exception nobody retrieved.
        if not task.cancelled():
            task.exception()

    def _counters(self) -> dict[str, Any]:
        return {"control_clients": len(self._clients), "watchers": len(self._watches)}

    def stats(self) -> dict[str, Any]:
        extra: list[dict[str, Any]] = []
        for hook in self.router.stats_hooks:
            try:
                extra.append(hook())
            except Exception:
                log.exception("stats hook %r failed", hook)
        return control.stats(self.router.table, extra)

    # -- watch ---------------------------------------------------------------

    async def _watch(
        self,
        request: Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> None:
        watch = _Watch(request.id, writer, self.watch_buffer, self._dropped)

        # 1. Register and read the starting point in one step between
        # transactions: every change is then either in the backlog or
        # delivered live, never both and never neither.
        since = request.args.get("since")
        async with self.router.lock:
            try:
                start = control.watch_backlog(self.router.table, since)
                if start is None:
                    snap = await self.router.snapshot()
                    start = control.watch_snapshot(snap, since)
            except StoreError as exc:
                # The snapshot could not be read (a table still partly in
                # its store): an answer, and no watch left registered.
                log.warning("control client %s: watch failed: %s", peer, exc)
                writer.write(control.encode(control.error(request.id, exc)))
                return
            self._watches.add(watch)
        if since is not None and not start.resync:
            watch.version = since
        log.debug(
            "control client %s watching from %s (resync: %s)",
            peer,
            since,
            start.resync,
        )
        try:
            # 2. The reply, then the backlog or the snapshot, at the
            # peer's pace while live changes wait in the watch's buffer.
            reply = {"version": start.version, "resync": start.resync}
            writer.write(control.encode(control.ok(request.id, reply)))
            for message in start.messages:
                if watch.ended.done() or writer.is_closing():
                    return
                watch.send(message["version"], control.encode(message))
                if writer.transport.get_write_buffer_size() > _HIGH_WATER:
                    await watch.wait_writable()

            # 3. Live: the buffered changes, then each as it is announced.
            watch.go_live()
            await self._hold(watch, reader, writer, peer)
        finally:
            self._watches.discard(watch)

    async def _hold(
        self,
        watch: _Watch,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> None:
        """Wait until the watcher leaves, sends something, or is dropped."""
        incoming = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait(
                (incoming, watch.ended), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            incoming.cancel()
        if not _received(incoming):
            return
        watch.end()
        exc = RequestError(
            "INVALID_REQUEST", "A watching connection takes no further requests"
        )
        log.warning("control client %s: %s", peer, exc.message)
        writer.write(control.encode(control.error(watch.rid, exc)))

    def _announce(self, message: dict[str, Any]) -> None:
        # Called inside Router.commit after the store has the change: it must
        # neither raise nor wait.  The line is encoded once for all watchers.
        if not self._watches:
            return
        try:
            line = control.encode(message)
            for watch in list(self._watches):
                watch.push(message["version"], line)
        except Exception:
            log.exception("watch fan-out of version %s failed", message.get("version"))

    def _dropped(self, watch: _Watch) -> None:
        self._watches.discard(watch)
        log.warning(
            "watcher dropped: more than %d bytes behind at version %d",
            self.watch_buffer,
            watch.version,
        )


class _Watch:
    """One watching connection and what it has been sent.

    Until its backlog is out, live messages wait in ``pending``; after that
    they go straight into the transport's buffer.  Either way at most
    ``limit`` bytes (plus one message) may wait for the peer: past that the
    watcher is told and dropped, so a slow follower costs the router bounded
    memory and never delays a commit or another watcher.
    """

    def __init__(
        self,
        rid: RequestId,
        writer: asyncio.StreamWriter,
        limit: int,
        on_drop: Callable[[_Watch], None],
    ) -> None:
        self.rid = rid
        self.writer = writer
        self.limit = limit
        self.on_drop = on_drop
        self.version = -1  # the last version handed to the transport
        self.pending: list[tuple[int, bytes]] | None = []
        self.pending_bytes = 0
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def send(self, version: int, line: bytes) -> None:
        """Write a backlog or snapshot message."""
        self.writer.write(line)
        self.version = version

    def push(self, version: int, line: bytes) -> None:
        """Take a live message (from ``ControlServer._announce``)."""
        if self.ended.done():
            return
        if self.writer.is_closing():
            # The peer left; its task will notice at its next step.
            self.end()
            return
        # The limit is checked before a message is added, so that one
        # message larger than the limit still goes through on its own.
        if self.pending is not None:
            if self.pending_bytes >= self.limit:
                self.drop()
                return
            self.pending.append((version, line))
            self.pending_bytes += len(line)
            return
        if version <= self.version:
            return
        if self.writer.transport.get_write_buffer_size() >= self.limit:
            self.drop()
            return
        self.writer.write(line)
        self.version = version

    def go_live(self) -> None:
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        for version, line in pending:
            self.push(version, line)

    async def wait_writable(self) -> None:
        """Wait for the peer to catch up, or for the watch to end."""
        drain = asyncio.ensure_future(self.writer.drain())
        try:
            await asyncio.wait((drain, self.ended), return_when=asyncio.FIRST_COMPLETED)
        finally:
            drain.cancel()
        if drain.done() and not drain.cancelled() and drain.exception() is not None:
            self.end()

    def drop(self) -> None:
        self.pending = None
        self.end()
        self.on_drop(self)
        if not self.writer.is_closing():
            overflow = control.watch_overflow(self.rid, self.version)
            self.writer.write(control.encode(overflow))

    def end(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


# -- sockets ---------------------------------------------------------------------


def parse_loopback(address: str) -> tuple[str, int]:
    """``HOST:PORT`` on a loopback address → (host, port), or refuse it.

    Host names other than ``localhost`` are refused rather than resolved: a
    name that resolves elsewhere later would open the control port to the
    network.
    """
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ControlSetupError(f"control_tcp {address!r} must be HOST:PORT")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is None or not ip.is_loopback:
        raise ControlSetupError(
            f"control_tcp {address!r} must be on a loopback address "
            "(127.0.0.1 or [::1]): the control port changes every route"
        )
    return str(ip), int(port)


def _bind_unix(path: str) -> socket.socket:
    """A Unix socket bound at ``path`` with mode 0600, not yet listening."""
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # connect() is refused until listen(), so narrowing the mode between
        # bind and listen leaves no moment when another user could get in.
        # A umask would do too, but it is process-wide: a thread creating a
        # file meanwhile (the store's WAL) would get the narrow mode as well.
        os.chmod(path, 0o600)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale(path: str) -> None:
    """Remove a socket file left by a router that is gone, and only that."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    except BlockingIOError:
        pass  # a full backlog: someone is listening
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another process is serving {path}")


def _describe_peer(writer: asyncio.StreamWriter) -> str:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        # Who is changing routes matters more than the (empty) peer name.
        creds = getattr(socket, "SO_PEERCRED", None)
        if creds is not None:
            try:
                raw = sock.getsockopt(socket.SOL_SOCKET, creds, struct.calcsize("3i"))
                pid, uid, _ = struct.unpack("3i", raw)
                return f"unix pid {pid} uid {uid}"
            except OSError:
                pass
        return "unix"
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _received(read: asyncio.Future[bytes]) -> bool:
    """Whether a finished ``read`` brought data (EOF and errors do not)."""
    if not read.done() or read.cancelled():
        return False
    return read.exception() is None and bool(read.result())


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close, letting the peer take what was written, but not forever."""
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_GRACE):
            await writer.wait_closed()
    except (TimeoutError, OSError):
        writer.transport.abort()
