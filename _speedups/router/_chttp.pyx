# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""HTTP/1.1 message heads and chunked framing: the compiled twin.

Built as ``router._chttp``.  It follows ``router/_http_py.py`` function by
function and gives the same answers; that file's docstring lists where both
are deliberately stricter than h11 0.16, the reference for everything else.

The head is read with C scans over the caller's buffer: its end found and
the bytes no head may contain looked for 16 at a time (``_headscan.h``),
``memchr`` for the line ends within it, a table lookup per byte only for
methods, targets and field names.  No regular expression and no per-header
object: besides the head, a parse makes one bytes object of header offsets
and render actions, and fills one shared record of what the header section
says.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from libc.stdint cimport int32_t
from libc.string cimport memchr, memcmp, memcpy

from router._clabels cimport _host_label

cimport cython


cdef extern from "_headscan.h":
    ctypedef struct eh_span:
        Py_ssize_t blank
        Py_ssize_t end
        Py_ssize_t lines
        int folded
    int eh_find_head(const char* buf, Py_ssize_t stop, eh_span* span) noexcept
    int eh_check_head(const char* buf, Py_ssize_t end) noexcept


BODY_NONE = 0
BODY_LENGTH = 1
BODY_CHUNKED = 2
BODY_CLOSE = 3

cdef enum:
    _NONE = 0
    _LENGTH = 1
    _CHUNKED = 2
    _CLOSE = 3

# h11 takes at most 20 digits; 63 bits are enough for any real body.
cdef enum:
    _MAX_LENGTH_DIGITS = 20
    _MAX_CHUNK_SIZE_DIGITS = 20

cdef long long _MAX_LENGTH = 0x7FFFFFFFFFFFFFFF

# Header kinds, recorded while parsing (see router/_http_py.py).
cdef enum:
    _K_OTHER = 0
    _K_HOST = 1
    _K_CONNECTION = 2
    _K_UPGRADE = 3
    _K_HOP = 4
    _K_FORWARDED = 5
    _K_CONTENT_LENGTH = 6
    _K_TRANSFER_ENCODING = 7
    _K_EXPECT = 8

# Render actions, written over the kinds once the section is read.
cdef enum:
    _KEEP = 0
    _DROP = 1
    _RESTATE = 2

# Chunked framer states, the same numbers as the pure twin's.
cdef enum:
    _SIZE_FIRST = 0
    _SIZE = 1
    _SIZE_SPACE = 2
    _SIZE_CR = 3
    _EXTENSION = 4
    _DATA = 5
    _DATA_CR = 6
    _DATA_LF = 7
    _TRAILER_START = 8
    _TRAILER_START_CR = 9
    _TRAILER_LINE = 10
    _DONE = 11
    _FAILED = 12

# Byte classes: tchar (RFC 9110 §5.6.2), hex digit values, ASCII lower case.
cdef unsigned char _TCHAR[256]
cdef unsigned char _HEX[256]
cdef unsigned char _LOWER[256]


cdef void _init_tables() noexcept:
    cdef int c
    cdef bytes tchar = (
        b"!#$%&'*+-.^_`|~0123456789"
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    )
    for c in range(256):
        _TCHAR[c] = 0
        _HEX[c] = 0xFF
        _LOWER[c] = c + 32 if 0x41 <= c <= 0x5A else c
    for c in tchar:
        _TCHAR[c] = 1
    for c in range(10):
        _HEX[0x30 + c] = c
    for c in range(6):
        _HEX[0x41 + c] = 10 + c
        _HEX[0x61 + c] = 10 + c


_init_tables()


class ParseError(ValueError):
    """A message the router will not accept, with the reply to send for it."""

    def __init__(self, status, code, message):
        ValueError.__init__(self, message)
        self.status = status
        self.code = code
        self.message = message


cdef object _bad(str message):
    return ParseError(400, "BAD_REQUEST", message)


cdef inline bint _is_space(char c) noexcept:
    return c == b" " or c == b"\t"


cdef inline bint _same_lower(
    const char* raw, Py_ssize_t size, const char* lower, Py_ssize_t lower_size
) noexcept:
    # ASCII case-insensitive comparison with an already lower-case string.
    cdef Py_ssize_t i
    if size != lower_size:
        return False
    for i in range(size):
        if _LOWER[<unsigned char>raw[i]] != <unsigned char>lower[i]:
            return False
    return True


cdef bytes _lower(const char* raw, Py_ssize_t size):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* w = PyBytes_AS_STRING(out)
    cdef Py_ssize_t i
    for i in range(size):
        w[i] = <char>_LOWER[<unsigned char>raw[i]]
    return out


# Headers are not split into Python objects while parsing: each is four
# offsets into the bytes the head was read from (name start and end, value
# start and end), and ``headers`` builds the list only when asked.  On the
# data path nothing asks; the renderers copy straight from those bytes.
#
# One bytes object per head holds them, 16 bytes a line of the head, and
# after them one byte a line: the header's kind while parsing, then what
# the renderers do with it (_KEEP, _DROP or _RESTATE).  One allocation, not
# two; only the first ``count`` entries of each part are meaningful.

cdef enum:
    _SPAN_SIZE = 4 * sizeof(int32_t)
    _LINE_SIZE = _SPAN_SIZE + 1


cdef inline int32_t* _spans_of(bytes spans) noexcept:
    return <int32_t*>PyBytes_AS_STRING(spans)


cdef inline char* _kinds_of(bytes spans) noexcept:
    return (
        PyBytes_AS_STRING(spans)
        + PyBytes_GET_SIZE(spans) // _LINE_SIZE * _SPAN_SIZE
    )


cdef list _header_list(bytes raw, bytes spans, Py_ssize_t count):
    cdef const char* buf = PyBytes_AS_STRING(raw)
    cdef int32_t* s = _spans_of(spans)
    cdef list out = []
    cdef Py_ssize_t i
    for i in range(count):
        out.append((
            PyBytes_FromStringAndSize(buf + s[4 * i], s[4 * i + 1] - s[4 * i]),
            PyBytes_FromStringAndSize(buf + s[4 * i + 2], s[4 * i + 3] - s[4 * i + 2]),
        ))
    return out


