"""Test and benchmark helpers: an in-process machined API (the real servicers over a small fake node)
on a unix socket, an in-process apid, and mTLS client channels."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from machined import gen, pki
from machined.api.server import ApiServer, serve
from machined.config import ConfigManager, ConfigStore, MachineConfig
from machined.config.testing import config_yaml
from machined.daemon import MachineEvents
from machined.daemon.logcapture import make_rings
from machined.services import EventRing
from machined.state import DEFINITIONS, Resource, State, register_all
from machined.state.catalog import KUBESPAN_IDENTITY, NS_KUBESPAN

from .main import Apid


class FakeNode:
    """What :func:`machined.api.server.serve` needs; one sensitive resource (KubeSpanIdentities/local)."""

    def __init__(self, hostname: str, tmp: Path, state: State | None = None) -> None:
        """``state``: a registry with the resource definitions registered (default: a new one)."""
        self.hostname = hostname
        if state is None:
            state = State()
            register_all(state, DEFINITIONS)
        self.state = state
        self.config = ConfigManager(ConfigStore(tmp / "cfg"))
        self.config.boot(MachineConfig.parse(config_yaml(cluster_id="c")))
        self.supervisor = None
        self.events = MachineEvents()
        self.machined_events = EventRing()
        self.rings = make_rings()

    async def seed(self) -> None:
        await self.state.create(
            Resource.new(
                NS_KUBESPAN, KUBESPAN_IDENTITY, "local", {"privateKey": "PRIVATE", "publicKey": "pub"}
            ),
            owner="test",
        )
        self.rings["machined"].append(f"hello from {self.hostname}")

    def log_ring(self, id: str) -> Any:
        return self.rings.get(id)


async def start_fake_machined(hostname: str, tmp: Path) -> tuple[FakeNode, ApiServer, Path]:
    node = FakeNode(hostname, tmp)
    await node.seed()
    path = tmp / f"{hostname}.sock"
    return node, await serve(node, path), path


async def start_machined(hostname: str, tmp: Path) -> tuple[ApiServer, Path]:
    _node, srv, path = await start_fake_machined(hostname, tmp)
    return srv, path


@dataclass
class Cluster:
    """A CA and a control-plane config file holding it."""

    secrets: gen.Secrets
    config: Path

    @classmethod
    def create(cls, tmp: Path) -> Cluster:
        s = gen.gen_secrets()
        g = gen.gen_config("test", "https://127.0.0.1:6443", s, discovery=["https://discovery.invalid/"])
        path = tmp / "controlplane.yaml"
        pki.write_secret_file(path, g.controlplane)
        return cls(s, path)

    @property
    def ca(self) -> pki.KeyPair:
        return self.secrets.os_ca

    def client(self, *roles: str, **kw: Any) -> pki.KeyPair:
        return pki.issue_client(self.ca, list(roles), **kw)

    def credentials(self, kp: pki.KeyPair | None) -> grpc.ChannelCredentials:
        if kp is None:
            return grpc.ssl_channel_credentials(self.ca.crt)
        return grpc.ssl_channel_credentials(self.ca.crt, kp.key, kp.crt)

    def channel(self, port: int, kp: pki.KeyPair | None) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(f"127.0.0.1:{port}", self.credentials(kp))


async def start_apid(
    cluster: Cluster,
    socket_path: Path,
    hostname: str = "apid",
    *,
    cert_ttl: dt.timedelta | None = None,
    config: Path | None = None,
    trustd_listen: str | None = None,
    trustd_endpoint: list[str] | None = None,
    trustd_wait: float = 10.0,
    addresses: tuple[str, ...] = (),
    backend_channels: int = 256,
    backend_idle: float = 300.0,
) -> Apid:
    ns = argparse.Namespace(
        config=config or cluster.config,
        trustd_listen=trustd_listen,
        trustd_endpoint=trustd_endpoint or [],
        trustd_wait=trustd_wait,
        machined_socket=socket_path,
        listen="127.0.0.1:0",
        hostname=hostname,
        address=["127.0.0.1", *addresses],
        node_port=50000,
        cert_ttl=(cert_ttl or pki.SERVER_TTL).total_seconds(),
        backend_channels=backend_channels,
        backend_idle=backend_idle,
        debug=False,
    )
    a = Apid(ns)
    await a.start()
    return a


def ed25519_ca() -> pki.KeyPair:
    """A CA as Talos generates it (Ed25519); its leaves are Ed25519 too (TLS through OpenSSL handles them)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return pki.generate_ca("talos", dt.timedelta(days=1), key=ed25519.Ed25519PrivateKey.generate())


@contextlib.asynccontextmanager
async def apid_nodes(cluster: Cluster, tmp: Path, *names: str) -> AsyncIterator[list[Apid]]:
    """For each of ``names``, a fake machined and an apid in front of it (in this process); all are
    stopped on exit, apids first."""
    servers: list[ApiServer] = []
    apids: list[Apid] = []
    try:
        for name in names:
            srv, sock = await start_machined(name, tmp)
            servers.append(srv)
            apids.append(await start_apid(cluster, sock, name))
        yield apids
    finally:
        for a in apids:
            await a.stop()
        for srv in servers:
            await srv.stop()


def apid_command() -> list[str]:
    """The argv prefix that runs apid: the console script beside this Python, else ``-m``."""
    exe = shutil.which("apid", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "machined.apid.main"]


def free_port() -> int:
    """A loopback TCP port nothing listens on (free when asked; nothing reserves it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_processes(procs: list[subprocess.Popen[Any]], timeout: float = 10) -> None:
    """SIGTERM ``procs`` last first, each given ``timeout`` seconds before SIGKILL."""
    for p in reversed(procs):
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
