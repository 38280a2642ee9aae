"""The preview-URL grammar (SPEC §1).

A preview URL is ``{scheme}://{port}-{sandbox}-{token}.{domain}/``.  This
module validates each part, generates tokens and builds URLs.  It is pure
data-in, data-out: the route table calls it before changing anything, so a
refused part never reaches the table.
"""

from __future__ import annotations

import functools
import re
import secrets
import string
import unicodedata

from .errors import RouteError

MIN_PORT = 1024
MAX_PORT = 65535
DEFAULT_RESERVED_PORTS = frozenset({3000})

# DNS allows 63 octets per label (RFC 1035 §2.3.4); the whole first label
# is ``{port}-{sandbox}-{token}``, so that is the budget for all three.
MAX_LABEL = 63
MAX_SANDBOX = 63
MAX_TOKEN = 16
GENERATED_TOKEN_LENGTH = 16
MAX_NAME = 256

_SANDBOX_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
# Unlike the Sandbox SDK we keep ``-`` in tokens: labels are looked up whole,
# never split, so a hyphen cannot be misread as the sandbox/token boundary.
_TOKEN_RE = re.compile(r"[a-z0-9_-]+")
_HOSTNAME_RE = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*"
    r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?::[0-9]{1,5})?"
)
_TOKEN_ALPHABET = string.ascii_lowercase + string.digits


def check_port(port: object, reserved: frozenset[int] = DEFAULT_RESERVED_PORTS) -> int:
    """Return ``port`` as an int, or refuse it.

    Strings are accepted only in canonical decimal form: ``"08080"`` would
    give a URL that no longer matches the label we store.
    """
    if type(port) is int and MIN_PORT <= port <= MAX_PORT and port not in reserved:
        return port  # the usual case, first
    if isinstance(port, bool):
        raise RouteError("INVALID_PORT", f"Port must be a number, not {port!r}")
    if isinstance(port, str):
        if not port.isdigit() or not port.isascii() or (port[0] == "0"):
            raise RouteError(
                "INVALID_PORT",
                f"Port {port!r} must be decimal digits without leading zeros",
            )
        port = int(port)
    if not isinstance(port, int):
        raise RouteError("INVALID_PORT", f"Port must be a number, not {port!r}")
    if not MIN_PORT <= port <= MAX_PORT:
        raise RouteError(
            "INVALID_PORT",
            f"Port {port} is out of range: use {MIN_PORT}-{MAX_PORT}",
        )
    if port in reserved:
        raise RouteError(
            "RESERVED_PORT", f"Port {port} is reserved and cannot be exposed"
        )
    return port


def check_sandbox(sandbox: object) -> str:
    """Return the sandbox id lower-cased, or refuse it."""
    if not isinstance(sandbox, str) or not sandbox:
        raise RouteError("INVALID_SANDBOX_ID", "Sandbox id must be a non-empty string")
    lowered = sandbox.lower()
    if len(lowered) > MAX_SANDBOX:
        raise RouteError(
            "INVALID_SANDBOX_ID",
            f"Sandbox id is {len(lowered)} characters; the limit is {MAX_SANDBOX}",
        )
    # Check the id as given: str.lower() folds a few non-ASCII letters to
    # ASCII (U+212A KELVIN SIGN becomes "k").
    if not sandbox.isascii() or not _SANDBOX_RE.fullmatch(lowered):
        raise RouteError(
            "INVALID_SANDBOX_ID",
            f"Sandbox id {sandbox!r} may hold only a-z, 0-9 and '-', "
            "and must not start or end with '-'",
        )
    return lowered


def check_token(token: object) -> str:
    """Return a custom token unchanged, or refuse it."""
    if not isinstance(token, str) or not token:
        raise RouteError("INVALID_TOKEN_FORMAT", "Token must be a non-empty string")
    if len(token) > MAX_TOKEN:
        raise RouteError(
            "INVALID_TOKEN_FORMAT",
            f"Token is {len(token)} characters; the limit is {MAX_TOKEN}",
        )
    if not token.isascii() or not _TOKEN_RE.fullmatch(token):
        raise RouteError(
            "INVALID_TOKEN_FORMAT",
            f"Token {token!r} may hold only a-z, 0-9, '_' and '-'",
        )
    return token


