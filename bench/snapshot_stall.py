"""How long a whole-table answer holds up a router with many routes.

    python bench/snapshot_stall.py [--routes 1000000]

Starts ``edge-router serve`` on a store of ``--routes`` routes (made once by
``table_bench.py``'s code, kept in its ``--store-dir``), then asks for a
``snapshot`` on one control connection while another pings every 10 ms.
It prints the start-up time, the snapshot's time and the worst ping: the
longest the router's event loop (its proxying included) was held up.
Everything runs on loopback and Unix sockets in a temp dir; the router is
stopped by its PID.  Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import table_bench  # noqa: E402

from router.client import ControlClient  # noqa: E402


def ask(sock: str) -> None:
    """The asker's process: one snapshot, its time and size on stdout."""
    with ControlClient(sock, timeout=300) as client:
        start = time.monotonic()
        routes = len(client.snapshot()["routes"])
        seconds = time.monotonic() - start
    print(json.dumps({"seconds": seconds, "routes": routes}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", type=int, default=1_000_000)
    parser.add_argument(
        "--store-dir",
        default=os.path.join(tempfile.gettempdir(), "edge-router-table-bench"),
    )
    parser.add_argument("--ask", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ask:
        ask(args.ask)
        return

    source = table_bench.store_path(Path(args.store_dir), args.routes)
    if not source.exists():
        source.parent.mkdir(parents=True, exist_ok=True)
        table_bench.make_store(source, args.routes)

    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "routes.db")
        shutil.copy(source, state)
        sock = os.path.join(tmp, "control.sock")
        command = [sys.executable, "-m", "router", "serve", "--listen", "127.0.0.1:0"]
        command += ["--state", state, "--control", sock, "--no-access-log"]
        command += ["--domain", table_bench.DOMAIN]
        proc = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            began = time.monotonic()
            while not os.path.exists(sock):
                if proc.poll() is not None or time.monotonic() - began > 60:
                    raise SystemExit("the router did not start")
                time.sleep(0.01)
            ready = time.monotonic() - began
            print(f"{args.routes:,} routes; serving after {ready:.2f} s")

            # The asker is a process of its own: decoding the reply holds
            # its interpreter's GIL for a second, which in a thread here
            # would delay the pinger and be counted as the router's stall.
            asker = subprocess.Popen(
                [sys.executable, __file__, "--ask", sock],
                stdout=subprocess.PIPE,
                text=True,
            )
            worst = 0.0
            with ControlClient(sock) as pinger:
                pinger.ping()
                while asker.poll() is None:
                    worst = max(worst, pinger.ping())
                    time.sleep(0.01)
            out, _ = asker.communicate()
            result = json.loads(out)
            print(
                f"snapshot of {result['routes']:,} routes: {result['seconds']:.2f} s; "
                f"worst ping meanwhile: {worst * 1000:.0f} ms"
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


if __name__ == "__main__":
    main()