cdef object _get(bytes raw, bytes spans, Py_ssize_t count, bytes lname):
    cdef const char* want = PyBytes_AS_STRING(lname)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(lname)
    cdef const char* buf = PyBytes_AS_STRING(raw)
    cdef int32_t* s = _spans_of(spans)
    cdef Py_ssize_t i
    for i in range(count):
        if _same_lower(buf + s[4 * i], s[4 * i + 1] - s[4 * i], want, size):
            return PyBytes_FromStringAndSize(
                buf + s[4 * i + 2], s[4 * i + 3] - s[4 * i + 2]
            )
    return None


# Heads and _Fields hold only bytes (and a list of bytes): they can be in no
# reference cycle, so the cycle collector is spared tracking the two heads a
# request makes.
@cython.no_gc
cdef class _Head:
    """What request and response heads share; attributes are read-only."""

    @property
    def headers(self):
        """``[(name as sent, value), ...]``, a new list each time."""
        return _header_list(self._raw, self._spans, self._count)

    def get(self, bytes lname not None):
        """The first value of the header named ``lname`` (lower case)."""
        return _get(self._raw, self._spans, self._count, lname)


@cython.no_gc
@cython.freelist(8)
cdef class RequestHead(_Head):
    """A parsed request head; attributes are read-only."""

    def __init__(self):
        raise TypeError("RequestHead objects are made by parse_request")

    def __repr__(self):
        return (
            f"<RequestHead {self.method!r} {self.target!r} "
            f"HTTP/{self.version // 10}.{self.version % 10} "
            f"{self._count} headers>"
        )


@cython.no_gc
@cython.freelist(8)
cdef class ResponseHead(_Head):
    """A parsed response head; attributes are read-only."""

    def __init__(self):
        raise TypeError("ResponseHead objects are made by parse_response")

    def __repr__(self):
        return (
            f"<ResponseHead {self.status} {self.reason!r} "
            f"HTTP/{self.version // 10}.{self.version % 10} "
            f"{self._count} headers>"
        )


@cython.no_gc
cdef class _Fields:
    pass


# What a header section says lives only while its head is made from it, and
# no parse starts inside another: one record, emptied by each parse, serves
# them all (a new one each time cost more than the rest of a small parse).
cdef _Fields _SCRATCH = _Fields.__new__(_Fields)


cdef _Fields _fresh_fields(bytes raw, bytes spans):
    cdef _Fields fields = _SCRATCH
    fields.raw = raw
    fields.spans = spans
    fields.count = 0
    fields.host = None
    fields.host_count = 0
    fields.content_length_count = 0
    fields.length_digits = NULL
    fields.length_size = 0
    fields.restate_length = False
    fields.transfer_encoding = False
    fields.connection_close = False
    fields.connection_keep_alive = False
    fields.connection_upgrade = False
    # None until a Connection header lists another option: most heads have
    # none, and a list per parse is not free.
    fields.connection_listed = None
    fields.upgrade_value = None
    fields.expect_continue = False
    return fields


# ---------------------------------------------------------------------------
# Finding the head

cdef inline bint _find_head(
    const char* buf, Py_ssize_t size, Py_ssize_t max_head, eh_span* span
) noexcept:
    # Like h11, the head ends at the first LF followed by an empty line,
    # CRLF or bare LF (RFC 9112 §2.2); ``span`` says where (_headscan.h).
    # Only the first max_head bytes are searched, so a large pipelined body
    # behind the head is never scanned.
    return eh_find_head(buf, size if size < max_head else max_head, span)


cdef int _incomplete(
    const char* buf, Py_ssize_t size, Py_ssize_t max_head, str what
) except -1:
    # h11 refuses at once a buffer whose first byte is whitespace or a control
    # byte: no message line can start that way (a leading empty line
    # included), and it catches a TLS handshake sent to a plain-text port.
    if size and <unsigned char>buf[0] < 0x21:
        raise _bad(f"{what} line starts with whitespace or a control byte")

    if size >= max_head:
        raise ParseError(431, "HEADERS_TOO_LARGE", f"{what} head is too large")
    return 0


cdef int _check_head_bytes(const char* buf, Py_ssize_t end) except -1:
    # NUL, VT and FF are valid nowhere in a head, and CR only right before LF
    # (RFC 9112 §2.2, RFC 9110 §5.5): the same set h11's grammar refuses.
    # Checking the whole head at once lets the line parsers skip values.
    cdef int verdict = eh_check_head(buf, end)
    if verdict == 1:
        raise _bad("control character in message head")
    if verdict == 2:
        raise _bad("bare CR in message head")
    return 0


cdef inline Py_ssize_t _line_end(const char* buf, Py_ssize_t pos, Py_ssize_t stop):
    # Offset of the LF ending the line at pos, or stop for the last line.
    cdef const char* lf = <const char*>memchr(buf + pos, b"\n", stop - pos)
    return stop if lf == NULL else lf - buf


cdef int _version(const char* raw, Py_ssize_t size) except -1:
    # RFC 9112 §2.3: HTTP-version = "HTTP/" DIGIT "." DIGIT, case-sensitive.
    if size == 8 and memcmp(raw, b"HTTP/1.", 7) == 0:
        if raw[7] == b"1":
            return 11
        if raw[7] == b"0":
            return 10
    if (
        size == 8
        and memcmp(raw, b"HTTP/", 5) == 0
        and b"0" <= raw[5] <= b"9"
        and raw[6] == b"."
        and b"0" <= raw[7] <= b"9"
    ):
        raise _bad(f"unsupported HTTP version {raw[:8].decode()}")
    raise _bad("malformed HTTP version")


# ---------------------------------------------------------------------------
# Header fields

cdef list _unfold(list lines):
    # RFC 9112 §5.2 lets a recipient replace each obs-fold with SP; h11 joins
    # each continuation, stripped of its leading whitespace, with one SP.
    # Rare, so it stays in Python, as in the pure twin.
    cdef list out = []
    cdef bytes line
    for line in lines:
        if line[0] in b" \t":
            if not out:
                raise _bad("continuation line at start of header section")
            out[len(out) - 1] += b" " + line.lstrip(b" \t")
        else:
            out.append(line)
    return out


