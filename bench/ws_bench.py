"""WebSocket benchmark: edge-router beside nginx, in one run.

Both proxies tunnel WebSocket connections to the same echo upstream and are
driven by the same load client in alternating rounds, so that noise on a
shared machine falls on both alike.  What matters is the ratio to nginx from
the same run, not the absolute numbers.

Layout (two cores are assumed)::

    load client ──► nginx       (core 1) ──┐
    load client ──► edge-router (core 1) ──┴──► echo upstream
    (load client and echo upstream on core 0)

Reported, as medians over the rounds:

* echoed messages/s with 10 connections x 64 messages in flight each, and
  with one connection and one message in flight (a round trip at a time),
  for 100-byte and 64 KiB binary messages;
* the proxy's CPU time per message (utime + stime from ``/proc/<pid>/stat``
  of the proxy and its children, over the measured window);
* memory per idle tunnel: the proxy's RSS growth with N idle tunnels open,
  divided by N (N is 10,000 when the file descriptor limit allows it).

The load client and the upstream speak RFC 6455 directly on raw sockets,
so that their per-message cost stays small next to the proxy's.  The client
masks with an all-zero key: the frame format allows it (RFC 6455 §5.3 wants
unpredictable keys from browsers, against cache poisoning); neither proxy
unmasks, so it changes nothing for them, and the echo can skip unmasking.
Per round two more figures are printed: the load side's CPU share of core
0 (near 100 % means the round was limited by the load side, not by the
proxy) and the cores used by other processes on the machine (noise).

With ``--floor``, ``bench/pipe_floor.py`` (a uvloop pipe that reads no
frame and gives each client an upstream connection of its own) runs as a
third proxy, and a second table shows its figures: what any Python proxy
on uvloop pays per message, under which edge-router cannot go.

nginx runs with its stock tunnel buffer (``proxy_buffer_size``, one page)
unless ``--nginx-buffer`` says otherwise; it reads and writes a tunnel in
pieces of that size, which is what its 64 KiB figures show.

Run: ``python bench/ws_bench.py`` (``-h`` for the flags).  Everything binds
127.0.0.1 on free ports, lives in a temp dir, and every process started
here is stopped by its PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import grp
import hashlib
import json
import os
import pwd
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from proctools import children, cpu_ticks, free_port, pin

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SANDBOX = "bench"
TOKEN = "wsbench"
TIMEOUT = 10.0


@dataclass(frozen=True)
class Scenario:
    key: str
    connections: int
    in_flight: int
    size: int


SCENARIOS = (
    Scenario("10x64 100B", 10, 64, 100),
    Scenario("10x64 64KiB", 10, 64, 64 * 1024),
    Scenario("1x1 100B", 1, 1, 100),
    Scenario("1x1 64KiB", 1, 1, 64 * 1024),
)


# -- RFC 6455 on raw sockets ----------------------------------------------------


def frame_header(size: int, masked: bool, first: int = 0x82) -> bytes:
    """A frame header (FIN binary unless told); a mask key is all zeros."""
    bit = 0x80 if masked else 0
    if size < 126:
        head = struct.pack("!BB", first, bit | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, bit | 127, size)
    return head + (b"\0\0\0\0" if masked else b"")


def accept_for(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


class FrameCounter:
    """Counts whole frames in a byte stream, reading only the headers."""

    __slots__ = ("head", "need")

    def __init__(self) -> None:
        self.head = b""
        self.need = 0

    def feed(self, data: bytes) -> int:
        done = 0
        if self.head:
            data = self.head + data
            self.head = b""
        pos, end, need = 0, len(data), self.need
        while pos < end:
            if need:
                take = min(need, end - pos)
                pos += take
                need -= take
                if not need:
                    done += 1
                continue
            if end - pos < 2:
                self.head = data[pos:]
                break
            b1 = data[pos + 1]
            n = b1 & 0x7F
            size = (
                2 + (2 if n == 126 else 8 if n == 127 else 0) + (4 if b1 & 0x80 else 0)
            )
            if end - pos < size:
                self.head = data[pos:]
                break
            if n == 126:
                n = int.from_bytes(data[pos + 2 : pos + 4], "big")
            elif n == 127:
                n = int.from_bytes(data[pos + 2 : pos + 10], "big")
            pos += size
            if n:
                need = n
            else:
                done += 1
        self.need = need
        return done


# -- the echo upstream (run as its own process: ``--upstream PORT``) -----------


class EchoUpstream(asyncio.Protocol):
    """Echoes every frame back unmasked, streaming: payload bytes go out as
    they come in, so a 64 KiB message is never gathered in memory."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.shaken = False
        self.buf = b""
        self.need = 0
        self.key = b""
        self.offset = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.shaken:
            self.buf += data
            if b"\r\n\r\n" not in self.buf:
                return
            head, _, data = self.buf.partition(b"\r\n\r\n")
            self.buf = b""
            key = b""
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                + accept_for(key)
                + b"\r\n\r\n"
            )
            self.shaken = True
        out = []
        if self.buf:
            data = self.buf + data
            self.buf = b""
        pos, end = 0, len(data)
        while pos < end:
            if self.need:
                take = min(self.need, end - pos)
                out.append(self._unmask(data[pos : pos + take]))
                pos += take
                self.need -= take
                continue
            if end - pos < 2:
                self.buf = data[pos:]
                break
            b0, b1 = data[pos], data[pos + 1]
            n = b1 & 0x7F
            size = (
                2 + (2 if n == 126 else 8 if n == 127 else 0) + (4 if b1 & 0x80 else 0)
            )
            if end - pos < size:
                self.buf = data[pos:]
                break
            if n == 126:
                n = int.from_bytes(data[pos + 2 : pos + 4], "big")
            elif n == 127:
                n = int.from_bytes(data[pos + 2 : pos + 10], "big")
            self.key = data[pos + size - 4 : pos + size] if b1 & 0x80 else b""
            if self.key == b"\0\0\0\0":
                self.key = b""
            self.offset = 0
            if b0 & 0x0F == 0x8:
                self.transport.write(b"\x88\x00")
                self.transport.close()
                return
            out.append(frame_header(n, masked=False, first=b0))
            pos += size
            self.need = n
        if out:
            self.transport.write(b"".join(out))

    def _unmask(self, chunk: bytes) -> bytes:
        key = self.key
        if not key:
            return chunk
        # A real client's random key: XOR through one big integer.
        start = self.offset % 4
        self.offset += len(chunk)
        rolled = (key[start:] + key[:start]) * (len(chunk) // 4 + 1)
        mixed = int.from_bytes(chunk, "big") ^ int.from_bytes(
            rolled[: len(chunk)], "big"
        )
        return mixed.to_bytes(len(chunk), "big")


def run_upstream(port: int) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            EchoUpstream, "127.0.0.1", port, backlog=4096, reuse_address=True
        )
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(main())


