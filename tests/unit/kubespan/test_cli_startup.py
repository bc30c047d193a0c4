"""``kubespan run`` start-up (issue 18): what the CLI defers until used still behaves as before.

``--version`` reads the installed metadata only when given, and ``/metrics`` builds its registry on the
first scrape; the output of both is the same as when they were built at start.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from types import SimpleNamespace

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kubespan import cli, testing
from kubespan.metrics import DiscoveryCollector, MeshCollector
from kubespan.snapshot import MeshStatus, NatStatus
from kubespan.testing import peer_status


class FakeDiscovery:
    """What DiscoveryCollector reads from the running discovery client."""

    stats = SimpleNamespace(reconnects=3)

    def endpoint_status(self) -> dict[str, SimpleNamespace]:
        return {"http://10.0.0.2:3000": SimpleNamespace(connected=True, affiliates=4)}


def mesh_status() -> MeshStatus:
    peer = peer_status(
        "n2",
        node_id="id2",
        public_key="pk2",
        endpoint="10.0.0.12:51820",
        rx_bytes=100,
        tx_bytes=200,
        endpoint_switches=1,
        nat_class="eim",
    )
    return testing.mesh_status(peer, nat=NatStatus("eim", None, None))


def test_version_flag_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    try:
        expected = metadata.version("kubespan-mesh")
    except metadata.PackageNotFoundError:
        expected = "0+unknown"
    out = capsys.readouterr()
    assert out.out == f"kubespan {expected}\n"
    assert out.err == ""


def test_metrics_page_scrapes_what_an_eager_registry_does() -> None:
    st = mesh_status()
    disc = FakeDiscovery()
    eager = CollectorRegistry()
    MeshCollector(lambda: st, eager)
    DiscoveryCollector(lambda: disc, eager)

    page = cli.MetricsPage(lambda: st, lambda: disc)
    body, ctype = page.render()
    assert ctype == CONTENT_TYPE_LATEST
    assert body == generate_latest(eager)
    assert b'kubespan_peer_state{peer="n2",public_key="pk2"} 1.0' in body
    assert b'kubespan_discovery_affiliates{endpoint="http://10.0.0.2:3000"} 4.0' in body
    assert page.registry() is page.registry()  # built once: a second scrape registers nothing twice
    assert page.render()[0] == body


def test_metrics_page_before_the_mesh_and_discovery_exist_is_empty() -> None:
    body, _ = cli.MetricsPage(lambda: None, lambda: None).render()
    assert body == b""


def test_importing_the_cli_leaves_the_deferred_modules_unloaded() -> None:
    code = (
        "import sys, kubespan.cli\n"
        "print(*[m for m in ('prometheus_client', 'kubespan.metrics', 'importlib.metadata') if m in sys.modules])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout.strip() == ""


def test_the_run_path_imports_neither_aiohttp_nor_urllib_request() -> None:
    """The agent's HTTP server is spanutil.minihttp (aiohttp.web was ~0.14 s CPU per start) and only
    ``kubespan status`` needs urllib.request; the modules ``run`` imports later (wiring, discovery
    client, dataplane, backends) must not bring either back."""
    code = (
        "import sys, kubespan.cli\n"
        "import discovery.client, discovery.client.target, kubespan.wiring, kubespan.hostinfo\n"
        "import kubespan.dataplane.links, kubespan.dataplane.nft, kubespan.nat.opener, kubespan.nat.stunclient\n"
        "import kubespan.relay.agent, kubespan.wireguard.kernel, kubespan.wireguard.userspace\n"
        "print(*[m for m in ('aiohttp', 'urllib.request', 'http.client') if m in sys.modules])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout.strip() == ""
