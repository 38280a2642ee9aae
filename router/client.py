"""Clients of the control socket: ``ControlClient`` (blocking) and
``AsyncControlClient`` (asyncio).

Both speak the protocol of ``docs/control-protocol.md`` to an address that is
a Unix socket path (``/run/edge-router.sock`` or ``unix:/run/...``) or
``tcp://HOST:PORT`` with a secret.  Method names and arguments follow the
ports API of SPEC §2, so code written against the Sandbox SDK reads the
same::

    with ControlClient("/run/edge-router.sock") as router:
        exposed = router.expose_port("my-sandbox", 8080, name="web")
        print(exposed.url)

Every refusal, from the router or on the way to it, is a ``ControlError``
with a ``code``.  Besides the router's own codes (SPEC §2 and the protocol
document), the client raises ``UNREACHABLE`` (cannot connect),
``CONNECTION_LOST`` (the connection broke or closed mid-call), ``TIMEOUT``
and ``BAD_REPLY``.  After one of those the client is closed: whether the
last change was applied is unknown, and only the caller can decide whether
to retry it.

One client holds one connection and sends one request at a time.  ``watch``
opens a connection of its own, because a watching connection carries only
the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson

__all__ = [
    "AsyncControlClient",
    "AsyncWatchStream",
    "ControlClient",
    "ControlError",
    "ExposedPort",
    "ExposedPortInfo",
    "SandboxInfo",
    "WatchEvent",
    "WatchStream",
]

DEFAULT_TIMEOUT = 30.0

# The longest request line the router reads (``router.control.MAX_LINE``;
# a test holds the two equal).  Kept here so that this module needs nothing
# else of the router's.
MAX_LINE = 1 << 20

# Replies such as a snapshot of a large table are one line each; the bound
# only protects against a peer that is not a router at all.
_MAX_REPLY = 1 << 30


class ControlError(Exception):
    """A refused request, or a failure to get an answer at all."""

    def __init__(self, code: str, message: str, index: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.index = index


@dataclass(frozen=True, slots=True)
class ExposedPort:
    """What ``expose_port`` returns."""

    port: int
    url: str
    name: str | None
    token: str
    exposed_at: str


@dataclass(frozen=True, slots=True)
class ExposedPortInfo:
    """One entry of ``get_exposed_ports``: status ``active`` or ``stale``."""

    port: int
    url: str
    name: str | None
    exposed_at: str
    status: str


@dataclass(frozen=True, slots=True)
class SandboxInfo:
    name: str
    upstream_host: str
    state: str


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One message of a watch stream.

    Either ``changes``, the change records that lead to ``version``, or
    ``snapshot``, the whole table at ``version``, which replaces whatever
    the follower held (``resync`` says the follower asked for a version the
    router no longer has changes for).
    """

    version: int
    changes: list[dict[str, Any]]
    snapshot: dict[str, Any] | None = None
    resync: bool = False


# -- the protocol, without IO --------------------------------------------------


def parse_address(address: str) -> tuple[str, str, int]:
    """``("unix", path, 0)`` or ``("tcp", host, port)``; ``ValueError``."""
    if address.startswith("tcp://"):
        host, sep, port = address[6:].rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"control address {address!r} must be tcp://HOST:PORT")
        return "tcp", host, int(port)
    path = address[5:] if address.startswith("unix:") else address
    if not path:
        raise ValueError("control address is empty")
    return "unix", path, 0


def _encode(rid: int, op: str, args: dict[str, Any]) -> bytes:
    # Arguments left at None are not sent: the router takes an absent
    # optional argument as "keep or use the default".
    request = {"id": rid, "op": op}
    request.update((k, v) for k, v in args.items() if v is not None)
    line = orjson.dumps(request)
    if len(line) > MAX_LINE:
        # Refused here, with the router's own code: sent, the router would
        # answer LINE_TOO_LONG and close while we still write, and all we
        # would see is a broken pipe.
        raise ControlError(
            "LINE_TOO_LONG",
            f"The {op} request is {len(line)} bytes; the router reads at most "
            f"{MAX_LINE} a line (split the batch)",
        )
    return line + b"\n"