# -- the load client (in this process, on core 0) -------------------------------


class LoadConnection(asyncio.Protocol):
    """One client connection: keeps ``in_flight`` messages out at all times."""

    def __init__(self, host: str, frame: bytes, in_flight: int) -> None:
        self.host = host
        self.frame = frame
        self.in_flight = in_flight
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.head = b""
        self.counter = FrameCounter()
        self.echoed = 0
        self.running = False
        self.key = base64.b64encode(os.urandom(16))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.write(
            f"GET /echo HTTP/1.1\r\nHost: {self.host}\r\nConnection: Upgrade\r\n"
            "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n".encode()
            + b"Sec-WebSocket-Key: "
            + self.key
            + b"\r\n\r\n"
        )

    def data_received(self, data: bytes) -> None:
        if not self.ready.done():
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101") or accept_for(self.key) not in head:
                self.ready.set_exception(RuntimeError(f"handshake: {head[:200]!r}"))
                return
            self.ready.set_result(None)
        done = self.counter.feed(data)
        if done:
            self.echoed += done
            if self.running and self.transport is not None:
                self.transport.write(self.frame * done)

    def start(self) -> None:
        assert self.transport is not None
        self.running = True
        self.transport.write(self.frame * self.in_flight)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed in handshake: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)


async def open_tunnels(
    port: int, host: str, count: int, frame: bytes, in_flight: int, parallel: int = 64
) -> list[LoadConnection]:
    loop = asyncio.get_running_loop()
    conns: list[LoadConnection] = []
    gate = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with gate:
            conn = LoadConnection(host, frame, in_flight)
            await asyncio.wait_for(
                loop.create_connection(lambda: conn, "127.0.0.1", port), TIMEOUT
            )
            conns.append(conn)
            await asyncio.wait_for(conn.ready, TIMEOUT)

    outcomes = await asyncio.gather(
        *(one() for _ in range(count)), return_exceptions=True
    )
    failed = [x for x in outcomes if isinstance(x, BaseException)]
    if failed:
        await close_tunnels(conns)
        raise RuntimeError(f"{len(failed)} of {count} tunnels failed: {failed[0]!r}")
    return conns


