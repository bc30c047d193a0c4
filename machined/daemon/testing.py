"""Test and benchmark helpers: the agent's mesh on in-memory fakes.

:class:`FakeMeshWorld` hands :class:`~machined.daemon.Agent` a mesh factory whose engines use
:class:`FakeWireGuard`, the fake link and nftables managers, a static host, a recording prober and a
:class:`FakeDiscovery` the test fills with affiliates (:func:`remote_affiliate`). :meth:`FakeMeshWorld.
set_peers_alive` makes every configured peer handshake and answer probes, so the engine sees it up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from discovery.crypto import endpoint_from_addr
from kubespan.dataplane.fake import FakeLinkManager, FakeNftManager
from kubespan.engine import Mesh
from kubespan.hostinfo import StaticHost
from kubespan.identity import LinkInfo, generate_private_key, ula_prefix
from kubespan.testing import Discovered, FakeDiscovery, FakeProber
from kubespan.wireguard.fake import FakeWireGuard
from kubespan.wireguard.types import PublicKey
from kubespan.wiring import MeshDeps, MeshRunner, build_mesh
from machined.config import MeshSettings
from spanapi.discovery.client import affiliate_pb2


def remote_affiliate(
    cluster_id: str, index: int, addr: str, *, name: str | None = None, port: int = 51820
) -> tuple[PublicKey, Discovered]:
    """A remote node ``node-<index>`` with a fresh key, mesh address ``index`` in the cluster's /64 and
    one endpoint ``addr:port``."""
    key = generate_private_key().public_key()
    node_id = f"node-{index:04d}"
    a = affiliate_pb2.Affiliate(
        node_id=node_id, nodename=name or node_id, hostname=name or node_id, machine_type="worker"
    )
    a.addresses.append(ipaddress.ip_address(addr).packed)
    a.kubespan.public_key = key.b64
    a.kubespan.address = ula_prefix(cluster_id)[index + 16].packed
    return key, Discovered(node_id, a, (endpoint_from_addr(ipaddress.ip_address(addr), port),))


@dataclass
class FakeMeshWorld:
    """A mesh factory on fakes, and handles on the fakes of the mesh it built last."""

    discovery: FakeDiscovery = field(default_factory=FakeDiscovery)
    poll_interval: float = 0.05
    mac: bytes = bytes.fromhex("2e1ab6538169")
    address: str = "10.5.0.1/24"
    wg: FakeWireGuard | None = None
    links: FakeLinkManager | None = None
    nft: FakeNftManager | None = None
    prober: FakeProber | None = None
    runners: list[MeshRunner] = field(default_factory=list)
    fail_next: int = 0  # make the next N builds fail
    fail_error: Exception | None = None  # what they raise (default: a RuntimeError)
    _alive: asyncio.Task[None] | None = None

    async def __call__(self, settings: MeshSettings, hostname: str) -> MeshRunner:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise self.fail_error or RuntimeError("fake: mesh start failed")
        opts = settings.options(hostname)
        timings = dataclasses.replace(opts.config.timings, poll_interval=self.poll_interval)
        opts = dataclasses.replace(opts, config=dataclasses.replace(opts.config, timings=timings))
        self.wg = FakeWireGuard()
        self.links = FakeLinkManager.from_config(opts.config)
        self.nft = FakeNftManager()
        self.prober = FakeProber()
        host = StaticHost(
            [LinkInfo("eth0", self.mac, physical=True), LinkInfo("lo", None, False, True)],
            [ipaddress.ip_interface(self.address)],
        )
        runner = await build_mesh(
            opts,
            discovery_urls=settings.discovery_urls,
            deps=MeshDeps(
                backend=self.wg,
                links=self.links,
                nft=self.nft,
                host=host,
                prober=self.prober,
                discovery=self.discovery,
            ),
        )
        self.runners.append(runner)
        return runner

    @property
    def mesh(self) -> Mesh | None:
        return self.runners[-1].mesh if self.runners else None

    def pulse(self, keys: Sequence[PublicKey] | None = None, *, answer: bool = True) -> None:
        """One round of traffic from us to ``keys`` (default: every configured peer); with ``answer``
        they handshake, send back and answer probes, without it nothing comes back."""
        wg, prober = self.wg, self.prober
        if wg is None or wg.device is None or prober is None:
            return
        for k in list(wg.device.peers) if keys is None else keys:
            with contextlib.suppress(KeyError):
                if answer:
                    wg.traffic(k, rx=148, tx=148, handshake=True)
                    prober.answer(k)
                else:
                    wg.traffic(k, tx=148)

    def set_peers_alive(self, alive: bool = True, *, only: Sequence[PublicKey] | None = None) -> None:
        """Keep ``only`` (default: every peer) answering in the background, or (``alive=False``) keep
        sending to them with nothing coming back, as when the peers are gone."""
        if self._alive is not None:
            self._alive.cancel()
            self._alive = None

        async def loop() -> None:
            while True:
                self.pulse(only, answer=alive)
                await asyncio.sleep(self.poll_interval / 2)

        self._alive = asyncio.get_running_loop().create_task(loop(), name="fake-peers-alive")

    def stop(self) -> None:
        if self._alive is not None:
            self._alive.cancel()
            self._alive = None


def mesh_mac(index: int) -> str:
    """A locally administered MAC for lab node ``index`` (deterministic mesh addresses)."""
    return f"02:00:00:00:{index >> 8:02x}:{index & 0xFF:02x}"
