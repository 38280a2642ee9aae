"""Settings, from flags, ``EDGE_ROUTER_<NAME>`` variables and a TOML file.

Precedence, highest first: command-line flag, environment variable, TOML key
(``--config FILE``), built-in default.  The names are the public interface of
SPEC §7: scripts rely on them, so they do not change.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any

from . import grammar


@dataclass(slots=True)
class Config:
    listen: str = "127.0.0.1:8787"
    domain: list[str] = field(default_factory=lambda: ["localhost"])
    control: str | None = None
    control_tcp: str | None = None
    control_secret: str | None = None
    state: str | None = None
    admin: str | None = None
    internal: str | None = None
    workers: int = 1
    fallback: str | None = None
    reserved_ports: list[int] = field(default_factory=lambda: [3000])
    head_timeout: float = 10.0
    idle_timeout: float = 60.0
    connect_timeout: float = 5.0
    response_timeout: float = 60.0
    retry_window: float = 1.0
    grace: float = 5.0
    tunnel_idle_timeout: float = 0.0
    max_head: int = 16384
    max_body: int = 0
    trusted_proxy: list[str] = field(default_factory=list)
    sync: str = "full"
    log_level: str = "info"
    access_log: bool = True
    demo: bool | None = None

    def trusted_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(c, strict=False) for c in self.trusted_proxy]

    def unix_listeners(self) -> tuple[str, ...]:
        """The paths of the router's own Unix sockets (control, internal)."""
        paths = [self.control] if self.control else []
        if self.internal and self.internal.startswith("unix:"):
            paths.append(self.internal[5:])
        return tuple(paths)


# name -> (flag help, parser for env/TOML strings)
HELP = {
    "listen": "public HTTP listener, HOST:PORT",
    "domain": "base domain of preview URLs (repeatable)",
    "control": "Unix control socket path",
    "control_tcp": "also serve control on loopback HOST:PORT (needs a secret)",
    "control_secret": "shared secret for the TCP control listener",
    "state": "SQLite route store (routes survive restarts)",
    "admin": "admin/metrics HTTP listener, HOST:PORT",
    "internal": "trusted internal listener, HOST:PORT or unix:PATH",
    "workers": "worker processes",
    "fallback": "upstream HOST:PORT for requests that are not preview hosts",
    "reserved_ports": "ports that cannot be exposed (repeatable)",
    "head_timeout": "seconds to read a request head",
    "idle_timeout": "seconds a kept-alive client connection may idle",
    "connect_timeout": "seconds to connect upstream",
    "response_timeout": "seconds to wait for an upstream response head",
    "retry_window": "seconds to retry refused upstream connects",
    "grace": "seconds a streaming response lives after its route is revoked",
    "tunnel_idle_timeout": "seconds a WebSocket tunnel may idle (0: never)",
    "max_head": "request head limit in bytes",
    "max_body": "request body limit in bytes (0: none)",
    "trusted_proxy": "CIDR whose X-Forwarded-* headers are kept (repeatable)",
    "sync": "SQLite synchronous mode: full or normal",
    "log_level": "debug, info, warning or error",
    "access_log": "log one line per request (true/false)",
    "demo": "serve the built-in demo upstream and route",
}


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _convert(name: str, raw: Any, default: Any) -> Any:
    """``raw`` (a flag's or variable's text, or a TOML value) as the setting's
    type; ValueError for anything that is not plainly that type.

    A TOML float for a whole number, or a word other than the boolean ones,
    is refused rather than rounded or read as false: a 1.5-byte body limit
    or a misspelt ``access_log`` should stop start-up, not change behaviour.
    """
    if isinstance(default, list):
        items = raw if isinstance(raw, list) else str(raw).split(",")
        conv = _whole if name == "reserved_ports" else str
        return [
            conv(i if isinstance(i, int) else str(i).strip())
            for i in items
            if str(i).strip()
        ]
    if isinstance(default, bool) or name == "demo":
        if isinstance(raw, bool):
            return raw
        word = str(raw).lower()
        if isinstance(raw, str) and word in _TRUE + _FALSE:
            return word in _TRUE
        raise ValueError("expected true or false")
    if isinstance(default, int):
        return _whole(raw)
    if isinstance(default, float):
        if isinstance(raw, bool):
            raise ValueError("expected a number")
        return float(raw)
    return None if raw is None else str(raw)


