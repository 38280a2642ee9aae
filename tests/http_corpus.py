"""Fixed inputs for the HTTP parser's differential tests.

Each case is run through both twins and through h11 0.16 by
``tests/test_http_parser.py``.  ``verdict`` is what the twins must say about
the whole byte string: ``ok`` (every message complete), ``incomplete`` (the
last message needs more bytes) or ``error``.  h11 must agree, except on the
cases with a ``divergence`` note, where the router is deliberately stricter.
"""

from __future__ import annotations

from typing import NamedTuple


class Case(NamedTuple):
    name: str
    data: bytes
    verdict: str
    divergence: str = ""
    head_request: bool = False  # responses only: the answer to a HEAD


def _msg(head: str, body: bytes = b"") -> bytes:
    # "|" stands for CRLF, to keep the heads readable on one line.
    return head.replace("|", "\r\n").encode("latin-1") + body


def _get(*lines: str) -> bytes:
    return _msg(
        "GET / HTTP/1.1|Host: a.example|" + "".join(f"{x}|" for x in lines) + "|"
    )


def _post(*lines: str, body: bytes = b"") -> bytes:
    return _msg(
        "POST / HTTP/1.1|Host: a.example|" + "".join(f"{x}|" for x in lines) + "|",
        body,
    )


def _chunked(body: bytes) -> bytes:
    return _post("Transfer-Encoding: chunked", body=body)


CL_TE = "RFC 9112 §6.3: Content-Length beside Transfer-Encoding; h11 lets TE win"
FOLD = "RFC 9112 §5.2 allows 400 for obs-fold in a request; h11 unfolds it"
VERSION = "only HTTP/1.0 and 1.1 are served; h11 takes any DIGIT.DIGIT"
HUGE = "a body that large can never be sent; h11 would wait for it"
AUTHORITY = "SPEC §1 and RFC 9110 §4.2: absolute-form authority; h11 ignores it"
ORIGIN = (
    "RFC 9112 §3.2: a target is a path from '/', absolute or OPTIONS *; h11 takes any"
)
EARLY = "a chunk-size line is refused once it cannot be valid; h11 waits for CRLF"
RELAYED = (
    "RFC 9112 §2.2, §5.2, §7.1.1: a chunked body goes on as it came, so no bare "
    "CR, no control byte, no bare LF line end, no obs-fold (which a sandbox may "
    "read otherwise) is passed on; h11 accepts them"
)

