"""``--workers N``: more processes on the same public port.

The first process (the *primary*) owns everything that must exist once: the
route table, its store, the control socket, the admin and internal
listeners.  It starts ``N - 1`` *followers*.  Each follower binds the public
address itself with ``SO_REUSEPORT`` (the kernel spreads new connections
over all of them) and holds only a ``ForwardingTable``, fed over a pipe with
the same records the ``watch`` stream carries:

* primary → follower, one JSON object per line on its stdin: first the
  forwarding table, as ``{"snapshot": {"version", "sandboxes", "routes": N}}``
  then the N routes in lines of ``{"routes": [...]}``
  (``ForwardingTable.export_routes``), then every change message
  ``{"version", "changes"}``;
* follower → primary, on its stdout: ``{"ready": v}`` once it serves, then
  ``{"ack": v}`` after each change message is applied, and every second
  its counters, ``{"stats": {"connections", "proxy"}}``, which the
  primary's ``stats`` adds up with its own.

A change is acknowledged to its caller only once every follower has
acknowledged it too (``Router.followers``), so "the URL dies at once" holds
across processes.  A follower that does not answer in time is restarted; it
comes back from a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import orjson

from . import speedups
from .app import tune_gc
from .config import Config
from .listeners import tcp_server
from .routes import ForwardingTable, RouteTable

log = logging.getLogger("edge_router")

ACK_TIMEOUT = 2.0
# A new follower parses and loads the whole table before it is ready:
# about 2 s a million routes on a slow core, so the wait grows with it.
START_TIMEOUT = 10.0
START_TIMEOUT_PER_ROUTE = 20e-6
# Routes per line of a follower's starting table: about 1 MB of JSON.
EXPORT_CHUNK = 10_000
# How often a follower reports its counters (so ``stats`` lags by this).
STATS_EVERY = 1.0
ENV_CONFIG = "EDGE_ROUTER_FOLLOWER"


def proxy_counters(proxy: Any) -> dict[str, Any]:
    """One process's traffic counters, as ``stats`` reports them."""
    return {"connections": len(proxy.clients), "proxy": proxy.stats.as_dict()}


class Follower:
    """The primary's handle on one follower process."""

    def __init__(self, number: int, config: Config, port: int) -> None:
        self.number = number
        self.config = config
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None
        self.acked = -1
        # The process's last reported counters (None until its first report).
        self.stats: dict[str, Any] | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._reader: asyncio.Task[None] | None = None
        self.stopping = False
        # Called when the process exits without being asked to (the primary
        # then starts a replacement: ``Router.replace_follower``).
        self.on_exit: Callable[[Follower], object] | None = None
        self.gone = False  # its output has ended (it exited or is exiting)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, table: RouteTable) -> None:
        """Start the process and stream it ``table``; return once it serves.

        The caller holds the router's lock: the table must not change until
        every chunk is written (``ForwardingTable.export_routes``).
        """
        settings = {
            "listen": f"{self.config.listen.rpartition(':')[0]}:{self.port}",
            "domain": self.config.domain,
            "log_level": self.config.log_level,
            **{
                name: getattr(self.config, name)
                for name in (
                    "head_timeout",
                    "idle_timeout",
                    "connect_timeout",
                    "response_timeout",
                    "retry_window",
                    "grace",
                    "tunnel_idle_timeout",
                    "max_head",
                    "max_body",
                    "trusted_proxy",
                    "fallback",
                    "access_log",
                )
            },
        }
        env = dict(os.environ, **{ENV_CONFIG: orjson.dumps(settings).decode()})
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "router.workers",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        self.acked = -1
        self.stats = None
        self.gone = False
        self._reader = asyncio.get_running_loop().create_task(
            self._read(), name=f"follower-{self.number}"
        )
        forwarding = table.forwarding
        routes = len(forwarding.index)
        wait = START_TIMEOUT + START_TIMEOUT_PER_ROUTE * routes
        try:
            await asyncio.wait_for(self._send_table(table), wait)
            await self.synced(table.version, wait)
        except TimeoutError:
            raise TimeoutError(
                f"worker {self.number} did not load the table "
                f"({routes} routes) within {wait:.0f} s"
            ) from None
        log.info("worker %d (pid %d) serving", self.number, self.proc.pid)

    async def _send_table(self, table: RouteTable) -> None:
        forwarding = table.forwarding
        self._send(
            {
                "snapshot": {
                    "version": table.version,
                    "sandboxes": forwarding.export_sandboxes(),
                    "routes": len(forwarding.index),
                }
            }
        )
        stdin = self.proc.stdin if self.proc is not None else None
        for chunk in forwarding.export_routes(EXPORT_CHUNK):
            self._send({"routes": chunk})
            # A chunk at a time through the pipe, not the whole table
            # buffered in this process.
            if stdin is not None and not stdin.is_closing():
                with contextlib.suppress(ConnectionError):
                    await stdin.drain()

    def _send(self, message: dict[str, Any]) -> None:
        stdin = self.proc.stdin if self.proc is not None else None
        if stdin is None or stdin.is_closing():
            return  # a dead worker; ``synced`` will time out and replace it
        try:
            stdin.write(orjson.dumps(message) + b"\n")
        except (BrokenPipeError, ConnectionResetError, RuntimeError) as exc:
            log.warning("worker %d cannot be told: %r", self.number, exc)

    def forward(self, message: dict[str, Any]) -> None:
        """A watch message from the table: pass it on (a Router watcher)."""
        self._send(message)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            try:
                reply = orjson.loads(line)
                if isinstance(reply.get("stats"), dict):
                    self.stats = reply["stats"]
                    continue
                version = int(reply.get("ack", reply.get("ready", -1)))
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                log.warning("worker %d said something odd: %r", self.number, line)
                continue
            self.acked = max(self.acked, version)
            keep = []
            for wanted, done in self._waiters:
                if wanted <= self.acked:
                    if not done.done():
                        done.set_result(None)
                else:
                    keep.append((wanted, done))
            self._waiters = keep
        # Its output ended: it will ack nothing more, so nobody waits for it
        # (``synced`` refuses at once from now on, not after its timeout).
        self.gone = True
        for _, done in self._waiters:
            if not done.done():
                done.set_exception(ConnectionError("worker exited"))
        self._waiters = []
        code = await self.proc.wait()
        if not self.stopping:
            log.error("worker %d exited with %s", self.number, code)
            if self.on_exit is not None:
                self.on_exit(self)

    async def synced(self, version: int, timeout: float = ACK_TIMEOUT) -> None:
        """Wait until the follower has applied ``version``."""
        if self.acked >= version:
            return
        if self.gone:
            raise ConnectionError("worker exited")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((version, done))
        await asyncio.wait_for(done, timeout)

    async def stop(self) -> None:
        self.stopping = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.config.grace + 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            await self._reader


