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
import errno
import functools
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

from . import __version__, speedups
from .admin import AdminConnection
from .app import Router, tune_gc
from .config import Config
from .control import stats as control_stats
from .demo import DEMO_SANDBOX, DEMO_TOKEN, start_demo
from .errors import RouterError, StoreError
from .listeners import hostport, tcp_server
from .workers import Follower, proxy_counters

T = TypeVar("T")

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
        self.proxy: speedups.proxy.Proxy | None = None
        self.servers: list[asyncio.Server] = []
        self.control: Any = None
        self.stopping = asyncio.Event()
        self.public_port = 0
        self.demo_url: str | None = None
        self.internal_proxy: speedups.proxy.Proxy | None = None
        self.admin_port = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # The bound port of a TCP --internal listener (0 for unix:PATH), so
        # that ``--internal 127.0.0.1:0`` can be used and found.
        self.internal_port = 0
        self.listening = False  # start() got to the end

    async def start(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        host, port = split_hostport(config.listen, "--listen")
        if config.workers < 1:
            raise RouterError(f"--workers must be at least 1, not {config.workers}")

        # 1. The table, from the store when there is one.
        router = self.router = Router(config, public_port=port or None)
        router.open_store()

        # 2. The public listener.
        proxy = self.proxy = speedups.proxy.Proxy(config, router.table.forwarding, loop)
        router.watchers.add(proxy.on_change)
        proxy.start()
        server = await _listen(
            "--listen",
            config.listen,
            tcp_server(
                functools.partial(loop.create_server, proxy.protocol),
                host,
                port,
                reuse_port=config.workers > 1,
                alone=True,
                backlog=2048,
            ),
        )
        self.servers.append(server)
        self.public_port = server.sockets[0].getsockname()[1]

        # 2b. Followers on the same port, before any change can happen: each
        #     starts from a snapshot and then gets every change (workers.py).
        for number in range(1, config.workers):
            follower = Follower(number, config, self.public_port)
            follower.on_exit = self._replace_follower
            await follower.start(router.table)
            router.watchers.add(follower.forward)
            router.followers.append(follower)
        router.table.public_port = self.public_port
        if port == 0:
            router.table.default_hostname = _local_hostname(
                router.table.domains[0], self.public_port
            )

        def proxy_stats() -> dict[str, Any]:
            # Every process's counters, added up: the kernel spreads
            # connections over them, so one process's figures are a part.
            # Followers report once a second (workers.STATS_EVERY); a
            # replaced one starts again from 0.
            own = proxy_counters(proxy)
            per: list[dict[str, Any]] = [{"worker": 0, "pid": os.getpid()} | own]
            for follower in router.followers:
                if follower.stats is not None and follower.proc is not None:
                    per.append(
                        {"worker": follower.number, "pid": follower.proc.pid}
                        | follower.stats
                    )
            return {
                "connections": sum(p.get("connections", 0) for p in per),
                "proxy": {
                    k: sum(p.get("proxy", {}).get(k, 0) for p in per)
                    for k in own["proxy"]
                },
                "workers": per,
            }

        router.stats_hooks.append(proxy_stats)

        # 3. The trusted internal entry, loopback or a Unix socket only.
        if config.internal:
            inner = speedups.proxy.Proxy(
                config, router.table.forwarding, loop, internal=True
            )
            router.watchers.add(inner.on_change)
            inner.start()
            self.internal_proxy = inner
            if config.internal.startswith("unix:"):
                # Bound, narrowed to the owner, and only then listening: the
                # entry skips token checks, so no other user may connect.
                path = config.internal[5:]
                server = await _listen(
                    "--internal",
                    config.internal,
                    loop.create_unix_server(inner.protocol, path, start_serving=False),
                )
                os.chmod(path, 0o600)
                await server.start_serving()
            else:
                ihost, iport = split_hostport(config.internal, "--internal")
                if not _is_loopback(ihost):
                    raise RouterError(
                        "--internal must be a loopback address or unix:PATH, "
                        f"not {ihost}"
                    )
                server = await _listen(
                    "--internal",
                    config.internal,
                    tcp_server(
                        functools.partial(loop.create_server, inner.protocol),
                        ihost,
                        iport,
                    ),
                )
                self.internal_port = server.sockets[0].getsockname()[1]
            self.servers.append(server)
            where = config.internal
            if self.internal_port:
                where = hostport(ihost, self.internal_port)  # port 0 → the one bound
            log.info("internal entry listening on %s", where)

        # 4. The control socket.
        if config.control or config.control_tcp:
            from .control_server import start_control

            flag = "--control" if config.control else "--control-tcp"
            where = config.control or config.control_tcp or ""
            self.control = await _listen(flag, where, start_control(router, config))

        # 5. Health and counters for operators.
        if config.admin:
            ahost, aport = split_hostport(config.admin, "--admin")

            def counters() -> dict[str, Any]:
                return control_stats(router.table, [h() for h in router.stats_hooks])

            server = await _listen(
                "--admin",
                config.admin,
                tcp_server(
                    functools.partial(
                        loop.create_server,
                        lambda: AdminConnection(counters, lambda: proxy.draining),
                    ),
                    ahost,
                    aport,
                ),
            )
            self.servers.append(server)
            self.admin_port = server.sockets[0].getsockname()[1]
            log.info("admin listening on %s", hostport(ahost, self.admin_port))

        # 5b. No route may lead back into one of these listeners.
        self._claim_own_listeners(host)
        await self._unexpose_routes_into_us()

        # 6. The demo, when nothing else tells the router what to serve.
        demo = config.demo
        if demo is None:
            demo = not (config.state or config.control or config.control_tcp)
        if demo:
            demo_server, demo_port = await start_demo(loop)
            self.servers.append(demo_server)
            # With --state the last run's demo route is stored, to a port
            # its upstream no longer has: it is replaced, in one step.
            txn = await router.commit(
                [
                    {"op": "destroy_sandbox", "sandbox": DEMO_SANDBOX},
                    {
                        "op": "expose_port",
                        "sandbox": DEMO_SANDBOX,
                        "port": demo_port,
                        "token": DEMO_TOKEN,
                        "name": "demo",
                    },
                ],
                batch=True,
            )
            self.demo_url = txn.results[-1]["url"]

        self.listening = True
        log.info(
            "edge-router %s listening on %s for *.%s; %s; %d routes",
            __version__,
            hostport(host, self.public_port),
            ", *.".join(router.table.domains),
            speedups.describe(),
            len(router.table.routes),
        )
        if self.demo_url:
            log.info("demo route ready: curl %s", self.demo_url)
            print(f"Demo preview URL: {self.demo_url}", flush=True)

    def _claim_own_listeners(self, host: str) -> None:
        """Tell the table and the internal entry which ports are ours.

        A route to the internal entry would let a public URL reach any
        sandbox without a token; one to the public listener loops each
        request through the router until its sockets run out.
        """
        assert self.router is not None
        config = self.config
        ports = {self.public_port, self.internal_port, self.admin_port}
        hosts = {host}
        wildcard: set[int] = set()
        if config.admin:
            hosts.add(split_hostport(config.admin, "--admin")[0])
        if config.internal and not config.internal.startswith("unix:"):
            hosts.add(split_hostport(config.internal, "--internal")[0])
        # What was bound, not how it was written: "0:8787" is 0.0.0.0 too.
        for server in self.servers:
            for sock in server.sockets:
                if sock.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                address, port = sock.getsockname()[:2]
                hosts.add(address)
                if ipaddress.ip_address(address).is_unspecified:
                    wildcard.add(port)
        tcp = self.control.tcp_address if self.control is not None else None
        if tcp is not None:
            hosts.add(tcp[0])
            ports.add(tcp[1])
        ports.discard(0)
        table = self.router.table
        table.own_ports = frozenset(ports)
        table.own_hosts = frozenset(h.strip("[]") for h in hosts)
        table.own_paths = frozenset(config.unix_listeners())
        table.own_wildcard_ports = frozenset(wildcard)
        if self.internal_proxy is not None:
            self.internal_proxy.reserved_ports = (
                self.internal_proxy.reserved_ports | table.own_ports
            )

    async def _unexpose_routes_into_us(self) -> None:
        """Stored routes that lead into one of this run's listeners go.

        They were checked against the listeners of the run that made them;
        a router restarted on other ports may listen where a sandbox did.
        Served, such a route would loop or reach the internal entry.
        """
        assert self.router is not None
        router, table = self.router, self.router.table
        if router.store is None or not table.own_ports:
            return
        doomed = [
            (sandbox, port)
            for sandbox, port, target, host in router.store.routes_that_may_reach(
                table.own_ports
            )
            if table.leads_to_own(port, target, host)
        ]
        for sandbox, port in doomed:
            log.error(
                "stored route of sandbox %s port %d leads into this router's own "
                "listener: unexposed",
                sandbox,
                port,
            )
        if doomed:
            await router.commit(
                [{"op": "unexpose_port", "sandbox": s, "port": p} for s, p in doomed],
                batch=True,
            )

    def _replace_follower(self, follower: Follower) -> None:
        if self.router is not None and not self.stopping.is_set():
            task = asyncio.get_running_loop().create_task(
                self.router.replace_follower(follower), name="replace-worker"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Stop accepting, let requests in flight finish, then close."""
        if self.listening:
            # (A start that failed has nothing to drain.)
            clients = len(self.proxy.clients) if self.proxy is not None else 0
            log.info("draining: %d client connections open", clients)
        proxy = self.proxy
        # The internal entry drains like the public one (``begin_drain``
        # below): its tunnels get 1001, not the 1008 of a revoked route.
        for server in self.servers:
            server.close()
        if self.control is not None:
            await self.control.close()
        proxies = [p for p in (proxy, self.internal_proxy) if p is not None]
        for p in proxies:
            p.begin_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.grace
        while any(p.clients for p in proxies) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for p in proxies:
            p.stop()
        if self.router is not None:
            for follower in self.router.followers:
                await follower.stop()
            self.router.close()
        log.info("stopped")


# Why a listener could not be opened, in words an operator can act on.
_CANNOT_LISTEN = {
    errno.EADDRINUSE: "the address is in use by another process",
    errno.EACCES: "permission denied",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address",
}


async def _listen(flag: str, value: str, opening: Awaitable[T]) -> T:
    """``await opening``, its OSError turned into one naming the setting."""
    try:
        return await opening
    except OSError as exc:
        why = _CANNOT_LISTEN.get(exc.errno or 0)
        if why is None or flag == "--control":
            # The control socket's own checks (a live router on the path, a
            # file in the way) already say what is wrong and where.
            why = exc.strerror or str(exc)
        raise RouterError(
            f"{flag} {value}: {why}; stop what holds it or choose another {flag}"
            if exc.errno == errno.EADDRINUSE
            else f"{flag} {value}: {why}"
        ) from exc


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    tune_gc()
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
