"""The control protocol (SPEC §2, §7), sans IO: one request in, one decision out.

A request is a JSON object ``{"id": ..., "op": "<name>", ...arguments}``.
``parse_request`` checks the object, the operation name and every argument's
presence and type, so that nothing malformed reaches the ``RouteTable``; the
route rules themselves (port ranges, token format, label conflicts ...) stay
in the table, which refuses with its own ``RouteError`` codes.

The server (``router.control_server``) then acts on the request's ``kind``:

* ``CHANGE`` and ``BATCH`` go through ``Router.commit`` (``Request.changes``),
  and ``change_result`` turns the transaction into the reply's result;
* ``QUERY`` is answered from the table by ``run_query``;
* ``STATS`` and ``WATCH`` need the server's own state (clients, watchers),
  with ``stats``, ``watch_backlog`` and ``watch_snapshot`` doing the table's part.

Replies and stream messages are built here too, so the framing of the
protocol lives in one file.  Nothing in this module does IO or logs.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from .errors import RouteError, RouterError
from .routes import RouteTable, Transaction

MAX_LINE = 1 << 20
"""Default limit of one request line, in bytes, newline excluded."""

RequestId = str | int | None


class RequestError(RouteError):
    """The request itself is malformed; nothing reached the route table.

    Codes: ``INVALID_JSON``, ``INVALID_REQUEST``, ``UNKNOWN_OP``,
    ``MISSING_ARGUMENT``, ``INVALID_ARGUMENT``, ``UNKNOWN_ARGUMENT``,
    ``LINE_TOO_LONG``, ``AUTH_REQUIRED``, ``AUTH_FAILED``.  Inside a batch,
    ``index`` names the refused operation.
    """


class Kind(enum.Enum):
    CHANGE = "change"
    BATCH = "batch"
    QUERY = "query"
    STATS = "stats"
    WATCH = "watch"


@dataclass(frozen=True, slots=True)
class OpSpec:
    kind: Kind
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


OPERATIONS: dict[str, OpSpec] = {
    "expose_port": OpSpec(
        Kind.CHANGE,
        ("sandbox", "port"),
        ("hostname", "name", "token", "target", "host"),
    ),
    "unexpose_port": OpSpec(Kind.CHANGE, ("sandbox", "port")),
    "set_sandbox": OpSpec(Kind.CHANGE, ("sandbox",), ("upstream_host", "state")),
    "destroy_sandbox": OpSpec(Kind.CHANGE, ("sandbox",)),
    "batch": OpSpec(Kind.BATCH, ("ops",)),
    "get_exposed_ports": OpSpec(Kind.QUERY, ("sandbox",), ("hostname",)),
    "validate_port_token": OpSpec(Kind.QUERY, ("sandbox", "port", "token")),
    "snapshot": OpSpec(Kind.QUERY),
    "ping": OpSpec(Kind.QUERY),
    "stats": OpSpec(Kind.STATS),
    "watch": OpSpec(Kind.WATCH, (), ("since",)),
}

# Every argument has one JSON type.  ``port`` must be a JSON number: the
# table would also take a canonical decimal string, but a protocol with two
# spellings of one value only invites clients that disagree.
ARGUMENT_TYPES: dict[str, type] = {
    "sandbox": str,
    "port": int,
    "hostname": str,
    "name": str,
    "token": str,
    "target": str,
    "host": str,
    "upstream_host": str,
    "state": str,
    "ops": list,
    "since": int,
}

_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list"}


@dataclass(frozen=True, slots=True)
class Request:
    """A request whose operation and arguments have been checked.

    ``args`` holds only the arguments that were given (a JSON ``null`` for
    an optional argument counts as not given).  For ``batch``, ``args["ops"]``
    is the list of checked operations, each ``{"op": name, **arguments}``.
    """

    id: RequestId
    op: str
    args: dict[str, Any]

    @property
    def kind(self) -> Kind:
        return OPERATIONS[self.op].kind

    @property
    def changes(self) -> list[dict[str, Any]]:
        """The operations to hand to ``Router.commit``."""
        if self.kind is Kind.BATCH:
            ops: list[dict[str, Any]] = self.args["ops"]
            return ops
        return [{"op": self.op, **self.args}]


# -- decoding and checking ---------------------------------------------------


def decode(line: bytes) -> object:
    """One request line → the JSON value it holds, or ``INVALID_JSON``."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        try:
            line.decode()
        except UnicodeDecodeError as bad:
            raise RequestError(
                "INVALID_JSON",
                f"Request is not UTF-8 (at byte {bad.start}); JSON must be",
            ) from exc
        raise RequestError("INVALID_JSON", f"Request is not valid JSON: {exc}") from exc


