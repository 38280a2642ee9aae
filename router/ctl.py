"""``edge-router ctl``: inspect and change the routes of a running router.

    edge-router ctl --control /run/edge-router.sock expose my-sandbox 8080
    edge-router ctl ls my-sandbox
    edge-router ctl watch --since 120 --json

The control address comes from ``--control`` or ``EDGE_ROUTER_CONTROL``: a
Unix socket path, or ``tcp://HOST:PORT`` with the secret in
``EDGE_ROUTER_CONTROL_SECRET`` (or ``--secret``, which other local users can
read in the process list).  Output is for people by default and JSON with
``--json``.

Exit status, for scripts:

* 0: done;
* 1: the router refused the request (the error code is on stderr), or
  ``validate`` found the token not valid;
* 2: usage error (bad arguments, no control address);
* 3: the router cannot be reached, or the connection broke before the
  answer came (a change may or may not have been applied);
* 130: ``watch`` interrupted with Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import orjson

from .client import ControlClient, ControlError, WatchEvent, parse_address

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

# Client-side failures: no answer from a router, as opposed to a refusal.
_TRANSPORT_CODES = frozenset({"UNREACHABLE", "CONNECTION_LOST", "TIMEOUT", "BAD_REPLY"})

Verb = Callable[[ControlClient, argparse.Namespace, TextIO], int]


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    out = sys.stdout

    # 1. Arguments; argparse reports its own errors and exits with 2.
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    control = args.control or os.environ.get("EDGE_ROUTER_CONTROL")
    if not control:
        _fail("no control socket: use --control PATH or set EDGE_ROUTER_CONTROL")
        return EXIT_USAGE
    try:
        parse_address(control)
    except ValueError as exc:
        _fail(str(exc))
        return EXIT_USAGE
    secret = args.secret or os.environ.get("EDGE_ROUTER_CONTROL_SECRET")
    if control.startswith("tcp://") and not secret:
        _fail(
            "a tcp:// control address needs the router's secret: set "
            "EDGE_ROUTER_CONTROL_SECRET (or use --secret)"
        )
        return EXIT_USAGE

    # 2. One connection, one verb.
    verb: Verb = args.verb
    try:
        with ControlClient(control, secret, args.timeout) as client:
            return verb(client, args, out)
    except ControlError as exc:
        where = f" (op {exc.index})" if exc.index is not None else ""
        _fail(f"{exc.message} [{exc.code}]{where}")
        if exc.code in _TRANSPORT_CODES:
            return EXIT_UNREACHABLE
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``ctl snapshot | head``): not a failure of
        # ours.  Quietly, and without Python's complaint when it flushes
        # stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    # The shared options are accepted before and after the verb; after it
    # they default to SUPPRESS so that they never undo a value given before.
    shared = argparse.ArgumentParser(add_help=False)
    _shared_options(shared, argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="edge-router ctl",
        description="Inspect and change the routes of a running edge-router.",
        epilog="Exit status: 0 done, 1 refused, 2 usage, 3 router unreachable.",
    )
    _shared_options(parser, None)
    verbs = parser.add_subparsers(metavar="VERB", required=True)

    def add(name: str, func: Verb, help: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, parents=[shared], help=help, description=help)
        sub.set_defaults(verb=func)
        return sub

    expose = add("expose", _expose, "expose a port; prints its preview URL")
    expose.add_argument("sandbox")
    expose.add_argument("port", type=_port)
    expose.add_argument("--token", help="custom token (default: keep or generate)")
    expose.add_argument("--name", help="a name for the port")
    expose.add_argument(
        "--target",
        help="HOST:PORT or unix:/PATH to send traffic to ('' for the sandbox's own)",
    )
    expose.add_argument("--host", choices=("rewrite", "preserve"), help="Host policy")
    expose.add_argument("--hostname", help="domain of the URL (default: the first)")

    unexpose = add("unexpose", _unexpose, "unexpose a port; its URL stops at once")
    unexpose.add_argument("sandbox")
    unexpose.add_argument("port", type=_port)

    ls = add("ls", _ls, "list a sandbox's exposed ports")
    ls.add_argument("sandbox")
    ls.add_argument("--hostname", help="domain of the URLs (default: the first)")

    validate = add("validate", _validate, "check a token; exit 1 if not valid")
    validate.add_argument("sandbox")
    validate.add_argument("port", type=_port)
    validate.add_argument("token")

    sandbox = add("sandbox", _no_action, "set or destroy a sandbox")
    actions = sandbox.add_subparsers(metavar="ACTION", required=True)
    sandbox_set = actions.add_parser(
        "set", parents=[shared], help="register a sandbox or change it"
    )
    sandbox_set.set_defaults(verb=_sandbox_set)
    sandbox_set.add_argument("sandbox")
    sandbox_set.add_argument("--upstream-host", help="where its ports are reached")
    sandbox_set.add_argument("--state", choices=("running", "stopped"))
    sandbox_destroy = actions.add_parser(
        "destroy", parents=[shared], help="remove a sandbox and all its routes"
    )
    sandbox_destroy.set_defaults(verb=_sandbox_destroy)
    sandbox_destroy.add_argument("sandbox")

    add("snapshot", _snapshot, "print the whole route table")

    watch = add("watch", _watch, "follow route changes as they are made")
    watch.add_argument("--since", type=_version, help="start after this version")
    watch.add_argument("--count", type=_version, help="stop after this many messages")

    add("stats", _stats, "print the router's counters")
    add("ping", _ping, "check that the router answers")
    return parser


def _shared_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--control",
        default=default,
        help="control socket path or tcp://HOST:PORT (env EDGE_ROUTER_CONTROL)",
    )
    parser.add_argument(
        "--secret",
        default=default,
        help="secret for tcp:// (prefer env EDGE_ROUTER_CONTROL_SECRET)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=30.0 if default is None else default,
        help="seconds to wait for an answer (default 30)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if default is None else default,
        help="print JSON instead of text",
    )


def _port(text: str) -> int:
    # The spelling is checked here (SPEC §1: canonical decimal), so that
    # ``08080`` is refused rather than sent as 8080; which ports may be
    # exposed is the router's to say.
    if not text.isdigit() or not text.isascii() or text[0] == "0":
        raise argparse.ArgumentTypeError(
            f"port must be decimal digits without leading zeros, not {text!r}"
        )
    if len(text) > 5:
        raise argparse.ArgumentTypeError(f"port {text} is out of range")
    return int(text)


def _version(text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise argparse.ArgumentTypeError(
            f"expected a whole number of 0 or more, not {text!r}"
        )
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 86400 * 365:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds above 0, not {text!r}"
        )
    return value


def _fail(message: str) -> None:
    print(f"edge-router ctl: {message}", file=sys.stderr)


def _json(out: TextIO, value: Any) -> None:
    out.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


# -- verbs ---------------------------------------------------------------------


def _expose(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    result = client.call(
        "expose_port",
        sandbox=args.sandbox,
        port=args.port,
        token=args.token,
        name=args.name,
        target=args.target,
        host=args.host,
        hostname=args.hostname,
    )
    if args.json:
        _json(out, result)
    else:
        out.write(f"{result['url']}\n")
    return EXIT_OK


def _unexpose(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    result = client.call("unexpose_port", sandbox=args.sandbox, port=args.port)
    if args.json:
        _json(out, result)
    elif result["unexposed"]:
        out.write(f"unexposed {args.sandbox} port {result['port']}\n")
    else:
        out.write(f"{args.sandbox} port {result['port']} was not exposed\n")
    return EXIT_OK


def _ls(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    ports = client.call(
        "get_exposed_ports", sandbox=args.sandbox, hostname=args.hostname
    )
    if args.json:
        _json(out, ports)
        return EXIT_OK
    if not ports:
        out.write(f"{args.sandbox} has no exposed ports\n")
        return EXIT_OK
    rows = [
        [str(p["port"]), p["status"], p["name"] or "-", p["exposedAt"], p["url"]]
        for p in ports
    ]
    _table(out, ["PORT", "STATUS", "NAME", "EXPOSED", "URL"], rows)
    return EXIT_OK


def _validate(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    valid = client.call(
        "validate_port_token", sandbox=args.sandbox, port=args.port, token=args.token
    )
    if args.json:
        _json(out, valid)
    else:
        out.write("valid\n" if valid else "not valid\n")
    return EXIT_OK if valid else EXIT_REFUSED


def _no_action(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    raise AssertionError("argparse requires a sandbox action")


def _sandbox_set(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    result = client.call(
        "set_sandbox",
        sandbox=args.sandbox,
        upstream_host=args.upstream_host,
        state=args.state,
    )
    if args.json:
        _json(out, result)
    else:
        out.write(
            f"sandbox {result['name']}: {result['state']}, "
            f"upstream host {result['upstream_host']}\n"
        )
    return EXIT_OK


def _sandbox_destroy(
    client: ControlClient, args: argparse.Namespace, out: TextIO
) -> int:
    result = client.call("destroy_sandbox", sandbox=args.sandbox)
    if args.json:
        _json(out, result)
    elif result["destroyed"]:
        routes = result["routes"]
        out.write(
            f"destroyed sandbox {result['sandbox']} "
            f"({routes} route{'' if routes == 1 else 's'})\n"
        )
    else:
        out.write(f"sandbox {result['sandbox']} did not exist\n")
    return EXIT_OK


def _snapshot(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    snap = client.call("snapshot")
    if args.json:
        _json(out, snap)
        return EXIT_OK
    out.write(
        f"version {snap['version']}: {len(snap['sandboxes'])} sandboxes, "
        f"{len(snap['routes'])} routes\n"
    )
    if snap["sandboxes"]:
        out.write("\n")
        rows = [[s["name"], s["state"], s["upstream_host"]] for s in snap["sandboxes"]]
        _table(out, ["SANDBOX", "STATE", "UPSTREAM"], rows)
    if snap["routes"]:
        out.write("\n")
        rows = [
            [
                r["sandbox"],
                str(r["port"]),
                r["token"],
                r["name"] or "-",
                r["target"] or "-",
                r["host"],
            ]
            for r in snap["routes"]
        ]
        _table(out, ["SANDBOX", "PORT", "TOKEN", "NAME", "TARGET", "HOST"], rows)
    return EXIT_OK


def _watch(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    # The probe connection only proved the router is there; the stream
    # needs a connection of its own.
    client.close()
    if args.count == 0:
        return EXIT_OK
    events = client.watch(args.since)
    try:
        for seen, event in enumerate(events, 1):
            if args.json:
                out.write(orjson.dumps(_event_message(event)).decode() + "\n")
            else:
                for line in _describe_event(event, args.since):
                    out.write(line + "\n")
            out.flush()
            if args.count is not None and seen >= args.count:
                break
    finally:
        events.close()
    return EXIT_OK


def _stats(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    stats = client.call("stats")
    if args.json:
        _json(out, stats)
    else:
        # Nested counters (a worker's, the proxy's) as dotted names, one
        # per line: the text form is for reading and for grep.
        rows = list(_flat(stats))
        width = max((len(key) for key, _ in rows), default=0)
        for key, value in rows:
            out.write(f"{key:<{width}}  {value}\n")
    return EXIT_OK


def _flat(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(dotted.name, text)`` for every scalar in ``value``."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _flat(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list) and value:
        for i, item in enumerate(value):
            yield from _flat(item, f"{prefix}.{i}")
    elif isinstance(value, str):
        yield prefix, value
    else:
        yield prefix, orjson.dumps(value).decode()


def _ping(client: ControlClient, args: argparse.Namespace, out: TextIO) -> int:
    seconds = client.ping()
    if args.json:
        _json(out, {"pong": True, "seconds": seconds})
    else:
        out.write(f"pong from {client.address} in {seconds * 1000:.2f} ms\n")
    return EXIT_OK


# -- formatting ------------------------------------------------------------------


def _table(out: TextIO, header: list[str], rows: list[list[str]]) -> None:
    # A cell is one line of plain text: control characters (a name stored
    # before names were checked) are shown escaped, never sent to the
    # terminal as they are.
    rows = [[_printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        out.write("  ".join(cells).rstrip() + "\n")


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _event_message(event: WatchEvent) -> dict[str, Any]:
    """The event as the router sent it."""
    if event.snapshot is not None:
        message: dict[str, Any] = {"version": event.version, "snapshot": event.snapshot}
        if event.resync:
            message["resync"] = True
        return message
    return {"version": event.version, "changes": event.changes}


def _describe_event(event: WatchEvent, since: int | None = None) -> list[str]:
    if event.snapshot is not None:
        snap = event.snapshot
        if since is not None and since > event.version:
            # The router is behind what the watcher saw: its store was
            # replaced or restored from an older copy.
            why = f" (resync: the router is at v{event.version}, before v{since})"
        else:
            why = " (resync: the requested version is no longer kept)"
        return [
            f"v{event.version} snapshot: {len(snap['sandboxes'])} sandboxes, "
            f"{len(snap['routes'])} routes{why if event.resync else ''}"
        ]
    return [f"v{event.version} {_describe_change(rec)}" for rec in event.changes]


def _describe_change(rec: dict[str, Any]) -> str:
    op = rec["op"]
    if op == "put_route":
        r = rec["route"]
        via = f" -> {r['target']}" if r["target"] else ""
        return f"expose {r['sandbox']} port {r['port']} token {r['token']}{via}"
    if op == "del_route":
        return f"revoke {rec['sandbox']} port {rec['port']}"
    if op == "put_sandbox":
        sb = rec["sandbox"]
        return f"sandbox {sb['name']} {sb['state']}, upstream {sb['upstream_host']}"
    if op == "del_sandbox":
        return f"sandbox {rec['name']} destroyed"
    return str(rec)


if __name__ == "__main__":
    sys.exit(main())
