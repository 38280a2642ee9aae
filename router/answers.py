"""The answers the router gives itself (SPEC §3), as ready-to-send bytes.

Every answer is JSON ``{"error": message, "code": CODE}`` with its status.
The bytes of the common ones are built once: they are sent on hot paths
(a scanner probing random labels gets thousands of 404s a second).
"""

from __future__ import annotations

import orjson

REASONS = {
    400: b"Bad Request",
    404: b"Not Found",
    408: b"Request Timeout",
    410: b"Gone",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}

MESSAGES = {
    "NOT_FOUND": (404, "Not a preview URL served by this router"),
    "INVALID_TOKEN": (404, "Access denied: Invalid token or port not exposed"),
    "STALE_PREVIEW_URL": (410, "The sandbox behind this preview URL is stopped"),
    "UPSTREAM_UNAVAILABLE": (502, "The sandbox port refused the connection"),
    "UPSTREAM_TIMEOUT": (504, "The sandbox port did not answer in time"),
    "UPSTREAM_CLOSED": (502, "The sandbox port closed the connection before answering"),
    "UPSTREAM_BAD_RESPONSE": (502, "The sandbox port sent a malformed response"),
    "BAD_REQUEST": (400, "Malformed request"),
    "REQUEST_TIMEOUT": (408, "The request head did not arrive in time"),
    "HEADERS_TOO_LARGE": (431, "Request header section too large"),
    "BODY_TOO_LARGE": (413, "Request body too large"),
    "SHUTTING_DOWN": (503, "The router is shutting down"),
}


def answer(
    code: str, message: str | None = None, close: bool = False, head: bool = False
) -> bytes:
    """A complete HTTP/1.1 response for one of the router's own answers."""
    status, default = MESSAGES[code]
    body = orjson.dumps({"error": message or default, "code": code})
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status]),
        b"Content-Type: application/json\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"Cache-Control: no-store\r\n",
    ]
    if close:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    if not head:
        lines.append(body)
    return b"".join(lines)


def status_of(code: str) -> int:
    return MESSAGES[code][0]


_CACHE: dict[tuple[str, bool, bool], bytes] = {}


def cached(code: str, close: bool = False, head: bool = False) -> bytes:
    """``answer`` with the default message, built once per variant."""
    key = (code, close, head)
    out = _CACHE.get(key)
    if out is None:
        out = _CACHE[key] = answer(code, close=close, head=head)
    return out
