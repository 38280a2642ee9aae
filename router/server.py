"""``edge-router serve``: wire the table, the store and the listeners.

Start-up order matters: the store is loaded before any listener opens, so
that no request ever sees an empty table; the control socket opens after the
public listener, so an orchestrator that can talk to us can also be served.
Shutdown drains: listeners stop accepting, idle connections close, requests
in flight get ``--grace`` seconds, new requests on kept-alive connections
get 503 ``SHUTTING_DOWN``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

from . import __version__, speedups
from .app import Router
from .config import Config
from .demo import DEMO_SANDBOX, DEMO_TOKEN, start_demo
from .errors import RouterError, StoreError
from .proxy import Proxy

log = logging.getLogger("edge_router")


def split_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"edge-router: {what} must be HOST:PORT, not {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


class Service:
    """One running router process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.router: Router | None = None
        self.proxy: Proxy | None = None
        self.servers: list[asyncio.Server] = []
        self.control: Any = None
        self.stopping = asyncio.Event()
        self.public_port = 0
        self.demo_url: str | None = None

    async def start(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        host, port = split_hostport(config.listen, "--listen")

        # 1. The table, from the store when there is one.
        router = self.router = Router(config, public_port=port or None)
        router.open_store()

        # 2. The public listener.
        proxy = self.proxy = Proxy(config, router.table.forwarding, loop)
        router.watchers.add(proxy.on_change)
        proxy.start()
        server = await loop.create_server(
            proxy.protocol, host, port, reuse_address=True, backlog=2048
        )
        self.servers.append(server)
        self.public_port = server.sockets[0].getsockname()[1]
        if port == 0:
            router.table.default_hostname = _local_hostname(
                router.table.domains[0], self.public_port
            )

        # 3. The control socket.
        if config.control or config.control_tcp:
            from .control_server import start_control

            self.control = await start_control(router, config)

        # 4. The demo, when nothing else tells the router what to serve.
        demo = config.demo
        if demo is None:
            demo = not (config.state or config.control or config.control_tcp)
        if demo:
            demo_server, demo_port = await start_demo(loop)
            self.servers.append(demo_server)
            txn = await router.commit(
                [
                    {
                        "op": "expose_port",
                        "sandbox": DEMO_SANDBOX,
                        "port": demo_port,
                        "token": DEMO_TOKEN,
                        "name": "demo",
                    }
                ]
            )
            self.demo_url = txn.results[0]["url"]

        log.info(
            "edge-router %s listening on %s:%d for *.%s; %s; %d routes",
            __version__,
            host,
            self.public_port,
            ", *.".join(router.table.domains),
            speedups.describe(),
            len(router.table.routes),
        )
        if self.demo_url:
            log.info("demo route ready: curl %s", self.demo_url)
            print(f"Demo preview URL: {self.demo_url}", flush=True)

    async def drain(self) -> None:
        """Stop accepting, let requests in flight finish, then close."""
        log.info("draining")
        proxy = self.proxy
        for server in self.servers:
            server.close()
        if self.control is not None:
            await self.control.close()
        if proxy is not None:
            proxy.draining = True
            for conn in list(proxy.clients):
                if conn.state == 0 and not conn.buf:
                    conn._close()
            deadline = asyncio.get_running_loop().time() + self.config.grace
            while proxy.clients and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            for conn in list(proxy.clients):
                conn._close()
            proxy.stop()
        if self.router is not None:
            self.router.close()
        log.info("stopped")


def _local_hostname(domain: str, port: int) -> str:
    if domain == "localhost" or domain.endswith(".localhost"):
        return f"{domain}:{port}"
    return domain


async def _main(config: Config) -> int:
    service = Service(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, service.stopping.set)
    try:
        await service.start()
    except StoreError as exc:
        log.error("%s", exc.message)
        return 1
    except (OSError, RouterError) as exc:
        log.error("cannot start: %s", exc)
        await service.drain()
        return 1
    await service.stopping.wait()
    await service.drain()
    return 0


def serve(config: Config) -> int:
    setup_logging(config.log_level)
    if speedups.FALLBACK_REASON:
        log.warning(
            "compiled hot path unavailable (%s); using pure-Python twins",
            speedups.FALLBACK_REASON,
        )
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed; using the stdlib event loop")
        return asyncio.run(_main(config))
    return uvloop.run(_main(config))