def request_id(obj: object) -> RequestId:
    """The id to answer with, even when the rest of the request is refused."""
    if isinstance(obj, dict):
        rid = obj.get("id")
        if _is_id(rid):
            return rid
    return None


def parse_request(obj: object) -> Request:
    """Check a decoded request; raise ``RequestError`` (or nothing)."""
    if not isinstance(obj, dict):
        raise RequestError(
            "INVALID_REQUEST", f"A request must be a JSON object, not {_json_type(obj)}"
        )
    rid = obj.get("id")
    if not _is_id(rid):
        raise RequestError(
            "INVALID_REQUEST",
            f"Request id must be a string, an integer or null, not {_json_type(rid)}",
        )
    op, args = _check_operation(obj, skip=("id",))
    if op == "batch":
        args["ops"] = _check_batch(args["ops"])
    if "since" in args and args["since"] < 0:
        raise RequestError("INVALID_ARGUMENT", "'since' must not be negative")
    return Request(rid, op, args)


def _check_operation(
    obj: dict[str, Any], skip: tuple[str, ...] = ()
) -> tuple[str, dict[str, Any]]:
    # 1. The operation name.
    op = obj.get("op")
    if op is None:
        raise RequestError("INVALID_REQUEST", "Request has no 'op'")
    if not isinstance(op, str):
        raise RequestError(
            "INVALID_REQUEST", f"'op' must be a string, not {_json_type(op)}"
        )
    spec = OPERATIONS.get(op)
    if spec is None:
        raise RequestError("UNKNOWN_OP", f"Unknown operation {op!r}")

    # 2. Arguments it does not take, before any it lacks: a misspelt
    # optional argument would otherwise be silently ignored.
    known = {"op", *skip, *spec.required, *spec.optional}
    for key in obj:
        if key not in known:
            raise RequestError("UNKNOWN_ARGUMENT", f"{op} takes no argument {key!r}")

    # 3. Presence and type of each argument it does take.
    args: dict[str, Any] = {}
    for key in spec.required:
        if key not in obj:
            raise RequestError("MISSING_ARGUMENT", f"{op} needs {key!r}")
        args[key] = _check_type(op, key, obj[key])
    for key in spec.optional:
        value = obj.get(key)
        if value is not None:
            args[key] = _check_type(op, key, value)
    return op, args


def _check_batch(ops: list[Any]) -> list[dict[str, Any]]:
    checked = []
    for index, item in enumerate(ops):
        try:
            if not isinstance(item, dict):
                raise RequestError(
                    "INVALID_ARGUMENT",
                    f"Each batch op must be an object, not {_json_type(item)}",
                )
            if "id" in item:
                raise RequestError(
                    "UNKNOWN_ARGUMENT", "Operations inside a batch carry no 'id'"
                )
            if item.get("op") == "auth":
                raise RequestError("UNKNOWN_OP", "Unknown operation 'auth'")
            op, args = _check_operation(item)
            if OPERATIONS[op].kind is not Kind.CHANGE:
                raise RequestError(
                    "INVALID_ARGUMENT",
                    f"{op} cannot be batched: a batch holds only expose_port, "
                    "unexpose_port, set_sandbox and destroy_sandbox",
                )
        except RequestError as exc:
            exc.index = index
            raise
        checked.append({"op": op, **args})
    return checked


def _check_type(op: str, key: str, value: object) -> Any:
    want = ARGUMENT_TYPES[key]
    # ``True`` is an ``int`` to Python but a boolean to JSON.
    if isinstance(value, bool) or not isinstance(value, want):
        raise RequestError(
            "INVALID_ARGUMENT",
            f"{op}: {key!r} must be {_TYPE_NAMES[want]}, not {_json_type(value)}",
        )
    return value


def _is_id(value: object) -> bool:
    return value is None or isinstance(value, str) or type(value) is int


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a number"
    if isinstance(value, float):
        # orjson reads an integer past 64 bits as a float, so "must be an
        # integer, not a number" would puzzle whoever sent 20 digits.
        return "a fraction or a number too large for 64 bits"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


# -- authentication (TCP only) -------------------------------------------------


