"""TCP listeners bound here, not by the event loop, to keep one thread.

``loop.create_server(factory, host, port)`` resolves ``host`` in libuv's
thread pool, a literal address too, and the pool's four threads then live
as long as the process.  A process with a second thread pays for it on
every system call of the data path: the kernel counts references on each
socket it looks up, and glibc arms thread cancellation around each read and
write.  On the 13-byte benchmark that was 1-2% of the CPU of a request
(measured with ``bench/http_bench.py --baseline`` against a router with
its threads).  So a listen address that is a literal IP
address is bound here and handed to the loop as a socket; a host name (or
an empty host, every address) still goes through the loop's resolver.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


def bound_socket(
    host: str, port: int, reuse_port: bool = False, alone: bool = False
) -> socket.socket | None:
    """A TCP socket bound to ``host:port``, or None when ``host`` is a name.

    Options as asyncio's ``create_server`` sets them: SO_REUSEADDR, and
    IPV6_V6ONLY on an IPv6 address so that ``::`` does not also take IPv4.
    With ``alone``, the port must be free before it is shared: SO_REUSEPORT
    lets any process of this user join a port, so a second router started
    on it by mistake would silently take half the connections.  Raises
    OSError when the address cannot be bound.
    """
    if not host:
        return None
    try:
        # Numeric only: a name is never looked up here (nor is the loop
        # held up by a DNS query).
        infos = socket.getaddrinfo(
            host,
            port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST,
        )
    except socket.gaierror:
        return None
    family, kind, proto, _, address = infos[0]
    if reuse_port and alone:
        # A bind without SO_REUSEPORT fails while anyone holds the port;
        # port 0 becomes the free port it found.
        with _socket(family, kind, proto, address, False) as probe:
            address = address[:1] + probe.getsockname()[1:2] + address[2:]
    return _socket(family, kind, proto, address, reuse_port)


def _socket(
    family: int, kind: int, proto: int, address: Any, reuse_port: bool
) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def tcp_server(
    start: Callable[..., Awaitable[T]],
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    alone: bool = False,
    **kwargs: Any,
) -> T:
    """``start`` (``loop.create_server`` or ``asyncio.start_server`` with its
    callback bound) listening on ``host:port``, on a socket bound here when
    ``host`` is an address (``alone`` as for ``bound_socket``)."""
    sock = bound_socket(host, port, reuse_port, alone)
    if sock is None:
        return await start(
            host=host,
            port=port,
            reuse_address=True,
            reuse_port=reuse_port,
            **kwargs,
        )
    try:
        return await start(sock=sock, **kwargs)
    except BaseException:
        sock.close()
        raise


def hostport(host: str, port: int) -> str:
    """``host:port`` as an operator writes it, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
