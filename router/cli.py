"""Command line: ``edge-router serve | ctl | --version`` (SPEC §7)."""

from __future__ import annotations

import argparse
import sys

from . import __version__, config, speedups


def version_line() -> str:
    return f"edge-router {__version__} ({speedups.describe()})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "ctl":
        from . import ctl

        return ctl.main(argv[1:])

    parser = argparse.ArgumentParser(
        prog="edge-router", description="Preview-URL edge router for sandboxes"
    )
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the router")
    config.add_arguments(serve)
    sub.add_parser("ctl", help="talk to a running router (see 'edge-router ctl -h')")
    args = parser.parse_args(argv)

    if args.command == "serve":
        from .server import serve as run

        return run(config.load(args))
    return 2


if __name__ == "__main__":
    sys.exit(main())
