"""The preview-URL grammar of SPEC §1: ports, ids, tokens, labels, URLs."""

from __future__ import annotations

import collections
import re
import string

import pytest

from router import grammar
from router.errors import RouteError


def refused(code: str, func: object, *args: object) -> str:
    """Call ``func`` expecting a ``RouteError`` with ``code``; its message."""
    assert callable(func)
    with pytest.raises(RouteError) as info:
        func(*args)
    assert info.value.code == code, info.value.message
    return info.value.message


# -- port ---------------------------------------------------------------


@pytest.mark.parametrize("port", [1024, 8080, 65535, "1024", "8080", "65535"])
def test_port_accepted(port: object) -> None:
    assert grammar.check_port(port) == int(str(port))


def test_port_leading_zero_refused() -> None:
    # "08080" would build a URL whose label no longer matches the stored one.
    message = refused("INVALID_PORT", grammar.check_port, "08080")
    assert "'08080'" in message
    assert "leading zeros" in message


@pytest.mark.parametrize(
    "port", ["0", "+8080", " 8080", "80_80", "8080.0", "", "\uff18\uff10\uff18\uff10"]
)
def test_port_not_canonical_decimal_refused(port: str) -> None:
    refused("INVALID_PORT", grammar.check_port, port)


@pytest.mark.parametrize("port", [1023, 65536, 0, -1, "1023", "65536"])
def test_port_out_of_range_refused(port: object) -> None:
    message = refused("INVALID_PORT", grammar.check_port, port)
    assert f"Port {int(str(port))} is out of range" in message
    assert "1024-65535" in message


@pytest.mark.parametrize("port", [True, 8080.0, None, [8080]])
def test_port_of_another_type_refused(port: object) -> None:
    message = refused("INVALID_PORT", grammar.check_port, port)
    assert "must be a number" in message


def test_port_3000_reserved_by_default() -> None:
    message = refused("RESERVED_PORT", grammar.check_port, 3000)
    assert message == "Port 3000 is reserved and cannot be exposed"
    refused("RESERVED_PORT", grammar.check_port, "3000")


def test_reserved_ports_are_configurable() -> None:
    reserved = frozenset({8080})
    assert grammar.check_port(3000, reserved) == 3000
    refused("RESERVED_PORT", grammar.check_port, 8080, reserved)


# -- sandbox id ---------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "stored"),
    [("MySandbox", "mysandbox"), ("ABC-123", "abc-123"), ("a", "a"), ("a-b", "a-b")],
)
def test_sandbox_id_stored_lower_case(given: str, stored: str) -> None:
    assert grammar.check_sandbox(given) == stored


def test_sandbox_id_of_63_characters_accepted() -> None:
    assert grammar.check_sandbox("s" * 63) == "s" * 63


def test_sandbox_id_too_long_refused() -> None:
    message = refused("INVALID_SANDBOX_ID", grammar.check_sandbox, "s" * 64)
    assert "64 characters" in message
    assert "63" in message


@pytest.mark.parametrize("sandbox", ["-ab", "ab-", "a_b", "a.b", "a b", "é", "a/b"])
def test_sandbox_id_bad_characters_refused(sandbox: str) -> None:
    message = refused("INVALID_SANDBOX_ID", grammar.check_sandbox, sandbox)
    assert repr(sandbox) in message
    assert "a-z, 0-9 and '-'" in message


def test_sandbox_id_folding_to_ascii_refused() -> None:
    # U+212A KELVIN SIGN lower-cases to ASCII "k": still not an allowed char.
    refused("INVALID_SANDBOX_ID", grammar.check_sandbox, "\u212aab")


@pytest.mark.parametrize("sandbox", ["", None, 7])
def test_sandbox_id_missing_refused(sandbox: object) -> None:
    message = refused("INVALID_SANDBOX_ID", grammar.check_sandbox, sandbox)
    assert "non-empty string" in message


# -- token --------------------------------------------------------------


@pytest.mark.parametrize(
    "token", ["a", "abc-def", "a_b", "0123456789abcdef", "-", "_x-"]
)
def test_token_accepted_unchanged(token: str) -> None:
    assert grammar.check_token(token) == token


def test_token_of_17_characters_refused() -> None:
    message = refused("INVALID_TOKEN_FORMAT", grammar.check_token, "t" * 17)
    assert message == "Token is 17 characters; the limit is 16"


@pytest.mark.parametrize("token", ["ab!", "ABC", "a.b", "a b", "tök", "a/b", "a\0"])
def test_token_bad_characters_refused(token: str) -> None:
    message = refused("INVALID_TOKEN_FORMAT", grammar.check_token, token)
    assert repr(token) in message
    assert "may hold only a-z, 0-9, '_' and '-'" in message


@pytest.mark.parametrize("token", ["", None, 12])
def test_token_missing_refused(token: object) -> None:
    refused("INVALID_TOKEN_FORMAT", grammar.check_token, token)


