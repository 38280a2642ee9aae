"""Pure-Python twin of ``_speedups/labels.pyx``: Host parsing and label index.

The data path asks two questions per request: which label does this Host
header name, and where does that label lead.  Both answers are here, with
the same behaviour as the compiled twin (``router._clabels``), which the
differential tests hold it to.  Nothing from the rest of the package is
imported: this module sits on the bottom floor.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

MAX_LABEL = 63
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_U63 = 0x7FFFFFFFFFFFFFFF

Value = tuple[int, int, int, int, int]

# What a Host value may hold (RFC 3986 reg-name, IP literals and a port):
# letters, digits, "-._~", "%" of percent-encoding, the sub-delims, ":"
# and the brackets.  The compiled twin builds its byte table from these.
NAME_BYTES = (
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%!$&'()*+,;="
)
_HOST_BYTES = NAME_BYTES + b":[]"
BAD_HOST_CHARACTER = "bad character in Host"


def host_label(host: bytes, domains: tuple[bytes, ...]) -> bytes | None:
    """The lower-cased first label when ``host`` names one under a domain.

    ``host`` is a Host header value as received; one that is not a host
    at all (a byte no host holds, a stray colon) is a ``ValueError``.  The
    port is dropped (it must be digits, at most 65535, else ``ValueError``),
    then one trailing dot, and what is left must be exactly ``label.domain``
    for one of ``domains`` (given lower-case, without a trailing dot).
    Anything else, the bare domain and deeper names included, is not a
    preview host: ``None``.
    """
    # RFC 9112 §3.2 wants a 400 for a Host that is not a host: a space, a
    # control byte, a non-ASCII byte, or a colon or bracket out of place.
    # ``odd`` is what is left of it without the bytes of a plain name:
    # nothing, or the port's colon, for nearly every request.
    if type(host) is not bytes:
        raise TypeError(f"host must be bytes, not {type(host).__name__}")
    odd = host.translate(None, NAME_BYTES)
    if odd and odd != b":":
        if odd.translate(None, b":[]"):
            raise ValueError(BAD_HOST_CHARACTER)
        if host[:1] == b"[":
            # An IPv6 literal is never a preview host; still insist that
            # what follows the bracket is a port, as for every other host.
            end = host.find(b"]")
            if end < 0:
                raise ValueError("unterminated IPv6 literal in Host")
            if not ip_literal(host[1:end]):
                raise ValueError("bad IP literal in Host")
            rest = host[end + 1 :]
            if rest and (rest[:1] != b":" or not _is_port(rest[1:])):
                raise ValueError("bad port in Host")
            return None

    if odd:
        colon = host.rfind(b":")
        if colon >= 0:
            if not _is_port(host[colon + 1 :]):
                raise ValueError("bad port in Host")
            host = host[:colon]
        # Any other colon, or a bracket, is out of place.
        if len(odd) > 1 or colon < 0:
            raise ValueError(BAD_HOST_CHARACTER)

    if host.endswith(b"."):
        host = host[:-1]

    dot = host.find(b".")
    if dot <= 0:
        return None
    if host[dot + 1 :].lower() not in domains:
        return None
    return host[:dot].lower()


def ip_literal(inside: bytes) -> bool:
    """Whether ``inside`` the brackets of a Host is an IP literal (RFC 3986
    §3.2.2): an IPv6 address, with a zone (RFC 6874) or not, or IPvFuture.

    The compiled twin calls this one: an IP literal is never a preview
    host, so speed does not matter, and one copy cannot drift.
    """
    text = inside.decode("ascii", "replace")
    if text[:1] in ("v", "V"):
        version, dot, rest = text[1:].partition(".")
        return bool(
            dot
            and version
            and all(c in _HEX for c in version)
            and rest
            and all(c in _FUTURE for c in rest)
        )
    address, _, zone = text.partition("%25")
    if zone and not all(c in _ZONE for c in zone):
        return False
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        return False
    return True


_HEX = frozenset("0123456789abcdefABCDEF")
_ZONE = frozenset(_HOST_BYTES.decode()) - frozenset(":[]!$&'()*+,;=")
_FUTURE = frozenset(_HOST_BYTES.decode()) - frozenset("[]%")


def _is_port(value: bytes) -> bool:
    # An empty port is allowed by RFC 3986 §3.2.3 (``port = *DIGIT``); a
    # number no TCP port can have is not.  Leading zeros are allowed, any
    # number of them (as the compiled twin counts): past five digits they
    # are dropped before int(), which refuses over 4,300 digits with an
    # error of its own.
    if not value:
        return True
    if not value.isdigit():  # bytes: ASCII digits only
        return False
    if len(value) > 5:
        value = value.lstrip(b"0")
        if len(value) > 5:
            return False
    return int(value or b"0") <= 65535


class Hit:
    """What ``LabelIndex.lookup_into`` found; one is reused for every lookup."""

    __slots__ = ("flags", "port", "route_id", "sandbox_slot", "target_slot")

    def __init__(self) -> None:
        self.route_id = 0
        self.sandbox_slot = 0
        self.port = 0
        self.target_slot = 0
        self.flags = 0


class LabelIndex:
    """Label → (route_id, sandbox_slot, port, target_slot, flags).

    The compiled twin keeps this in an open-addressing table of fixed-size
    C records; here a dict gives the same answers.
    """

    __slots__ = ("_map",)

    def __init__(self) -> None:
        self._map: dict[bytes, Value] = {}

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, label: bytes) -> bool:
        return label in self._map

    def set(
        self,
        label: bytes,
        route_id: int,
        sandbox_slot: int,
        port: int,
        target_slot: int,
        flags: int,
    ) -> int | None:
        """Insert ``label`` or replace its value.

        The target slot of the value replaced, or None for a new label: the
        caller keeps targets' reference counts, and needs no lookup first.
        """
        _check_label(label)
        if not 0 <= route_id <= _U63:
            raise ValueError("route_id out of range")
        if not (0 <= sandbox_slot <= _U32 and 0 <= target_slot <= _U32):
            raise ValueError("slot out of range")
        if not (0 <= port <= _U16 and 0 <= flags <= _U16):
            raise ValueError("port or flags out of range")
        key = bytes(label)
        old = self._map.get(key)
        self._map[key] = (route_id, sandbox_slot, port, target_slot, flags)
        return None if old is None else old[3]

    def load_rows(
        self,
        rows: Sequence[Sequence[Any]],
        sandbox_slots: dict[str, int],
        target_slot: Callable[[str], int],
    ) -> int:
        """Insert stored routes in bulk; the highest route_id among them.

        Each row is ``(sandbox, port, token, route_id, target, flags)``, as
        the store reads them; the label is ``{port}-{sandbox}-{token}`` and
        the sandbox slot comes from ``sandbox_slots``.  ``target_slot`` is
        called for a row with a target to get its slot.
        """
        top = 0
        for sandbox, port, token, route_id, target, flags in rows:
            self.set(
                _join_label(sandbox, port, token),
                route_id,
                sandbox_slots[sandbox],
                port,
                0 if target is None else target_slot(target),
                flags,
            )
            if route_id > top:
                top = route_id
        return top

    def put_route(
        self,
        route: dict[str, Any],
        sandbox_slots: dict[str, int],
        target_slot: Callable[[str], int],
    ) -> int | None:
        """Insert or replace one route from its change record's ``route``.

        ``load_rows`` for one record (``sandbox``, ``port``, ``token``,
        ``route_id``, ``target``, ``host``), as a change applies it.
        Returns what ``set`` does, the replaced target slot or None.
        """
        port = route["port"]
        target = route["target"]
        return self.set(
            _join_label(route["sandbox"], port, route["token"]),
            route["route_id"],
            sandbox_slots[route["sandbox"]],
            port,
            target_slot(target) if target else 0,
            1 if route["host"] == "preserve" else 0,
        )

    def remove(self, label: bytes) -> bool:
        """Drop ``label``; False when it was not there."""
        return self._map.pop(label, None) is not None

    def lookup(self, label: bytes) -> Value | None:
        return self._map.get(label)

    def lookup_into(self, label: bytes, hit: Hit) -> bool:
        """``lookup`` for the data path: the route's fields go into ``hit``.

        The compiled twin makes no object per request this way.
        """
        if not isinstance(hit, Hit):
            raise TypeError("label must be bytes and hit a Hit")
        value = self._map.get(label)
        if value is None:
            return False
        hit.route_id, hit.sandbox_slot, hit.port, hit.target_slot, hit.flags = value
        return True

    def reserve(self, count: int) -> None:
        """Make room for ``count`` labels in all before a bulk load.

        The compiled twin sizes its arrays once instead of growing (and
        rehashing) them many times; a dict sizes itself, so this is only
        the argument check.
        """
        if count < 0:
            raise ValueError("count must be >= 0")

    def compact(self) -> None:
        """Give back spare room after a bulk load (a dict has none to give)."""

    def clear(self) -> None:
        self._map.clear()

    def iter_items(self) -> Iterator[tuple[bytes, Value]]:
        """Every entry, in storage order, one at a time.

        The index must not change meanwhile.
        """
        yield from self._map.items()

    def items(self) -> list[tuple[bytes, Value]]:
        """Every entry, sorted by label (for tests and snapshots)."""
        return sorted(self._map.items())

    def memory_bytes(self) -> int:
        """Approximate bytes held, for the benchmarks."""
        total = sys.getsizeof(self._map)
        for label, value in self._map.items():
            total += sys.getsizeof(label) + sys.getsizeof(value)
            total += sum(sys.getsizeof(v) for v in value if v > 256)
        return total


def _check_label(label: bytes) -> None:
    if not isinstance(label, bytes):
        raise TypeError("label must be bytes")
    if not 1 <= len(label) <= MAX_LABEL:
        raise ValueError("label must be 1-63 bytes")


def _join_label(sandbox: str, port: int, token: str) -> bytes:
    """``{port}-{sandbox}-{token}`` for ``load_rows`` and ``put_route``
    (``set`` checks its length)."""
    if not 0 <= port <= _U16:
        raise ValueError("port or flags out of range")
    return f"{port}-{sandbox}-{token}".encode()
