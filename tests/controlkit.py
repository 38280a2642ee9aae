"""A real router with its control server, on an event loop of its own thread.

Shared by ``test_control.py`` and ``test_ctl.py``: the tests talk to it over
a real Unix socket (and loopback TCP) from the main thread, as clients would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import uvloop

from router.app import Router
from router.config import Config
from router.control_server import ControlServer, start_control
from router.routes import ForwardingTable, Route, RouteTable, Sandbox
from router.store import Store

T = TypeVar("T")


class RouterThread:
    """``Router`` + ``ControlServer`` with a SQLite store in ``directory``."""

    def __init__(
        self,
        directory: Path,
        *,
        loop: str = "uvloop",
        log_size: int | None = None,
        tcp: bool = False,
        secret: str = "s3cret-for-tests",
        **tuning: Any,
    ) -> None:
        self.path = str(directory / "control.sock")
        self.state = str(directory / "routes.db")
        self.config = Config(
            control=self.path,
            state=self.state,
            control_tcp="127.0.0.1:0" if tcp else None,
            control_secret=secret if tcp else None,
        )
        self.secret = secret
        self._loop_kind = loop
        self._log_size = log_size
        self._tuning = tuning
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="router", daemon=True)
        self.loop: asyncio.AbstractEventLoop
        self.router: Router
        self.server: ControlServer
        self._stop: asyncio.Event

    # -- lifetime --

    def start(self) -> RouterThread:
        self._thread.start()
        self._ready.wait(10)
        if self._failure is not None:
            raise self._failure
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        assert not self._thread.is_alive(), "router thread did not stop"

    def _main(self) -> None:
        runner = uvloop.run if self._loop_kind == "uvloop" else asyncio.run
        try:
            runner(self._serve())
        except BaseException as exc:
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.router = Router(self.config)
        if self._log_size is not None:
            self.router.table.log_limit = self._log_size
        self.router.open_store()
        try:
            self.server = await start_control(self.router, **self._tuning)
        except BaseException:
            self.router.close()
            raise
        try:
            self._ready.set()
            await self._stop.wait()
        finally:
            await self.server.close()
            self.router.close()

    # -- reaching into the loop --

    def call(self, func: Callable[[], Awaitable[T]]) -> T:
        """Run ``func()`` on the router's loop and return its result."""

        async def wrapper() -> T:
            return await func()

        future = asyncio.run_coroutine_threadsafe(wrapper(), self.loop)
        return future.result(20)

    def sync(self, func: Callable[[], T]) -> T:
        """Run a plain function on the router's loop (between its tasks)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(func())
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return future.result(20)

    def snapshot(self) -> dict[str, Any]:
        return self.sync(self.router.table.snapshot)

    def stored_snapshot(self) -> dict[str, Any]:
        """The table as a fresh reader of the SQLite file sees it."""
        store = Store(self.state)
        try:
            version, sandboxes, routes = store.load()
            table = RouteTable()
            table.load(version, sandboxes, routes)
            return table.snapshot()
        finally:
            store.close()

    @property
    def tcp_address(self) -> str:
        address = self.server.tcp_address
        assert address is not None
        return f"tcp://{address[0]}:{address[1]}"


class Raw:
    """A bare protocol connection: bytes in, decoded lines out."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")

    @classmethod
    def tcp(cls, address: tuple[str, int], timeout: float = 10.0) -> Raw:
        raw = cls.__new__(cls)
        raw.sock = socket.create_connection(address, timeout=timeout)
        raw.reader = raw.sock.makefile("rb")
        return raw

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, obj: Any) -> dict[str, Any]:
        self.send(orjson.dumps(obj) + b"\n")
        return self.read()

    def read(self) -> dict[str, Any]:
        line = self.reader.readline()
        assert line, "connection closed"
        message: dict[str, Any] = orjson.loads(line)
        return message

    def at_eof(self) -> bool:
        return self.reader.readline() == b""

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def replay(messages: list[dict[str, Any]]) -> RouteTable:
    """A follower's table: the watch messages applied in order.

    Change records are applied with the table's own ``_apply``, the path a
    follower takes (no rules: the leader already enforced them).
    """
    table = RouteTable()
    for message in messages:
        if "snapshot" in message:
            snap = message["snapshot"]
            table = RouteTable()
            table.load(
                snap["version"],
                [Sandbox(**sb) for sb in snap["sandboxes"]],
                [Route.from_record(r) for r in snap["routes"]],
            )
            continue
        assert message["version"] == table.version + 1, "gap or repeat in stream"
        for rec in message["changes"]:
            table._apply(rec)
        table.version = message["version"]
    return table


def forwarding_view(fwd: ForwardingTable) -> dict[bytes, tuple[Any, ...]]:
    """What the data path would resolve each label to, slot numbers aside."""
    out = {}
    for label, (route_id, sb_slot, port, target_slot, flags) in fwd.index.items():
        sandbox = fwd.sandbox_view(sb_slot)
        assert sandbox is not None
        target = fwd.targets[target_slot]
        out[label] = (route_id, sandbox.name, sandbox.stopped, port, target, flags)
    return out


def replay_forwarding(messages: list[dict[str, Any]]) -> ForwardingTable:
    """A worker's forwarding table, built from the stream alone."""
    fwd = ForwardingTable(("localhost",))
    for message in messages:
        if "snapshot" in message:
            fwd.load_snapshot(message["snapshot"])
        else:
            for rec in message["changes"]:
                fwd.apply(rec)
    return fwd