async def close_tunnels(conns: list[LoadConnection]) -> None:
    for conn in conns:
        if conn.transport is not None:
            conn.transport.write(b"\x88\x80\0\0\0\0")  # masked, empty close
            conn.transport.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(c.closed for c in conns)), TIMEOUT)


# -- processes --------------------------------------------------------------------


def family(pid: int) -> list[int]:
    """The process and its children (an nginx master and its worker)."""
    return [pid, *children(pid)]


def tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def machine_busy_ticks() -> int:
    """Time all cores spent running processes (``/proc/stat``), steal
    included.  Interrupt and softirq time is left out: on loopback much of
    the kernel's network work for our own sockets is counted there."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = fields
    return user + nice + system + steal


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/statm") as fh:
            total += int(fh.read().split()[1]) * PAGE
    return total


@dataclass
class Processes:
    """Every process started here, stopped by PID on the way out."""

    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(
        self, argv: list[str], log: Path, **kw: object
    ) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kw,  # type: ignore[call-overload]
            )
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited at start-up:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{proc.args} is not listening on {port}:\n{log.read_text()}")


def nginx_config(
    prefix: Path, port: int, upstream: int, connections: int, buffer: str | None
) -> str:
    user = ""
    if os.geteuid() == 0:
        # Run as root, nginx would switch its worker to ``nobody``, which
        # cannot read the private temp dir.
        user = (
            f"user {pwd.getpwuid(os.geteuid()).pw_name} "
            f"{grp.getgrgid(os.getegid()).gr_name};\n"
        )
    temp = "".join(
        f"    {kind}_temp_path {prefix}/tmp/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{user}worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile {resource.getrlimit(resource.RLIMIT_NOFILE)[1]};
# Two sockets per tunnel, and slots of closed connections come back lazily:
# with only 2N slots a second batch of N tunnels made nginx "reuse" (close)
# live ones.
events {{ worker_connections {4 * connections + 1024}; }}
http {{
{temp}    access_log off;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            # The Host rewrite edge-router does for a route (SPEC 4).
            proxy_set_header Host localhost:{upstream};
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Forwarded-Port $server_port;
            # No tunnel timeout, like edge-router's default.
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
{f"            proxy_buffer_size {buffer}; proxy_buffers 4 {buffer};" if buffer else ""}
        }}
    }}
}}
"""


def control(path: Path, request: dict[str, object]) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(str(path))
        sock.sendall(json.dumps({"id": 1, **request}).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    answer: dict[str, object] = json.loads(reply)
    if not answer.get("ok"):
        raise SystemExit(f"control {request}: {answer}")
    return answer


# -- the bench ---------------------------------------------------------------------


@dataclass
class Target:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    host: str
    log: Path  # shown when something goes wrong

    def pids(self) -> list[int]:
        return family(self.proc.pid)


@dataclass
class Round:
    rate: float  # messages/s
    cpu_us: float  # proxy CPU per message
    load_share: float  # load client + upstream CPU, share of one core
    others: float  # cores busy with processes outside this bench


@contextlib.contextmanager
def started(args: argparse.Namespace) -> Iterator[tuple[list[Target], int]]:
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="ws-bench-"))
    try:
        # 1. The echo upstream, on the load core.
        up_port = free_port()
        log = tmp / "upstream.log"
        up = procs.start(
            pin(args.load_cpu, args.python, __file__, "--upstream", str(up_port)),
            log,
        )
        wait_listening(up, up_port, log)

        # 2. edge-router, one process, on the proxy core; the route by the
        # control socket.
        port = free_port()
        ctl = tmp / "control.sock"
        log = tmp / "edge-router.log"
        argv = pin(
            args.proxy_cpu,
            args.python,
            "-m",
            "router",
            "serve",
            f"--listen=127.0.0.1:{port}",
            f"--control={ctl}",
            "--no-demo",
            "--no-access-log",
            "--log-level=warning",
        )
        env = {k: v for k, v in os.environ.items() if k != "EDGE_ROUTER_PURE"}
        router = procs.start(argv, log, cwd=REPO, env=env)
        wait_listening(router, port, log)
        deadline = time.monotonic() + TIMEOUT
        while not ctl.exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # the control socket opens after the listener
        control(
            ctl,
            {"op": "expose_port", "sandbox": SANDBOX, "port": up_port, "token": TOKEN},
        )
        host = f"{up_port}-{SANDBOX}-{TOKEN}.localhost:{port}"
        print("edge-router: " + " ".join(argv))

        # 3. nginx, one worker, on the proxy core.
        nport = free_port()
        prefix = tmp / "nginx"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / "tmp" / kind).mkdir(parents=True)
        conf = prefix / "nginx.conf"
        conf.write_text(
            nginx_config(prefix, nport, up_port, args.idle_tunnels, args.nginx_buffer)
        )
        log = tmp / "nginx.log"
        nginx = procs.start(
            pin(
                args.proxy_cpu,
                args.nginx,
                f"-p{prefix}",
                f"-c{conf}",
                f"-e{prefix}/error.log",
            ),
            log,
        )
        wait_listening(nginx, nport, log)
        print(
            f"nginx: {args.nginx} -p {prefix} -c {conf} (1 worker, core "
            f"{args.proxy_cpu})"
        )
        targets = [
            Target("edge-router", router, port, host, tmp / "edge-router.log"),
            Target("nginx", nginx, nport, host, prefix / "error.log"),
        ]

        # 4. The floor (``--floor``): bytes piped to the upstream, one
        # upstream connection per client, nothing read.
        if args.floor:
            fport = free_port()
            log = tmp / "floor.log"
            script = REPO / "bench" / "pipe_floor.py"
            argv = pin(args.proxy_cpu, args.python, str(script), str(fport))
            floor = procs.start([*argv, str(up_port)], log)
            wait_listening(floor, fport, log)
            print("floor: " + " ".join([*argv, str(up_port)]))
            targets.append(Target("floor", floor, fport, host, log))
        yield targets, up.pid
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


