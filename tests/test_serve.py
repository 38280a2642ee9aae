"""The quick start: ``edge-router serve`` with no settings serves a demo."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import serve_refused

from router import config, speedups
from router.listeners import bound_socket


def test_version_names_the_hot_path() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "router", "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("edge-router ")
    if speedups.FORCED_PURE:
        assert "pure-Python twins" in out
    else:
        assert "compiled hot path" in out


def test_demo_route_answers_curl() -> None:
    _serve_demo()


def test_demo_with_a_store_starts_again(tmp_path: Path) -> None:
    # The first run stores its demo route (to that run's upstream port);
    # the second replaces it instead of refusing the token as in use.
    state = tmp_path / "routes.db"
    for _ in range(2):
        _serve_demo("--state", str(state), "--demo")
    # Every token of the table is in this file: its owner's alone.
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(f"{state}.lock").st_mode) == 0o600


def _serve_demo(*flags: str) -> None:
    """``serve`` on a free port: its demo answers curl, and SIGTERM stops it."""
    with subprocess.Popen(
        [sys.executable, "-m", "router", "serve", "--listen", "127.0.0.1:0", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        _check_demo(proc)
    assert proc.returncode == 0


def _check_demo(proc: subprocess.Popen[str]) -> None:
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"(http://\S+)", line)
        assert match, line
        url = match.group(1)
        out = subprocess.run(
            ["curl", "-sS", "-i", url], capture_output=True, text=True, timeout=10
        ).stdout
        assert out.startswith("HTTP/1.1 200")
        assert "Hello from the edge-router demo sandbox" in out
        # The demo upstream sees the rewritten Host of SPEC §4.
        assert re.search(r"with Host localhost:\d+", out)

        wrong = url.replace("quickstart", "wrongtoken")
        out = subprocess.run(
            ["curl", "-sS", "-i", wrong], capture_output=True, text=True, timeout=10
        ).stdout
        assert out.startswith("HTTP/1.1 404")
        assert '"code":"INVALID_TOKEN"' in out
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("router did not stop on SIGTERM")


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-body", "99999999999999999999", "--max-body must be between 0 and"),
        ("--max-body", "-1", "--max-body must be between 0 and 9223372036854775807"),
        ("--max-head", "0", "--max-head must be between 64 and 16777216"),
        ("--max-head", "99999999999999999999", "--max-head must be between 64 and"),
        ("--grace", "nan", "--grace must be between 0 and 31536000"),
        ("--workers", "0", "--workers must be between 1 and 256"),
        ("--reserved-ports", "70000", "ports must be between 1 and 65535"),
        ("--sync", "off", "--sync must be one of full, normal"),
        ("--log-level", "loud", "--log-level must be one of debug, info, warning"),
        # A port past 65535 used to be taken modulo 65536 by the bind.
        ("--listen", "127.0.0.1:131152", "--listen port must be between 0 and 65535"),
        ("--admin", "127.0.0.1:83617", "--admin port must be between 0 and 65535"),
        ("--internal", "127.0.0.1:99999", "--internal port must be between 0"),
        ("--listen", "8080", "--listen must be HOST:PORT"),
        ("--fallback", "127.0.0.1:0", "--fallback port must be between 1 and 65535"),
        ("--domain", "bad domain", "--domain must be DNS names such as example.com"),
        ("--domain", "*.example.com", "--domain must be DNS names"),
        ("--trusted-proxy", "300.0.0.0/8", "--trusted-proxy must be networks"),
    ],
)
def test_out_of_range_settings_stop_startup(
    flag: str, value: str, message: str
) -> None:
    """Refused with a message naming the setting, in both twins alike,
    before anything listens (it used to fail per request, or in C)."""
    stderr = serve_refused(flag, value)
    assert message in stderr
    assert repr(value) in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("head", ["64", str(16 * 1024 * 1024)])
def test_in_range_extremes_are_taken_by_the_data_path(head: str) -> None:
    import asyncio

    from router.routes import ForwardingTable

    env = {"EDGE_ROUTER_MAX_BODY": str(2**63 - 1), "EDGE_ROUTER_MAX_HEAD": head}
    cfg = config.load(None, env)
    loop = asyncio.new_event_loop()
    try:
        proxy = speedups.proxy.Proxy(cfg, ForwardingTable(("localhost",)), loop)
    finally:
        loop.close()
    assert (proxy.max_body, proxy.max_head) == (2**63 - 1, int(head))


def test_a_store_in_use_is_refused_by_a_second_router(tmp_path: Path) -> None:
    state = str(tmp_path / "routes.db")
    control = str(tmp_path / "control.sock")
    command = [sys.executable, "-m", "router", "serve", "--listen", "127.0.0.1:0"]
    command += ["--state", state, "--control", control]

    @contextlib.contextmanager
    def running() -> Iterator[subprocess.Popen[str]]:
        with subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        ) as proc:
            try:
                deadline = time.monotonic() + 20
                while not os.path.exists(control):
                    assert proc.poll() is None, (
                        proc.stderr.read() if proc.stderr else ""
                    )
                    assert time.monotonic() < deadline, "router did not start"
                    time.sleep(0.05)
                yield proc
            finally:
                proc.terminate()
                proc.wait(20)

    with running() as first:
        stderr = serve_refused("--state", state)
        assert f"Route store {state} is in use by another edge-router" in stderr
        assert f"(pid {first.pid})" in stderr

    # Once the first has stopped, the store is free again.
    with running():
        pass


@pytest.mark.parametrize("flag", ["--listen", "--admin", "--internal", "--control-tcp"])
def test_an_address_in_use_is_named_with_its_flag(flag: str, tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        flags = ["--state", str(tmp_path / "routes.db"), flag, taken]
        if flag == "--control-tcp":
            flags += ["--control-secret", "s" * 32]
        stderr = serve_refused(*flags)
    assert f"cannot start: {flag} {taken}: the address is in use" in stderr
    assert f"choose another {flag}" in stderr
    # Nothing was serving, so nothing is said to drain.
    assert "draining" not in stderr and "stopped" in stderr


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("max_body", 1.5),  # was truncated to a one-byte limit
        ("workers", True),
        ("access_log", "maybe"),  # was read as false
        ("head_timeout", True),
        ("reserved_ports", [3000.5]),
    ],
)
def test_config_file_values_of_the_wrong_type_are_refused(
    setting: str, value: object, tmp_path: Path
) -> None:
    toml = tmp_path / "edge-router.toml"
    text = "true" if value is True else repr(value).replace("'", '"')
    toml.write_text(f"{setting} = {text}\n")
    with pytest.raises(SystemExit) as info:
        config.load(None, {"EDGE_ROUTER_CONFIG": str(toml)})
    assert str(info.value).startswith(f"edge-router: bad value for {setting} in {toml}")


@pytest.mark.parametrize(
    ("environ", "toml", "named"),
    [
        ({"EDGE_ROUTER_HEAD_TIMEOUT": "abc"}, "", "EDGE_ROUTER_HEAD_TIMEOUT"),
        ({"EDGE_ROUTER_WORKERS": "0"}, "", "EDGE_ROUTER_WORKERS must be between"),
        ({}, 'head_timeout = "x"\n', "head_timeout in "),
        ({}, "max-head = 1\n", "max-head in "),
    ],
)
def test_a_refused_setting_is_named_where_it_was_set(
    environ: dict[str, str], toml: str, named: str, tmp_path: Path
) -> None:
    # A flag is named as a flag; a value from the environment or from the
    # config file is named as the user wrote it there, not as a flag.
    env = dict(environ)
    if toml:
        path = tmp_path / "edge-router.toml"
        path.write_text(toml)
        env["EDGE_ROUTER_CONFIG"] = str(path)
    with pytest.raises(SystemExit) as info:
        config.load(None, env)
    assert named in str(info.value)
    assert "--" not in str(info.value)


def test_config_words_and_numbers_that_are_plainly_right_are_taken(
    tmp_path: Path,
) -> None:
    toml = tmp_path / "edge-router.toml"
    toml.write_text(
        'access_log = "off"\nmax_body = 100\ngrace = 2\n'
        'domain = ["Preview.Example.COM."]\n'
    )
    cfg = config.load(
        None, {"EDGE_ROUTER_CONFIG": str(toml), "EDGE_ROUTER_DEMO": "yes"}
    )
    assert cfg.access_log is False and cfg.demo is True
    assert cfg.max_body == 100 and cfg.grace == 2.0
    assert cfg.domain == ["preview.example.com"]


def test_listeners_on_an_address_are_bound_without_the_loop() -> None:
    # A literal address: a socket bound as asyncio would bind it.
    with contextlib.closing(bound_socket("127.0.0.1", 0)) as sock:
        assert sock is not None
        assert sock.getsockname()[0] == "127.0.0.1"
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert not sock.getblocking()
    # IPv6 "::1" (or "::") takes IPv6 only, as create_server does.
    if socket.has_ipv6:
        try:
            v6 = bound_socket("::1", 0, reuse_port=True)
        except OSError:
            v6 = None  # no IPv6 loopback on this machine
        if v6 is not None:
            with contextlib.closing(v6):
                assert v6.family == socket.AF_INET6
                assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
                assert v6.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    # A name, or every address, is left to the loop's resolver.
    assert bound_socket("localhost", 0) is None
    assert bound_socket("", 0) is None
    # A port in use is an OSError, which start-up names with its flag.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        with pytest.raises(OSError) as info:
            bound_socket("127.0.0.1", holder.getsockname()[1])
    assert info.value.errno == errno.EADDRINUSE


def test_control_tcp_without_a_secret_is_refused_in_flag_words() -> None:
    stderr = serve_refused("--control-tcp", "127.0.0.1:0")
    assert "--control-tcp needs --control-secret" in stderr
