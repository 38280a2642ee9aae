"""Headless Chromium through preview URLs: what a dev server's page does.

Public reports of proxies breaking dev servers are about what browsers do:
the HMR socket's subprotocol or compression lost, a different Host on the
upgrade than on the page, cookies missing, an event stream held back until
it ends.  Here a real browser loads a page through the router and the page
checks those itself (``browser_page.html``), then a route revocation is
watched from inside the browser.

``scripts/test`` installs Chromium and sets ``EDGE_ROUTER_REQUIRE_BROWSER``,
so CI fails rather than skips when the browser is missing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from browser import COOKIE, SSE_EVENTS, SSE_GAP, Chromium, DevServer, chromium_path
from harness import RouterThread
from ws_harness import router_maker

if chromium_path() is None:
    if os.environ.get("EDGE_ROUTER_REQUIRE_BROWSER"):
        raise RuntimeError("EDGE_ROUTER_REQUIRE_BROWSER is set but chromium is not")
    pytest.skip("chromium is not installed", allow_module_level=True)


@pytest.fixture
def make_router() -> Iterator[Callable[..., RouterThread]]:
    yield from router_maker("uvloop")


@pytest.fixture
def dev() -> Iterator[DevServer]:
    server = DevServer()
    yield server
    server.stop()


@pytest.mark.parametrize("policy", ["rewrite", "preserve"])
def test_dev_server_page_in_chromium(
    make_router: Callable[..., RouterThread], dev: DevServer, policy: str
) -> None:
    router = make_router()
    page = router.expose("devbox", dev.port, token="pagetoken", host=policy)
    reports = router.expose("reporter", dev.port, token="reports")
    page_host = page["url"].split("/")[2]
    report_url = reports["url"].rstrip("/")
    assert page_host == f"{dev.port}-devbox-pagetoken.localhost:{router.port}"

    with Chromium(f"{page['url']}?report={report_url}"):
        found = dev.wait_report("main")

        # 1. The page ran at its preview URL.
        assert found["host"] == page_host

        # 2. Server-Sent Events arrive one by one, as the upstream sends
        # them (0.3 s apart), not together when the stream ends.
        sse = found["sse"]
        assert [e["data"] for e in sse] == [f"tick {n}" for n in range(1, 4)]
        assert sse[-1]["at"] - sse[0]["at"] >= SSE_GAP * (SSE_EVENTS - 1) * 0.6

        # 3. The HMR socket: the subprotocol and permessage-deflate the
        # upstream chose reached the browser; text and a 256 KiB binary
        # message (compressed frames) came back whole; the close code and
        # reason went through both ways.
        assert found["protocol"] == "vite-hmr"
        assert "permessage-deflate" in found["extensions"]
        assert found["hello"] == '{"type":"connected"}'
        assert found["echoed"] == "echo:hello"
        assert found["backLength"] == found["sentLength"] == 256 * 1024
        assert found["backSum"] == found["sentSum"]
        assert found["closed"] == {"code": 4000, "reason": "bye", "clean": True}
        assert dev.wait_closes(1)[0] == (4000, "bye")

        # 4. The upstream saw the upgrade as it saw the page: the same Host
        # (policy applied alike), the browser's Origin and its cookie.
        page_head = dev.head_of("GET", "/")
        upgrade = dev.head_of("GET", "/hmr")
        expected_host = page_host if policy == "preserve" else f"localhost:{dev.port}"
        assert page_head["host"] == upgrade["host"] == expected_host
        assert page_head["x-forwarded-host"] == upgrade["x-forwarded-host"]
        assert upgrade["x-forwarded-host"] == page_host
        assert upgrade["origin"] == f"http://{page_host}"
        assert COOKIE in upgrade["cookie"]
        assert upgrade["sec-websocket-protocol"] == "vite-hmr"

        # 5. Revocation, seen from the browser: the open tunnel gets a close
        # frame with 1008, the upstream 1001, and the page's URL is gone.
        dev.wait_report("ready")
        router.commit({"op": "unexpose_port", "sandbox": "devbox", "port": dev.port})
        revoked = dev.wait_report("revoked")
        assert revoked["closed"]["code"] == 1008
        assert revoked["closed"]["reason"] == "route revoked"
        assert revoked["closed"]["clean"] is True
        assert revoked["status"] == 404
        assert revoked["answer"]["code"] == "INVALID_TOKEN"
        assert dev.wait_closes(2)[1][0] == 1001
