"""The registry's landing page over plain HTTP: its files are served from the package, /stats carries
counts and counters only (no identifier of any cluster or affiliate), and the page is self-contained."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable

from discovery.client.client import DiscoveryClient
from discovery.testing import ServerProcess
from spanapi.discovery.client import affiliate_pb2

Start = Callable[..., ServerProcess]


def get(srv: ServerProcess, path: str) -> tuple[dict[str, str], bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.ports['landing']}{path}", timeout=10) as r:
        return dict(r.headers), r.read()


async def test_stats_are_counts_only_and_the_page_is_self_contained(discovery_server: Start) -> None:
    srv = discovery_server("--no-rpc-log")  # state in a file (journal + snapshot)
    url = f"http://{srv.target}"
    async with DiscoveryClient(
        [url], cluster_id="landing-cluster-x1", secret=bytes(32), affiliate_id="aff-x1"
    ) as c:
        await c.set_local_data(affiliate_pb2.Affiliate(node_id="aff-x1", hostname="hidden-host-x1"))
        assert await c.wait_connected()
        _, raw = get(srv, "/stats")
        stats = json.loads(raw)
    assert set(stats) == {
        "clusters", "affiliates", "endpoints", "subscriptions", "rpcs", "store", "uptime_seconds", "version"
    }  # fmt: skip
    assert (stats["clusters"], stats["affiliates"], stats["subscriptions"]) == (1, 1, 1)
    assert stats["store"] == {"kind": "file", "healthy": True}
    assert stats["rpcs"]["Hello"]["codes"] == {"OK": 1}
    assert stats["rpcs"]["Watch"]["started"] == 1
    for word in ("landing-cluster-x1", "aff-x1", "hidden-host-x1", "127.0.0.1"):
        assert word.encode() not in raw

    headers, html = get(srv, "/")
    assert headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert b"/static/landing.js" in html and b"/static/landing.css" in html
    assert b"http://" not in html.replace(b"http://host:3000", b"")  # no CDN or other origin
    for name, ctype in (("landing.js", "text/javascript"), ("landing.css", "text/css")):
        headers, body = get(srv, f"/static/{name}")
        assert headers["Content-Type"].startswith(ctype) and len(body) > 500
        assert b"http://" not in body and b"https://" not in body
    try:
        get(srv, "/static/../main.py")
    except urllib.error.HTTPError as e:
        assert e.code == 404
    else:
        raise AssertionError("/static/ served a file outside its list")
