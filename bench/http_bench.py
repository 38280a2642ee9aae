"""HTTP benchmark: edge-router beside nginx as a reverse proxy, in one run.

Both proxies sit in front of the same upstream (an nginx standing in for a
sandbox's dev server) and are driven by wrk in alternating rounds, so that
the noise of a shared machine falls on both alike.  The figures that matter
are the ratios to nginx from the same run, not the absolute numbers.

Layout on the machine (two cores are assumed; see ``--proxy-cpu``)::

    wrk ──► nginx-proxy  (core 1) ──┐
    wrk ──► edge-router  (core 1) ──┴──► upstream nginx (core 0)
    (wrk on core 0)

Per round: requests/s, p50/p99 latency, and the proxy's CPU time per
request (utime + stime from ``/proc/<pid>/stat``, summed over the process and
its children, divided by the requests wrk completed).

Run ``python bench/http_bench.py -h`` for the flags; ``bench/README.md`` says
how to read the output.  Every server binds 127.0.0.1 on a free port; every
process started here is stopped by its PID at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import grp
import hashlib
import http.client
import os
import pwd
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from signal import SIGINT, SIGTERM

from proctools import children, cpu_split, cpu_ticks, free_port, pin, proc_stat

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

SMALL_BODY = b"hello, world\n"  # 13 bytes
MEDIUM_SIZE = 64 * 1024
LARGE_SIZE = 1024 * 1024
UPLOAD_SIZE = 1024 * 1024

# "2026/12/04 16:40:00 [warn] 12#12: *45 an upstream response is buffered
# to a temporary file /tmp/... while reading upstream, client: ..."
NGINX_LOG_LINE = re.compile(
    r"\S+ \S+ \[(?P<level>\w+)\] \d+#\d+: (?:\*\d+ )?(?P<text>.*?)(?:, client: .*)?$"
)

SANDBOX = "bench"
TOKEN = "bench"

# The per-run cost besides the wrk duration (wrk start-up and tear-down,
# reading /proc, a short settle), and the one-off start-up and checks; used
# only for the estimate printed up front.
RUN_OVERHEAD = 0.4
SETUP_OVERHEAD = 8.0

# wrk calls the Lua ``done`` hook once per run; it prints one machine-readable
# line, so that nothing depends on the layout of wrk's human report.
REPORT_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d "
      .. "status=%d timeout=%d p50_us=%.1f p99_us=%.1f\\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read,
    e.write, e.status, e.timeout, latency:percentile(50.0),
    latency:percentile(99.0)))
end
"""

UPLOAD_LUA = f"""
wrk.method = "POST"
wrk.body = string.rep("x", {UPLOAD_SIZE})
wrk.headers["Content-Type"] = "application/octet-stream"
"""


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    path: str
    connections: int
    upload: bool = False


SCENARIOS = (
    Scenario("small", "13 B GET, 50 conn", "/small", 50),
    Scenario("small-1", "13 B GET, 1 conn", "/small", 1),
    Scenario("64k", "64 KiB GET, 50 conn", "/64k.bin", 50),
    Scenario("1m", "1 MiB GET, 50 conn", "/1m.bin", 50),
    Scenario("post-1m", "1 MiB POST, 50 conn", "/upload", 50, upload=True),
)


# -- processes -----------------------------------------------------------


def machine_busy_ticks() -> int:
    """Busy time of all cores (``/proc/stat``), steal included: a core taken
    by another virtual machine is as unavailable as a busy one."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal


def own_ticks() -> int:
    """This harness and the children it has waited for (wrk), in ticks."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return round(total * CLK_TCK)


