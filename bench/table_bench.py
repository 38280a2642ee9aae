"""Route table benchmark: the compiled label twin against the pure one.

Run from the repository root, after ``python setup.py build_ext --inplace``::

    python bench/table_bench.py                 # 10k, 100k and 1M routes
    python bench/table_bench.py --sizes 10000   # a quick look
    python bench/table_bench.py --only changes  # one section

It prints one table per question of the issue "Route table, durable store
and the build", each next to its target:

1. lookup time per hit and per miss: ``LabelIndex.lookup`` called from a
   Python loop, ``lookup_into`` called from compiled code (as
   ``router._cproxy`` calls it, through ``_lookup_from_c.pyx``, built on
   first use), and the per-request path ``host_label`` + ``lookup`` on a
   ``ForwardingTable``;
2. memory per route of the ``ForwardingTable`` a worker holds;
3. time to load 1M routes from the store into a ``RouteTable`` as the
   router starts (``router.app.load_table``), and the memory it takes;
4. batched change rate (``RouteTable.prepare`` + ``Store.commit`` +
   ``RouteTable.finish``, 1000-op batches) with ``synchronous=FULL`` and
   ``NORMAL``: the median of ``--rounds`` runs taking turns, each pinned
   to one core.

Each measurement runs in a child process of its own, so one twin's memory
and warm caches never colour the other's figures.  The store used for the
load test is made once (``commit_many`` in big batches) and kept in
``--store-dir``.  Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TWINS = {"c": "router._clabels", "py": "router._labels_py"}
DOMAIN = "preview.example.com"
PORTS_PER_SANDBOX = 4
PROBES = 200_000
REPEATS = 5
BATCH = 1000

# The targets.
TARGET_LOOKUP_NS = 100
TARGET_BYTES_PER_ROUTE = 150
TARGET_LOAD_S = 2.0
TARGET_CHANGES_PER_S = 100_000


# -- the routes every measurement uses ---------------------------------


def route_parts(i: int) -> tuple[str, int, str]:
    """Route ``i``: a sandbox of 20 characters, its port and a 16-char token.

    Labels come out at 42 characters, what generated ids and tokens give.
    """
    box = i // PORTS_PER_SANDBOX
    sandbox = f"sb-{box:08d}-{random.Random(box).getrandbits(32):08x}"
    port = 8000 + i % PORTS_PER_SANDBOX
    token = f"{random.Random(i).getrandbits(64):016x}"
    return sandbox, port, token


def label_of(i: int) -> bytes:
    sandbox, port, token = route_parts(i)
    return f"{port}-{sandbox}-{token}".encode()


def missing_label_of(i: int) -> bytes:
    """A label of the same shape that no route has (another token)."""
    sandbox, port, _ = route_parts(i)
    return f"{port}-{sandbox}-{'z' * 16}".encode()


def use_twin(name: str) -> ModuleType:
    """Import twin ``name`` and make every new ``ForwardingTable`` use it."""
    import importlib

    from router import routes

    twin = importlib.import_module(TWINS[name])
    routes._labels = twin  # type: ignore[assignment]
    return twin


def worker_table(n: int) -> Any:
    """The ``ForwardingTable`` a worker holds for ``n`` routes."""
    from router.routes import ForwardingTable, Route, Sandbox

    fwd = ForwardingTable((DOMAIN,))
    for i in range(n):
        sandbox, port, token = route_parts(i)
        if i % PORTS_PER_SANDBOX == 0:
            fwd.put_sandbox(Sandbox(sandbox))
        fwd.put_route(
            Route(sandbox, port, token, None, "", None, "rewrite", i + 1).to_record()
        )
    # A worker's table comes from ForwardingTable.load_snapshot, which ends
    # the same way.
    fwd.index.compact()
    return fwd


def per_call_ns(run: Callable[[list[bytes]], None], values: list[bytes]) -> float:
    """Best time per item of ``run(items)`` over ``REPEATS`` passes.

    Every pass gets freshly built arguments, as requests do: a bytes object
    caches its hash, and reusing one would flatter the dict-based twin.
    """
    best = float("inf")
    for _ in range(REPEATS):
        items = [bytes(bytearray(v)) for v in values]
        start = time.perf_counter_ns()
        run(items)
        best = min(best, (time.perf_counter_ns() - start) / len(items))
    return best


def bare_pass(items: list[bytes]) -> None:
    for _ in items:
        pass


def index_pass(lookup: Callable[[bytes], object]) -> Callable[[list[bytes]], None]:
    def run(items: list[bytes]) -> None:
        for label in items:
            lookup(label)

    return run


def resolve_pass(twin: ModuleType, fwd: Any) -> Callable[[list[bytes]], None]:
    """What the data path does per request, inline as the proxy has it."""
    host_label, lookup, domains = twin.host_label, fwd.index.lookup, fwd.domains

    def run(items: list[bytes]) -> None:
        for host in items:
            lookup(host_label(host, domains))

    return run


# -- the measurements (each in its own process) -------------------------


def from_c_module() -> ModuleType | None:
    """``bench/_lookup_from_c.pyx``, compiled into the temp dir when needed."""
    import importlib

    build = Path(tempfile.gettempdir()) / "edge-router-bench-build"
    source = ROOT / "bench" / "_lookup_from_c.pyx"
    built = list(build.glob(f"{source.stem}.*.so"))
    inputs = (source, ROOT / "_speedups" / "router" / "_clabels.pxd")
    newest = max(p.stat().st_mtime for p in inputs)
    # Rebuilt when the index's C layout changed since: a stale module reads
    # the table's fields at the old offsets.
    if not built or min(p.stat().st_mtime for p in built) < newest:
        try:
            from Cython.Build import cythonize
            from setuptools import Distribution, Extension
        except ImportError:
            return None
        exts = cythonize(
            [Extension(source.stem, [str(source)])],
            include_path=[str(ROOT / "_speedups")],
            language_level=3,
            build_dir=str(build),
            quiet=True,
        )
        dist = Distribution({"ext_modules": exts, "script_name": "build"})
        cmd: Any = dist.get_command_obj("build_ext")
        cmd.build_lib = str(build)
        cmd.build_temp = str(build / "tmp")
        cmd.ensure_finalized()
        cmd.run()
        importlib.invalidate_caches()
    sys.path.insert(0, str(build))
    return importlib.import_module(source.stem)


def measure_lookup(twin_name: str, n: int) -> dict[str, Any]:
    twin = use_twin(twin_name)
    rng = random.Random(n)
    picks = [rng.randrange(n) for _ in range(PROBES)]
    hits = [label_of(i) for i in picks]
    misses = [missing_label_of(i) for i in picks]
    suffix = f".{DOMAIN}:443".encode()
    hit_hosts = [label + suffix for label in hits]
    miss_hosts = [label + suffix for label in misses]

    index = twin.LabelIndex()
    for i in range(n):
        index.set(label_of(i), i + 1, i // PORTS_PER_SANDBOX + 1, 8000, 0, 0)
    assert index.lookup(hits[0]) is not None and index.lookup(misses[0]) is None
    out = {
        "loop": per_call_ns(bare_pass, hits),
        "index_hit": per_call_ns(index_pass(index.lookup), hits),
        "index_miss": per_call_ns(index_pass(index.lookup), misses),
    }
    module = from_c_module() if twin_name == "c" else None
    if module is not None:
        # One Python call per pass: the per-label cost is the C loop's.
        out["c_hit"] = per_call_ns(functools.partial(module.lookups, index), hits)
        out["c_miss"] = per_call_ns(functools.partial(module.lookups, index), misses)
        out["c_alone"] = per_call_ns(
            functools.partial(module.chained_lookups, index), hits
        )
        out["floor"] = module.memory_latency_ns(index.memory_bytes())
    del index
    gc.collect()

    fwd = worker_table(n)
    out["fwd_hit"] = per_call_ns(resolve_pass(twin, fwd), hit_hosts)
    out["fwd_miss"] = per_call_ns(resolve_pass(twin, fwd), miss_hosts)
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def measure_memory(twin_name: str, n: int, traced: bool) -> dict[str, Any]:
    """Bytes per route of a worker's table, before and after traffic.

    Traffic matters for the compiled twin: it caches the tuple that
    ``lookup`` returns on a route's first hit.
    """
    use_twin(twin_name)
    gc.collect()
    if traced:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0] if traced else rss_bytes()
    fwd = worker_table(n)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] if traced else rss_bytes()
    lookup = fwd.index.lookup
    for i in range(n):
        lookup(label_of(i))
    gc.collect()
    hit = tracemalloc.get_traced_memory()[0] if traced else rss_bytes()
    out = {"built": (after - before) / n, "after_hits": (hit - before) / n}
    if hasattr(fwd.index, "memory_bytes") and twin_name == "c":
        out["index_arrays"] = fwd.index.memory_bytes() / n
    return out


def store_path(store_dir: Path, n: int) -> Path:
    return store_dir / f"routes-{n}.db"


def make_store(path: Path, n: int) -> None:
    """Write ``n`` routes with ``commit_many``, 50k records a transaction."""
    from router.routes import Route, Sandbox, Transaction
    from router.store import Store

    def records() -> Iterator[dict[str, Any]]:
        for i in range(n):
            sandbox, port, token = route_parts(i)
            if i % PORTS_PER_SANDBOX == 0:
                yield {"op": "put_sandbox", "sandbox": Sandbox(sandbox).to_record()}
            route = Route(
                sandbox,
                port,
                token,
                None,
                "2025-01-01T00:00:00.000Z",
                None,
                "rewrite",
                i + 1,
            )
            yield {"op": "put_route", "route": route.to_record()}

    tmp = path.with_suffix(".tmp")
    for leftover in tmp.parent.glob(tmp.name + "*"):
        leftover.unlink()
    store = Store(str(tmp), "NORMAL")
    chunk: list[dict[str, Any]] = []
    version = 0
    for rec in records():
        chunk.append(rec)
        if len(chunk) == 50_000:
            version += 1
            store.commit_many([Transaction(version, chunk, [])])
            chunk = []
    version += 1
    store.commit_many([Transaction(version, chunk, [])])
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    tmp.rename(path)


def measure_load(twin_name: str, path: str, parts: bool) -> dict[str, Any]:
    """A start-up with ``path``'s routes, in a fresh process.

    With ``parts``, the same start-up timed step by step instead (in a
    process of its own: a second load in one process runs on a heap the
    first one left fragmented, and comes out slower).
    """
    use_twin(twin_name)
    from router.app import load_table
    from router.routes import RouteTable
    from router.store import Store

    if parts:
        gc.disable()
        start = time.perf_counter()
        store = Store(path)
        opened = time.perf_counter()
        version, sandboxes, rows = store.load_index()
        read = time.perf_counter()
        table = RouteTable((DOMAIN,))
        table.load_index(version, sandboxes, rows, store)
        loaded = time.perf_counter()
        store.close()
        gc.enable()
        return {"open": opened - start, "read": read - opened, "build": loaded - read}

    # 1. As the router starts (``router.app.load_table``): the forwarding
    #    index whole, each sandbox's route metadata left in the store.
    rss_before = rss_bytes()
    start = time.perf_counter()
    store = Store(path)
    table = RouteTable((DOMAIN,))
    load_table(store, table)
    whole = time.perf_counter() - start
    held = rss_bytes() - rss_before

    # 2. Then every route's metadata read in, as the first snapshot for a
    #    worker process does.
    start = time.perf_counter()
    table.page_in_all()
    paged = time.perf_counter() - start
    held_all = rss_bytes() - rss_before
    routes = len(table.routes)
    store.close()
    return {
        "total": whole,
        "page_in_all": paged,
        "bytes_per_route": held / max(routes, 1),
        "bytes_per_route_all": held_all / max(routes, 1),
        "routes": routes,
    }


def measure_changes(twin_name: str, synchronous: str, batches: int) -> dict[str, Any]:
    use_twin(twin_name)
    from router.app import tune_gc
    from router.routes import RouteTable
    from router.store import Store

    tune_gc()  # as the router runs
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(os.path.join(tmp, "changes.db"), synchronous)
        table = RouteTable((DOMAIN,))
        # Every batch is made before the clock starts: making names with
        # ``random.Random`` between batches evicted the table from the CPU
        # caches, which the control socket's decoding does not do.
        all_ops = [
            [
                {"op": "expose_port", "sandbox": sandbox, "port": port, "token": token}
                for sandbox, port, token in map(
                    route_parts, range(b * BATCH, (b + 1) * BATCH)
                )
            ]
            for b in range(batches)
        ]
        prepare = commit = 0.0
        for ops in all_ops:
            t0 = time.perf_counter()
            txn = table.prepare(ops)
            t1 = time.perf_counter()
            store.commit(txn)
            table.finish(txn)
            t2 = time.perf_counter()
            prepare += t1 - t0
            commit += t2 - t1
        store.close()
    total = batches * BATCH
    return {
        "rate": total / (prepare + commit),
        "prepare_us": prepare / total * 1e6,
        "commit_us": commit / total * 1e6,
    }


# -- the parent: run the children, print the tables ---------------------


def child(*args: object, cpu: str | None = None) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", json.dumps([str(a) for a in args])]
    out = subprocess.run(
        argv if cpu is None else ["taskset", "-c", cpu, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def run_child(args: list[str]) -> None:
    kind, *rest = args
    if kind == "lookup":
        result = measure_lookup(rest[0], int(rest[1]))
    elif kind == "memory":
        result = measure_memory(rest[0], int(rest[1]), rest[2] == "traced")
    elif kind == "load":
        result = measure_load(rest[0], rest[1], rest[2] == "parts")
    else:
        result = measure_changes(rest[0], rest[1], int(rest[2]))
    print(json.dumps(result))


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def lookup_section(args: argparse.Namespace) -> None:
    """1. Lookup time per hit and per miss, at each size."""
    print(
        f"\n1. Lookup, ns per call, best of {REPEATS} x {PROBES} calls "
        f"(target <= {TARGET_LOOKUP_NS} ns)"
    )
    print("   'loop' is the bare Python loop over the same fresh arguments;")
    print("   'index' is lookup called from that loop; 'from C' is lookup_into")
    print("   called from compiled code with a kept Hit, as the compiled data")
    print("   path calls it (compiled twin only); 'fwd' is host_label + lookup")
    print("   on a worker's table.")
    print("   Calls from C run back to back, and the processor overlaps the")
    print("   memory reads of one lookup with the next's: 'from C' is the cost")
    print("   per lookup in a stream.  'alone' is a hit that waits for the one")
    print("   before (the next label depends on what it read): the latency one")
    print("   request sees.  '1 read' is one dependent random read in an array")
    print("   as big as the index's (a C pointer chase): a hit makes two such")
    print("   reads in a row (slot, then label, with the value alongside), a")
    print("   miss one, so past the caches memory latency sets 'alone'.")
    head = (
        "routes",
        "twin",
        "loop",
        "index hit",
        "index miss",
        "from C hit",
        "from C miss",
        "alone",
        "fwd hit",
        "fwd miss",
        "1 read",
    )
    widths = (9, 4, 6, 10, 11, 11, 12, 6, 8, 9, 7)
    print("   " + " ".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)))
    for n in args.sizes:
        for twin in TWINS:
            r = child("lookup", twin, n)
            c_hit, c_miss, alone = r.get("c_hit"), r.get("c_miss"), r.get("c_alone")
            c_cols = (
                f" {c_hit:>11.0f} {c_miss:>12.0f} {alone:>6.0f}"
                if c_hit is not None and c_miss is not None and alone is not None
                else f" {'-':>11} {'-':>12} {'-':>6}"
            )
            best = min(v for v in (r["index_hit"], c_hit) if v is not None)
            floor = f"{r['floor']:>7.0f}" if "floor" in r else f"{'-':>7}"
            print(
                f"   {n:>9,} {twin:>4} {r['loop']:>6.0f} {r['index_hit']:>10.0f}"
                f" {r['index_miss']:>11.0f}{c_cols}"
                f" {r['fwd_hit']:>8.0f} {r['fwd_miss']:>9.0f}"
                f" {floor}"
                f"  {verdict(best <= TARGET_LOOKUP_NS)}"
            )


def memory_section(args: argparse.Namespace) -> None:
    """2. Memory per route of a worker's table, at the largest size."""
    n = max(args.sizes)
    print(
        f"\n2. Memory per route of a worker's ForwardingTable, {n:,} routes "
        f"(target <= {TARGET_BYTES_PER_ROUTE} bytes)"
    )
    print(
        "   {:>4} {:>12} {:>10} {:>15} {:>11} {:>15}".format(
            "twin", "C arrays", "traced", "traced + hits", "RSS delta", "RSS + hits"
        )
    )
    for twin in TWINS:
        traced = child("memory", twin, n, "traced")
        rss = child("memory", twin, n, "rss")
        arrays = traced.get("index_arrays")
        print(
            f"   {twin:>4} {'-' if arrays is None else round(arrays):>12}"
            f" {traced['built']:>10.0f} {traced['after_hits']:>15.0f}"
            f" {rss['built']:>11.0f} {rss['after_hits']:>15.0f}"
            f"  {verdict(traced['after_hits'] <= TARGET_BYTES_PER_ROUTE)}"
        )


