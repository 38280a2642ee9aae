"""``--workers N``: follower processes on the same port, one route table.

A real ``edge-router serve --workers 2`` with its control socket and admin
listener; curl-like clients on fresh connections, which the kernel spreads
over the processes.  What a user checks: every request is routed right
whichever process takes it, and a revoked URL is dead in all of them as
soon as the change is acknowledged.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from harness import RouterThread, free_port, serve_refused, upstream

from router.client import ControlClient

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def serving(
    tmp_path: Path, *flags: str
) -> Iterator[tuple[int, int, str, subprocess.Popen[bytes]]]:
    """``edge-router serve --workers 2`` with ``flags``, its admin listener
    and control socket; stopped with SIGTERM, which it must obey."""
    port, admin = free_port(), free_port()
    control = str(tmp_path / "control.sock")
    argv = [sys.executable, "-m", "router", "serve", "--workers", "2"]
    argv += ["--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}"]
    argv += ["--control", control, "--no-access-log", *flags]
    # The log goes to a file: a pipe that nobody reads fills up under a
    # stream of route changes (one INFO line each) and stalls the router.
    log = tmp_path / "router.log"
    with (
        log.open("w") as sink,
        subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=sink
        ) as proc,
    ):
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(control):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "router did not start"
                time.sleep(0.05)
            yield port, admin, control, proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail("router with workers did not stop on SIGTERM")
    assert proc.returncode == 0, log.read_text()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[int, int, str, int]]:
    with serving(tmp_path) as (port, admin, control, proc):
        yield port, admin, control, proc.pid


def fetch(port: int, host: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": host, "Connection": "close"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def admin_stats(admin: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
    try:
        conn.request("GET", "/stats")
        stats: dict[str, Any] = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return stats


def test_two_workers_share_the_port_and_the_table(
    cluster: tuple[int, int, str, int],
) -> None:
    port, admin, control, _ = cluster
    with upstream() as up, ControlClient(control) as ctl:
        exposed = ctl.expose_port("sb", up.port, token="tok")
        host = exposed.url.split("//", 1)[1].split("/", 1)[0]

        # 1. Every request is routed right, whichever process takes it; the
        #    primary took some but not all (the kernel spreads connections),
        #    and /stats adds up both processes' counters (the follower's
        #    come once a second).
        assert [fetch(port, host) for _ in range(40)] == [200] * 40
        deadline = time.monotonic() + 5
        while (stats := admin_stats(admin))["proxy"]["requests"] < 40:
            assert time.monotonic() < deadline, stats
            time.sleep(0.1)
        assert stats["proxy"]["requests"] == 40
        primary, follower = stats["workers"]
        assert (primary["worker"], follower["worker"]) == (0, 1)
        assert 0 < primary["proxy"]["requests"] < 40
        assert primary["proxy"]["requests"] + follower["proxy"]["requests"] == 40
        assert follower["pid"] != primary["pid"]

        # 2. Once unexpose is acknowledged, no process serves the URL.
        ctl.unexpose_port("sb", up.port)
        assert [fetch(port, host) for _ in range(40)] == [404] * 40

        # 3. And a new route reaches them all too.
        exposed = ctl.expose_port("sb", up.port, token="again")
        host = exposed.url.split("//", 1)[1].split("/", 1)[0]
        assert [fetch(port, host) for _ in range(40)] == [200] * 40


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry))
    return found


def test_a_dead_worker_is_replaced_from_the_current_table(
    cluster: tuple[int, int, str, int],
) -> None:
    port, admin, control, primary = cluster
    with upstream() as up, ControlClient(control) as ctl:
        first = ctl.expose_port("sb", up.port, token="one")
        # More routes than one line of the starting table carries
        # (workers.EXPORT_CHUNK), so the replacement gets several.
        many: list[Any] = []
        for start in range(0, 25_000, 5_000):
            many += ctl.batch(
                [
                    {
                        "op": "expose_port",
                        "sandbox": f"many-{i % 50}",
                        "port": 10_000 + i,
                    }
                    for i in range(start, start + 5_000)
                    # The router's own ports are not for sandboxes here.
                    if 10_000 + i not in (port, admin)
                ]
            )
        (worker,) = children(primary)
        os.kill(worker, signal.SIGKILL)

        # A replacement starts on its own, from the table as it now is.
        deadline = time.monotonic() + 10
        while (now := children(primary)) in ([], [worker]):
            assert time.monotonic() < deadline, "no replacement worker"
            time.sleep(0.05)
        (replacement,) = now
        assert replacement != worker

        # It serves the old routes and follows new changes.
        second = ctl.expose_port("other", up.port, token="two")
        for exposed in (first, second):
            host = exposed.url.split("//", 1)[1].split("/", 1)[0]
            assert [fetch(port, host) for _ in range(20)] == [200] * 20
        # Routes of the bulk (their ports have no server: 502, not 404),
        # from the first chunk to the last.
        for result in (many[0], many[12_345], many[-1]):
            host = result["url"].split("//", 1)[1].split("/", 1)[0]
            assert 404 not in [fetch(port, host) for _ in range(6)]


def wrk(port: int, host: str, seconds: int, connections: int = 8) -> dict[str, int]:
    """Run wrk on one URL; its totals, from the report it prints."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "-H",
            f"Host: {host}",
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    totals = {"requests": 0, "non_2xx": 0, "socket_errors": 0}
    for line in out.splitlines():
        words = line.split()
        if "requests in" in line:
            totals["requests"] = int(words[0])
        elif line.strip().startswith("Non-2xx or 3xx responses:"):
            totals["non_2xx"] = int(words[-1])
        elif line.strip().startswith("Socket errors:"):
            totals["socket_errors"] = sum(
                int(w.rstrip(",")) for w in words if w.rstrip(",").isdigit()
            )
    assert totals["requests"], out
    return totals


