"""How long big control requests hold up a router with many routes.

    python bench/snapshot_stall.py [--routes 1000000] [--bulk 60000]

Starts ``edge-router serve`` on a store of ``--routes`` routes (made once by
``table_bench.py``'s code, kept in its ``--store-dir``), then, one at a time
and each from a process of its own:

1. asks for a ``snapshot`` of the whole table;
2. exposes ``--bulk`` new routes in batches of 12,000 (near what a 1 MiB
   request line allows), then destroys their sandboxes in one batch.

Meanwhile another control connection pings every 5 ms.  For each phase it
prints how long it took and the worst ping: the longest the router's event
loop (its proxying included) was held up.  Everything runs on loopback and
Unix sockets in a temp dir; the router is stopped by its PID.  Not a test:
nothing here asserts.
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

BATCH = 12_000
PORTS_PER_SANDBOX = 10


def ask_snapshot(sock: str, _bulk: int) -> dict[str, object]:
    with ControlClient(sock, timeout=300) as client:
        start = time.monotonic()
        routes = len(client.snapshot()["routes"])
        return {"seconds": time.monotonic() - start, "what": f"{routes:,} routes"}


def ask_bulk(sock: str, bulk: int) -> dict[str, object]:
    ops = [
        {
            "op": "expose_port",
            "sandbox": f"bulk-{i // PORTS_PER_SANDBOX}",
            "port": 4000 + i % PORTS_PER_SANDBOX,
            "token": f"t{i}",
        }
        for i in range(bulk)
    ]
    boxes = (bulk + PORTS_PER_SANDBOX - 1) // PORTS_PER_SANDBOX
    with ControlClient(sock, timeout=300) as client:
        start = time.monotonic()
        for at in range(0, bulk, BATCH):
            client.batch(ops[at : at + BATCH])
        client.batch(
            [{"op": "destroy_sandbox", "sandbox": f"bulk-{b}"} for b in range(boxes)]
        )
        return {
            "seconds": time.monotonic() - start,
            "what": f"{bulk:,} exposes, then {boxes:,} sandboxes destroyed",
        }


PHASES = {"snapshot": ask_snapshot, "bulk": ask_bulk}


def run_phase(sock: str, phase: str, bulk: int) -> None:
    # The asker is a process of its own: encoding or decoding a big request
    # holds its interpreter's GIL for a second, which in a thread here
    # would delay the pinger and be counted as the router's stall.
    asker = subprocess.Popen(
        [sys.executable, __file__, "--ask", phase, sock, "--bulk", str(bulk)],
        stdout=subprocess.PIPE,
        text=True,
    )
    worst = 0.0
    with ControlClient(sock) as pinger:
        pinger.ping()
        while asker.poll() is None:
            worst = max(worst, pinger.ping())
            time.sleep(0.005)
    out, _ = asker.communicate()
    result = json.loads(out)
    print(
        f"{phase:<9} {result['what']}: {result['seconds']:.2f} s; "
        f"worst ping meanwhile: {worst * 1000:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", type=int, default=1_000_000)
    parser.add_argument("--bulk", type=int, default=60_000)
    parser.add_argument(
        "--store-dir",
        default=os.path.join(tempfile.gettempdir(), "edge-router-table-bench"),
    )
    parser.add_argument("--ask", nargs=2, metavar=("PHASE", "SOCKET"))
    args = parser.parse_args()
    if args.ask:
        phase, sock = args.ask
        print(json.dumps(PHASES[phase](sock, args.bulk)))
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
            for phase in PHASES:
                run_phase(sock, phase, args.bulk)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


if __name__ == "__main__":
    main()