@pytest.mark.parametrize("name", ["web", "Vite dev server", "アプリ 1", "x" * 256])
def test_name_accepted_unchanged(name: str) -> None:
    assert grammar.check_name(name) == name


def test_name_of_257_characters_refused() -> None:
    message = refused("INVALID_NAME", grammar.check_name, "n" * 257)
    assert message == "Name is 257 characters; the limit is 256"


@pytest.mark.parametrize(
    "name", ["\x1b[2Jgone", "two\nlines", "nul\0", "del\x7f", "c1\x85"]
)
def test_name_with_a_control_character_refused(name: str) -> None:
    message = refused("INVALID_NAME", grammar.check_name, name)
    assert "control characters" in message


def test_name_of_another_type_refused() -> None:
    refused("INVALID_NAME", grammar.check_name, 7)


def test_generated_tokens_are_16_lower_alphanumerics_and_differ() -> None:
    tokens = [grammar.generate_token() for _ in range(200)]
    for token in tokens:
        assert re.fullmatch(r"[a-z0-9]{16}", token), token
        assert grammar.check_token(token) == token
    assert len(set(tokens)) == len(tokens)
    # Every character of the alphabet turns up (3,200 draws of 36: missing
    # one by chance is a 1 in 10^36 event), and none is favoured much.
    counts = collections.Counter("".join(tokens))
    assert set(counts) == set(string.ascii_lowercase + string.digits)
    assert max(counts.values()) < 4 * min(counts.values())


# -- label --------------------------------------------------------------


def test_label_joins_the_parts() -> None:
    assert grammar.make_label(8080, "a-b", "c-d") == "8080-a-b-c-d"


def test_label_of_63_characters_accepted() -> None:
    # 5 + 1 + 41 + 1 + 15 = 63
    label = grammar.make_label(10000, "s" * 41, "t" * 15)
    assert len(label) == 63


def test_label_of_64_characters_refused() -> None:
    message = refused("LABEL_TOO_LONG", grammar.make_label, 10000, "s" * 41, "t" * 16)
    assert "64 characters" in message
    assert "DNS allows 63" in message


# -- domains, hostnames and URLs ---------------------------------------


@pytest.mark.parametrize(
    ("given", "normal"),
    [("Example.COM", "example.com"), ("localhost.", "localhost"), (" a.b ", "a.b")],
)
def test_domain_normalised(given: str, normal: str) -> None:
    assert grammar.normalize_domain(given) == normal


@pytest.mark.parametrize("domain", ["", ".", "a..b", "-a.com", "a.com:80", "a b"])
def test_bad_domain_refused(domain: str) -> None:
    with pytest.raises(ValueError, match="not a valid base domain"):
        grammar.normalize_domain(domain)


DOMAINS = ("example.com", "localhost")


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("example.com", "example.com"),
        ("EXAMPLE.com.", "example.com"),
        ("localhost:8787", "localhost:8787"),
        ("LocalHost:1", "localhost:1"),
    ],
)
def test_hostname_accepted(given: str, normal: str) -> None:
    assert grammar.check_hostname(given, DOMAINS) == normal


def test_hostname_of_another_domain_refused() -> None:
    message = refused("INVALID_HOSTNAME", grammar.check_hostname, "other.org", DOMAINS)
    assert "'other.org'" in message
    assert "example.com, localhost" in message


@pytest.mark.parametrize(
    "hostname",
    ["", None, "localhost:0", "localhost:99999", "localhost:", "a b", "x.example.com"],
)
def test_bad_hostname_refused(hostname: object) -> None:
    refused("INVALID_HOSTNAME", grammar.check_hostname, hostname, DOMAINS)


def test_url_is_https_by_default() -> None:
    assert (
        grammar.build_url("8080-sb-tok", "example.com")
        == "https://8080-sb-tok.example.com/"
    )


@pytest.mark.parametrize(
    ("hostname", "url"),
    [
        ("localhost:8787", "http://8080-sb-tok.localhost:8787/"),
        ("localhost", "http://8080-sb-tok.localhost/"),
        ("dev.localhost:9000", "http://8080-sb-tok.dev.localhost:9000/"),
        ("example.com:8443", "https://8080-sb-tok.example.com:8443/"),
    ],
)
def test_url_of_local_hostnames_is_http_with_port(hostname: str, url: str) -> None:
    assert grammar.build_url("8080-sb-tok", hostname) == url


def test_notlocalhost_is_not_local() -> None:
    assert not grammar.is_local_hostname("notlocalhost")
    assert not grammar.is_local_hostname("localhost.example.com")
    assert grammar.is_local_hostname("a.localhost:1")


def test_hostname_folding_to_ascii_refused() -> None:
    refused("INVALID_HOSTNAME", grammar.check_hostname, "\u212aube.io", ("kube.io",))