def load_section(args: argparse.Namespace) -> None:
    """3. Time to load the store as the router starts."""
    n = args.load_routes
    path = store_path(Path(args.store_dir), n)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        make_store(path, n)
        print(f"\n   (made {path} in {time.perf_counter() - start:.1f} s)")
    print(
        f"\n3. Loading {n:,} routes from the store into a RouteTable "
        f"(target <= {TARGET_LOAD_S} s)"
    )
    print("   'total' is a start-up as the router makes it (router.app.load_table):")
    print("   the forwarding index whole, each sandbox's names and exposure times")
    print("   left in the store until an operation touches it; 'open', 'read'")
    print("   (Store.load_index) and 'build' (RouteTable.load_index) are its parts,")
    print("   timed in another process.  'B/route' is the RSS the start-up added;")
    print("   'all s' and 'B/route all' are reading every route in afterwards, as")
    print("   the first whole-table answer (a snapshot, a watch from scratch) does.")
    print(
        "   {:>4} {:>7} {:>7} {:>7} {:>8} {:>8} {:>6} {:>12}".format(
            "twin",
            "open s",
            "read s",
            "build s",
            "total s",
            "B/route",
            "all s",
            "B/route all",
        )
    )
    for twin in TWINS:
        r = child("load", twin, str(path), "whole")
        assert r["routes"] == n, r
        r.update(child("load", twin, str(path), "parts"))
        print(
            f"   {twin:>4} {r['open']:>7.2f} {r['read']:>7.2f} {r['build']:>7.2f}"
            f" {r['total']:>8.2f} {r['bytes_per_route']:>8.0f}"
            f" {r['page_in_all']:>6.2f} {r['bytes_per_route_all']:>12.0f}"
            f"  {verdict(r['total'] <= TARGET_LOAD_S)}"
        )