def check_auth(obj: object, secret: bytes) -> RequestId:
    """Check the first line of a TCP connection; return its id.

    The secret is compared in constant time so that the time an answer takes
    says nothing about how much of a guess was right.
    """
    if not isinstance(obj, dict) or obj.get("op") != "auth":
        raise RequestError(
            "AUTH_REQUIRED",
            'The first request on TCP must be {"op": "auth", "secret": ...}',
        )
    given = obj.get("secret")
    extra = set(obj) - {"id", "op", "secret"}
    if not isinstance(given, str) or extra or not _is_id(obj.get("id")):
        raise RequestError("AUTH_FAILED", "Authentication failed")
    if not hmac.compare_digest(given.encode(), secret):
        raise RequestError("AUTH_FAILED", "Authentication failed")
    return request_id(obj)


# -- acting on a request -------------------------------------------------------


def change_result(request: Request, txn: Transaction) -> Any:
    """A committed change's result: the one op's, or every op's for a batch."""
    if request.kind is Kind.BATCH:
        return txn.results
    return txn.results[0]


def run_query(table: RouteTable, request: Request) -> Any:
    """Answer a ``QUERY`` request from the table; may raise ``RouteError``.

    Not ``snapshot``: the IO layer builds that one in steps
    (``Router.snapshot``).
    """
    args = request.args
    if request.op == "get_exposed_ports":
        return table.get_exposed_ports(args["sandbox"], args.get("hostname"))
    if request.op == "validate_port_token":
        return table.validate_port_token(args["sandbox"], args["port"], args["token"])
    if request.op == "ping":
        return "pong"
    raise AssertionError(f"{request.op} is not a query")


def stats(table: RouteTable, extra: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    """The table's counters, then each ``extra`` mapping merged over them."""
    # Counted in the forwarding view: what is stored and served, at
    # ``version`` (the table's own maps hold changes still being stored).
    forwarding = table.forwarding
    out: dict[str, Any] = {
        "version": table.version,
        "routes": len(forwarding.index),
        "sandboxes": len(forwarding.sandbox_slots),
        "log_oldest": table.log[0]["version"] if table.log else None,
        "log_size": len(table.log),
    }
    for more in extra:
        out.update(more)
    return out


@dataclass(frozen=True, slots=True)
class WatchStart:
    """How a watch begins: the messages to send before the live ones.

    ``messages`` is the backlog from the table's log, or one snapshot
    message when the follower has no usable version (``resync`` tells the
    two apart).  ``version`` is the version those messages lead to; every
    live message after them is newer.
    """

    version: int
    resync: bool
    messages: list[dict[str, Any]]


def watch_backlog(table: RouteTable, since: int | None) -> WatchStart | None:
    """The start of a watch that resumes from the change log; None when it
    must start from a snapshot instead (``watch_snapshot``)."""
    if since is None:
        return None
    backlog = table.changes_since(since)
    if backlog is None:
        return None
    return WatchStart(table.version, False, backlog)


def watch_snapshot(snap: dict[str, Any], since: int | None) -> WatchStart:
    """The start of a watch from ``snap``, the table's snapshot."""
    message: dict[str, Any] = {"version": snap["version"], "snapshot": snap}
    if since is not None:
        # The log no longer reaches back to ``since`` (or ``since`` is ahead
        # of this router, which means its store was replaced): the follower
        # must drop what it holds and start over from the snapshot.
        message["resync"] = True
    return WatchStart(snap["version"], since is not None, [message])


# -- replies and stream messages -----------------------------------------------


def ok(rid: RequestId, result: Any, version: int | None = None) -> dict[str, Any]:
    """A success reply; changes add the version the table is at after them."""
    reply: dict[str, Any] = {"id": rid, "ok": True, "result": result}
    if version is not None:
        reply["version"] = version
    return reply


def error(rid: RequestId, exc: RouterError) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": exc.to_dict()}


def watch_overflow(rid: RequestId, version: int) -> dict[str, Any]:
    """The last message to a watcher that fell too far behind.

    ``version`` is the last one the watcher was sent (-1: none), where it
    can resume once it has read everything before this message.
    """
    hint = f"with since={version}" if version >= 0 else "from a snapshot"
    message: dict[str, Any] = {
        "id": rid,
        "ok": False,
        "error": {
            "code": "WATCH_OVERFLOW",
            "message": "Watcher fell too far behind and was dropped; "
            f"watch again {hint}",
        },
    }
    if version >= 0:
        message["version"] = version
    return message


def encode(message: dict[str, Any]) -> bytes:
    """One protocol line."""
    # Appended by orjson: ``+ b"\n"`` would copy the line again, which for
    # a snapshot of a million routes is a tenth of a second.
    return orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE)