@dataclass
class Started:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path | None
    # (pid, start time) of children seen while running, so that an orphan
    # left by a killed parent can be stopped without touching a reused PID.
    kids: list[tuple[int, str]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        """The process and its children (an nginx master and its worker)."""
        kids = children(self.pid)
        for kid in kids:
            stat = proc_stat(kid)
            if stat is not None and (kid, stat[19]) not in self.kids:
                self.kids.append((kid, stat[19]))
        return [self.pid, *kids]


class Processes:
    """Every process this harness starts, stopped by PID on the way out."""

    def __init__(self) -> None:
        self.started: list[Started] = []

    def start(
        self, name: str, argv: list[str], log: Path | None = None, **kw: object
    ) -> Started:
        out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            # A session of its own: Ctrl-C reaches only this harness, which
            # then stops everything in order.
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kw,  # type: ignore[call-overload]
            )
        finally:
            if log is not None:
                out.close()  # type: ignore[union-attr]
        proc = Started(name, popen, log)
        self.started.append(proc)
        return proc

    def stop(self, proc: Started, timeout: float = 5.0) -> None:
        proc.pids()
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        for kid, start in proc.kids:
            stat = proc_stat(kid)
            if stat is not None and stat[19] == start:
                os.kill(kid, signal.SIGKILL)
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.started)):
            try:
                self.stop(proc)
            except OSError as exc:
                print(f"warning: stopping {proc.name} ({proc.pid}): {exc}")


def wait_listening(proc: Started, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise SystemExit(
                f"{proc.name} exited with {proc.popen.returncode} at start-up:\n"
                + tail(proc.log)
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{proc.name} is not listening on {port}:\n" + tail(proc.log))


def tail(path: Path | None, lines: int = 40) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:]) or "(empty log)"


# -- nginx configurations --------------------------------------------------


def nginx_common(prefix: Path) -> str:
    """Lines both nginx instances share: one worker, no logs, own paths."""
    user = ""
    if os.geteuid() == 0:
        # nginx run as root switches its workers to ``nobody``, which cannot
        # read a private temp dir (and Debian has no ``nobody`` group).
        user_name = pwd.getpwuid(os.geteuid()).pw_name
        group_name = grp.getgrgid(os.getegid()).gr_name
        user = f"user {user_name} {group_name};\n"
    return (
        f"{user}worker_processes 1;\n"
        "daemon off;\n"
        "master_process on;\n"
        f"pid {prefix}/nginx.pid;\n"
        f"error_log {prefix}/error.log warn;\n"
        "events { worker_connections 4096; }\n"
    )


def nginx_paths(prefix: Path) -> str:
    # The compiled-in temp paths are under /var/lib/nginx; each instance
    # keeps its own under its prefix instead.
    return "".join(
        f"    {kind}_temp_path {prefix}/tmp/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


def upstream_config(prefix: Path, port: int) -> str:
    return (
        nginx_common(prefix)
        + "http {\n"
        + nginx_paths(prefix)
        + f"""\
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    # Neither proxy should see its upstream connections recycled mid-run.
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_max_body_size 2m;
    client_body_buffer_size 2m;

    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {prefix}/html;

        location = /small {{
            default_type text/plain;
            return 200 "hello, world\\n";
        }}

        # What the upstream received, for the check before timing.
        location = /echo {{
            default_type text/plain;
            return 200 "host=$http_host
x-forwarded-for=$http_x_forwarded_for
x-forwarded-proto=$http_x_forwarded_proto
x-forwarded-host=$http_x_forwarded_host
x-forwarded-port=$http_x_forwarded_port
connection=$http_connection
";
        }}

        # A plain ``return`` answers before the body has arrived and then
        # discards it, so a proxy would see the answer while still sending
        # and could not reuse either connection.  ``mirror_request_body``
        # makes nginx read the whole body first; the static handler then
        # refuses POST with 405, which error_page turns into the 13-byte 200.
        location = /upload {{
            mirror /_sink;
            mirror_request_body on;
            error_page 405 =200 /small;
        }}
        location = /_sink {{
            internal;
            return 204;
        }}
    }}
}}
"""
    )


def proxy_config(prefix: Path, port: int, upstream_port: int, extra: list[str]) -> str:
    lines = "".join(f"            {line.rstrip(';')};\n" for line in extra)
    return (
        nginx_common(prefix)
        + "http {\n"
        + nginx_paths(prefix)
        + f"""\
    access_log off;
    # edge-router never ends a client connection after N requests.
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_max_body_size 2m;

    upstream sandbox {{
        server 127.0.0.1:{upstream_port};
        # edge-router keeps up to 64 idle connections per upstream.
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}

    server {{
        listen 127.0.0.1:{port} backlog=4096;

        location / {{
            proxy_pass http://sandbox;
            proxy_http_version 1.1;
            proxy_buffering on;
            proxy_set_header Connection "";
            # The Host rewrite edge-router does for a route (SPEC 4).
            proxy_set_header Host localhost:{upstream_port};
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Forwarded-Port $server_port;
{lines}        }}
    }}
}}
"""
    )


def write_nginx(prefix: Path, config: str) -> Path:
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / kind).mkdir(parents=True, exist_ok=True)
    (prefix / "html").mkdir(exist_ok=True)
    path = prefix / "nginx.conf"
    path.write_text(config)
    return path