REQUESTS = [
    # Valid shapes.
    Case("get", _get(), "ok"),
    Case(
        "browser",
        _msg(
            "GET /app/main.js?v=3 HTTP/1.1|Host: 5173-sbx-tok.preview.dev|"
            "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0)|"
            "Accept: */*|Accept-Language: en-US,en;q=0.5|"
            "Accept-Encoding: gzip, deflate, br|Connection: keep-alive|"
            "Cookie: a=1; b=2|Sec-Fetch-Mode: no-cors||"
        ),
        "ok",
    ),
    Case("http10 without host", _msg("GET / HTTP/1.0||"), "ok"),
    Case("options star", _msg("OPTIONS * HTTP/1.1|Host: a||"), "ok"),
    Case("path without slash", _msg("GET foo HTTP/1.1|Host: a||"), "error", ORIGIN),
    Case("star for get", _msg("GET * HTTP/1.1|Host: a||"), "error", ORIGIN),
    Case("authority form", _msg("CONNECT a:443 HTTP/1.1|Host: a||"), "error", ORIGIN),
    Case("post length", _post("Content-Length: 5", body=b"hello"), "ok"),
    Case("post length zero", _post("Content-Length: 0"), "ok"),
    Case("length leading zeros", _post("Content-Length: 0005", body=b"hello"), "ok"),
    Case(
        "length 20 digits", _post("Content-Length: " + "0" * 19 + "1", body=b"x"), "ok"
    ),
    Case("length list equal", _post("Content-Length: 5, 5", body=b"hello"), "ok"),
    Case(
        "length repeated equal",
        _post("Content-Length: 5", "content-length: 5", body=b"hello"),
        "ok",
    ),
    Case("short body", _post("Content-Length: 5", body=b"hel"), "incomplete"),
    Case("chunked", _chunked(b"5\r\nhello\r\n0\r\n\r\n"), "ok"),
    Case(
        "chunked coding upper case",
        _post("Transfer-Encoding: Chunked", body=b"0\r\n\r\n"),
        "ok",
    ),
    Case(
        "chunked extensions and trailers",
        _chunked(
            b'5;name=value;q="a b"\r\nhello\r\nA \t\r\n0123456789\r\n'
            b"0;last\r\nDigest: x\r\nExpires: never\r\n\r\n"
        ),
        "ok",
    ),
    Case("chunk size leading zeros", _chunked(b"00005\r\nhello\r\n0\r\n\r\n"), "ok"),
    Case("chunk size 20 digits", _chunked(b"0" * 19 + b"1\r\nx\r\n0\r\n\r\n"), "ok"),
    Case("trailer equal lengths", _chunked(b"0\r\nContent-Length: 1, 1\r\n\r\n"), "ok"),
    Case("chunked incomplete", _chunked(b"5\r\nhel"), "incomplete"),
    Case("chunked trailer incomplete", _chunked(b"0\r\nX: y\r\n"), "incomplete"),
    Case(
        "pipelined",
        _msg("GET /1 HTTP/1.1|Host: a||")
        + _msg("POST /2 HTTP/1.1|Host: a|Content-Length: 2||", b"ok")
        + _msg("POST /3 HTTP/1.1|Host: a|Transfer-Encoding: chunked||")
        + b"2\r\nok\r\n0\r\n\r\n"
        + _msg("GET /4 HTTP/1.1|Host: a||"),
        "ok",
    ),
    Case("pipelined partial", _get() + b"GET /2 HT", "incomplete"),
    Case("bare lf", b"GET / HTTP/1.1\nHost: a\n\n", "ok"),
    Case("mixed line ends", b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\n", "ok"),
    Case("ows and empty value", _get("X:   \t", "Y:z \t "), "ok"),
    Case("obs-text and ctl in value", _get("X: \x01\x7f\xff\x1c"), "ok"),
    Case(
        "absolute form", _msg("GET http://a.example/p HTTP/1.1|Host: A.example||"), "ok"
    ),
    Case(
        "absolute form 1.0 without host",
        _msg("GET HTTP://a.example:80/ HTTP/1.0||"),
        "ok",
    ),
    Case(
        "websocket upgrade",
        _get(
            "Connection: keep-alive, Upgrade",
            "Upgrade: websocket",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ),
        "ok",
    ),
    Case("expect", _post("Expect: 100-continue", "Content-Length: 1", body=b"x"), "ok"),
    Case("incomplete head", b"GET / HTTP/1.1\r\nHost: a\r\n\r", "incomplete"),
    Case("incomplete line", b"GET / HTT", "incomplete"),
    # Refused by both.
    Case("leading crlf", b"\r\n" + _get(), "error"),
    Case("leading space", b" " + _get(), "error"),
    Case("tls handshake", b"\x16\x03\x01\x02\x00\x01\x00", "error"),
    Case("missing host", _msg("GET / HTTP/1.1||"), "error"),
    Case("two hosts", _get("Host: a.example"), "error"),
    Case("lower case version", _msg("GET / http/1.1|Host: a||"), "error"),
    Case("double space", _msg("GET  / HTTP/1.1|Host: a||"), "error"),
    Case("space after version", _msg("GET / HTTP/1.1 |Host: a||"), "error"),
    Case("space in target", _msg("GET /a b HTTP/1.1|Host: a||"), "error"),
    Case("del in target", _msg("GET /\x7f HTTP/1.1|Host: a||"), "error"),
    Case("bad method", _msg("G(T / HTTP/1.1|Host: a||"), "error"),
    Case("space in name", _get("X Y: z"), "error"),
    Case("space before colon", _get("X : z"), "error"),
    Case("empty name", _get(": z"), "error"),
    Case("no colon", _get("Xz"), "error"),
    Case("nul in value", _get("X: a\x00b"), "error"),
    Case("vt in value", _get("X: a\x0bb"), "error"),
    Case("bare cr in value", _get("X: a\rb"), "error"),
    Case("cr cr lf", b"GET / HTTP/1.1\r\r\nHost: a\r\n\r\n", "error"),
    Case("fold on first line", _msg("GET / HTTP/1.1| X: y|Host: a||"), "error"),
    Case("negative length", _post("Content-Length: -1"), "error"),
    Case("hex length", _post("Content-Length: 0x5"), "error"),
    Case("plus length", _post("Content-Length: +5"), "error"),
    Case("empty length", _post("Content-Length:"), "error"),
    Case("length 21 digits", _post("Content-Length: " + "0" * 20 + "5"), "error"),
    Case("lengths differ", _post("Content-Length: 5", "Content-Length: 6"), "error"),
    Case(
        "lengths differ by zeros",
        _post("Content-Length: 5", "Content-Length: 05"),
        "error",
    ),
    Case("length list differs", _post("Content-Length: 5, 6"), "error"),
    Case("length list trailing comma", _post("Content-Length: 5,"), "error"),
    Case("gzip chunked", _post("Transfer-Encoding: gzip, chunked"), "error"),
    Case("identity coding", _post("Transfer-Encoding: identity"), "error"),
    Case(
        "two transfer encodings",
        _post("Transfer-Encoding: chunked", "Transfer-Encoding: chunked"),
        "error",
    ),
    Case("chunk size not hex", _chunked(b"g\r\n"), "error"),
    Case("chunk size empty", _chunked(b"\r\n"), "error"),
    Case("chunk size 21 digits", _chunked(b"0" * 20 + b"1\r\nx\r\n0\r\n\r\n"), "error"),
    Case("chunk size lf only", _chunked(b"5\nhello\r\n0\r\n\r\n"), "error"),
    Case("chunk data without crlf", _chunked(b"5\r\nhelloX\r\n0\r\n\r\n"), "error"),
    Case("chunk data lf only", _chunked(b"5\r\nhello\n0\r\n\r\n"), "error"),
    Case("space before extension", _chunked(b"5 ;x\r\nhello\r\n0\r\n\r\n"), "error"),
    Case("negative chunk size", _chunked(b"-5\r\nhello\r\n0\r\n\r\n"), "error"),
    Case("trailer bad length", _chunked(b"0\r\nContent-Length: x\r\n\r\n"), "error"),
    Case("trailer gzip", _chunked(b"0\r\nTransfer-Encoding: gzip\r\n\r\n"), "error"),
    Case("trailer starting with fold", _chunked(b"0\r\n X: y\r\n\r\n"), "error"),
    Case("trailer nul", _chunked(b"0\r\nX: \x00\r\n\r\n"), "error"),
    Case("trailer no colon", _chunked(b"0\r\nX\r\n\r\n"), "error"),
    # Deliberately stricter than h11.
    Case(
        "length and chunked",
        _post("Content-Length: 3", "Transfer-Encoding: chunked", body=b"0\r\n\r\n"),
        "error",
        CL_TE,
    ),
    Case("obs-fold", _get("X: a", "  b"), "error", FOLD),
    Case("http 1.2", _msg("GET / HTTP/1.2|Host: a||"), "error", VERSION),
    Case("http 2.0", _msg("GET / HTTP/2.0|Host: a||"), "error", VERSION),
    Case("http 0.9", _msg("GET / HTTP/0.9||"), "error", VERSION),
    Case(
        "length over 63 bits",
        _post("Content-Length: 9223372036854775808"),
        "error",
        HUGE,
    ),
    Case("chunk size over 63 bits", _chunked(b"8000000000000000\r\nx"), "error", HUGE),
    Case("chunk size refused early", _chunked(b"g6\n"), "error", EARLY),
    Case("chunk line bare lf refused early", _chunked(b"5\nhello"), "error", EARLY),
    Case("chunk extension lf refused early", _chunked(b"5;a\nb"), "error", EARLY),
    Case(
        "chunk extension with cr",
        _chunked(b"5;a\rb\r\nhello\r\n0\r\n\r\n"),
        "error",
        RELAYED,
    ),
    Case(
        "chunk extension with nul",
        _chunked(b"5;\x00\r\nhello\r\n0\r\n\r\n"),
        "error",
        RELAYED,
    ),
    Case("trailer folded", _chunked(b"0\r\nX: a\r\n b\r\n\r\n"), "error", RELAYED),
    Case("trailer bare lf", _chunked(b"0\r\nX: a\n\n"), "error", RELAYED),
    Case("trailer bare lf blank", _chunked(b"0\r\n\n"), "error", RELAYED),
    Case(
        "absolute form host mismatch",
        _msg("GET http://b.example/ HTTP/1.1|Host: a.example||"),
        "error",
        AUTHORITY,
    ),
    Case(
        "absolute form userinfo",
        _msg("GET http://u@a.example/ HTTP/1.1|Host: u@a.example||"),
        "error",
        AUTHORITY,
    ),
    Case(
        "absolute form empty",
        _msg("GET http:///x HTTP/1.1|Host: a||"),
        "error",
        AUTHORITY,
    ),
]


def _resp(head: str, body: bytes = b"") -> bytes:
    return _msg(head, body)


RESPONSES = [
    Case("length", _resp("HTTP/1.1 200 OK|Content-Length: 2||", b"ok"), "ok"),
    Case("no reason", _resp("HTTP/1.1 200|Content-Length: 0||"), "ok"),
    Case("empty reason", _resp("HTTP/1.1 200 |Content-Length: 0||"), "ok"),
    Case("reason with tab", _resp("HTTP/1.1 200 O\tK \x80|Content-Length: 0||"), "ok"),
    Case(
        "chunked",
        _resp("HTTP/1.1 200 OK|Transfer-Encoding: chunked||", b"3\r\nabc\r\n0\r\n\r\n"),
        "ok",
    ),
    Case(
        "length beside chunked",
        _resp(
            "HTTP/1.1 200 OK|Content-Length: 99|Transfer-Encoding: chunked||",
            b"3\r\nabc\r\n0\r\n\r\n",
        ),
        "ok",
    ),
    Case("close delimited", _resp("HTTP/1.1 200 OK||", b"until the end"), "ok"),
    Case("http10 close delimited", _resp("HTTP/1.0 200 OK||", b"abc"), "ok"),
    Case(
        "head", _resp("HTTP/1.1 200 OK|Content-Length: 1234||"), "ok", head_request=True
    ),
    Case(
        "head chunked",
        _resp("HTTP/1.1 200 OK|Transfer-Encoding: chunked||"),
        "ok",
        head_request=True,
    ),
    Case("204 with length", _resp("HTTP/1.1 204 No Content|Content-Length: 7||"), "ok"),
    Case("304", _resp('HTTP/1.1 304 Not Modified|ETag: "x"||'), "ok"),
    Case(
        "interim then final",
        _resp("HTTP/1.1 100 Continue||HTTP/1.1 103 Early Hints|Link: </a>||")
        + _resp("HTTP/1.1 200 OK|Content-Length: 2||", b"ok"),
        "ok",
    ),
    Case(
        "switching",
        _resp(
            "HTTP/1.1 101 Switching Protocols|Upgrade: websocket|Connection: Upgrade||"
        ),
        "ok",
    ),
    Case(
        "set-cookie repeated",
        _resp(
            "HTTP/1.1 302 Found|Set-Cookie: a=1|Set-Cookie: b=2|Location: /x|"
            "Content-Length: 0||"
        ),
        "ok",
    ),
    Case(
        "folded header", _resp("HTTP/1.1 200 OK|X: a |\t b|Content-Length: 0||"), "ok"
    ),
    Case(
        "folded length", _resp("HTTP/1.1 200 OK|Content-Length: 2,| 2||", b"ok"), "ok"
    ),
    Case("bare lf", b"HTTP/1.1 200 OK\nContent-Length: 1\n\nx", "ok"),
    Case(
        "short body", _resp("HTTP/1.1 200 OK|Content-Length: 5||", b"ab"), "incomplete"
    ),
    Case("incomplete head", b"HTTP/1.1 200 OK\r\nContent-Le", "incomplete"),
    Case("status 99", _resp("HTTP/1.1 099 Low||"), "error"),
    Case("status 4 digits", _resp("HTTP/1.1 2000 OK||"), "error"),
    Case("no space after status", _resp("HTTP/1.1 200OK||"), "error"),
    Case("fold first", _resp("HTTP/1.1 200 OK| X: y||"), "error"),
    Case("bad length", _resp("HTTP/1.1 200 OK|Content-Length: 1x||"), "error"),
    Case("gzip", _resp("HTTP/1.1 200 OK|Transfer-Encoding: gzip||"), "error"),
    Case("leading crlf", _resp("|HTTP/1.1 200 OK||"), "error"),
    Case("nul in reason", _resp("HTTP/1.1 200 O\x00K||"), "error"),
    Case(
        "bad chunk",
        _resp("HTTP/1.1 200 OK|Transfer-Encoding: chunked||", b"x\r\n"),
        "error",
    ),
    Case("http 2.0", _resp("HTTP/2.0 200 OK|Content-Length: 0||"), "error", VERSION),
    Case(
        "length over 63 bits",
        _resp("HTTP/1.1 200 OK|Content-Length: 99999999999999999999||"),
        "error",
        HUGE,
    ),
]
