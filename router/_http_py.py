"""HTTP/1.1 message heads and chunked framing: the pure-Python twin.

This module and ``router._chttp`` (built from ``_speedups/router/_chttp.pyx``) export
the same names and give the same answers; the Cython file follows this one
function by function so that the two can be read side by side.  Neither does
IO: bytes go in, a parsed head (or ``None`` while the head is incomplete)
comes out, and every malformed input raises :class:`ParseError` carrying the
reply the router should send.

The reference for what is valid, and where each message ends, is h11 0.16.
Where this module is stricter than h11 it says so next to the rule, and the
differential tests in ``tests/test_http_parser.py`` list the same cases:

* obs-fold (a header line starting with SP or HTAB) in a *request* is refused
  (RFC 9112 §5.2 allows a server to answer 400); h11 unfolds it.  In responses
  it is unfolded exactly as h11 does.
* A request with both Content-Length and Transfer-Encoding is refused (RFC 9112
  §6.3: "ought to be handled as an error"); h11 lets Transfer-Encoding win.
  Responses follow h11, and rendering them drops the Content-Length.
* Only HTTP/1.0 and HTTP/1.1 are accepted; h11 takes any ``HTTP/d.d``.
* Content-Length and chunk sizes must fit in 63 bits; h11 would wait for up
  to 10**20 bytes.
* An absolute-form target whose authority is empty, carries userinfo or
  differs from Host is refused (SPEC §1, RFC 9110 §4.2); h11 does not look.
* Any other target must be a path from ``/``, or ``*`` for OPTIONS (RFC 9112
  §3.2); authority-form (CONNECT) is not served.  h11 takes any visible
  characters.
* A chunk-size line is refused as soon as no ending could make it valid; h11
  waits for its CRLF first, then refuses it too.
* A chunked body is relayed as it came, so what a sandbox could read another
  way is refused in it: a bare CR or a control byte in a chunk extension, a
  bare LF or obs-fold in the trailer section.  h11 accepts all four.
* A head longer than ``max_head`` is refused even when it arrived complete;
  h11 only counts bytes buffered while the head is still incomplete.
"""

from __future__ import annotations

from ._labels_py import host_label as _host_label

__all__ = [
    "BODY_CHUNKED",
    "BODY_CLOSE",
    "BODY_LENGTH",
    "BODY_NONE",
    "ChunkedFramer",
    "Codec",
    "ParseError",
    "RequestHead",
    "ResponseHead",
    "parse_request",
    "parse_response",
    "render_request",
    "render_response",
]

BODY_NONE = 0
BODY_LENGTH = 1
BODY_CHUNKED = 2
BODY_CLOSE = 3

# RFC 9110 §5.6.2: tchar, the bytes allowed in methods and field names.
_TCHAR = (
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)

# RFC 9112 §3.2: the request-target is made of visible characters only.
_VCHAR = bytes(range(0x21, 0x7F))

# h11 takes at most 20 digits (a billion terabytes); 63 bits are enough for any
# body that can actually be sent, and keep the compiled twin in a C integer.
_MAX_LENGTH_DIGITS = 20
_MAX_LENGTH = 2**63 - 1

# h11 allows at most 20 hex digits in a chunk size, leading zeros included.
_MAX_CHUNK_SIZE_DIGITS = 20

# What each header is to the framing and forwarding rules.  Parsing records
# one kind per header; the end of parsing turns kinds into render actions.
_K_OTHER = 0
_K_HOST = 1
_K_CONNECTION = 2
_K_UPGRADE = 3
_K_HOP = 4  # Keep-Alive, Proxy-Connection, TE: hop-by-hop, RFC 9110 §7.6.1
_K_FORWARDED = 5  # X-Forwarded-*: set by the router, never passed on
_K_CONTENT_LENGTH = 6
_K_TRANSFER_ENCODING = 7
_K_EXPECT = 8

_KINDS = {
    b"host": _K_HOST,
    b"connection": _K_CONNECTION,
    b"upgrade": _K_UPGRADE,
    b"keep-alive": _K_HOP,
    b"proxy-connection": _K_HOP,
    b"te": _K_HOP,
    b"x-forwarded-for": _K_FORWARDED,
    b"x-forwarded-proto": _K_FORWARDED,
    b"x-forwarded-host": _K_FORWARDED,
    b"x-forwarded-port": _K_FORWARDED,
    b"content-length": _K_CONTENT_LENGTH,
    b"transfer-encoding": _K_TRANSFER_ENCODING,
    b"expect": _K_EXPECT,
}

# Render actions, one per header.
_KEEP = 0
_DROP = 1
_RESTATE = 2  # the one Content-Length left after folding duplicates together


