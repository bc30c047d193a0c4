"""The engine's ports: the real adapters and the fakes implement them, and production never loads a fake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from discovery.client import DiscoveryClient
from kubespan import constants as C
from kubespan.dataplane.fake import FakeLinkManager, FakeNftManager, FakeWatch
from kubespan.dataplane.links import LinkManager
from kubespan.dataplane.nft import NftManager
from kubespan.dataplane.nftwatch import NftWatch
from kubespan.ports import (
    ChangeWatcher,
    Closable,
    DiscoveryPort,
    Leaver,
    LinkPort,
    NftPort,
    Startable,
    WireGuardBackend,
)
from kubespan.testing import FakeDiscovery
from kubespan.wireguard.fake import FakeWireGuard
from kubespan.wireguard.userspace import UserspaceBackend

ROOT = Path(__file__).resolve().parents[3]


def test_links_real_and_fake_implement_the_port_and_its_abilities() -> None:
    for links in (LinkManager(), FakeLinkManager()):
        assert isinstance(links, LinkPort)
        assert isinstance(links, ChangeWatcher)
        assert isinstance(links, Closable)


def test_nft_real_and_fake_implement_the_port() -> None:
    assert isinstance(NftManager(), NftPort)
    assert isinstance(FakeNftManager(), NftPort)
    assert isinstance(NftWatch(C.NFT_TABLE), ChangeWatcher)  # the table's watch, and its fake
    assert isinstance(FakeWatch(), ChangeWatcher)


def test_wireguard_real_and_fake_implement_the_port(tmp_path: Path) -> None:
    assert isinstance(UserspaceBackend("ks0", socket_dir=tmp_path), WireGuardBackend)
    assert isinstance(FakeWireGuard(), WireGuardBackend)


def test_discovery_client_and_the_one_fake_implement_the_port_and_its_abilities() -> None:
    client = DiscoveryClient(
        ["127.0.0.1:1"], cluster_id="c", secret=bytes(32), affiliate_id="a", on_change=None
    )
    for port in (client, FakeDiscovery()):
        assert isinstance(port, DiscoveryPort)
        assert isinstance(port, Startable) and isinstance(port, Closable) and isinstance(port, Leaver)


def test_fake_from_config_matches_the_real_one() -> None:
    cfg = C.MeshConfig(link_name="ks1", mtu=1300, routing_table=7, nft_table="ks1")
    real, fake = LinkManager.from_config(cfg), FakeLinkManager.from_config(cfg)
    for attr in ("ifname", "mtu", "table", "priority", "fwmark", "fwmask"):
        assert getattr(real, attr) == getattr(fake, attr), attr
    assert NftManager.from_config(cfg).params == FakeNftManager.from_config(cfg).params


@pytest.mark.parametrize(
    "module", ["kubespan.engine", "kubespan.wiring", "kubespan.cli", "machined.daemon", "machined.main"]
)
def test_production_imports_no_fake(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "print('\\n'.join(m for m in sys.modules if m.split('.')[-1] in ('fake', 'testing')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "", f"importing {module} loads test-support modules: {out.split()}"