async def measure(
    target: Target, scenario: Scenario, seconds: float, upstream_pid: int
) -> Round:
    frame = frame_header(scenario.size, masked=True) + os.urandom(scenario.size)
    conns = await open_tunnels(
        target.port, target.host, scenario.connections, frame, scenario.in_flight
    )
    try:
        for conn in conns:
            conn.start()
        await asyncio.sleep(0.3)  # warm up
        pids = target.pids()
        before = sum(c.echoed for c in conns)
        ticks = cpu_ticks(pids)
        load = cpu_ticks([os.getpid(), upstream_pid])
        busy = machine_busy_ticks()
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - t0
        echoed = sum(c.echoed for c in conns) - before
        ticks = cpu_ticks(pids) - ticks
        load = cpu_ticks([os.getpid(), upstream_pid]) - load
        busy = machine_busy_ticks() - busy
        if echoed == 0:
            raise SystemExit(f"{target.name} {scenario.key}: nothing echoed")
        return Round(
            rate=echoed / elapsed,
            cpu_us=ticks / CLK_TCK / echoed * 1e6,
            load_share=load / CLK_TCK / elapsed,
            others=max(busy - ticks - load, 0) / CLK_TCK / elapsed,
        )
    finally:
        for conn in conns:
            conn.running = False
        await close_tunnels(conns)


async def idle_memory(target: Target, count: int) -> float:
    """RSS growth per idle tunnel, in bytes."""
    pids = target.pids()
    await asyncio.sleep(0.5)
    before = rss_bytes(pids)
    probe = frame_header(5, masked=True) + b"probe"
    conns = await open_tunnels(target.port, target.host, count, probe, 1, parallel=128)
    try:
        # Every 500th tunnel carries one message: they are real tunnels.
        sample = conns[::500]
        for conn in sample:
            conn.start()
            conn.running = False
        deadline = time.monotonic() + TIMEOUT
        while any(c.echoed == 0 for c in sample) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if any(c.echoed == 0 for c in sample):
            raise SystemExit(f"{target.name}: idle tunnels do not echo")
        await asyncio.sleep(1.0)
        after = rss_bytes(target.pids())
    finally:
        await close_tunnels(conns)
    return (after - before) / count


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return min(wanted, (hard - 256) // 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per round")
    parser.add_argument("--idle-tunnels", type=int, default=10_000)
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also run bench/pipe_floor.py, a uvloop pipe that reads no frame, "
        "as a third proxy: the floor under any Python proxy's CPU per message",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(s.key for s in SCENARIOS),
        help="comma-separated scenario names to run (default: all)",
    )
    parser.add_argument("--proxy-cpu", default="1")
    parser.add_argument("--load-cpu", default="0")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--nginx", default=shutil.which("nginx") or "nginx")
    parser.add_argument(
        "--nginx-buffer",
        help="proxy_buffer_size for nginx (its tunnel buffer; default: one page)",
    )
    args = parser.parse_args()
    if args.upstream is not None:
        run_upstream(args.upstream)
        return

    # The proxy holds two sockets per tunnel; the child processes inherit
    # the raised limit.
    wanted = args.idle_tunnels
    args.idle_tunnels = raise_fd_limit(wanted)
    os.sched_setaffinity(0, {int(args.load_cpu)})
    import uvloop

    with started(args) as (targets, upstream_pid):
        uvloop.run(run(args, targets, upstream_pid, wanted))