def test_route_changes_under_load_drop_no_request(
    cluster: tuple[int, int, str, int],
) -> None:
    """wrk on one URL while other routes churn through the control socket
    (exposes, rotations, batches, stops, destroys): every request of the
    steady URL is answered 200, by both processes, and the churned routes
    end up exactly as the last change left them."""
    port, _, control, _ = cluster
    with upstream() as up, ControlClient(control) as ctl:
        steady = ctl.expose_port("sb", up.port, token="steady")
        host = steady.url.split("//", 1)[1].split("/", 1)[0]
        with ThreadPoolExecutor(1) as pool:
            load = pool.submit(wrk, port, host, 3)
            changes = 0
            last_token = ""
            i = 0
            while not load.done():
                box = f"churn-{i % 7}"
                # A rotation on the steady sandbox's other port, a batch on
                # another sandbox, a stop and start, a destroy now and then.
                last_token = f"r{i}"
                ctl.expose_port("sb", 9000, token=last_token)
                ops: list[dict[str, Any]] = [
                    {"op": "expose_port", "sandbox": box, "port": 8000 + k}
                    for k in range(10)
                ]
                ops += [
                    {"op": "unexpose_port", "sandbox": box, "port": 8000 + k}
                    for k in range(0, 10, 2)
                ]
                ctl.batch(ops)
                ctl.set_sandbox(box, state="stopped")
                ctl.set_sandbox(box, state="running")
                changes += 4
                if i % 5 == 4:
                    ctl.destroy_sandbox(box)
                    changes += 1
                i += 1
            totals = load.result()
        assert changes > 20
        assert totals["requests"] > 500, totals
        assert totals["non_2xx"] == 0, totals
        assert totals["socket_errors"] == 0, totals

        # The churned routes are as the last changes left them.
        assert fetch(port, host) == 200
        rotated = f"9000-sb-{last_token}.localhost"
        assert [fetch(port, rotated) for _ in range(10)] != [404] * 10
        assert [fetch(port, "9000-sb-r0.localhost") for _ in range(10)] == [404] * 10


def test_a_worker_that_is_gone_is_not_waited_for(tmp_path: Path) -> None:
    # A change made just after a worker died used to wait out the whole
    # acknowledgement timeout (2 s) before the worker was replaced.
    router = RouterThread(workers=2, state=str(tmp_path / "routes.db"))
    try:
        assert router.service.router is not None
        (follower,) = router.service.router.followers
        assert follower.proc is not None
        follower.on_exit = None  # not replaced at once: this is about synced
        os.kill(follower.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while follower.alive:
            assert time.monotonic() < deadline, "the worker's exit went unseen"
            time.sleep(0.02)
        with pytest.raises(ConnectionError, match="worker exited"):
            router.call(follower.synced(follower.acked + 1))
    finally:
        router.stop()


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_serving_processes_run_one_thread_between_store_writes(
    tmp_path: Path,
) -> None:
    # A second thread costs every read and write of the data path (see
    # router/listeners.py); what an operator sees is ``ps -L`` showing one
    # thread per process, with every listener open and after a stored change.
    internal = f"127.0.0.1:{free_port()}"
    flags = ("--internal", internal, "--state", str(tmp_path / "routes.db"))
    with serving(tmp_path, *flags) as (port, _, control, proc), upstream() as up:
        with ControlClient(control) as ctl:
            exposed = ctl.expose_port("sb", up.port, token="tok")
        host = exposed.url.split("//", 1)[1].split("/", 1)[0]
        assert [fetch(port, host) for _ in range(10)] == [200] * 10

        # The store write's thread ends with the write: poll for it.
        pids = [proc.pid, *children(proc.pid)]
        assert len(pids) == 2
        deadline = time.monotonic() + 5
        while (counts := [threads(p) for p in pids]) != [1, 1]:
            assert time.monotonic() < deadline, counts
            time.sleep(0.05)


def test_a_second_router_cannot_share_the_port_of_one_with_workers(
    tmp_path: Path,
) -> None:
    # The workers share their port with SO_REUSEPORT, which any process of
    # the same user could join: a second router started there by mistake
    # would silently take half of the connections.
    with serving(tmp_path) as (port, _, _, _):
        stderr = serve_refused(
            "--listen", f"127.0.0.1:{port}", "--workers", "2", "--no-demo"
        )
    assert f"--listen 127.0.0.1:{port}: the address is in use" in stderr