def changes_section(args: argparse.Namespace) -> None:
    """4. Batched change rate: rounds of pinned children, medians."""
    total = args.batches * BATCH
    print(
        f"\n4. Batched changes: {total:,} expose_port in {BATCH}-op batches, "
        f"prepare + commit + finish (target >= {TARGET_CHANGES_PER_S:,}/s)"
    )
    # The runs of the four kinds take turns, each in a child pinned to one
    # core (when taskset is here); the median of each kind is printed, with
    # the slowest and fastest round beside it for the machine's noise.
    allowed = sorted(os.sched_getaffinity(0))
    cpu = str(allowed[-1]) if shutil.which("taskset") and len(allowed) > 1 else None
    kinds = [(twin, sync) for twin in TWINS for sync in ("FULL", "NORMAL")]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for twin, sync in kinds:
            runs[twin, sync].append(child("changes", twin, sync, args.batches, cpu=cpu))
    print(
        f"   median of {args.rounds} rounds, pinned to CPU {cpu or '(any)'}; "
        "range is the slowest and the fastest round"
    )
    print(
        "   {:>4} {:>7} {:>11} {:>17} {:>11} {:>10}".format(
            "twin", "sync", "changes/s", "range", "prepare us", "commit us"
        )
    )
    for twin, sync in kinds:
        rounds = sorted(runs[twin, sync], key=lambda r: float(r["rate"]))
        r = rounds[len(rounds) // 2]
        spread = f"{rounds[0]['rate']:,.0f}-{rounds[-1]['rate']:,.0f}"
        print(
            f"   {twin:>4} {sync:>7} {r['rate']:>11,.0f} {spread:>17}"
            f" {r['prepare_us']:>11.1f} {r['commit_us']:>10.1f}"
            f"  {verdict(r['rate'] >= TARGET_CHANGES_PER_S)}"
        )


SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {
    "lookup": lookup_section,
    "memory": memory_section,
    "load": load_section,
    "changes": changes_section,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--load-routes", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds of the change-rate runs"
    )
    parser.add_argument(
        "--store-dir",
        default=os.path.join(tempfile.gettempdir(), "edge-router-table-bench"),
    )
    parser.add_argument(
        "--only",
        default="lookup,memory,load,changes",
        help="sections to run, comma-separated (default: all four)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(json.loads(args.child))
        return

    from router import speedups

    args.sizes = [int(s) for s in args.sizes.split(",")]
    wrong = set(args.only.split(",")) - set(SECTIONS)
    if wrong:
        parser.error(f"--only takes {', '.join(SECTIONS)}, not {', '.join(wrong)}")
    print(
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {speedups.describe()}"
    )
    print(f"labels of {len(label_of(0))} bytes, {PORTS_PER_SANDBOX} routes per sandbox")
    # Other work on the machine shows up in every figure: say how much.
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average at start: {load}")

    for section in args.only.split(","):
        SECTIONS[section](args)

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nload average at end: {load}")


if __name__ == "__main__":
    main()