def _decode(line: bytes) -> dict[str, Any]:
    if not line:
        raise ControlError("CONNECTION_LOST", "The router closed the connection")
    try:
        message = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ControlError("BAD_REPLY", f"Reply is not JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise ControlError("BAD_REPLY", "Reply is not a JSON object")
    return message


def _check(message: dict[str, Any], rid: int | None) -> Any:
    """The result of a reply, or its error raised."""
    if message.get("ok") is False:
        err = message.get("error")
        if not isinstance(err, dict):
            raise ControlError("BAD_REPLY", "Error reply without an error")
        raise ControlError(
            str(err.get("code", "ERROR")), str(err.get("message", "")), err.get("index")
        )
    # A reply with another id is a reply to somebody else's request: the
    # connection is out of step and no later answer on it can be trusted.
    if message.get("ok") is not True or (rid is not None and message.get("id") != rid):
        raise ControlError("BAD_REPLY", f"Unexpected reply {message!r:.200}")
    return message.get("result")


def _exposed(result: dict[str, Any]) -> ExposedPort:
    return ExposedPort(
        result["port"],
        result["url"],
        result["name"],
        result["token"],
        result["exposedAt"],
    )


def _port_info(item: dict[str, Any]) -> ExposedPortInfo:
    return ExposedPortInfo(
        item["port"], item["url"], item["name"], item["exposedAt"], item["status"]
    )


def _sandbox(result: dict[str, Any]) -> SandboxInfo:
    return SandboxInfo(result["name"], result["upstream_host"], result["state"])


def _event(message: dict[str, Any]) -> WatchEvent:
    if "ok" in message:
        # The stream's only reply-shaped message is its last: an error.
        _check(message, None)
    if "snapshot" in message:
        return WatchEvent(
            message["version"], [], message["snapshot"], bool(message.get("resync"))
        )
    if "changes" in message:
        return WatchEvent(message["version"], message["changes"])
    raise ControlError("BAD_REPLY", f"Unexpected watch message {message!r:.200}")


def _expose_args(
    sandbox: str,
    port: int,
    hostname: str | None,
    name: str | None,
    token: str | None,
    target: str | None,
    host: str | None,
) -> dict[str, Any]:
    return {
        "sandbox": sandbox,
        "port": port,
        "hostname": hostname,
        "name": name,
        "token": token,
        "target": target,
        "host": host,
    }


# -- blocking client -------------------------------------------------------------


class ControlClient:
    """A blocking client; safe to share between threads (calls take turns).

    ``version`` is the table version after the last change this client made
    (every change reply carries it), for waiting until a follower has it.
    """

    def __init__(
        self,
        address: str,
        secret: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self.address = address
        self.secret = secret
        self.timeout = timeout
        self.version: int | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._sock = _connect(address, timeout)
        self._reader = self._sock.makefile("rb")
        if parse_address(address)[0] == "tcp":
            try:
                self.call("auth", secret=secret or "")
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def call(self, op: str, **args: Any) -> Any:
        """Send one request and return its result; raise ``ControlError``."""
        with self._lock:
            rid = next(self._ids)
            data = _encode(rid, op, args)
            try:
                self._sock.sendall(data)
                message = _decode(self._reader.readline(_MAX_REPLY))
            except TimeoutError as exc:
                self.close()
                raise ControlError("TIMEOUT", f"No reply to {op} in time") from exc
            except ControlError:
                self.close()
                raise
            except (OSError, ValueError) as exc:
                self.close()
                raise ControlError("CONNECTION_LOST", f"{op}: {exc}") from exc
            result = _check(message, rid)
            if "version" in message:
                self.version = message["version"]
            return result

    # -- SPEC §2 operations --

    def expose_port(
        self,
        sandbox: str,
        port: int,
        *,
        hostname: str | None = None,
        name: str | None = None,
        token: str | None = None,
        target: str | None = None,
        host: str | None = None,
    ) -> ExposedPort:
        args = _expose_args(sandbox, port, hostname, name, token, target, host)
        return _exposed(self.call("expose_port", **args))

    def unexpose_port(self, sandbox: str, port: int) -> bool:
        """True when the port was exposed (unexposing is idempotent)."""
        result = self.call("unexpose_port", sandbox=sandbox, port=port)
        return bool(result["unexposed"])

    def get_exposed_ports(
        self, sandbox: str, hostname: str | None = None
    ) -> list[ExposedPortInfo]:
        result = self.call("get_exposed_ports", sandbox=sandbox, hostname=hostname)
        return [_port_info(item) for item in result]

    def validate_port_token(self, sandbox: str, port: int, token: str) -> bool:
        result = self.call(
            "validate_port_token", sandbox=sandbox, port=port, token=token
        )
        return bool(result)

    def set_sandbox(
        self,
        sandbox: str,
        *,
        upstream_host: str | None = None,
        state: str | None = None,
    ) -> SandboxInfo:
        result = self.call(
            "set_sandbox", sandbox=sandbox, upstream_host=upstream_host, state=state
        )
        return _sandbox(result)

    def destroy_sandbox(self, sandbox: str) -> dict[str, Any]:
        """``{"sandbox", "destroyed", "routes"}``: whether it existed, and
        how many routes went with it."""
        result: dict[str, Any] = self.call("destroy_sandbox", sandbox=sandbox)
        return result

    def batch(self, ops: list[dict[str, Any]]) -> list[Any]:
        """Apply ``[{"op": ..., ...}, ...]`` all or none; each op's result."""
        result: list[Any] = self.call("batch", ops=ops)
        return result

    def snapshot(self) -> dict[str, Any]:
        """``{"version", "routes", "sandboxes"}``."""
        result: dict[str, Any] = self.call("snapshot")
        return result

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("stats")
        return result

    def ping(self) -> float:
        """The round trip in seconds."""
        start = time.perf_counter()
        self.call("ping")
        return time.perf_counter() - start

    def watch(self, since: int | None = None) -> WatchStream:
        """Follow the table: changes after ``since`` (a snapshot first when it
        is None), then each new one as it is made.

        The stream has a connection of its own, open when this returns.
        Resume after a disconnect with the last event's ``version``.
        """
        return WatchStream(self.address, self.secret, self.timeout, since)


class WatchStream:
    """The events of one ``watch``; iterate, then ``close`` (or use ``with``).

    ``version`` and ``resync`` are the router's first answer: the version
    the backlog (or snapshot) leads to, and whether ``since`` was too old.
    """

    def __init__(
        self,
        address: str,
        secret: str | None,
        timeout: float | None,
        since: int | None,
    ) -> None:
        self._closed = False
        self._sock = _connect(address, timeout)
        self._reader = self._sock.makefile("rb")
        try:
            if parse_address(address)[0] == "tcp":
                self._send(0, "auth", {"secret": secret or ""})
                _check(self._read(), 0)
            self._send(1, "watch", {"since": since})
            started = _check(self._read(), 1)
        except BaseException:
            self.close()
            raise
        self.version: int = started["version"]
        self.resync: bool = started["resync"]
        # Changes come whenever they are made: no read timeout from here.
        self._sock.settimeout(None)

    def _send(self, rid: int, op: str, args: dict[str, Any]) -> None:
        try:
            self._sock.sendall(_encode(rid, op, args))
        except OSError as exc:
            raise ControlError("CONNECTION_LOST", f"watch: {exc}") from exc

    def _read(self) -> dict[str, Any]:
        try:
            return _decode(self._reader.readline(_MAX_REPLY))
        except (OSError, ValueError) as exc:
            raise ControlError("CONNECTION_LOST", f"watch: {exc}") from exc

    def __iter__(self) -> WatchStream:
        return self

    def __next__(self) -> WatchEvent:
        if self._closed:
            raise StopIteration
        return _event(self._read())

    def close(self) -> None:
        self._closed = True
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _connect(address: str, timeout: float | None) -> socket.socket:
    kind, host, port = parse_address(address)
    try:
        if kind == "tcp":
            sock = socket.create_connection((host, port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(host)
        except BaseException:
            sock.close()
            raise
        return sock
    except OSError as exc:
        raise ControlError(
            "UNREACHABLE", f"Cannot reach the router at {address}: {exc}"
        ) from exc


# -- asyncio client --------------------------------------------------------------


class AsyncControlClient:
    """The asyncio twin of ``ControlClient``; tasks sharing one take turns.

    Use ``client = await AsyncControlClient.connect(address)`` or
    ``async with AsyncControlClient(address) as client``.
    """

    def __init__(
        self,
        address: str,
        secret: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self.address = address
        self.secret = secret
        self.timeout = timeout
        self.version: int | None = None
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @classmethod
    async def connect(
        cls,
        address: str,
        secret: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> AsyncControlClient:
        client = cls(address, secret, timeout)
        await client.open()
        return client

    async def open(self) -> None:
        self._reader, self._writer = await _open(self.address, self.timeout)
        if parse_address(self.address)[0] == "tcp":
            try:
                await self.call("auth", secret=self.secret or "")
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def __aenter__(self) -> AsyncControlClient:
        if self._writer is None:
            await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def call(self, op: str, **args: Any) -> Any:
        """Send one request and return its result; raise ``ControlError``."""
        async with self._lock:
            if self._writer is None or self._reader is None:
                raise ControlError("CONNECTION_LOST", "The client is closed")
            rid = next(self._ids)
            data = _encode(rid, op, args)
            try:
                async with asyncio.timeout(self.timeout):
                    self._writer.write(data)
                    await self._writer.drain()
                    message = _decode(await _readline(self._reader))
            except TimeoutError as exc:
                await self.close()
                raise ControlError("TIMEOUT", f"No reply to {op} in time") from exc
            except ControlError:
                await self.close()
                raise
            except OSError as exc:
                await self.close()
                raise ControlError("CONNECTION_LOST", f"{op}: {exc}") from exc
            result = _check(message, rid)
            if "version" in message:
                self.version = message["version"]
            return result

    # -- SPEC §2 operations --

    async def expose_port(
        self,
        sandbox: str,
        port: int,
        *,
        hostname: str | None = None,
        name: str | None = None,
        token: str | None = None,
        target: str | None = None,
        host: str | None = None,
    ) -> ExposedPort:
        args = _expose_args(sandbox, port, hostname, name, token, target, host)
        return _exposed(await self.call("expose_port", **args))

    async def unexpose_port(self, sandbox: str, port: int) -> bool:
        result = await self.call("unexpose_port", sandbox=sandbox, port=port)
        return bool(result["unexposed"])

    async def get_exposed_ports(
        self, sandbox: str, hostname: str | None = None
    ) -> list[ExposedPortInfo]:
        result = await self.call(
            "get_exposed_ports", sandbox=sandbox, hostname=hostname
        )
        return [_port_info(item) for item in result]

    async def validate_port_token(self, sandbox: str, port: int, token: str) -> bool:
        result = await self.call(
            "validate_port_token", sandbox=sandbox, port=port, token=token
        )
        return bool(result)

    async def set_sandbox(
        self,
        sandbox: str,
        *,
        upstream_host: str | None = None,
        state: str | None = None,
    ) -> SandboxInfo:
        result = await self.call(
            "set_sandbox", sandbox=sandbox, upstream_host=upstream_host, state=state
        )
        return _sandbox(result)

    async def destroy_sandbox(self, sandbox: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("destroy_sandbox", sandbox=sandbox)
        return result

    async def batch(self, ops: list[dict[str, Any]]) -> list[Any]:
        result: list[Any] = await self.call("batch", ops=ops)
        return result

    async def snapshot(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("snapshot")
        return result

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("stats")
        return result

    async def ping(self) -> float:
        start = time.perf_counter()
        await self.call("ping")
        return time.perf_counter() - start

    def watch(self, since: int | None = None) -> AsyncWatchStream:
        """As ``ControlClient.watch``; the connection opens in ``start``
        (or ``async with``, or the first ``async for`` step)."""
        return AsyncWatchStream(self.address, self.secret, self.timeout, since)


class AsyncWatchStream:
    """The asyncio twin of ``WatchStream``::

    async with client.watch(since) as events:
        async for event in events:
            ...
    """

    def __init__(
        self,
        address: str,
        secret: str | None,
        timeout: float | None,
        since: int | None,
    ) -> None:
        self.address = address
        self.secret = secret
        self.timeout = timeout
        self.since = since
        self.version: int | None = None
        self.resync = False
        self._closed = False
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def start(self) -> None:
        if self._reader is not None or self._closed:
            return
        self._reader, self._writer = await _open(self.address, self.timeout)
        try:
            async with asyncio.timeout(self.timeout):
                if parse_address(self.address)[0] == "tcp":
                    auth = {"secret": self.secret or ""}
                    self._writer.write(_encode(0, "auth", auth))
                    _check(await self._read(), 0)
                self._writer.write(_encode(1, "watch", {"since": self.since}))
                started = _check(await self._read(), 1)
        except TimeoutError as exc:
            await self.aclose()
            raise ControlError("TIMEOUT", "No answer to watch in time") from exc
        except BaseException:
            await self.aclose()
            raise
        self.version = started["version"]
        self.resync = started["resync"]

    async def _read(self) -> dict[str, Any]:
        assert self._reader is not None
        try:
            return _decode(await _readline(self._reader))
        except OSError as exc:
            raise ControlError("CONNECTION_LOST", f"watch: {exc}") from exc

    def __aiter__(self) -> AsyncWatchStream:
        return self

    async def __anext__(self) -> WatchEvent:
        await self.start()
        if self._closed:
            raise StopAsyncIteration
        return _event(await self._read())

    async def aclose(self) -> None:
        self._closed = True
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def __aenter__(self) -> AsyncWatchStream:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def _open(
    address: str, timeout: float | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    kind, host, port = parse_address(address)
    try:
        async with asyncio.timeout(timeout):
            if kind == "tcp":
                return await asyncio.open_connection(host, port, limit=_MAX_REPLY)
            return await asyncio.open_unix_connection(host, limit=_MAX_REPLY)
    except (OSError, TimeoutError) as exc:
        raise ControlError(
            "UNREACHABLE", f"Cannot reach the router at {address}: {exc}"
        ) from exc


async def _readline(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    except asyncio.LimitOverrunError as exc:
        raise ControlError("BAD_REPLY", "Reply line is too long") from exc