async def run(
    args: argparse.Namespace, targets: list[Target], upstream_pid: int, wanted: int
) -> None:
    from router import speedups

    print(f"edge-router hot path: {speedups.describe()}")
    results: dict[tuple[str, str], list[Round]] = {}
    began = time.monotonic()

    # 1. Memory first, while both proxies are fresh.
    memory = {}
    for target in targets:
        try:
            memory[target.name] = await idle_memory(target, args.idle_tunnels)
        except (OSError, RuntimeError, TimeoutError):
            log = tail(target.log)
            raise SystemExit(f"{target.name} failed; its log:\n{log}") from None
        print(f"{target.name}: {memory[target.name] / 1024:.1f} KiB per idle tunnel")

    # 2. Throughput, alternating.
    wanted_keys = {k.strip() for k in args.scenarios.split(",")}
    scenarios = [s for s in SCENARIOS if s.key in wanted_keys]
    if not scenarios:
        raise SystemExit(f"no such scenario in {args.scenarios!r}")
    for r in range(args.rounds):
        for scenario in scenarios:
            # Alternate which proxy goes first from round to round.
            order = targets if r % 2 == 0 else targets[::-1]
            for target in order:
                got = await measure(target, scenario, args.seconds, upstream_pid)
                results.setdefault((target.name, scenario.key), []).append(got)
                print(
                    f"round {r + 1} {scenario.key:12} {target.name:11} "
                    f"{got.rate:10.0f} msg/s {got.cpu_us:8.1f} us CPU/msg "
                    f"load side {got.load_share * 100:4.0f}% of a core, "
                    f"others {got.others:.2f} cores",
                    flush=True,
                )

    print(
        f"\nmedians of {args.rounds} rounds of {args.seconds:.0f} s "
        f"(took {time.monotonic() - began:.0f} s)"
    )
    print(
        f"{'scenario':14}{'edge msg/s':>12}{'nginx msg/s':>13}{'ratio':>7}"
        f"{'edge us/msg':>13}{'nginx us/msg':>14}{'ratio':>7}"
    )

    def medians(name: str, key: str) -> tuple[float, float]:
        """A proxy's median messages/s and CPU per message in a scenario."""
        rounds = results[(name, key)]
        return (
            statistics.median(x.rate for x in rounds),
            statistics.median(x.cpu_us for x in rounds),
        )

    for scenario in scenarios:
        e_rate, e_cpu = medians("edge-router", scenario.key)
        n_rate, n_cpu = medians("nginx", scenario.key)
        print(
            f"{scenario.key:14}{e_rate:12.0f}{n_rate:13.0f}{e_rate / n_rate:7.2f}"
            f"{e_cpu:13.1f}{n_cpu:14.1f}{e_cpu / n_cpu:7.2f}"
        )
    if args.floor:
        # What a pipe that reads no frame costs, and what edge-router costs
        # over it: the part of the gap to nginx that is edge-router's own.
        print(
            f"{'scenario':14}{'floor msg/s':>12}{'floor/nginx':>13}"
            f"{'floor us/msg':>13}{'floor/nginx':>13}{'edge/floor':>12}"
        )
        for scenario in scenarios:
            f_rate, f_cpu = medians("floor", scenario.key)
            n_rate, n_cpu = medians("nginx", scenario.key)
            e_cpu = medians("edge-router", scenario.key)[1]
            print(
                f"{scenario.key:14}{f_rate:12.0f}{f_rate / n_rate:13.2f}"
                f"{f_cpu:13.1f}{f_cpu / n_cpu:13.2f}{e_cpu / f_cpu:12.2f}"
            )
    n = args.idle_tunnels
    note = "" if n == wanted else f" (not {wanted}: file descriptor limit)"
    e_mem, n_mem = memory["edge-router"], memory["nginx"]
    floor_mem = f", floor {memory['floor'] / 1024:.1f} KiB" if args.floor else ""
    print(
        f"idle tunnels: {n}{note}; RSS per tunnel: edge-router "
        f"{e_mem / 1024:.1f} KiB, nginx {n_mem / 1024:.1f} KiB, ratio "
        f"{e_mem / n_mem:.2f}{floor_mem}"
    )


if __name__ == "__main__":
    main()