# -- the bench ---------------------------------------------------------------


@dataclass
class Proxy:
    name: str
    proc: Started
    port: int


@dataclass
class Round:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # proxy CPU per request
    kernel: float  # the kernel's share of it (stime over utime + stime)
    non2xx: int
    socket_errors: int
    # CPU used by processes outside this benchmark during the round, in
    # cores (other people's work on a shared machine, or steal).
    other_cores: float


@dataclass
class Bench:
    args: argparse.Namespace
    procs: Processes
    tmp: Path
    host: str = ""
    upstream: Started | None = None
    upstream_port: int = 0
    proxies: list[Proxy] = field(default_factory=list)
    scripts: dict[bool, Path] = field(default_factory=dict)
    bodies: dict[str, bytes] = field(default_factory=dict)

    # -- 1. the upstream --------------------------------------------------

    def start_upstream(self) -> None:
        prefix = self.tmp / "upstream"
        prefix.mkdir()
        self.upstream_port = port = free_port()
        conf = write_nginx(prefix, upstream_config(prefix, port))
        # Random bodies, so that the check before timing compares real bytes.
        self.bodies = {
            "/small": SMALL_BODY,
            "/64k.bin": os.urandom(MEDIUM_SIZE),
            "/1m.bin": os.urandom(LARGE_SIZE),
        }
        for path, body in self.bodies.items():
            if path.endswith(".bin"):
                (prefix / "html" / path[1:]).write_bytes(body)
        # The static handler must find a file at /upload to answer 405.
        (prefix / "html" / "upload").write_bytes(b"")
        self.upstream = self.procs.start(
            "upstream nginx",
            self._nginx_argv(self.args.load_cpu, prefix, conf),
            prefix / "stderr.log",
        )
        wait_listening(self.upstream, port)
        if self.args.show_upstream_config:
            print_config("upstream nginx configuration", conf)

    def _nginx_argv(self, cpu: str, prefix: Path, conf: Path) -> list[str]:
        early_log = prefix / "error.log"  # before the config is read
        return pin(cpu, self.args.nginx, f"-p{prefix}", f"-c{conf}", f"-e{early_log}")

    def check_upload_sink(self) -> None:
        """The upstream must read the whole POST body, then keep the socket."""
        head = (
            f"POST /upload HTTP/1.1\r\nHost: localhost:{self.upstream_port}\r\n"
            f"Content-Length: {UPLOAD_SIZE}\r\n\r\n"
        ).encode()
        half = UPLOAD_SIZE // 2
        with socket.create_connection(("127.0.0.1", self.upstream_port), 5) as sock:
            sock.sendall(head + b"x" * half)
            early, _, _ = select.select([sock], [], [], 0.5)
            sock.sendall(b"x" * (UPLOAD_SIZE - half))
            first = read_response(sock)
            sock.sendall(
                f"GET /small HTTP/1.1\r\nHost: localhost:{self.upstream_port}"
                "\r\n\r\n".encode()
            )
            second = read_response(sock)
        ok = not early and first[0] == 200 and second[0] == 200
        print(
            "upstream POST /upload: answers only after the whole 1 MiB body: "
            f"{'yes' if not early else 'NO'}; status {first[0]}, body "
            f"{first[1]!r}; connection reused after it: "
            f"{'yes' if second[0] == 200 else 'NO'}"
        )
        if not ok:
            raise SystemExit("the upstream does not read POST bodies as intended")

    # -- 2. the proxies ---------------------------------------------------

    def start_nginx_proxy(self) -> None:
        prefix = self.tmp / "nginx-proxy"
        prefix.mkdir()
        port = free_port()
        config = proxy_config(
            prefix, port, self.upstream_port, self.args.nginx_directive or []
        )
        conf = write_nginx(prefix, config)
        proc = self.procs.start(
            "nginx-proxy",
            self._nginx_argv(self.args.proxy_cpu, prefix, conf),
            prefix / "stderr.log",
        )
        wait_listening(proc, port)
        self.proxies.append(Proxy("nginx", proc, port))
        print_config("nginx reference proxy configuration (exact)", conf)

    def start_edge_router(self, name: str = "edge-router", tree: Path = REPO) -> None:
        """edge-router from ``tree`` (this checkout, or ``--baseline``'s)."""
        state = self.tmp / f"{name}.db"
        python = self.args.python
        # The route is stored before the router starts (no control socket
        # needed): sandbox "bench", the upstream's port, a fixed token.
        make_route = (
            "import sys\n"
            "from router.routes import RouteTable\n"
            "from router.store import Store\n"
            "store = Store(sys.argv[1])\n"
            "store.commit(RouteTable().prepare([{'op': 'expose_port', "
            f"'sandbox': {SANDBOX!r}, 'port': int(sys.argv[2]), "
            f"'token': {TOKEN!r}}}]))\n"
            "store.close()\n"
        )
        # ``python -m router`` and ``-c`` import the package from the
        # working directory before the installed one.
        subprocess.run(
            [python, "-c", make_route, str(state), str(self.upstream_port)],
            cwd=tree,
            check=True,
        )
        port = free_port()
        serve = "-m router serve --no-demo --no-access-log --log-level warning"
        where = (f"--listen=127.0.0.1:{port}", f"--state={state}")
        argv = pin(self.args.proxy_cpu, python, *serve.split(), *where)
        env = dict(os.environ)
        if self.args.pure:
            env["EDGE_ROUTER_PURE"] = "1"
        proc = self.procs.start(name, argv, self.tmp / f"{name}.log", cwd=tree, env=env)
        wait_listening(proc, port)
        self.proxies.append(Proxy(name, proc, port))
        if name == "edge-router":
            # The port in Host is not part of the label: one Host for all.
            self.host = f"{self.upstream_port}-{SANDBOX}-{TOKEN}.localhost:{port}"
        print(f"{name} command (in {tree}): " + " ".join(argv))

    def start_floor(self) -> None:
        """``pipe_floor.py``: bytes piped to the upstream, nothing parsed."""
        port = free_port()
        script = REPO / "bench" / "pipe_floor.py"
        argv = pin(
            self.args.proxy_cpu,
            self.args.python,
            str(script),
            str(port),
            str(self.upstream_port),
        )
        proc = self.procs.start("floor", argv, self.tmp / "floor.log")
        wait_listening(proc, port)
        self.proxies.append(Proxy("floor", proc, port))
        print("floor command: " + " ".join(argv))

    # -- 3. the checks before timing -------------------------------------

    def verify(self) -> None:
        print(f"\nPreview Host header (sent to both proxies): {self.host}")
        seen: dict[str, dict[str, str]] = {}
        for proxy in self.proxies:
            for path, body in self.bodies.items():
                status, got = http_get(proxy.port, self.host, path)
                if status != 200 or got != body:
                    raise SystemExit(
                        f"{proxy.name} GET {path}: status {status}, "
                        f"{len(got)} bytes, expected 200 and {len(body)} bytes"
                    )
            status, got = http_get(proxy.port, self.host, "/upload", b"x" * UPLOAD_SIZE)
            if status != 200 or got != SMALL_BODY:
                raise SystemExit(
                    f"{proxy.name} POST /upload: status {status}, body {got[:80]!r}"
                )
            if proxy.name == "floor":
                continue  # it forwards the request as it came, on purpose
            status, got = http_get(proxy.port, self.host, "/echo")
            fields = dict(
                line.split("=", 1) for line in got.decode().splitlines() if line
            )
            seen[proxy.name] = fields
        print(
            "Bodies: every proxy returns the same bytes for /small (13 B), "
            "/64k.bin, /1m.bin and POST /upload (sha256 "
            + ", ".join(
                f"{p}={hashlib.sha256(b).hexdigest()[:12]}"
                for p, b in self.bodies.items()
            )
            + ")"
        )
        print("What the upstream received (one GET /echo through each proxy):")
        names = list(seen)
        keys = list(seen[names[0]])
        width = 2 + max(len(repr(v)) for n in names for v in seen[n].values())
        print(f"  {'header':<18}" + "".join(f"{n:<{width}}" for n in names))
        for key in keys:
            print(f"  {key:<18}" + "".join(f"{seen[n][key]!r:<{width}}" for n in names))
        for key in ("host", "x-forwarded-for"):
            values = {seen[n][key] for n in names}
            if len(values) != 1 or "" in values:
                raise SystemExit(f"the upstream saw different {key} values: {values}")
        print("Host and X-Forwarded-For are the same from both proxies.\n")

    # -- 4. timing ----------------------------------------------------------

    def wrk(self, proxy: Proxy, scenario: Scenario, seconds: int) -> Round:
        url = f"http://127.0.0.1:{proxy.port}{scenario.path}"
        argv = pin(
            self.args.load_cpu,
            *f"{self.args.wrk} -t1 -c{scenario.connections} -d{seconds}s".split(),
            *f"--latency --timeout {self.args.timeout}s".split(),
            *("-H", f"Host: {self.host}", "-s", str(self.scripts[scenario.upload])),
            url,
        )
        pids = proxy.proc.pids()
        servers = self.server_pids()
        before = cpu_split(pids)
        ours_before = cpu_ticks(servers) + own_ticks()
        busy_before = machine_busy_ticks()
        out_path = self.tmp / "wrk.out"
        run = self.procs.start("wrk", argv, out_path)
        try:
            run.popen.wait(seconds + self.args.timeout + 30)
        finally:
            self.procs.stop(run)
        after = cpu_split(pids)
        ours = cpu_ticks(servers) + own_ticks() - ours_before
        other = max(0, machine_busy_ticks() - busy_before - ours)
        output = out_path.read_text(errors="replace")
        if proxy.proc.popen.poll() is not None:
            raise ProxyDied(proxy, scenario, output)
        line = next((ln for ln in output.splitlines() if ln.startswith("BENCH ")), "")
        if not line:
            raise SystemExit(f"wrk gave no report against {proxy.name}:\n{output}")
        r = {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
        requests = int(r["requests"])
        secs = r["duration_us"] / 1e6
        user, system = (a - b for a, b in zip(after, before, strict=True))
        return Round(
            requests=requests,
            seconds=secs,
            rps=requests / secs if secs else 0.0,
            p50_ms=r["p50_us"] / 1000,
            p99_ms=r["p99_us"] / 1000,
            cpu_us=(user + system) / CLK_TCK * 1e6 / requests if requests else 0.0,
            kernel=system / (user + system) if user + system else 0.0,
            non2xx=int(r["status"]),
            socket_errors=int(r["connect"] + r["read"] + r["write"] + r["timeout"]),
            other_cores=other / CLK_TCK / secs if secs else 0.0,
        )

    def server_pids(self) -> list[int]:
        procs = [p.proc for p in self.proxies]
        if self.upstream is not None:
            procs.append(self.upstream)
        return [pid for proc in procs for pid in proc.pids()]

    def run(self, scenarios: list[Scenario]) -> dict[str, dict[str, list[Round]]]:
        for upload in (False, True):
            script = self.tmp / f"wrk-{'upload' if upload else 'get'}.lua"
            script.write_text((UPLOAD_LUA if upload else "") + REPORT_LUA)
            self.scripts[upload] = script
        rounds, duration = self.args.rounds, self.args.duration
        results: dict[str, dict[str, list[Round]]] = {}
        for scenario in scenarios:
            print(f"== {scenario.title} ({scenario.path})", flush=True)
            per_proxy: dict[str, list[Round]] = {p.name: [] for p in self.proxies}
            results[scenario.key] = per_proxy
            for proxy in self.proxies:
                if self.args.warmup:
                    warm = self.wrk(proxy, scenario, self.args.warmup)
                    print(
                        f"   warm-up      {proxy.name:<12} {warm.rps:>9.0f} req/s"
                        + errors_note(warm),
                        flush=True,
                    )
            for i in range(rounds):
                # Alternate who goes first, so that neither always runs on
                # the heels of the other's load.
                order = self.proxies if i % 2 == 0 else self.proxies[::-1]
                for proxy in order:
                    time.sleep(0.2)
                    got = self.wrk(proxy, scenario, duration)
                    per_proxy[proxy.name].append(got)
                    print(
                        f"   round {i + 1}/{rounds}  {proxy.name:<12}"
                        f" {got.rps:>9.0f} req/s  p50 {got.p50_ms:7.2f} ms"
                        f"  p99 {got.p99_ms:7.2f} ms  CPU {got.cpu_us:7.1f} us/req"
                        f" ({got.kernel:.0%} kernel)  other load {got.other_cores:4.2f}"
                        + errors_note(got),
                        flush=True,
                    )
        return results


class ProxyDied(Exception):
    def __init__(self, proxy: Proxy, scenario: Scenario, wrk_output: str) -> None:
        code = proxy.proc.popen.returncode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
        super().__init__(f"{proxy.name} {how} during {scenario.title}")
        self.proxy = proxy
        self.scenario = scenario
        self.wrk_output = wrk_output


def errors_note(r: Round) -> str:
    if r.non2xx or r.socket_errors:
        return f"  !! non-2xx {r.non2xx}, socket errors {r.socket_errors}"
    return ""


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One response with a Content-Length body, from a blocking socket."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, buf
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), body