def _whole(raw: Any) -> int:
    if isinstance(raw, bool | float):
        raise ValueError("expected a whole number")
    return int(raw)


# Bounds of the numeric settings, checked at start-up: a value out of them
# would otherwise be taken and fail later, on every request (a zero head
# limit) or at the C fields of the compiled data path (a 20-digit one).
LIMITS: dict[str, tuple[float, float]] = {
    "workers": (1, 256),
    "max_head": (64, 16 * 1024 * 1024),
    "max_body": (0, 2**63 - 1),
    "head_timeout": (0, 86400 * 365),
    "idle_timeout": (0, 86400 * 365),
    "connect_timeout": (0, 86400 * 365),
    "response_timeout": (0, 86400 * 365),
    "retry_window": (0, 86400 * 365),
    "grace": (0, 86400 * 365),
    "tunnel_idle_timeout": (0, 86400 * 365),
}


# Settings that take one of a few words (any case).
CHOICES: dict[str, tuple[str, ...]] = {
    "sync": ("full", "normal"),
    "log_level": ("debug", "info", "warning", "error"),
}


def _check(name: str, value: Any) -> Any:
    """Refuse a value out of bounds (ValueError); the value, normalised."""
    low, high = LIMITS.get(name, (None, None))
    if low is not None and high is not None and not low <= value <= high:
        raise ValueError(f"must be between {low} and {high}")
    if name in CHOICES and str(value).lower() not in CHOICES[name]:
        raise ValueError(f"must be one of {', '.join(CHOICES[name])}")
    if name == "reserved_ports" and not all(1 <= p <= 65535 for p in value):
        raise ValueError("ports must be between 1 and 65535")
    if name in ("listen", "admin") or (
        name == "internal" and not value.startswith("unix:")
    ):
        _host_port(value, lowest=0)
    if name == "fallback":
        _host_port(value, lowest=1)
    if name == "domain":
        # Lower-case, no trailing dot: the form Host headers are matched in
        # (and ``localhost`` URLs get their port by).
        try:
            return [grammar.normalize_domain(d) for d in value]
        except ValueError:
            raise ValueError("must be DNS names such as example.com") from None
    if name == "trusted_proxy":
        try:
            for cidr in value:
                ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ValueError("must be networks such as 10.0.0.0/8") from None
    return value


def _host_port(value: str, lowest: int) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not port.isascii():
        raise ValueError("must be HOST:PORT")
    if not lowest <= int(port) <= 65535:
        raise ValueError(f"port must be between {lowest} and 65535")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every setting; unset flags stay ``None``."""
    parser.add_argument("--config", help="TOML file with settings")
    defaults = Config()
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, list):
            parser.add_argument(flag, action="append", help=HELP[f.name], dest=f.name)
        elif f.name in ("demo", "access_log"):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, help=HELP[f.name]
            )
        else:
            parser.add_argument(flag, help=HELP[f.name], dest=f.name)


def load(
    args: argparse.Namespace | None = None, environ: dict[str, str] | None = None
) -> Config:
    """Build the settings from flags, environment and TOML."""
    env = os.environ if environ is None else environ
    cfg = Config()
    defaults = Config()
    values: dict[str, Any] = {}
    # Where each value came from, as a refusal names it: the flag, the
    # environment variable, or the key and its file.
    sources: dict[str, str] = {}

    path = getattr(args, "config", None) or env.get("EDGE_ROUTER_CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SystemExit(f"edge-router: cannot read config {path}: {exc}") from exc
        for key, raw in data.items():
            name = key.replace("-", "_")
            if not hasattr(cfg, name):
                raise SystemExit(f"edge-router: unknown key {key!r} in {path}")
            values[name] = raw
            sources[name] = f"{key} in {path}"

    for f in fields(Config):
        variable = "EDGE_ROUTER_" + f.name.upper()
        raw = env.get(variable)
        if raw is not None:
            values[f.name] = raw
            sources[f.name] = variable
        if args is not None and getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
            sources[f.name] = "--" + f.name.replace("_", "-")

    for name, raw in values.items():
        where = sources[name]
        try:
            value = _convert(name, raw, getattr(defaults, name))
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"edge-router: bad value for {where}: {raw!r}") from exc
        try:
            value = _check(name, value)
        except ValueError as exc:
            raise SystemExit(f"edge-router: {where} {exc}, not {raw!r}") from exc
        setattr(cfg, name, value)
    return cfg
