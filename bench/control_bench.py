"""Control socket throughput and watch propagation delay.

    python bench/control_bench.py [--changes 2000] [--batches 50] [--sync full]

The router runs in a child process of its own (as in production, so that
client and server do not share an interpreter lock), with its SQLite store
in a temporary directory; the bench talks to it over the Unix socket.  It
measures:

* changes/s sent one by one, each awaited before the next (expose, then
  unexpose, of distinct ports, so that every request is a real change);
* changes/s in batches of ``--batch-size`` operations;
* how long after a change is acknowledged a watcher on another connection
  has it (negative: the watcher had it first; the router announces a change
  to watchers just before it writes the reply).

Each phase stops at its count or after ``--phase-seconds``, whichever comes
first, so a run stays well under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from router.client import AsyncControlClient, ControlError  # noqa: E402


def serve(directory: str, sync: str) -> None:
    """The child: a router with only its control socket, until killed."""
    import uvloop

    from router.app import Router
    from router.config import Config
    from router.control_server import start_control

    async def main() -> None:
        config = Config(
            control=os.path.join(directory, "control.sock"),
            state=os.path.join(directory, "routes.db"),
            sync=sync,
        )
        router = Router(config)
        router.open_store()
        server = await start_control(router)
        try:
            await asyncio.Event().wait()
        finally:
            await server.close()
            router.close()

    uvloop.run(main())


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


async def one_by_one(path: str, count: int, limit: float) -> tuple[int, float]:
    async with AsyncControlClient(path) as c:
        start = time.perf_counter()
        done = 0
        while done < count and time.perf_counter() - start < limit:
            sandbox, port = f"one-{done // 2000}", 8000 + (done // 2) % 2000
            if done % 2 == 0:
                await c.expose_port(sandbox, port)
            else:
                await c.unexpose_port(sandbox, port)
            done += 1
        return done, time.perf_counter() - start


async def batched(
    path: str, batches: int, size: int, limit: float
) -> tuple[int, float]:
    async with AsyncControlClient(path) as c:
        start = time.perf_counter()
        done = 0
        for b in range(batches):
            if time.perf_counter() - start >= limit:
                break
            sandbox = f"batch-{b}"
            ops = [
                {"op": "expose_port", "sandbox": sandbox, "port": 8000 + i}
                for i in range(size)
            ]
            await c.batch(ops)
            done += size
        return done, time.perf_counter() - start


async def propagation(
    path: str, count: int, limit: float
) -> tuple[list[float], list[float]]:
    """(ack → watcher, request sent → watcher) delays in seconds."""
    arrived: dict[int, float] = {}
    sent: dict[int, float] = {}
    acked: dict[int, float] = {}

    async with AsyncControlClient(path) as c:
        stream = c.watch((await c.stats())["version"])
        await stream.start()

        async def follow() -> None:
            async for event in stream:
                arrived[event.version] = time.perf_counter()

        follower = asyncio.ensure_future(follow())
        start = time.perf_counter()
        for i in range(count):
            if time.perf_counter() - start >= limit:
                break
            began = time.perf_counter()
            await c.expose_port("watch", 8000 + i % 2000, token=f"t{i}")
            assert c.version is not None
            sent[c.version], acked[c.version] = began, time.perf_counter()
        deadline = time.perf_counter() + 5
        while set(acked) - set(arrived) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await stream.aclose()

    versions = [v for v in acked if v in arrived]
    if len(versions) != len(acked):
        raise SystemExit(f"watcher missed {len(acked) - len(versions)} changes")
    return (
        [arrived[v] - acked[v] for v in versions],
        [arrived[v] - sent[v] for v in versions],
    )


async def measure(path: str, args: argparse.Namespace) -> None:
    single, single_s = await one_by_one(path, args.changes, args.phase_seconds)
    many, many_s = await batched(
        path, args.batches, args.batch_size, args.phase_seconds
    )
    after_ack, after_send = await propagation(
        path, args.watch_changes, args.phase_seconds
    )

    ms = 1000.0
    rows = [
        (f"changes/s, one by one ({single})", f"{single / single_s:,.0f}"),
        (
            f"changes/s, batches of {args.batch_size} ({many})",
            f"{many / many_s:,.0f}",
        ),
        ("request -> ack mean (ms), one by one", f"{single_s / single * ms:.3f}"),
    ]
    for name, values in (
        ("ack -> watcher", after_ack),
        ("sent -> watcher", after_send),
    ):
        for pct in (50, 99):
            rows.append((f"{name} p{pct} (ms)", f"{percentile(values, pct) * ms:.3f}"))
    rows.append(("watch samples", str(len(after_ack))))

    print(f"{'measure':<42}{'value':>12}")
    print("-" * 54)
    for name, value in rows:
        print(f"{name:<42}{value:>12}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--changes", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--watch-changes", type=int, default=1000)
    parser.add_argument("--phase-seconds", type=float, default=15.0)
    parser.add_argument("--sync", choices=("full", "normal"), default="full")
    parser.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.sync)
        return 0

    with tempfile.TemporaryDirectory(prefix="control-bench-") as directory:
        path = os.path.join(directory, "control.sock")
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", directory, "--sync", args.sync],
            cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(path):
                if child.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the router did not start")
                time.sleep(0.02)
            print(
                f"python {sys.version.split()[0]}, sqlite synchronous={args.sync}, "
                f"store in {directory}"
            )
            asyncio.run(measure(path, args))
        except ControlError as exc:
            raise SystemExit(f"bench failed: {exc}") from exc
        finally:
            child.terminate()
            child.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