# -- the follower process ------------------------------------------------------


async def _follow(config: Config) -> int:
    loop = asyncio.get_running_loop()
    domains = tuple(config.domain or ["localhost"])
    table = ForwardingTable(domains)
    proxy = speedups.proxy.Proxy(config, table, loop)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    reader = asyncio.StreamReader(limit=1 << 30)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    out = sys.stdout.buffer

    # 1. The whole table first: no request is served from an empty one.
    first = orjson.loads(await reader.readline())["snapshot"]
    table.import_sandboxes(first["sandboxes"], first["routes"])
    loaded = 0
    while loaded < first["routes"]:
        chunk = orjson.loads(await reader.readline())["routes"]
        table.import_routes(chunk)
        loaded += len(chunk)
    table.index.compact()
    host, _, port = config.listen.rpartition(":")
    proxy.start()
    server = await tcp_server(
        functools.partial(loop.create_server, proxy.protocol),
        host.strip("[]"),
        int(port),
        reuse_port=True,
        backlog=2048,
    )
    out.write(orjson.dumps({"ready": first["version"]}) + b"\n")
    out.flush()

    # 2. Then each change, acknowledged once applied.
    async def follow() -> None:
        while line := await reader.readline():
            message = orjson.loads(line)
            for rec in message["changes"]:
                table.apply(rec)
            proxy.on_change(message)
            out.write(orjson.dumps({"ack": message["version"]}) + b"\n")
            out.flush()
        stop.set()  # the primary is gone

    async def report() -> None:
        while True:
            await asyncio.sleep(STATS_EVERY)
            out.write(orjson.dumps({"stats": proxy_counters(proxy)}) + b"\n")
            out.flush()

    following = loop.create_task(follow())
    reporting = loop.create_task(report())
    await stop.wait()
    following.cancel()
    reporting.cancel()
    server.close()
    proxy.begin_drain()
    deadline = loop.time() + config.grace
    while proxy.clients and loop.time() < deadline:
        await asyncio.sleep(0.05)
    proxy.stop()
    return 0


def main() -> int:
    settings = orjson.loads(os.environ[ENV_CONFIG])
    config = Config(**settings)
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s %(name)s[w{os.getpid()}]: %(message)s",
        stream=sys.stderr,
    )
    tune_gc()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_follow(config))
    return uvloop.run(_follow(config))


if __name__ == "__main__":
    sys.exit(main())