def http_get(
    port: int, host: str, path: str, body: bytes | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST" if body else "GET", path, body, {"Host": host})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def nginx_log_summary(name: str, path: Path) -> str:
    """nginx's warnings counted by kind: temp-file spooling shows up here."""
    kinds: Counter[str] = Counter()
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            found = NGINX_LOG_LINE.match(line)
            if found:
                text = re.sub(r"/\S+", "PATH", found["text"])
                kinds[f"[{found['level']}] " + re.sub(r"\d+", "N", text)] += 1
    if not kinds:
        return f"{name} error log: no warnings"
    lines = [f"{name} error log, lines by kind:"]
    lines += [f"  {count:>7} x {kind}" for kind, count in kinds.most_common(8)]
    return "\n".join(lines)


def print_config(title: str, path: Path) -> None:
    print(f"--- {title}: {path.name}")
    print(path.read_text().rstrip())
    print("---")


# -- the report ---------------------------------------------------------------


def report(
    results: dict[str, dict[str, list[Round]]],
    scenarios: list[Scenario],
    names: list[str],
) -> bool:
    """Print the table of medians and ratios; return True if any run erred."""
    flagged = False
    loads: list[float] = []
    header = (
        f"{'scenario':<21} {'proxy':<12} {'req/s':>9} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'CPU us/req':>11} {'kernel':>7} {'non-2xx':>8}"
        f" {'sock err':>9} {'other':>6}"
    )
    print(header)
    print("-" * len(header))
    base, edge = names[:2]
    for scenario in scenarios:
        per_proxy = results.get(scenario.key)
        if not per_proxy or not all(per_proxy[n] for n in names):
            continue
        med: dict[str, dict[str, float]] = {}
        for i, name in enumerate(names):
            rounds = per_proxy[name]
            m = med[name] = {
                "rps": statistics.median(r.rps for r in rounds),
                "p50": statistics.median(r.p50_ms for r in rounds),
                "p99": statistics.median(r.p99_ms for r in rounds),
                "cpu": statistics.median(r.cpu_us for r in rounds),
                "kernel": statistics.median(r.kernel for r in rounds),
                "other": statistics.median(r.other_cores for r in rounds),
            }
            loads += [r.other_cores for r in rounds]
            non2xx = sum(r.non2xx for r in rounds)
            sock = sum(r.socket_errors for r in rounds)
            mark = "  !! ERRORS" if non2xx or sock else ""
            flagged = flagged or bool(mark)
            print(
                f"{scenario.title if i == 0 else '':<21} {name:<12} "
                f"{m['rps']:>9.0f} {m['p50']:>8.2f} {m['p99']:>8.2f} "
                f"{m['cpu']:>11.1f} {m['kernel']:>7.0%} {non2xx:>8} {sock:>9}"
                f" {m['other']:>6.2f}{mark}"
            )
        pairs = [("edge/nginx", edge, base)]
        if "baseline" in med:
            pairs += [("base/nginx", "baseline", base), ("edge/base", edge, "baseline")]
        if "floor" in med:
            pairs += [("floor/nginx", "floor", base), ("edge/floor", edge, "floor")]
        for label, top, bottom in pairs:
            t, b = med[top], med[bottom]
            print(
                f"{'':<21} {label:<12} {ratio(t['rps'], b['rps']):>9} "
                f"{'':>8} {ratio(t['p99'], b['p99']):>8} "
                f"{ratio(t['cpu'], b['cpu']):>11}"
            )
    if loads:
        print(
            "Other load during timed rounds (CPU of processes outside this "
            f"benchmark, in cores of {os.cpu_count()}): median "
            f"{statistics.median(loads):.2f}, max {max(loads):.2f}"
        )
    return flagged


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


# -- main -----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="edge-router vs nginx as a reverse proxy (see bench/README.md)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per proxy")
    parser.add_argument(
        "--duration", type=int, default=5, help="seconds per timed round"
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="seconds of warm-up per proxy (0: none)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 round of 2 s, 1 s warm-up"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=[s.key for s in SCENARIOS],
        help="run only this scenario (repeatable)",
    )
    parser.add_argument(
        "--timeout", type=int, default=5, help="wrk request timeout, seconds"
    )
    parser.add_argument("--proxy-cpu", default="1", help="core of both proxies")
    parser.add_argument("--load-cpu", default="0", help="core of wrk and the upstream")
    parser.add_argument(
        "--python", default=sys.executable, help="Python that runs edge-router"
    )
    parser.add_argument(
        "--pure", action="store_true", help="run edge-router on the pure-Python twins"
    )
    parser.add_argument(
        "--baseline",
        metavar="TREE",
        help="also run edge-router from this source tree (its extensions built in"
        " place) as a third proxy: an A/B of two commits in one run",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also run bench/pipe_floor.py, a uvloop pipe that parses nothing, as"
        " a proxy: the floor under any Python proxy's CPU per request",
    )
    parser.add_argument(
        "--nginx-directive",
        action="append",
        metavar="TEXT",
        help="extra directive for the nginx proxy's location, e.g. "
        "'proxy_request_buffering off' (repeatable; shown in the printed config)",
    )
    parser.add_argument("--nginx", default="nginx", help="nginx binary")
    parser.add_argument("--wrk", default="wrk", help="wrk binary")
    parser.add_argument(
        "--show-upstream-config",
        action="store_true",
        help="also print the upstream nginx configuration",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2, 1
    if args.rounds < 1 or args.duration < 1 or args.warmup < 0:
        parser.error("--rounds and --duration must be at least 1")
    return args


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM unwind as ``KeyboardInterrupt``, so that the same
    cleanup runs; SIGINT too, since a shell starting us in the background
    leaves it ignored."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (SIGINT, SIGTERM)}
    try:
        yield
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = [s for s in SCENARIOS if not args.only or s.key in args.only]
    for tool in (args.nginx, args.wrk, "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    per_proxy = args.warmup + args.rounds * args.duration
    proxies = 2 + bool(args.baseline) + bool(args.floor)
    runs = len(scenarios) * proxies * ((1 if args.warmup else 0) + args.rounds)
    estimate = (
        len(scenarios) * proxies * per_proxy + runs * RUN_OVERHEAD + SETUP_OVERHEAD
    )
    version = subprocess.run(
        [args.python, "-m", "router", "--version"],
        cwd=REPO,
        env=dict(os.environ, EDGE_ROUTER_PURE="1") if args.pure else None,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print(f"edge-router: {version}; {source_state()}")
    print(
        f"Plan: {len(scenarios)} scenarios x {proxies} proxies x ({args.warmup} s"
        " warm-up"
        f" + {args.rounds} rounds x {args.duration} s); estimated total runtime"
        f" {estimate // 60:.0f} min {estimate % 60:.0f} s",
        flush=True,
    )
    # The harness itself stays off the proxies' core.
    os.sched_setaffinity(0, {int(c) for c in args.load_cpu.split(",")})

    started = time.monotonic()
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="edge-router-bench-"))
    bench = Bench(args, procs, tmp)
    results: dict[str, dict[str, list[Round]]] = {}
    code = 0
    try:
        with interruptible():
            bench.start_upstream()
            bench.check_upload_sink()
            bench.start_nginx_proxy()
            bench.start_edge_router()
            if args.baseline:
                bench.start_edge_router("baseline", Path(args.baseline).resolve())
            if args.floor:
                bench.start_floor()
            show_pins(bench)
            bench.verify()
            try:
                results = bench.run(scenarios)
            except ProxyDied as died:
                code = 1
                print(f"\n!! {died}; wrk said:\n{died.wrk_output}")
                print(f"!! {died.proxy.name} log:\n{tail(died.proxy.proc.log, 80)}")
            names = [p.name for p in bench.proxies]
            mode = version.partition("(")[2][:-1]
            print(
                f"\n== Medians of {args.rounds} round(s) x {args.duration} s per "
                f"proxy; edge-router on {mode}; wrk -t1, proxies on core "
                f"{args.proxy_cpu}, upstream and wrk on core {args.load_cpu}"
            )
            if report(results, scenarios, names):
                code = code or 2
                print("!! some runs had non-2xx responses or socket errors")
            for name in ("nginx-proxy", "upstream"):
                print(nginx_log_summary(name, tmp / name / "error.log"))
            router_log = tail(tmp / "edge-router.log", 60)
            if router_log != "(empty log)":
                print(f"\nedge-router log (warnings and above):\n{router_log}")
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        code = 130
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"Total runtime {time.monotonic() - started:.0f} s")
    return code


def source_state() -> str:
    """The commit measured, and whether the code differs from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "router", "_speedups"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    files = [line[3:] for line in changed if line.strip()]
    if not files:
        return f"commit {head}"
    return f"commit {head} + uncommitted changes in {', '.join(files)}"


def show_pins(bench: Bench) -> None:
    rows = []
    procs = [p.proc for p in bench.proxies]
    if bench.upstream is not None:
        procs.insert(0, bench.upstream)
    for proc in procs:
        for pid in proc.pids():
            cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(pid)))
            rows.append(f"{proc.name} pid {pid} on cpu {cpus}")
    print("Pinned: " + "; ".join(rows) + f"; wrk on cpu {bench.args.load_cpu}")


if __name__ == "__main__":
    sys.exit(main())
