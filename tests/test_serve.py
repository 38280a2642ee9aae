"""The quick start: ``edge-router serve`` with no settings serves a demo."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def test_version_names_the_hot_path() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "router", "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("edge-router ")
    if os.environ.get("EDGE_ROUTER_PURE"):
        assert "pure-Python twins" in out
    else:
        assert "compiled hot path" in out


def test_demo_route_answers_curl() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "router", "serve", "--listen", "127.0.0.1:0"],
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