class ParseError(ValueError):
    """A message the router will not accept, with the reply to send for it."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _bad(message: str) -> ParseError:
    return ParseError(400, "BAD_REQUEST", message)


class _Head:
    """What request and response heads share; attributes are read-only."""

    __slots__ = (
        "_actions",
        "_content_length",
        "_content_length_value",
        "_framing",
        "_head_len",
        "_headers",
        "_keep_alive",
        "_version",
    )

    _version: int
    _headers: list[tuple[bytes, bytes]]
    _head_len: int
    _framing: int
    _content_length: int
    _keep_alive: bool
    _actions: bytes
    _content_length_value: bytes

    @property
    def version(self) -> int:
        return self._version

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """``[(name as sent, value), ...]``, a new list each time."""
        return list(self._headers)

    @property
    def head_len(self) -> int:
        return self._head_len

    @property
    def framing(self) -> int:
        return self._framing

    @property
    def content_length(self) -> int:
        return self._content_length

    @property
    def keep_alive(self) -> bool:
        return self._keep_alive

    def get(self, lname: bytes) -> bytes | None:
        """The first value of the header named ``lname`` (lower case)."""
        return _get(self._headers, lname)


class RequestHead(_Head):
    """A parsed request head; attributes are read-only."""

    __slots__ = (
        "_expect_continue",
        "_host",
        "_method",
        "_origin_form",
        "_target",
        "_upgrade",
        "_upgrade_value",
    )

    _method: bytes
    _target: bytes
    _host: bytes | None
    _upgrade: bytes | None
    _expect_continue: bool
    _upgrade_value: bytes
    _origin_form: bytes

    def __init__(self) -> None:
        raise TypeError("RequestHead objects are made by parse_request")

    @property
    def method(self) -> bytes:
        return self._method

    @property
    def target(self) -> bytes:
        return self._target

    @property
    def host(self) -> bytes | None:
        return self._host

    @property
    def upgrade(self) -> bytes | None:
        return self._upgrade

    @property
    def expect_continue(self) -> bool:
        return self._expect_continue

    def __repr__(self) -> str:
        return (
            f"<RequestHead {self._method!r} {self._target!r} "
            f"HTTP/{self._version // 10}.{self._version % 10} "
            f"{len(self._headers)} headers>"
        )


class ResponseHead(_Head):
    """A parsed response head; attributes are read-only."""

    __slots__ = ("_reason", "_status")

    _status: int
    _reason: bytes

    def __init__(self) -> None:
        raise TypeError("ResponseHead objects are made by parse_response")

    @property
    def status(self) -> int:
        return self._status

    @property
    def reason(self) -> bytes:
        return self._reason

    def __repr__(self) -> str:
        return (
            f"<ResponseHead {self._status} {self._reason!r} "
            f"HTTP/{self._version // 10}.{self._version % 10} "
            f"{len(self._headers)} headers>"
        )


def _get(headers: list[tuple[bytes, bytes]], lname: bytes) -> bytes | None:
    size = len(lname)
    for name, value in headers:
        if len(name) == size and name.lower() == lname:
            return value
    return None


class _Fields:
    """What the header section says about framing and forwarding."""

    __slots__ = (
        "connection_close",
        "connection_keep_alive",
        "connection_listed",
        "connection_upgrade",
        "content_length_count",
        "content_length_value",
        "expect_continue",
        "headers",
        "host",
        "host_count",
        "kinds",
        "restate_length",
        "transfer_encoding",
        "upgrade_value",
    )

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.kinds = bytearray()
        self.host: bytes | None = None
        self.host_count = 0
        self.content_length_count = 0
        self.content_length_value = b""
        self.restate_length = False
        self.transfer_encoding = False
        self.connection_close = False
        self.connection_keep_alive = False
        self.connection_upgrade = False
        self.connection_listed: list[bytes] = []
        self.upgrade_value: bytes | None = None
        self.expect_continue = False


# ---------------------------------------------------------------------------
# Finding the head


def _find_head(buf: bytes, max_head: int) -> tuple[int, int]:
    """Return (start of the blank line, end of the head), or (-1, -1).

    Like h11, the head ends at the first LF followed by an empty line, CRLF
    or bare LF (RFC 9112 §2.2 lets a recipient accept a bare LF as a line
    terminator).  Only the first ``max_head`` bytes are searched, so a large
    pipelined body behind the head is never scanned.
    """
    window = min(len(buf), max_head)
    crlf = buf.find(b"\n\r\n", 0, window)
    lf = buf.find(b"\n\n", 0, crlf + 2 if crlf >= 0 else window)
    if lf >= 0:
        return lf, lf + 2
    if crlf >= 0:
        return crlf, crlf + 3
    return -1, -1


def _incomplete(buf: bytes, max_head: int, what: str) -> None:
    # h11 refuses at once a buffer whose first byte is whitespace or a control
    # byte: no message line can start that way, and it catches a TLS handshake
    # sent to a plain-text port before the head limit is reached.  A leading
    # empty line is refused for the same reason (h11 does not skip it).
    if buf and buf[0] < 0x21:
        raise _bad(f"{what} line starts with whitespace or a control byte")

    if len(buf) >= max_head:
        raise ParseError(431, "HEADERS_TOO_LARGE", f"{what} head is too large")


def _check_head_bytes(buf: bytes, end: int) -> None:
    # NUL, VT and FF are valid nowhere in a head, and CR only right before LF
    # (RFC 9112 §2.2, RFC 9110 §5.5): the same set h11's grammar refuses.
    # Checking the whole head once lets the line parsers skip field values.
    if (
        buf.find(b"\x00", 0, end) >= 0
        or buf.find(b"\x0b", 0, end) >= 0
        or buf.find(b"\x0c", 0, end) >= 0
    ):
        raise _bad("control character in message head")

    if buf.count(b"\r", 0, end) != buf.count(b"\r\n", 0, end):
        raise _bad("bare CR in message head")


def _head_lines(buf: bytes, blank: int) -> list[bytes]:
    # Every CR left is the one before an LF (checked above), so dropping all
    # of them drops exactly one CR from the end of each line.
    return buf[:blank].replace(b"\r", b"").split(b"\n")


def _version(raw: bytes) -> int:
    # RFC 9112 §2.3: HTTP-version = "HTTP/" DIGIT "." DIGIT, case-sensitive.
    if raw == b"HTTP/1.1":
        return 11
    if raw == b"HTTP/1.0":
        return 10
    if (
        len(raw) == 8
        and raw.startswith(b"HTTP/")
        and raw[5] in b"0123456789"
        and raw[6] == 0x2E
        and raw[7] in b"0123456789"
    ):
        raise _bad(f"unsupported HTTP version {raw.decode()}")
    raise _bad("malformed HTTP version")


def _is_token(raw: bytes) -> bool:
    return bool(raw) and not raw.translate(None, _TCHAR)


# ---------------------------------------------------------------------------
# Header fields


def _has_fold(buf: bytes, blank: int) -> bool:
    # A line starting with SP or HTAB continues the one before (obs-fold).
    return buf.find(b"\n ", 0, blank) >= 0 or buf.find(b"\n\t", 0, blank) >= 0


def _unfold(lines: list[bytes]) -> list[bytes]:
    # RFC 9112 §5.2 lets a recipient replace each obs-fold with SP; h11 joins
    # each continuation, stripped of its leading whitespace, with one SP.
    out: list[bytes] = []
    for line in lines:
        if line[0] in b" \t":
            if not out:
                raise _bad("continuation line at start of header section")
            out[-1] += b" " + line.lstrip(b" \t")
        else:
            out.append(line)
    return out


def _parse_fields(lines: list[bytes]) -> _Fields:
    # RFC 9112 §5: field-name ":" OWS field-value OWS.  The value bytes were
    # checked for the whole head at once, so only the name needs a scan.
    fields = _Fields()
    headers = fields.headers
    kinds = fields.kinds
    for line in lines:
        colon = line.find(b":")
        name = line[:colon]
        if colon <= 0 or name.translate(None, _TCHAR):
            if line[0] in b" \t":
                raise _bad("obsolete line folding in header section")
            shown = line[:40].decode("latin-1")
            raise _bad(f"malformed header line {shown!r}")
        value = line[colon + 1 :].strip(b" \t")
        headers.append((name, value))
        kinds.append(_note_field(fields, name, value))
    return fields


def _note_field(fields: _Fields, name: bytes, value: bytes) -> int:
    kind = _KINDS.get(name.lower(), _K_OTHER)
    if kind == _K_OTHER:
        return kind

    if kind == _K_HOST:
        fields.host_count += 1
        if fields.host is None:
            fields.host = value
    elif kind == _K_CONTENT_LENGTH:
        _note_content_length(fields, value)
    elif kind == _K_TRANSFER_ENCODING:
        # RFC 9112 §6.1: chunked is the only coding a proxy must understand;
        # like h11, refuse any other, a list, or a second header.
        if fields.transfer_encoding:
            raise _bad("more than one Transfer-Encoding header")
        if value.lower() != b"chunked":
            raise _bad("Transfer-Encoding must be exactly chunked")
        fields.transfer_encoding = True
    elif kind == _K_CONNECTION:
        _note_connection(fields, value)
    elif kind == _K_UPGRADE:
        if fields.upgrade_value is None:
            fields.upgrade_value = value
    elif kind == _K_EXPECT:
        for item in value.split(b","):
            if item.strip(b" \t").lower() == b"100-continue":
                fields.expect_continue = True
    return kind


def _note_content_length(fields: _Fields, value: bytes) -> None:
    # RFC 9112 §6.3 and RFC 9110 §8.6, as h11 reads them: a list of equal
    # values ("5, 5") or repeated equal headers stand for one length; any
    # difference, even "5" against "05", is refused.
    items = value.split(b",")
    first = items[0].strip(b" \t")
    for item in items[1:]:
        if item.strip(b" \t") != first:
            raise _bad("conflicting Content-Length values")

    if not first.isdigit() or not first.isascii():
        raise _bad("Content-Length is not a decimal number")
    if len(first) > _MAX_LENGTH_DIGITS:
        raise _bad("Content-Length is too large")

    fields.content_length_count += 1
    if fields.content_length_count == 1:
        fields.content_length_value = first
        fields.restate_length = len(items) > 1
    elif first != fields.content_length_value:
        raise _bad("conflicting Content-Length values")
    else:
        fields.restate_length = True


def _content_length(fields: _Fields) -> int:
    # Checked apart from the grammar so that trailers, whose Content-Length
    # means nothing, are held to h11's 20 digits only.
    if not fields.content_length_count:
        return -1
    length = int(fields.content_length_value)
    if length > _MAX_LENGTH:
        raise _bad("Content-Length is too large")
    return length


def _note_connection(fields: _Fields, value: bytes) -> None:
    # RFC 9110 §7.6.1: a comma list of case-insensitive option names.
    for item in value.split(b","):
        option = item.strip(b" \t").lower()
        if option == b"close":
            fields.connection_close = True
        elif option == b"keep-alive":
            fields.connection_keep_alive = True
        elif option == b"upgrade":
            fields.connection_upgrade = True
        elif option:
            fields.connection_listed.append(option)


def _listed(fields: _Fields, index: int) -> bool:
    name = fields.headers[index][0].lower()
    return name in fields.connection_listed


# ---------------------------------------------------------------------------
# Requests


def parse_request(buf: bytes, max_head: int) -> RequestHead | None:
    """Parse the request head at the start of ``buf``.

    Returns ``None`` while the head is incomplete; raises :class:`ParseError`
    (400, or 431 past ``max_head`` bytes) for a request to refuse.
    """
    if max_head <= 0:
        raise ValueError("max_head must be positive")
    if not isinstance(buf, bytes):
        buf = bytes(buf)

    # 1. Find the blank line that ends the head.
    blank, end = _find_head(buf, max_head)
    if end < 0:
        _incomplete(buf, max_head, "request")
        return None

    # 2. Split it into lines and read the request line, RFC 9112 §3.
    _check_head_bytes(buf, end)
    lines = _head_lines(buf, blank)
    line = lines[0]
    if not line:
        raise _bad("empty request line")
    first = line.find(b" ")
    if first < 0:
        raise _bad("malformed request line")
    method = line[:first]
    if not _is_token(method):
        raise _bad("malformed method")
    second = line.find(b" ", first + 1)
    if second < 0:
        raise _bad("malformed request line")
    target = line[first + 1 : second]
    if not target or target.translate(None, _VCHAR):
        raise _bad("malformed request-target")
    version = _version(line[second + 1 :])

    # 3. Read the header section; obs-fold is refused in requests (RFC 9112
    #    §5.2 allows it), which leaves a smuggler no two readings of a header.
    #    h11 unfolds it instead: the one grammar difference between the two.
    fields = _parse_fields(lines[1:])

    # 4. Host, RFC 9112 §3.2: a 1.1 request without one, or any request with
    #    two, is answered 400.
    if fields.host_count > 1:
        raise _bad("more than one Host header")
    host = fields.host
    if host is None and version == 11:
        raise _bad("missing Host header")
    origin_form = target
    absolute = _absolute_form(target)
    if (
        absolute is None
        and target[:1] != b"/"
        and (method, target) != (b"OPTIONS", b"*")
    ):
        # RFC 9112 §3.2: origin-form starts with "/"; authority-form is for
        # CONNECT, which a preview router does not serve.  h11 accepts any
        # visible characters here.
        raise _bad(
            "request-target must be a path from '/', absolute-form, or '*' for OPTIONS"
        )
    if absolute is not None:
        # SPEC §1: the authority of an absolute-form target is the host, and
        # must not disagree with a Host header sent beside it.
        authority, rest = absolute
        if host is None:
            host = authority
        elif host.lower() != authority.lower():
            raise _bad("Host header differs from the request-target")
        origin_form = _origin_form(method, rest)

    # 5. Body framing, RFC 9112 §6.3.  Both headers at once is the classic
    #    smuggling shape; h11 lets Transfer-Encoding win, a proxy refuses.
    if fields.transfer_encoding:
        if fields.content_length_count:
            raise _bad("both Content-Length and Transfer-Encoding")
        framing = BODY_CHUNKED
    elif fields.content_length_count:
        framing = BODY_LENGTH
    else:
        framing = BODY_NONE
    content_length = _content_length(fields)

    # 6. Persistence, RFC 9112 §9.3; a 1.0 message with Transfer-Encoding
    #    must close after it (RFC 9112 §6.1).
    if version == 11:
        keep_alive = not fields.connection_close
    else:
        keep_alive = fields.connection_keep_alive and not fields.connection_close
        keep_alive = keep_alive and not fields.transfer_encoding

    # 7. Upgrade, RFC 9110 §7.8: only when Connection lists it, and never
    #    for HTTP/1.0, where the server must ignore it.  Only WebSocket is
    #    tunnelled (SPEC §5): a tunnel ends with WebSocket close frames, so
    #    another protocol (h2c, TLS/1.2) goes upstream as an ordinary
    #    request without its Upgrade, which §7.8 lets a recipient ignore.
    upgrade = None
    if (
        fields.connection_upgrade
        and version == 11
        and fields.upgrade_value
        and fields.upgrade_value.lower() == b"websocket"
    ):
        upgrade = b"websocket"

    head = RequestHead.__new__(RequestHead)
    head._method = method
    head._target = target
    head._version = version
    head._headers = fields.headers
    head._head_len = end
    head._host = host
    head._framing = framing
    head._content_length = content_length
    head._keep_alive = keep_alive
    head._upgrade = upgrade
    # RFC 9110 §10.1.1: a 100-continue expectation in 1.0 is ignored.
    head._expect_continue = fields.expect_continue and version == 11
    head._actions = _request_actions(fields)
    head._content_length_value = fields.content_length_value
    head._upgrade_value = fields.upgrade_value or b""
    head._origin_form = origin_form
    return head


def _absolute_form(target: bytes) -> tuple[bytes, bytes] | None:
    """The authority of an absolute-form target, and what follows it.

    RFC 9112 §3.2.2; only http and https URIs are served.
    """
    scheme = target[:8].lower()
    if scheme.startswith(b"http://"):
        rest = target[7:]
    elif scheme.startswith(b"https://"):
        rest = target[8:]
    else:
        return None

    end = len(rest)
    for delimiter in (b"/", b"?", b"#"):
        found = rest.find(delimiter, 0, end)
        if found >= 0:
            end = found
    authority = rest[:end]

    # RFC 9110 §4.2.1 and §4.2.4: an http URI needs a host, and userinfo in
    # it is to be treated as an error.
    if not authority or b"@" in authority:
        raise _bad("malformed authority in request-target")

    return authority, rest[end:]


def _origin_form(method: bytes, rest: bytes) -> bytes:
    # RFC 9112 §3.2.1: a request sent straight to an origin server, as the
    # router's are, carries the path and query only, never a fragment.  An
    # empty path is "/", or "*" for OPTIONS without a query (§3.2.4).
    fragment = rest.find(b"#")
    if fragment >= 0:
        rest = rest[:fragment]
    if not rest:
        return b"*" if method == b"OPTIONS" else b"/"
    if not rest.startswith(b"/"):
        return b"/" + rest
    return rest


def _request_actions(fields: _Fields) -> bytes:
    # Hop-by-hop headers go (RFC 9110 §7.6.1), so do Host and X-Forwarded-*,
    # which the router sets itself (SPEC §4).  Content-Length and
    # Transfer-Encoding stay even when Connection names them: dropping them
    # would let a client change the framing the upstream sees.  Trailer
    # stays too: it is end-to-end (RFC 9110 §6.6.2, not in §7.6.1's list),
    # and the trailer section it announces is relayed verbatim.
    actions = bytearray(len(fields.kinds))
    restated = False
    for index, kind in enumerate(fields.kinds):
        if kind == _K_CONTENT_LENGTH:
            if fields.restate_length:
                actions[index] = _DROP if restated else _RESTATE
                restated = True
        elif kind == _K_TRANSFER_ENCODING:
            pass
        elif kind in (_K_HOST, _K_CONNECTION, _K_UPGRADE, _K_HOP, _K_FORWARDED) or (
            fields.connection_listed and _listed(fields, index)
        ):
            actions[index] = _DROP
    return bytes(actions)


def render_request(head: RequestHead, host: bytes, extra: bytes) -> bytes:
    """The head to send upstream: HTTP/1.1, the target in origin-form,
    end-to-end headers as received, then ``Host``, the pre-formatted ``extra``
    lines and the upgrade pair."""
    parts = [head._method, b" ", head._origin_form, b" HTTP/1.1\r\n"]
    _render_fields(parts, head._headers, head._actions, head._content_length_value)
    parts += (b"Host: ", host, b"\r\n", extra)
    if head._upgrade is not None:
        parts += (b"Connection: Upgrade\r\nUpgrade: ", head._upgrade_value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def _render_fields(
    parts: list[bytes],
    headers: list[tuple[bytes, bytes]],
    actions: bytes,
    length: bytes,
) -> None:
    for (name, value), action in zip(headers, actions, strict=True):
        if action == _KEEP:
            parts += (name, b": ", value, b"\r\n")
        elif action == _RESTATE:
            parts += (name, b": ", length, b"\r\n")


# ---------------------------------------------------------------------------
# Responses


def parse_response(
    buf: bytes, max_head: int, head_request: bool
) -> ResponseHead | None:
    """Parse the response head at the start of ``buf``.

    Returns ``None`` while the head is incomplete.  An interim (1xx) response
    is returned on its own; call again after it for the next one.  Errors are
    :class:`ParseError` 502 ``UPSTREAM_BAD_RESPONSE``.
    """
    if max_head <= 0:
        raise ValueError("max_head must be positive")
    try:
        return _parse_response(buf, max_head, head_request)
    except ParseError as exc:
        raise ParseError(502, "UPSTREAM_BAD_RESPONSE", exc.message) from None


def _parse_response(
    buf: bytes, max_head: int, head_request: bool
) -> ResponseHead | None:
    if not isinstance(buf, bytes):
        buf = bytes(buf)

    # 1. Find the blank line that ends the head.
    blank, end = _find_head(buf, max_head)
    if end < 0:
        _incomplete(buf, max_head, "status")
        return None

    # 2. Read the status line, RFC 9112 §4.  h11 also accepts a status line
    #    without the SP before an empty reason, which some servers send.
    _check_head_bytes(buf, end)
    lines = _head_lines(buf, blank)
    line = lines[0]
    if len(line) < 12 or line[8] != 0x20 or not line[9:12].isdigit():
        raise _bad("malformed status line")
    if len(line) > 12 and line[12] != 0x20:
        raise _bad("malformed status line")
    version = _version(line[:8])
    status = int(line[9:12])
    if status < 100:
        raise _bad("status code below 100")
    reason = line[13:]

    # 3. Read the header section.  obs-fold is unfolded as h11 does, which
    #    is what RFC 9112 §5.2 asks of a proxy forwarding a response.
    headers = lines[1:]
    if _has_fold(buf, blank):
        headers = _unfold(headers)
    fields = _parse_fields(headers)
    content_length = _content_length(fields)

    # 4. Body framing, RFC 9112 §6.3: interim, 204 and 304 responses and
    #    answers to HEAD have none whatever they say; Transfer-Encoding wins
    #    over Content-Length; with neither, the body runs to the close.
    if status < 200 or status in (204, 304) or head_request:
        framing = BODY_NONE
    elif fields.transfer_encoding:
        framing = BODY_CHUNKED
    elif fields.content_length_count:
        framing = BODY_LENGTH
    else:
        framing = BODY_CLOSE

    # 5. Can the upstream connection carry another request (RFC 9112 §9.3)?
    if version == 11:
        keep_alive = not fields.connection_close
    else:
        keep_alive = fields.connection_keep_alive and not fields.connection_close
        keep_alive = keep_alive and not fields.transfer_encoding
    if framing == BODY_CLOSE or status == 101:
        keep_alive = False

    head = ResponseHead.__new__(ResponseHead)
    head._status = status
    head._reason = reason
    head._version = version
    head._headers = fields.headers
    head._head_len = end
    head._framing = framing
    head._content_length = content_length if framing == BODY_LENGTH else -1
    head._keep_alive = keep_alive
    head._actions = _response_actions(fields, status)
    head._content_length_value = fields.content_length_value
    return head


def _response_actions(fields: _Fields, status: int) -> bytes:
    # Hop-by-hop headers go (RFC 9110 §7.6.1), except that a 101 keeps its
    # Connection and Upgrade so the client sees the switch as sent.  Beside
    # Transfer-Encoding a Content-Length is removed (RFC 9112 §6.3).
    actions = bytearray(len(fields.kinds))
    switching = status == 101
    restated = False
    for index, kind in enumerate(fields.kinds):
        if kind == _K_CONTENT_LENGTH:
            if fields.transfer_encoding:
                actions[index] = _DROP
            elif fields.restate_length:
                actions[index] = _DROP if restated else _RESTATE
                restated = True
        elif kind == _K_TRANSFER_ENCODING:
            pass
        elif kind in (_K_CONNECTION, _K_UPGRADE):
            if not switching:
                actions[index] = _DROP
        elif kind == _K_HOP or (fields.connection_listed and _listed(fields, index)):
            actions[index] = _DROP
    return bytes(actions)


def render_response(
    head: ResponseHead, close: bool, body: bytes = b"", start: int = 0
) -> bytes:
    """The head to send to the client, HTTP/1.1, hop-by-hop headers removed;
    ``close`` adds ``Connection: close``.  ``body[start:]`` follows the head
    in the same bytes object: a small answer leaves in one write, with no
    copy made to join them, nor to cut its body out of what was read."""
    if not 0 <= start <= len(body):
        raise ValueError("start is outside the body")
    status = str(head._status).encode()
    parts = [b"HTTP/1.1 ", status, b" ", head._reason, b"\r\n"]
    _render_fields(parts, head._headers, head._actions, head._content_length_value)
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    parts.append(body[start:] if start else body)
    return b"".join(parts)


# ---------------------------------------------------------------------------
# The per-request entry points as methods


class Codec:
    """``host_label`` (of the route table's twin) and this module's parse and
    render functions, as methods.

    The compiled twin's methods are C calls from the compiled proxy, which
    holds a ``Codec`` for that; here they are the functions themselves.
    """

    __slots__ = ()

    host_label = staticmethod(_host_label)
    parse_request = staticmethod(parse_request)
    parse_response = staticmethod(parse_response)
    render_request = staticmethod(render_request)
    render_response = staticmethod(render_response)


# ---------------------------------------------------------------------------
# Chunked bodies, RFC 9112 §7.1

# One state per place in the grammar, so that any split of the input is
# handled without buffering.
_SIZE_FIRST = 0  # first hex digit of chunk-size
_SIZE = 1  # more hex digits
_SIZE_SPACE = 2  # whitespace after the size (h11 tolerates it)
_SIZE_CR = 3  # CR seen, LF must follow
_EXTENSION = 4  # chunk-ext, up to CRLF
_DATA = 5
_DATA_CR = 6  # the CRLF closing chunk-data
_DATA_LF = 7
_TRAILER_START = 8  # after an LF: an LF, or CR LF, here ends the trailers
_TRAILER_START_CR = 9
_TRAILER_LINE = 10
_DONE = 11
_FAILED = 12

_HEX = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}


class ChunkedFramer:
    """Follows a chunked body relayed verbatim, to find where it ends.

    Chunk-size lines and the trailer section are each limited to
    ``max_line`` bytes, the role h11's buffer limit plays for them.
    """

    __slots__ = (
        "_cr",
        "_digits",
        "_done",
        "_line",
        "_max_line",
        "_remaining",
        "_state",
        "_trailers",
    )

    def __init__(self, max_line: int = 16384) -> None:
        if max_line <= 0:
            raise ValueError("max_line must be positive")
        self._done = False
        self._max_line = max_line
        self._state = _SIZE_FIRST
        self._remaining = 0
        self._digits = 0
        self._line = 0
        self._cr = False
        self._trailers = bytearray()

    @property
    def done(self) -> bool:
        """True once the last chunk and the trailer section are through."""
        return self._done

    def feed(self, data: bytes | memoryview) -> int:
        """Return how many bytes of ``data`` belong to the body."""
        return self._walk(data, None)

    def decode(self, data: bytes | memoryview) -> tuple[int, list[bytes]]:
        """Like :meth:`feed`, and also return the chunk payloads in ``data``."""
        pieces: list[bytes] = []
        used = self._walk(data, pieces)
        return used, pieces

    def _fail(self, message: str) -> ParseError:
        self._state = _FAILED
        return _bad(message)

    def _walk(self, data: bytes | memoryview, pieces: list[bytes] | None) -> int:
        state = self._state
        if state == _DONE:
            return 0
        if state == _FAILED:
            raise _bad("chunked body already refused")

        size = len(data)
        pos = 0
        while pos < size:
            # 1. Chunk data: take as much as is there, without a byte loop.
            if state == _DATA:
                take = min(self._remaining, size - pos)
                if pieces is not None:
                    pieces.append(bytes(data[pos : pos + take]))
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    state = _DATA_CR
                continue

            # 2. Everything else is read byte by byte against the grammar.
            byte = data[pos]
            pos += 1
            if state < _DATA:
                self._line += 1
                if self._line > self._max_line:
                    raise self._fail("chunk-size line is too long")
                state = self._size_byte(state, byte)
            elif state == _DATA_CR:
                if byte != 0x0D:
                    raise self._fail("chunk data not followed by CRLF")
                state = _DATA_LF
            elif state == _DATA_LF:
                if byte != 0x0A:
                    raise self._fail("chunk data not followed by CRLF")
                state = _SIZE_FIRST
            else:
                # 3. The trailer section is kept, up to its blank line, to be
                #    checked as a whole (h11 holds trailers to every rule of a
                #    header section, Content-Length included).
                self._line += 1
                if self._line > self._max_line:
                    raise self._fail("trailer section is too long")
                self._trailers.append(byte)
                state = self._trailer_byte(state, byte)
                if state == _DONE:
                    self._end_trailers()
                    self._state = state
                    self._done = True
                    return pos

        self._state = state
        return pos

    def _size_byte(self, state: int, byte: int) -> int:
        # chunk = chunk-size [ chunk-ext ] CRLF, with h11's leniencies: up to
        # 20 hex digits, whitespace before CRLF, and any visible bytes in the
        # extension (which nobody here interprets).
        if state in (_SIZE_FIRST, _SIZE):
            digit = _HEX.get(byte, -1)
            if digit >= 0:
                self._digits += 1
                if self._digits > _MAX_CHUNK_SIZE_DIGITS:
                    raise self._fail("chunk size has too many digits")
                if self._remaining >> 59:
                    raise self._fail("chunk size is too large")
                self._remaining = self._remaining * 16 + digit
                return _SIZE
            if state == _SIZE_FIRST:
                raise self._fail("chunk size is not hexadecimal")
            if byte == 0x3B:
                self._cr = False
                return _EXTENSION
            if byte == 0x20 or byte == 0x09:
                return _SIZE_SPACE
            if byte == 0x0D:
                return _SIZE_CR
            raise self._fail("malformed chunk-size line")

        if state == _SIZE_SPACE:
            if byte == 0x20 or byte == 0x09:
                return _SIZE_SPACE
            if byte == 0x0D:
                return _SIZE_CR
            raise self._fail("malformed chunk-size line")

        if state == _SIZE_CR:
            if byte != 0x0A:
                raise self._fail("chunk-size line not ended by CRLF")
            return self._chunk_start()

        # _EXTENSION: the line ends at the first CRLF.  The line goes on
        # upstream as it came, so whatever RFC 9112 §2.2 and §7.1.1 let no
        # recipient pass on is refused here, where h11 lets it through: a
        # bare LF, a bare CR, a control byte.
        if byte == 0x0A:
            if not self._cr:
                raise self._fail("chunk-size line ended by a bare LF")
            return self._chunk_start()
        if self._cr:
            raise self._fail("bare CR in chunk extension")
        if byte == 0x0D:
            self._cr = True
        elif (byte < 0x20 and byte != 0x09) or byte == 0x7F:
            raise self._fail("control character in chunk extension")
        return _EXTENSION

    def _chunk_start(self) -> int:
        self._line = 0
        self._digits = 0
        if self._remaining == 0:
            return _TRAILER_START
        return _DATA

    def _trailer_byte(self, state: int, byte: int) -> int:
        # The section ends where h11's does: at the first LF followed by an
        # empty line (CRLF or bare LF), counting the chunk-size line's LF.
        if byte == 0x0A:
            if state == _TRAILER_LINE:
                return _TRAILER_START
            return _DONE
        if byte == 0x0D and state == _TRAILER_START:
            return _TRAILER_START_CR
        return _TRAILER_LINE

    def _end_trailers(self) -> None:
        section = bytes(self._trailers)
        self._trailers = bytearray()
        try:
            _check_trailers(section)
        except ParseError:
            self._state = _FAILED
            raise


def _check_trailers(section: bytes) -> None:
    # RFC 9112 §7.1.2: a header section, ending with its blank line.  It goes
    # on as it came, so two things h11 reads leniently are refused: a bare
    # LF (a sandbox that wants CRLF would read the lines otherwise, even take
    # the next request for more trailers) and obs-fold (h11 unfolds it; RFC
    # 9112 §5.2, as in a request head).
    if section.count(b"\n") != section.count(b"\r\n"):
        raise _bad("trailer section has a bare LF")
    folded = b"\n " in section or b"\n\t" in section
    if folded or section.startswith((b" ", b"\t")):
        raise _bad("obsolete line folding in trailer section")
    if len(section) <= 2:
        return
    blank = len(section) - 3  # every line ends with CRLF
    _check_head_bytes(section, len(section))
    _parse_fields(_head_lines(section, blank))