def check_name(name: object) -> str:
    """Return a port's display name unchanged, or refuse it.

    Names are shown to people (``ctl ls``, dashboards): a control character
    could rewrite their terminal or split a line of output, and a megabyte
    of name would ride along in every snapshot and watch message.
    """
    if not isinstance(name, str):
        raise RouteError("INVALID_NAME", "Name must be a string")
    if len(name) > MAX_NAME:
        raise RouteError(
            "INVALID_NAME", f"Name is {len(name)} characters; the limit is {MAX_NAME}"
        )
    for ch in name:
        if unicodedata.category(ch) == "Cc":
            raise RouteError(
                "INVALID_NAME",
                f"Name may not hold control characters such as {ch!r}",
            )
    return name


def generate_token() -> str:
    """A fresh token: 16 characters of a-z0-9 from the OS CSPRNG.

    One read of random bytes for all of them (``secrets.choice`` per
    character was most of the cost of an expose).  A byte below 252, which
    is 7 x 36, picks a character uniformly; the few above are skipped.
    """
    chars: list[str] = []
    while len(chars) < GENERATED_TOKEN_LENGTH:
        chars += [
            _TOKEN_ALPHABET[b % 36]
            for b in secrets.token_bytes(GENERATED_TOKEN_LENGTH + 4)
            if b < 252
        ]
    return "".join(chars[:GENERATED_TOKEN_LENGTH])


def make_label(port: int, sandbox: str, token: str) -> str:
    """Join the parts and enforce the DNS label limit."""
    label = f"{port}-{sandbox}-{token}"
    if len(label) > MAX_LABEL:
        raise RouteError(
            "LABEL_TOO_LONG",
            f"Preview label '{label}' is {len(label)} characters; DNS allows "
            f"{MAX_LABEL}. Use a shorter sandbox id or token",
        )
    return label


def normalize_domain(domain: str) -> str:
    """A configured base domain, lower-cased, without a trailing dot."""
    out = domain.strip().lower().rstrip(".")
    if not out or ":" in out or not _HOSTNAME_RE.fullmatch(out):
        raise ValueError(f"not a valid base domain: {domain!r}")
    return out


def check_hostname(hostname: object, domains: tuple[str, ...]) -> str:
    """Return the hostname URLs are built on, or refuse it.

    A hostname is one of the configured base domains, optionally with a
    port (``localhost:8787``).  A URL on any other domain would never be
    routed here, so it is refused instead of handed out.
    """
    if not isinstance(hostname, str) or not hostname:
        raise RouteError("INVALID_HOSTNAME", "Hostname must be a non-empty string")
    lowered = hostname.lower().rstrip(".")
    if not hostname.isascii() or not _HOSTNAME_RE.fullmatch(lowered):
        raise RouteError("INVALID_HOSTNAME", f"Hostname {hostname!r} is not valid")
    name, _, port = lowered.partition(":")
    if port and not 1 <= int(port) <= 65535:
        raise RouteError("INVALID_HOSTNAME", f"Hostname {hostname!r} has a bad port")
    if name not in domains:
        raise RouteError(
            "INVALID_HOSTNAME",
            f"Hostname {hostname!r} is not one of this router's domains "
            f"({', '.join(domains)})",
        )
    return lowered


def is_local_hostname(hostname: str) -> bool:
    """Hostnames that browsers reach over plain HTTP on this machine."""
    name = hostname.partition(":")[0]
    return name == "localhost" or name.endswith(".localhost")


@functools.lru_cache(maxsize=256)
def url_scheme(hostname: str) -> str:
    """https, or http for localhost-style hosts.

    Cached: every expose builds a URL, nearly always on the same hostname.
    """
    return "http" if is_local_hostname(hostname) else "https"


def build_url(label: str, hostname: str) -> str:
    """The public URL of a label."""
    return f"{url_scheme(hostname)}://{label}.{hostname}/"