cdef _Fields _parse_unfolded(bytes region):
    # Slow path for obs-fold: unfold the lines, then read them as usual; the
    # headers then point into the unfolded copy.
    cdef list lines = _unfold(region.replace(b"\r", b"").split(b"\n"))
    cdef bytes joined = b"\n".join(lines)
    return _parse_fields(joined, 0, len(joined), len(lines))


cdef _Fields _parse_fields(
    bytes raw, Py_ssize_t pos, Py_ssize_t stop, Py_ssize_t max_lines
):
    # RFC 9112 §5: field-name ":" OWS field-value OWS.  The value bytes were
    # checked for the whole head at once, so only the name needs a scan.
    cdef const char* buf = PyBytes_AS_STRING(raw)
    cdef bytes spans = PyBytes_FromStringAndSize(NULL, max_lines * _LINE_SIZE)
    cdef _Fields fields = _fresh_fields(raw, spans)
    cdef int32_t* span = _spans_of(spans)
    cdef char* kind = _kinds_of(spans)
    cdef Py_ssize_t line_end, end, colon, value, value_end
    if stop > 0x7FFFFFFF:
        raise ParseError(431, "HEADERS_TOO_LARGE", "message head is too large")
    while pos < stop:
        line_end = _line_end(buf, pos, stop)
        end = line_end
        if buf[end - 1] == b"\r":
            end -= 1

        colon = pos
        while colon < end and _TCHAR[<unsigned char>buf[colon]]:
            colon += 1
        if colon == pos or colon == end or buf[colon] != b":":
            if _is_space(buf[pos]):
                raise _bad("obsolete line folding in header section")
            shown = buf[pos:min(end, pos + 40)].decode("latin-1")
            raise _bad(f"malformed header line {shown!r}")

        # RFC 9112 §5.1: the field value is stripped of OWS on both sides.
        value = colon + 1
        while value < end and _is_space(buf[value]):
            value += 1
        value_end = end
        while value_end > value and _is_space(buf[value_end - 1]):
            value_end -= 1

        span[4 * fields.count] = <int32_t>pos
        span[4 * fields.count + 1] = <int32_t>colon
        span[4 * fields.count + 2] = <int32_t>value
        span[4 * fields.count + 3] = <int32_t>value_end
        kind[fields.count] = _note_field(
            fields, buf + pos, colon - pos, buf + value, value_end - value
        )
        fields.count += 1
        pos = line_end + 1
    return fields


cdef int _kind(const char* name, Py_ssize_t size) noexcept:
    # Dispatch on the length first: most names match no candidate's length.
    if size == 2:
        if _same_lower(name, 2, b"te", 2):
            return _K_HOP
    elif size == 4:
        if _same_lower(name, 4, b"host", 4):
            return _K_HOST
    elif size == 6:
        if _same_lower(name, 6, b"expect", 6):
            return _K_EXPECT
    elif size == 7:
        if _same_lower(name, 7, b"upgrade", 7):
            return _K_UPGRADE
    elif size == 10:
        if _same_lower(name, 10, b"connection", 10):
            return _K_CONNECTION
        if _same_lower(name, 10, b"keep-alive", 10):
            return _K_HOP
    elif size == 14:
        if _same_lower(name, 14, b"content-length", 14):
            return _K_CONTENT_LENGTH
    elif size == 15:
        if _same_lower(name, 15, b"x-forwarded-for", 15):
            return _K_FORWARDED
    elif size == 16:
        if _same_lower(name, 16, b"proxy-connection", 16):
            return _K_HOP
        if _same_lower(name, 16, b"x-forwarded-host", 16):
            return _K_FORWARDED
        if _same_lower(name, 16, b"x-forwarded-port", 16):
            return _K_FORWARDED
    elif size == 17:
        if _same_lower(name, 17, b"transfer-encoding", 17):
            return _K_TRANSFER_ENCODING
        if _same_lower(name, 17, b"x-forwarded-proto", 17):
            return _K_FORWARDED
    return _K_OTHER


cdef int _note_field(
    _Fields fields,
    const char* name,
    Py_ssize_t name_size,
    const char* value,
    Py_ssize_t size,
) except -1:
    cdef int kind = _kind(name, name_size)
    if kind == _K_OTHER:
        return kind

    if kind == _K_HOST:
        fields.host_count += 1
        if fields.host is None:
            fields.host = PyBytes_FromStringAndSize(value, size)
    elif kind == _K_CONTENT_LENGTH:
        _note_content_length(fields, value, size)
    elif kind == _K_TRANSFER_ENCODING:
        # RFC 9112 §6.1: chunked is the only coding a proxy must understand;
        # like h11, refuse any other, a list, or a second header.
        if fields.transfer_encoding:
            raise _bad("more than one Transfer-Encoding header")
        if not _same_lower(value, size, b"chunked", 7):
            raise _bad("Transfer-Encoding must be exactly chunked")
        fields.transfer_encoding = True
    elif kind == _K_CONNECTION:
        _note_connection(fields, value, size)
    elif kind == _K_UPGRADE:
        if fields.upgrade_value is None:
            fields.upgrade_value = PyBytes_FromStringAndSize(value, size)
    elif kind == _K_EXPECT:
        _note_expect(fields, value, size)
    return kind


cdef struct _Item:
    const char* start
    Py_ssize_t size
    Py_ssize_t next     # where the next item starts, or -1 after the last


cdef inline void _comma_item(const char* value, Py_ssize_t size, Py_ssize_t pos,
                             _Item* item) noexcept:
    # One element of a comma list, stripped of SP and HTAB on both sides.
    cdef const char* comma = <const char*>memchr(value + pos, b",", size - pos)
    cdef Py_ssize_t end = size if comma == NULL else comma - value
    item.next = -1 if comma == NULL else end + 1
    while pos < end and _is_space(value[pos]):
        pos += 1
    while end > pos and _is_space(value[end - 1]):
        end -= 1
    item.start = value + pos
    item.size = end - pos


