"""``edge-router ctl`` against a real router: output, ``--json``, exit codes.

Most cases call ``ctl.main`` in-process (fast, output via capsys); a few run
``python -m router.ctl`` in a subprocess to check what a shell script sees.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from controlkit import RouterThread

from router import ctl
from router.client import ControlClient

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RouterThread]:
    router = RouterThread(tmp_path).start()
    yield router
    router.stop()


def run(
    capsys: pytest.CaptureFixture[str], server: RouterThread, *argv: str
) -> tuple[int, str, str]:
    code = ctl.main(["--control", server.path, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_process(
    *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_ROUTER_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "router.ctl", *argv],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
    )


# -- readable output --------------------------------------------------------------


def test_expose_prints_the_url(
    capsys: pytest.CaptureFixture[str], server: RouterThread
) -> None:
    code, out, err = run(capsys, server, "expose", "box", "8080", "--token", "abc")
    assert (code, out, err) == (0, "http://8080-box-abc.localhost/\n", "")


def test_ls_prints_a_table(
    capsys: pytest.CaptureFixture[str], server: RouterThread
) -> None:
    code, out, _ = run(capsys, server, "ls", "box")
    assert (code, out) == (0, "box has no exposed ports\n")

    run(capsys, server, "expose", "box", "8080", "--token", "abc", "--name", "web")
    run(capsys, server, "expose", "box", "5173", "--token", "vite")
    code, out, _ = run(capsys, server, "ls", "box")
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == ["PORT", "STATUS", "NAME", "EXPOSED", "URL"]
    assert lines[1].split()[:3] == ["5173", "active", "-"]
    assert lines[1].split()[4] == "http://5173-box-vite.localhost/"
    assert lines[2].split()[:3] == ["8080", "active", "web"]
    # The columns line up.
    assert len({line.index("http") for line in lines[1:]}) == 1


def test_every_verb_in_text(
    capsys: pytest.CaptureFixture[str], server: RouterThread
) -> None:
    run(capsys, server, "expose", "box", "8080", "--token", "abc")
    assert run(capsys, server, "validate", "box", "8080", "abc")[:2] == (0, "valid\n")
    assert run(capsys, server, "validate", "box", "8080", "xyz")[:2] == (
        1,
        "not valid\n",
    )
    assert run(capsys, server, "sandbox", "set", "box", "--state", "stopped")[:2] == (
        0,
        "sandbox box: stopped, upstream host 127.0.0.1\n",
    )
    code, out, _ = run(capsys, server, "snapshot")
    assert code == 0 and out.startswith("version 2: 1 sandboxes, 1 routes\n")
    assert "box      8080  abc" in out
    assert run(capsys, server, "unexpose", "box", "8080")[:2] == (
        0,
        "unexposed box port 8080\n",
    )
    assert run(capsys, server, "unexpose", "box", "8080")[:2] == (
        0,
        "box port 8080 was not exposed\n",
    )
    assert run(capsys, server, "sandbox", "destroy", "box")[:2] == (
        0,
        "destroyed sandbox box (0 routes)\n",
    )
    code, out, _ = run(capsys, server, "stats")
    assert code == 0 and "version" in out and "control_clients" in out
    code, out, _ = run(capsys, server, "ping")
    assert code == 0 and out.startswith(f"pong from {server.path} in ")

    code, out, _ = run(capsys, server, "watch", "--since", "0", "--count", "4")
    assert code == 0
    assert out.splitlines() == [
        "v1 sandbox box running, upstream 127.0.0.1",
        "v1 expose box port 8080 token abc",
        "v2 sandbox box stopped, upstream 127.0.0.1",
        "v3 revoke box port 8080",
        "v4 sandbox box destroyed",
    ]
    # A watcher ahead of the router (its store was replaced) is told so.
    code, out, _ = run(capsys, server, "watch", "--since", "9", "--count", "1")
    assert code == 0
    assert out.splitlines() == [
        "v4 snapshot: 0 sandboxes, 0 routes (resync: the router is at v4, before v9)"
    ]


def test_stats_text_names_nested_counters_with_dots(
    capsys: pytest.CaptureFixture[str], server: RouterThread
) -> None:
    # As ``serve`` adds them: the proxy's counters and one entry per worker.
    server.router.stats_hooks.append(
        lambda: {
            "proxy": {"requests": 12, "errors": 0},
            "workers": [{"worker": 0, "pid": 41, "draining": False}],
        }
    )
    code, out, _ = run(capsys, server, "stats")
    rows = dict(line.split(None, 1) for line in out.splitlines())
    assert code == 0
    assert rows["proxy.requests"] == "12" and rows["proxy.errors"] == "0"
    assert rows["workers.0.pid"] == "41" and rows["workers.0.draining"] == "false"
    assert rows["log_oldest"] == "null" and rows["routes"] == "0"
    assert "{" not in out and "[" not in out


# -- JSON output -----------------------------------------------------------------


def test_json_output(capsys: pytest.CaptureFixture[str], server: RouterThread) -> None:
    code, out, _ = run(
        capsys, server, "--json", "expose", "box", "8080", "--token", "abc"
    )
    exposed = orjson.loads(out)
    assert code == 0
    assert exposed["url"] == "http://8080-box-abc.localhost/"
    assert set(exposed) == {"port", "url", "name", "token", "exposedAt"}

    # --json is accepted after the verb too.
    code, out, _ = run(capsys, server, "ls", "box", "--json")
    assert code == 0
    assert [p["status"] for p in orjson.loads(out)] == ["active"]

    code, out, _ = run(capsys, server, "validate", "box", "8080", "nope", "--json")
    assert (code, orjson.loads(out)) == (1, False)

    code, out, _ = run(capsys, server, "--json", "snapshot")
    assert orjson.loads(out) == server.snapshot()

    code, out, _ = run(capsys, server, "--json", "stats")
    assert orjson.loads(out)["routes"] == 1

    code, out, _ = run(
        capsys, server, "--json", "sandbox", "set", "box", "--upstream-host", "::1"
    )
    assert orjson.loads(out) == {
        "name": "box",
        "upstream_host": "::1",
        "state": "running",
    }

    code, out, _ = run(capsys, server, "--json", "watch", "--count", "1")
    (message,) = [orjson.loads(line) for line in out.splitlines()]
    assert message["version"] == 2 and message["snapshot"] == server.snapshot()


# -- exit codes ------------------------------------------------------------------


def test_refused_op_exits_1_with_the_code_on_stderr(
    capsys: pytest.CaptureFixture[str], server: RouterThread
) -> None:
    code, out, err = run(capsys, server, "expose", "box", "80")
    assert (code, out) == (1, "")
    assert "[INVALID_PORT]" in err and "out of range" in err

    run(capsys, server, "expose", "box", "8080", "--token", "abc")
    code, _, err = run(capsys, server, "expose", "box", "8081", "--token", "abc")
    assert code == 1
    assert "Token 'abc' is already in use by port 8080 [TOKEN_IN_USE]" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["expose", "box"],
        ["expose", "box", "eighty"],
        ["expose", "box", "8080", "--host", "keep"],
        ["sandbox"],
        ["sandbox", "set", "box", "--state", "paused"],
        ["watch", "--since", "-1"],
        ["frobnicate"],
        [],
        # Refused here as the router would refuse them, not sent as 8080.
        ["expose", "box", "08080"],
        ["expose", "box", "99999999999999999999999"],
        ["--timeout", "0", "ping"],
        ["--timeout", "-1", "ping"],
        ["ping", "--timeout", "nan"],
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], server: RouterThread, argv: list[str]
) -> None:
    code, out, err = run(capsys, server, *argv)
    assert code == 2 and out == ""
    assert "usage:" in err


def test_unreachable_router_exits_3(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = ctl.main(["--control", str(tmp_path / "nobody.sock"), "ping"])
    _, err = capsys.readouterr()
    assert code == 3
    assert "Cannot reach the router" in err and "[UNREACHABLE]" in err

    code = ctl.main(["--control", "tcp://127.0.0.1:1", "--secret", "s", "ping"])
    assert code == 3


def test_tcp_without_a_secret_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGE_ROUTER_CONTROL_SECRET", raising=False)
    code = ctl.main(["--control", "tcp://127.0.0.1:1", "ping"])
    assert code == 2
    assert "needs the router's secret" in capsys.readouterr().err


def test_a_reader_that_leaves_early_is_not_an_error(server: RouterThread) -> None:
    # ``ctl snapshot | head -1``: the pipe closes under ctl's output, which
    # is more than a pipe holds (64 KiB), so a write fails.
    with ControlClient(server.path) as c:
        c.batch(
            [
                {"op": "expose_port", "sandbox": f"box-{i}", "port": 8080}
                for i in range(2000)
            ]
        )
    with subprocess.Popen(
        [sys.executable, "-m", "router.ctl", "--control", server.path, "snapshot"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(30) == 0
    assert err == ""


def test_text_tables_show_control_characters_escaped() -> None:
    out = io.StringIO()
    ctl._table(out, ["NAME", "URL"], [["a\x1b[2Jb\nc", "http://x/"]])
    assert out.getvalue().splitlines()[1] == "a\\x1b[2Jb\\nc  http://x/"


def test_control_address_from_the_environment(
    capsys: pytest.CaptureFixture[str],
    server: RouterThread,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("EDGE_ROUTER_CONTROL", raising=False)
    assert ctl.main(["ping"]) == 2
    assert "EDGE_ROUTER_CONTROL" in capsys.readouterr().err

    monkeypatch.setenv("EDGE_ROUTER_CONTROL", server.path)
    assert ctl.main(["ping"]) == 0
    assert ctl.main(["--control", "tcp://nohost", "ping"]) == 2


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["--help"]) == 0
    assert "Exit status" in capsys.readouterr().out


def test_tcp_with_secret_from_the_environment(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    router = RouterThread(tmp_path, tcp=True).start()
    try:
        monkeypatch.setenv("EDGE_ROUTER_CONTROL_SECRET", router.secret)
        assert ctl.main(["--control", router.tcp_address, "ping"]) == 0
        monkeypatch.setenv("EDGE_ROUTER_CONTROL_SECRET", "wrong")
        assert ctl.main(["--control", router.tcp_address, "ping"]) == 1
        assert "[AUTH_FAILED]" in capsys.readouterr().err
    finally:
        router.stop()


# -- as a separate process -------------------------------------------------------


def test_as_a_process(server: RouterThread) -> None:
    done = run_process("--control", server.path, "--json", "expose", "box", "8080")
    assert done.returncode == 0, done.stderr
    token = orjson.loads(done.stdout)["token"]

    done = run_process(
        "validate", "box", "8080", token, env={"EDGE_ROUTER_CONTROL": server.path}
    )
    assert (done.returncode, done.stdout) == (0, "valid\n")

    done = run_process("--control", server.path, "expose", "box", "3000")
    assert done.returncode == 1 and "[RESERVED_PORT]" in done.stderr

    done = run_process("--control", server.path, "expose")
    assert done.returncode == 2 and "usage:" in done.stderr

    done = run_process("--control", server.path + ".missing", "ping")
    assert done.returncode == 3 and "[UNREACHABLE]" in done.stderr

    with ControlClient(server.path) as c:
        assert c.get_exposed_ports("box")[0].port == 8080
