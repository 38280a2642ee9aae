"""``--admin``: health and counters over HTTP, for operators."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import RouterThread, upstream

from router.client import ControlClient


@pytest.fixture
def router() -> Iterator[RouterThread]:
    made = RouterThread(admin="127.0.0.1:0")
    yield made
    made.stop()


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_health_and_stats_follow_the_router(router: RouterThread) -> None:
    admin = router.service.admin_port
    assert get(admin, "/healthz") == (200, {"status": "ok"})

    with upstream() as up:
        exposed = router.expose("sb", up.port, token="tok")
        conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=5)
        conn.request("GET", "/", headers={"Host": router.host(exposed)})
        assert conn.getresponse().status == 200
        conn.close()

    status, stats = get(admin, "/stats")
    assert status == 200
    assert stats["routes"] == 1 and stats["sandboxes"] == 1
    assert stats["version"] == 1
    proxy = stats["proxy"]
    assert isinstance(proxy, dict) and proxy["requests"] == 1


def test_unknown_paths_and_methods_get_json_errors(router: RouterThread) -> None:
    admin = router.service.admin_port
    status, body = get(admin, "/nope")
    assert status == 404 and body["code"] == "NOT_FOUND"
    status, body = get(admin, "/stats", method="POST")
    assert status == 405 and body["code"] == "METHOD_NOT_ALLOWED"
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
    try:
        conn.request("DELETE", "/healthz")
        response = conn.getresponse()
        assert response.status == 405 and response.getheader("Allow") == "GET, HEAD"
    finally:
        conn.close()


def test_health_says_draining_during_shutdown(router: RouterThread) -> None:
    admin = router.service.admin_port
    assert router.service.proxy is not None
    router.loop.call_soon_threadsafe(setattr, router.service.proxy, "draining", True)
    router.call(_noop())
    assert get(admin, "/healthz") == (503, {"status": "draining"})


async def _noop() -> None:
    return None


def test_stats_count_control_clients_and_watchers(tmp_path: Path) -> None:
    made = RouterThread(admin="127.0.0.1:0", control=str(tmp_path / "control.sock"))
    try:
        admin = made.service.admin_port
        assert get(admin, "/stats")[1]["watchers"] == 0
        with ControlClient(str(tmp_path / "control.sock")) as c:
            events = c.watch()
            try:
                next(events)
                _, stats = get(admin, "/stats")
                # The client's connection, and the watch's own.
                assert stats["watchers"] == 1 and stats["control_clients"] == 2
            finally:
                events.close()
    finally:
        made.stop()