cdef int _note_content_length(
    _Fields fields, const char* value, Py_ssize_t size
) except -1:
    # RFC 9112 §6.3 and RFC 9110 §8.6, as h11 reads them: a list of equal
    # values ("5, 5") or repeated equal headers stand for one length; any
    # difference, even "5" against "05", is refused.
    cdef _Item first, item
    cdef Py_ssize_t i
    _comma_item(value, size, 0, &first)
    item.next = first.next
    while item.next >= 0:
        _comma_item(value, size, item.next, &item)
        if item.size != first.size or memcmp(item.start, first.start, first.size):
            raise _bad("conflicting Content-Length values")

    if first.size == 0:
        raise _bad("Content-Length is not a decimal number")
    for i in range(first.size):
        if not b"0" <= first.start[i] <= b"9":
            raise _bad("Content-Length is not a decimal number")
    if first.size > _MAX_LENGTH_DIGITS:
        raise _bad("Content-Length is too large")

    fields.content_length_count += 1
    if fields.content_length_count == 1:
        fields.length_digits = first.start
        fields.length_size = first.size
        fields.restate_length = first.next >= 0
        return 0

    if fields.length_size != first.size or memcmp(
        fields.length_digits, first.start, first.size
    ):
        raise _bad("conflicting Content-Length values")
    fields.restate_length = True
    return 0


cdef bytes _EMPTY = b""


cdef bytes _length_value(_Fields fields):
    # The digits a _RESTATE header is written with; no other header needs
    # them as bytes, so nearly every head shares one empty value.
    if not fields.restate_length:
        return _EMPTY
    return PyBytes_FromStringAndSize(fields.length_digits, fields.length_size)


cdef long long _content_length(_Fields fields) except -2:
    # Checked apart from the grammar so that trailers, whose Content-Length
    # means nothing, are held to h11's 20 digits only.
    cdef const char* digits = fields.length_digits
    cdef long long length = 0
    cdef int digit
    cdef Py_ssize_t i
    if not fields.content_length_count:
        return -1
    for i in range(fields.length_size):
        digit = digits[i] - 0x30
        if length > (_MAX_LENGTH - digit) // 10:
            raise _bad("Content-Length is too large")
        length = length * 10 + digit
    return length


cdef int _note_connection(
    _Fields fields, const char* value, Py_ssize_t size
) except -1:
    # RFC 9110 §7.6.1: a comma list of case-insensitive option names.
    cdef _Item item
    item.next = 0
    while item.next >= 0:
        _comma_item(value, size, item.next, &item)
        if _same_lower(item.start, item.size, b"close", 5):
            fields.connection_close = True
        elif _same_lower(item.start, item.size, b"keep-alive", 10):
            fields.connection_keep_alive = True
        elif _same_lower(item.start, item.size, b"upgrade", 7):
            fields.connection_upgrade = True
        elif item.size:
            if fields.connection_listed is None:
                fields.connection_listed = []
            fields.connection_listed.append(_lower(item.start, item.size))
    return 0


cdef int _note_expect(_Fields fields, const char* value, Py_ssize_t size) except -1:
    cdef _Item item
    item.next = 0
    while item.next >= 0:
        _comma_item(value, size, item.next, &item)
        if _same_lower(item.start, item.size, b"100-continue", 12):
            fields.expect_continue = True
    return 0


cdef bint _listed(_Fields fields, Py_ssize_t index) except -1:
    cdef int32_t* span = _spans_of(fields.spans)
    cdef const char* raw = PyBytes_AS_STRING(fields.raw) + span[4 * index]
    cdef Py_ssize_t size = span[4 * index + 1] - span[4 * index]
    cdef bytes option
    for option in fields.connection_listed:
        if _same_lower(raw, size, PyBytes_AS_STRING(option), len(option)):
            return True
    return False


# ---------------------------------------------------------------------------
# Requests

cdef bytes _OK = b"OK"
cdef bytes _GET = b"GET"
cdef bytes _POST = b"POST"


cdef bytes _method(const char* raw, Py_ssize_t size):
    # The two methods nearly every request uses are shared, not copied.
    if size == 3 and memcmp(raw, b"GET", 3) == 0:
        return _GET
    if size == 4 and memcmp(raw, b"POST", 4) == 0:
        return _POST
    return PyBytes_FromStringAndSize(raw, size)


def parse_request(object buf, Py_ssize_t max_head):
    """Parse the request head at the start of ``buf``.

    Returns ``None`` while the head is incomplete; raises :class:`ParseError`
    (400, or 431 past ``max_head`` bytes) for a request to refuse.
    """
    cdef Py_buffer view
    if max_head <= 0:
        raise ValueError("max_head must be positive")
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        return _parse_request(buf, <const char*>view.buf, view.len, max_head)
    finally:
        PyBuffer_Release(&view)


cdef bytes _head_bytes(object obj, const char* buf, Py_ssize_t end):
    # The bytes a parsed head points into: the caller's own bytes object
    # when it is one (no copy; the head keeps it alive), else a copy of the
    # head, since a bytearray or a memoryview can change under it.
    if type(obj) is bytes:
        return <bytes>obj
    return PyBytes_FromStringAndSize(buf, end)


