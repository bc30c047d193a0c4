"""proto_spec through real machined and apid processes, decoded as talosctl decodes it.

Every type the resource definitions list is Listed (and its first resource fetched with Get) through
an apid process in front of a real ``machined`` over mTLS; every reply's ``proto_spec`` is decoded
with Talos's messages (:func:`machined.api.protospec_testing.check_wire`) and must hold the same
fields as its ``yaml_spec``. On the host (no mesh: config, runtime, network and cluster identity
types hold resources) and, as root, on a two-node mesh in network namespaces (the kubespan and
cluster types hold resources too).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from machined_lab import DISC, build, full_mesh, wait

from machined import gen, pki
from machined.api.protospec_testing import check_wire
from machined.apid.testing import Cluster, apid_command, free_port, stop_processes
from machined.config.testing import config_yaml
from machined.state import DEFINITIONS
from netns.lab import Lab
from spanapi.talos.cosi import meta_pb2, state_pb2, state_pb2_grpc

DEFINITION_TYPE = "ResourceDefinitions.meta.cosi.dev"


def start_apid(config: Path, sock: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [*apid_command(), "--config", str(config), "--machined-socket", str(sock),
         "--listen", f"127.0.0.1:{port}", "--hostname", "node", "--trustd-listen", "off"],
        stdout=subprocess.DEVNULL, stderr=open(log, "w"),
    )  # fmt: skip
    return proc, port


async def list_all(cluster: Cluster, port: int, log: Path) -> dict[str, int]:
    """Every defined type Listed and decoded (its first resource also with Get): type -> count."""
    async with cluster.channel(port, cluster.client("os:admin")) as ch:
        s = state_pb2_grpc.StateStub(ch)
        for _ in range(150):  # apid and machined starting
            try:
                defs = [
                    r.resource
                    async for r in s.List(
                        state_pb2.ListRequest(namespace="meta", type=DEFINITION_TYPE), timeout=5
                    )
                ]
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
        else:
            raise AssertionError((await asyncio.to_thread(log.read_text))[-2000:])
        counts: dict[str, int] = {}
        for d in defs:
            check_wire(d)
            spec = meta_pb2.ResourceDefinitionSpec.FromString(d.spec.proto_spec)  # what talosctl resolves
            assert spec.resource_type.lower() == d.metadata.id and spec.default_namespace
            items = [
                r.resource
                async for r in s.List(
                    state_pb2.ListRequest(namespace=spec.default_namespace, type=spec.resource_type),
                    timeout=10,
                )
            ]
            for r in items:
                check_wire(r)
            if items:
                got = await s.Get(
                    state_pb2.GetRequest(
                        namespace=spec.default_namespace, type=spec.resource_type, id=items[0].metadata.id
                    ),
                    timeout=5,
                )
                check_wire(got.resource)
            counts[spec.resource_type] = len(items)
        return counts


def test_every_served_type_decodes_through_apid_from_a_host_machined(tmp_path: Path) -> None:
    machined = shutil.which("machined", path=os.path.dirname(sys.executable))
    if machined is None:
        pytest.skip("machined console script not installed")
    cluster = Cluster.create(tmp_path)
    mcfg = tmp_path / "machined.yaml"
    mcfg.write_text(
        config_yaml(kubespan=False, machine_type="controlplane", agent={"stateDir": str(tmp_path / "state")})
    )
    sock = tmp_path / "machined.sock"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            subprocess.Popen(
                [
                    machined,
                    "--config",
                    str(mcfg),
                    "--state-dir",
                    str(tmp_path / "state"),
                    "--socket",
                    str(sock),
                    "--hostname",
                    "real-node",
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(tmp_path / "machined.log", "w"),
            )
        )
        deadline = time.monotonic() + 20
        while not sock.exists():
            if procs[0].poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"machined did not start: {(tmp_path / 'machined.log').read_text()[-500:]}")
            time.sleep(0.1)
        apid, port = start_apid(cluster.config, sock, tmp_path / "apid.log")
        procs.append(apid)
        counts = asyncio.run(list_all(cluster, port, tmp_path / "apid.log"))
    finally:
        stop_processes(procs)
    assert set(counts) == {d.type for d in DEFINITIONS}
    held = {
        "ResourceDefinitions.meta.cosi.dev",
        "MachineConfigs.config.talos.dev",
        "KubeSpanConfigs.kubespan.talos.dev",
        "Services.v1alpha1.talos.dev",
        "MachineStatuses.runtime.talos.dev",
        "LinkStatuses.net.talos.dev",
        "AddressStatuses.net.talos.dev",
        "RouteStatuses.net.talos.dev",
        "NodeAddresses.net.talos.dev",
        "Identities.cluster.talos.dev",
    } & set(counts)
    assert not [t for t in held if counts[t] == 0], counts


@pytest.mark.root
def test_every_served_type_decodes_through_apid_on_a_mesh(tmp_path: Path) -> None:
    """Two machined agents meshed in network namespaces; apid on the host in front of n1's socket."""
    with Lab() as lab:
        agents = build(lab, {"a": ["n1", "n2"]})
        secrets = gen.gen_secrets()
        g = gen.gen_config("lab", "https://10.1.0.11:6443", secrets, discovery=[f"http://{DISC}:3000"])
        for a in agents:
            docs = list(yaml.safe_load_all(g.controlplane if a.index == 1 else g.worker))
            a.cluster_id = docs[0]["cluster"]["id"]
            pki.write_secret_file(a.config, yaml.safe_dump_all([*docs, a.agent_config()], sort_keys=False))
        for a in agents:
            a.start()
        wait("machine API sockets", lambda: all(a.socket.exists() for a in agents), 30, agents)
        wait("full mesh", lambda: full_mesh(agents), 90, agents)
        n1 = agents[0]
        cluster = Cluster(secrets, n1.config)
        apid, port = start_apid(n1.config, n1.socket, tmp_path / "apid.log")
        try:

            def mesh_types_held() -> dict[str, int] | None:
                counts = asyncio.run(list_all(cluster, port, tmp_path / "apid.log"))
                want = [
                    "KubeSpanIdentities.kubespan.talos.dev",
                    "KubeSpanPeerSpecs.kubespan.talos.dev",
                    "KubeSpanPeerStatuses.kubespan.talos.dev",
                    "KubeSpanEndpoints.kubespan.talos.dev",
                    "Affiliates.cluster.talos.dev",
                    "Members.cluster.talos.dev",
                ]
                return counts if all(counts.get(t) for t in want) else None

            counts = wait("every mesh type holds resources", mesh_types_held, 60, agents, every=2)
        finally:
            stop_processes([apid])
    assert set(counts) == {d.type for d in DEFINITIONS}
    assert counts["Members.cluster.talos.dev"] == 2 and counts["KubeSpanPeerStatuses.kubespan.talos.dev"] == 1