cdef object _parse_request(
    object obj, const char* buf, Py_ssize_t size, Py_ssize_t max_head
):
    cdef eh_span span
    cdef Py_ssize_t line_end, pos, first, second, i
    cdef const char* space
    cdef int version, framing
    cdef bint keep_alive
    cdef _Fields fields
    cdef object host, authority, upgrade, absolute
    cdef bytes target, origin_form, rest, raw
    cdef RequestHead head

    # 1. Find the blank line that ends the head.
    if not _find_head(buf, size, max_head, &span):
        _incomplete(buf, size, max_head, "request")
        return None

    # 2. Read the request line, RFC 9112 §3: method SP target SP version.
    _check_head_bytes(buf, span.end)
    line_end = _line_end(buf, 0, span.blank)
    pos = line_end
    if pos > 0 and buf[pos - 1] == b"\r":
        pos -= 1
    if pos == 0:
        raise _bad("empty request line")
    space = <const char*>memchr(buf, b" ", pos)
    if space == NULL:
        raise _bad("malformed request line")
    first = space - buf
    i = 0
    while i < first and _TCHAR[<unsigned char>buf[i]]:
        i += 1
    if first == 0 or i < first:
        raise _bad("malformed method")
    space = <const char*>memchr(buf + first + 1, b" ", pos - first - 1)
    if space == NULL:
        raise _bad("malformed request line")
    second = space - buf
    for i in range(first + 1, second):
        if not 0x21 <= <unsigned char>buf[i] <= 0x7E:
            raise _bad("malformed request-target")
    if second == first + 1:
        raise _bad("malformed request-target")
    version = _version(buf + second + 1, pos - second - 1)

    # 3. Read the header section; obs-fold is refused in requests (RFC 9112
    #    §5.2 allows it), which leaves a smuggler no two readings of a header.
    #    h11 unfolds it instead: the one grammar difference between the two.
    raw = _head_bytes(obj, buf, span.end)
    fields = _parse_fields(raw, line_end + 1, span.blank, span.lines)

    # 4. Host, RFC 9112 §3.2: a 1.1 request without one, or any request with
    #    two, is answered 400.
    if fields.host_count > 1:
        raise _bad("more than one Host header")
    host = fields.host
    if host is None and version == 11:
        raise _bad("missing Host header")
    target = PyBytes_FromStringAndSize(buf + first + 1, second - first - 1)
    origin_form = target
    absolute = _absolute_form(target)
    if absolute is None and buf[first + 1] != b"/" and not (
        second - first - 1 == 1
        and buf[first + 1] == b"*"
        and first == 7
        and memcmp(buf, b"OPTIONS", 7) == 0
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
        origin_form = _origin_form(buf, first, rest)

    # 5. Body framing, RFC 9112 §6.3.  Both headers at once is the classic
    #    smuggling shape; h11 lets Transfer-Encoding win, a proxy refuses.
    if fields.transfer_encoding:
        if fields.content_length_count:
            raise _bad("both Content-Length and Transfer-Encoding")
        framing = _CHUNKED
    elif fields.content_length_count:
        framing = _LENGTH
    else:
        framing = _NONE

    # 6. Persistence, RFC 9112 §9.3; a 1.0 message with Transfer-Encoding
    #    must close after it (RFC 9112 §6.1).
    if version == 11:
        keep_alive = not fields.connection_close
    else:
        keep_alive = (
            fields.connection_keep_alive
            and not fields.connection_close
            and not fields.transfer_encoding
        )

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
    head.method = _method(buf, first)
    head.target = target
    head.version = version
    head._raw = fields.raw
    head._spans = fields.spans
    head.head_len = span.end
    head.host = host
    head.framing = framing
    head.content_length = _content_length(fields)
    head.keep_alive = keep_alive
    head.upgrade = upgrade
    # RFC 9110 §10.1.1: a 100-continue expectation in 1.0 is ignored.
    head.expect_continue = fields.expect_continue and version == 11
    _request_actions(fields)
    head._count = fields.count
    head._content_length_value = _length_value(fields)
    head._upgrade_value = fields.upgrade_value or b""
    head._origin_form = origin_form
    return head


cdef object _absolute_form(bytes target):
    # The authority of an absolute-form target, and what follows it, or
    # None.  RFC 9112 §3.2.2; only http and https URIs are served.
    cdef const char* raw = PyBytes_AS_STRING(target)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(target)
    cdef Py_ssize_t start, end
    if size >= 7 and _same_lower(raw, 7, b"http://", 7):
        start = 7
    elif size >= 8 and _same_lower(raw, 8, b"https://", 8):
        start = 8
    else:
        return None

    end = start
    while end < size and raw[end] != b"/" and raw[end] != b"?" and raw[end] != b"#":
        end += 1

    # RFC 9110 §4.2.1 and §4.2.4: an http URI needs a host, and userinfo in
    # it is to be treated as an error.
    if end == start or memchr(raw + start, b"@", end - start) != NULL:
        raise _bad("malformed authority in request-target")
    return target[start:end], target[end:]


cdef bytes _origin_form(const char* method, Py_ssize_t method_size, bytes rest):
    # RFC 9112 §3.2.1: a request sent straight to an origin server, as the
    # router's are, carries the path and query only, never a fragment.  An
    # empty path is "/", or "*" for OPTIONS without a query (§3.2.4).
    cdef Py_ssize_t fragment = rest.find(b"#")
    if fragment >= 0:
        rest = rest[:fragment]
    if not rest:
        if method_size == 7 and memcmp(method, b"OPTIONS", 7) == 0:
            return b"*"
        return b"/"
    if rest[0] != 0x2F:
        return b"/" + rest
    return rest


cdef int _request_actions(_Fields fields) except -1:
    # Hop-by-hop headers go (RFC 9110 §7.6.1), so do Host and X-Forwarded-*,
    # which the router sets itself (SPEC §4).  Content-Length and
    # Transfer-Encoding stay even when Connection names them: dropping them
    # would let a client change the framing the upstream sees.  Trailer
    # stays too: it is end-to-end (RFC 9110 §6.6.2, not in §7.6.1's list),
    # and the trailer section it announces is relayed verbatim.
    cdef char* actions = _kinds_of(fields.spans)
    cdef bint restated = False
    cdef Py_ssize_t index
    cdef char kind
    for index in range(fields.count):
        kind = actions[index]
        actions[index] = _KEEP
        if kind == _K_CONTENT_LENGTH:
            if fields.restate_length:
                actions[index] = _DROP if restated else _RESTATE
                restated = True
        elif kind == _K_TRANSFER_ENCODING:
            pass
        elif (
            kind == _K_HOST
            or kind == _K_CONNECTION
            or kind == _K_UPGRADE
            or kind == _K_HOP
            or kind == _K_FORWARDED
        ):
            actions[index] = _DROP
        elif fields.connection_listed and _listed(fields, index):
            actions[index] = _DROP
    return 0


cdef inline char* _put(char* w, bytes part) noexcept:
    cdef Py_ssize_t size = PyBytes_GET_SIZE(part)
    memcpy(w, PyBytes_AS_STRING(part), size)
    return w + size


cdef inline char* _put_c(char* w, const char* part, Py_ssize_t size) noexcept:
    memcpy(w, part, size)
    return w + size


cdef Py_ssize_t _fields_size(bytes spans, Py_ssize_t count, bytes length) noexcept:
    # Bytes taken by the kept headers, each "name: value\r\n".
    cdef const char* action = _kinds_of(spans)
    cdef int32_t* s = _spans_of(spans)
    cdef Py_ssize_t size = 0
    cdef Py_ssize_t index
    for index in range(count):
        if action[index] == _DROP:
            continue
        size += s[4 * index + 1] - s[4 * index] + 4
        if action[index] == _KEEP:
            size += s[4 * index + 3] - s[4 * index + 2]
        else:
            size += PyBytes_GET_SIZE(length)
    return size


cdef char* _put_fields(
    char* w, bytes raw, bytes spans, Py_ssize_t count, bytes length
) noexcept:
    cdef const char* action = _kinds_of(spans)
    cdef const char* buf = PyBytes_AS_STRING(raw)
    cdef int32_t* s = _spans_of(spans)
    cdef Py_ssize_t index
    for index in range(count):
        if action[index] == _DROP:
            continue
        w = _put_c(w, buf + s[4 * index], s[4 * index + 1] - s[4 * index])
        w = _put_c(w, b": ", 2)
        if action[index] == _KEEP:
            w = _put_c(w, buf + s[4 * index + 2], s[4 * index + 3] - s[4 * index + 2])
        else:
            w = _put(w, length)
        w = _put_c(w, b"\r\n", 2)
    return w


def render_request(RequestHead head not None, bytes host not None,
                   bytes extra not None):
    """The head to send upstream: HTTP/1.1, the target in origin-form,
    end-to-end headers as received, then ``Host``, the pre-formatted ``extra``
    lines and the upgrade pair."""
    return _render_request(head, host, extra)


cdef bytes _render_request(RequestHead head, bytes host, bytes extra):
    cdef Py_ssize_t size
    cdef bytes out
    cdef char* w
    cdef bint upgrade = head.upgrade is not None

    if head is None or host is None or extra is None:
        raise TypeError("render_request takes a head and two bytes objects")
    if head._spans is None:
        raise TypeError("RequestHead objects are made by parse_request")

    # 1. Measure, so that the head is written into one bytes object.
    size = PyBytes_GET_SIZE(head.method) + PyBytes_GET_SIZE(head._origin_form) + 12
    size += _fields_size(head._spans, head._count, head._content_length_value)
    size += 8 + PyBytes_GET_SIZE(host) + PyBytes_GET_SIZE(extra) + 2
    if upgrade:
        size += 30 + PyBytes_GET_SIZE(head._upgrade_value) + 2

    # 2. Write.
    out = PyBytes_FromStringAndSize(NULL, size)
    w = PyBytes_AS_STRING(out)
    w = _put(w, head.method)
    w = _put_c(w, b" ", 1)
    w = _put(w, head._origin_form)
    w = _put_c(w, b" HTTP/1.1\r\n", 11)
    w = _put_fields(
        w,
        head._raw,
        head._spans,
        head._count,
        head._content_length_value,
    )
    w = _put_c(w, b"Host: ", 6)
    w = _put(w, host)
    w = _put_c(w, b"\r\n", 2)
    w = _put(w, extra)
    if upgrade:
        w = _put_c(w, b"Connection: Upgrade\r\nUpgrade: ", 30)
        w = _put(w, head._upgrade_value)
        w = _put_c(w, b"\r\n", 2)
    w = _put_c(w, b"\r\n", 2)
    _check_written(out, w)
    return out


cdef int _check_written(bytes out, char* w) except -1:
    # The measure and write loops must agree; a mismatch is a bug here, and
    # is caught before the bytes leave (an overrun would already be fatal).
    if w != PyBytes_AS_STRING(out) + PyBytes_GET_SIZE(out):
        raise SystemError("rendered head size mismatch")
    return 0


# ---------------------------------------------------------------------------
# Responses

def parse_response(object buf, Py_ssize_t max_head, bint head_request):
    """Parse the response head at the start of ``buf``.

    Returns ``None`` while the head is incomplete.  An interim (1xx) response
    is returned on its own; call again after it for the next one.  Errors are
    :class:`ParseError` 502 ``UPSTREAM_BAD_RESPONSE``.
    """
    cdef Py_buffer view
    if max_head <= 0:
        raise ValueError("max_head must be positive")
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        return _parse_response(
            buf, <const char*>view.buf, view.len, max_head, head_request
        )
    finally:
        PyBuffer_Release(&view)


cdef object _parse_response(
    object obj,
    const char* buf,
    Py_ssize_t size,
    Py_ssize_t max_head,
    bint head_request,
):
    # A response the router refuses is the upstream's fault, whatever the
    # head readers it shares with requests (which say 400) raised: 502.
    try:
        return _response_head(obj, buf, size, max_head, head_request)
    except ParseError as exc:
        raise ParseError(502, "UPSTREAM_BAD_RESPONSE", exc.message) from None


cdef object _response_head(
    object obj,
    const char* buf,
    Py_ssize_t size,
    Py_ssize_t max_head,
    bint head_request,
):
    cdef eh_span span
    cdef Py_ssize_t line_end, pos, i
    cdef int version, status, framing
    cdef bint keep_alive
    cdef long long content_length
    cdef _Fields fields
    cdef ResponseHead head

    # 1. Find the blank line that ends the head.
    if not _find_head(buf, size, max_head, &span):
        _incomplete(buf, size, max_head, "status")
        return None

    # 2. Read the status line, RFC 9112 §4.  h11 also accepts a status line
    #    without the SP before an empty reason, which some servers send.
    _check_head_bytes(buf, span.end)
    line_end = _line_end(buf, 0, span.blank)
    pos = line_end
    if pos > 0 and buf[pos - 1] == b"\r":
        pos -= 1
    if pos < 12 or buf[8] != b" ":
        raise _bad("malformed status line")
    for i in range(9, 12):
        if not b"0" <= buf[i] <= b"9":
            raise _bad("malformed status line")
    if pos > 12 and buf[12] != b" ":
        raise _bad("malformed status line")
    version = _version(buf, 8)
    status = (buf[9] - 0x30) * 100 + (buf[10] - 0x30) * 10 + (buf[11] - 0x30)
    if status < 100:
        raise _bad("status code below 100")

    # 3. Read the header section.  obs-fold is unfolded as h11 does, which
    #    is what RFC 9112 §5.2 asks of a proxy forwarding a response.
    if span.folded:
        fields = _parse_unfolded(buf[line_end + 1:span.blank])
    else:
        fields = _parse_fields(
            _head_bytes(obj, buf, span.end), line_end + 1, span.blank, span.lines
        )
    content_length = _content_length(fields)

    # 4. Body framing, RFC 9112 §6.3: interim, 204 and 304 responses and
    #    answers to HEAD have none whatever they say; Transfer-Encoding wins
    #    over Content-Length; with neither, the body runs to the close.
    if status < 200 or status == 204 or status == 304 or head_request:
        framing = _NONE
    elif fields.transfer_encoding:
        framing = _CHUNKED
    elif fields.content_length_count:
        framing = _LENGTH
    else:
        framing = _CLOSE

    # 5. Can the upstream connection carry another request (RFC 9112 §9.3)?
    if version == 11:
        keep_alive = not fields.connection_close
    else:
        keep_alive = (
            fields.connection_keep_alive
            and not fields.connection_close
            and not fields.transfer_encoding
        )
    if framing == _CLOSE or status == 101:
        keep_alive = False

    head = ResponseHead.__new__(ResponseHead)
    head.status = status
    if pos == 15 and buf[13] == b"O" and buf[14] == b"K":
        head.reason = _OK  # nearly every response: one bytes object for all
    else:
        head.reason = buf[13:pos] if pos > 13 else b""
    head.version = version
    head._raw = fields.raw
    head._spans = fields.spans
    head.head_len = span.end
    head.framing = framing
    head.content_length = content_length if framing == _LENGTH else -1
    head.keep_alive = keep_alive
    _response_actions(fields, status)
    head._count = fields.count
    head._content_length_value = _length_value(fields)
    return head


cdef int _response_actions(_Fields fields, int status) except -1:
    # Hop-by-hop headers go (RFC 9110 §7.6.1), except that a 101 keeps its
    # Connection and Upgrade so the client sees the switch as sent.  Beside
    # Transfer-Encoding a Content-Length is removed (RFC 9112 §6.3).
    cdef char* actions = _kinds_of(fields.spans)
    cdef bint switching = status == 101
    cdef bint restated = False
    cdef Py_ssize_t index
    cdef char kind
    for index in range(fields.count):
        kind = actions[index]
        actions[index] = _KEEP
        if kind == _K_CONTENT_LENGTH:
            if fields.transfer_encoding:
                actions[index] = _DROP
            elif fields.restate_length:
                actions[index] = _DROP if restated else _RESTATE
                restated = True
        elif kind == _K_TRANSFER_ENCODING:
            pass
        elif kind == _K_CONNECTION or kind == _K_UPGRADE:
            if not switching:
                actions[index] = _DROP
        elif kind == _K_HOP:
            actions[index] = _DROP
        elif fields.connection_listed and _listed(fields, index):
            actions[index] = _DROP
    return 0


def render_response(
    ResponseHead head not None,
    bint close,
    bytes body not None=b"",
    Py_ssize_t start=0,
):
    """The head to send to the client, HTTP/1.1, hop-by-hop headers removed;
    ``close`` adds ``Connection: close``.  ``body[start:]`` follows the head
    in the same bytes object: a small answer leaves in one write, with no
    copy made to join them, nor to cut its body out of what was read."""
    return _render_response(head, close, body, start)


cdef bytes _render_response(
    ResponseHead head, bint close, bytes body, Py_ssize_t start
):
    cdef Py_ssize_t size
    cdef bytes out
    cdef char* w
    cdef char status[3]

    if head is None or body is None:
        raise TypeError("render_response takes a head and bytes")
    if head._spans is None:
        raise TypeError("ResponseHead objects are made by parse_response")
    if not 0 <= start <= PyBytes_GET_SIZE(body):
        raise ValueError("start is outside the body")

    # 1. Measure, so that the head is written into one bytes object.
    size = 13 + PyBytes_GET_SIZE(head.reason) + 2
    size += _fields_size(head._spans, head._count, head._content_length_value)
    if close:
        size += 19
    size += 2 + PyBytes_GET_SIZE(body) - start

    # 2. Write.
    status[0] = <char>(0x30 + head.status // 100)
    status[1] = <char>(0x30 + head.status // 10 % 10)
    status[2] = <char>(0x30 + head.status % 10)
    out = PyBytes_FromStringAndSize(NULL, size)
    w = PyBytes_AS_STRING(out)
    w = _put_c(w, b"HTTP/1.1 ", 9)
    w = _put_c(w, status, 3)
    w = _put_c(w, b" ", 1)
    w = _put(w, head.reason)
    w = _put_c(w, b"\r\n", 2)
    w = _put_fields(
        w,
        head._raw,
        head._spans,
        head._count,
        head._content_length_value,
    )
    if close:
        w = _put_c(w, b"Connection: close\r\n", 19)
    w = _put_c(w, b"\r\n", 2)
    w = _put_c(w, PyBytes_AS_STRING(body) + start, PyBytes_GET_SIZE(body) - start)
    _check_written(out, w)
    return out


# ---------------------------------------------------------------------------
# The per-request entry points as C methods

@cython.final
cdef class Codec:
    """``host_label`` (of ``router._clabels``) and this module's parse and
    render functions, as methods that behave exactly as those functions.

    ``router._cproxy`` holds a ``Codec`` in a typed variable, so that each of
    the five calls a request makes is a C call: no argument tuple, no boxed
    ``max_head``, and no buffer protocol for a ``bytes`` buffer.
    """

    cpdef object host_label(self, bytes host, tuple domains):
        if host is None or domains is None:
            raise TypeError("host_label takes bytes and a tuple")
        return _host_label(host, domains)

    cpdef object parse_request(self, object buf, Py_ssize_t max_head):
        if type(buf) is not bytes or max_head <= 0:
            return parse_request(buf, max_head)
        return _parse_request(
            buf, PyBytes_AS_STRING(buf), PyBytes_GET_SIZE(buf), max_head
        )

    cpdef object parse_response(
        self, object buf, Py_ssize_t max_head, bint head_request
    ):
        if type(buf) is not bytes or max_head <= 0:
            return parse_response(buf, max_head, head_request)
        return _parse_response(
            buf, PyBytes_AS_STRING(buf), PyBytes_GET_SIZE(buf), max_head, head_request
        )

    cpdef bytes render_request(self, RequestHead head, bytes host, bytes extra):
        return _render_request(head, host, extra)

    cpdef bytes render_response(
        self, ResponseHead head, bint close, bytes body=b"", Py_ssize_t start=0
    ):
        return _render_response(head, close, body, start)


# ---------------------------------------------------------------------------
# Chunked bodies, RFC 9112 §7.1

cdef class ChunkedFramer:
    """Follows a chunked body relayed verbatim, to find where it ends.

    Chunk-size lines and the trailer section are each limited to
    ``max_line`` bytes, the role h11's buffer limit plays for them.
    """

    def __init__(self, Py_ssize_t max_line=16384):
        if max_line <= 0:
            raise ValueError("max_line must be positive")
        self.done = False
        self._max_line = max_line
        self._state = _SIZE_FIRST
        self._remaining = 0
        self._digits = 0
        self._line = 0
        self._cr = False
        self._trailers = bytearray()

    def feed(self, data):
        """Return how many bytes of ``data`` belong to the body."""
        return self._walk(data, None)

    def decode(self, data):
        """Like :meth:`feed`, and also return the chunk payloads in ``data``."""
        cdef list pieces = []
        used = self._walk(data, pieces)
        return used, pieces

    cdef object _fail(self, str message):
        self._state = _FAILED
        return _bad(message)

    cdef Py_ssize_t _walk(self, object data, list pieces) except -1:
        cdef Py_buffer view
        cdef const unsigned char* raw
        cdef Py_ssize_t size, pos = 0, take, start
        cdef int state = self._state
        cdef unsigned char byte
        if state == _DONE:
            return 0
        if state == _FAILED:
            raise _bad("chunked body already refused")

        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            raw = <const unsigned char*>view.buf
            size = view.len
            while pos < size:
                # 1. Chunk data: take as much as is there, without a byte loop.
                if state == _DATA:
                    take = size - pos
                    if <unsigned long long>take > self._remaining:
                        take = <Py_ssize_t>self._remaining
                    if pieces is not None:
                        pieces.append(
                            PyBytes_FromStringAndSize(<const char*>raw + pos, take)
                        )
                    pos += take
                    self._remaining -= take
                    if self._remaining == 0:
                        state = _DATA_CR
                    continue

                # 2. Everything else is read byte by byte against the grammar.
                byte = raw[pos]
                pos += 1
                if state < _DATA:
                    self._line += 1
                    if self._line > self._max_line:
                        raise self._fail("chunk-size line is too long")
                    self._state = state
                    state = self._size_byte(byte)
                elif state == _DATA_CR:
                    if byte != 0x0D:
                        raise self._fail("chunk data not followed by CRLF")
                    state = _DATA_LF
                elif state == _DATA_LF:
                    if byte != 0x0A:
                        raise self._fail("chunk data not followed by CRLF")
                    state = _SIZE_FIRST
                else:
                    # 3. The trailer section is kept, up to its blank line, to
                    #    be checked as a whole (h11 holds trailers to every
                    #    rule of a header section, Content-Length included).
                    start = pos - 1
                    while True:
                        self._line += 1
                        if self._line > self._max_line:
                            raise self._fail("trailer section is too long")
                        state = _trailer_byte(state, byte)
                        if state == _DONE or pos == size:
                            break
                        byte = raw[pos]
                        pos += 1
                    self._trailers += raw[start:pos]
                    if state == _DONE:
                        self._end_trailers()
                        self._state = state
                        self.done = True
                        return pos
        finally:
            PyBuffer_Release(&view)

        self._state = state
        return pos

    cdef int _size_byte(self, unsigned char byte) except -1:
        # chunk = chunk-size [ chunk-ext ] CRLF, with h11's leniencies: up to
        # 20 hex digits, whitespace before CRLF, and any visible bytes in the
        # extension (which nobody here interprets).
        cdef int state = self._state
        cdef unsigned char digit
        if state == _SIZE_FIRST or state == _SIZE:
            digit = _HEX[byte]
            if digit != 0xFF:
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

    cdef int _chunk_start(self) noexcept:
        self._line = 0
        self._digits = 0
        if self._remaining == 0:
            return _TRAILER_START
        return _DATA

    cdef int _end_trailers(self) except -1:
        cdef bytes section = bytes(self._trailers)
        self._trailers = bytearray()
        try:
            _check_trailers(section)
        except ParseError:
            self._state = _FAILED
            raise
        return 0


cdef inline int _trailer_byte(int state, unsigned char byte) noexcept:
    # The section ends where h11's does: at the first LF followed by an
    # empty line (CRLF or bare LF), counting the chunk-size line's LF.
    if byte == 0x0A:
        if state == _TRAILER_LINE:
            return _TRAILER_START
        return _DONE
    if byte == 0x0D and state == _TRAILER_START:
        return _TRAILER_START_CR
    return _TRAILER_LINE


cdef int _check_trailers(bytes section) except -1:
    # RFC 9112 §7.1.2: a header section, ending with its blank line.  It goes
    # on as it came, so two things h11 reads leniently are refused: a bare
    # LF (a sandbox that wants CRLF would read the lines otherwise, even take
    # the next request for more trailers) and obs-fold (h11 unfolds it; RFC
    # 9112 §5.2, as in a request head).
    cdef const char* raw = PyBytes_AS_STRING(section)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(section)
    cdef Py_ssize_t blank, lines = 1, pos = 0
    cdef const char* lf
    if section.count(b"\n") != section.count(b"\r\n"):
        raise _bad("trailer section has a bare LF")
    folded = b"\n " in section or b"\n\t" in section
    if folded or section.startswith((b" ", b"\t")):
        raise _bad("obsolete line folding in trailer section")
    if size <= 2:
        return 0
    blank = size - 3  # every line ends with CRLF
    _check_head_bytes(raw, size)
    while True:
        lf = <const char*>memchr(raw + pos, b"\n", blank - pos)
        if lf == NULL:
            break
        lines += 1
        pos = lf - raw + 1
    _parse_fields(section, 0, blank, lines)
    return 0
