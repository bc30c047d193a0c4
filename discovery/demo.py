"""Discovery demo: a real server process and three encrypted clients on loopback.

Starts ``discovery-service``, runs three clients that publish KubeSpan-style
affiliates (AES-256-GCM data, AES-256-ECB endpoints) and watch each other,
prints what each client decrypted and what the server stored (ciphertext only),
shows a live change and a leave, then stops everything cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import logging
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from discovery.client import DiscoveredAffiliate, DiscoveryClient
from discovery.crypto import addresses_to_pb, endpoint_from_addr
from discovery.testing import ServerProcess
from spanapi.discovery.client import affiliate_pb2 as apb
from spanapi.discovery.server import cluster_pb2 as pb
from spanapi.discovery.server import cluster_pb2_grpc as rpc
from spanutil.ipcodec import ip_to_bytes

NODES = [
    ("cp-1", "controlplane", "10.0.1.10", "fd7f:175a:b97c:5602:1::1"),
    ("worker-1", "worker", "172.16.5.20", "fd7f:175a:b97c:5602:2::1"),
    ("worker-2", "worker", "192.168.77.30", "fd7f:175a:b97c:5602:3::1"),
]


def affiliate_for(name: str, role: str, ip: str, mesh: str, version: int = 1) -> apb.Affiliate:
    a = apb.Affiliate(
        node_id=f"node-id-{name}",
        hostname=f"{name}.demo.internal",
        nodename=name,
        machine_type=role,
        operating_system=f"kubespan-mesh demo v{version}",
        addresses=addresses_to_pb([ipaddress.ip_address(ip)]),
    )
    a.kubespan.public_key = base64.b64encode(os.urandom(32)).decode()
    a.kubespan.address = ip_to_bytes(ipaddress.ip_address(mesh))
    if role == "controlplane":
        a.control_plane.api_server_port = 6443
    return a


def describe(d: DiscoveredAffiliate) -> str:
    a = d.affiliate
    addrs = ",".join(str(ipaddress.ip_address(x)) for x in a.addresses)
    eps = ",".join(f"{ip}:{port}" for ip, port in d.endpoint_addrs())
    mesh = ipaddress.ip_address(a.kubespan.address) if a.kubespan.address else "-"
    return f"{a.nodename:<9} {a.machine_type:<13} addrs={addrs:<14} mesh={mesh} endpoints={eps} os='{a.operating_system}'"


async def wait_for(pred: Callable[[], bool], within: float = 15.0) -> None:
    """Poll a condition on the clients' views (they change asynchronously)."""
    async with asyncio.timeout(within):
        while not pred():  # noqa: ASYNC110 - polling several clients' views
            await asyncio.sleep(0.05)


def print_views(clients: list[tuple[str, DiscoveryClient]]) -> None:
    for name, c in clients:
        print(f"  [{name}] sees {len(c.affiliates)} peers:")
        for d in sorted(c.affiliates.values(), key=lambda d: d.affiliate.nodename):
            print(f"      {describe(d)}")


async def show_server_state(target: str, cluster_id: str) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        resp = await rpc.ClusterStub(ch).List(pb.ListRequest(cluster_id=cluster_id), timeout=5)
    print(f"  the server stores {len(resp.affiliates)} affiliates for this cluster, as opaque bytes:")
    for a in sorted(resp.affiliates, key=lambda a: a.id):
        print(
            f"      id={a.id[:22]}...  data={len(a.data)} B {a.data[:12].hex()}...  "
            f"endpoints={[f'{len(e)} B {e[:6].hex()}...' for e in a.endpoints]}"
        )
    blob = b"".join(a.data + b"".join(a.endpoints) for a in resp.affiliates)
    leaked = [n for n, *_ in NODES if n.encode() in blob] + [
        ip for _, _, ip, _ in NODES if ip.encode() in blob
    ]
    print(f"  plaintext hostnames/addresses found in stored blobs: {leaked or 'none'}")


async def run(workdir: Path) -> int:
    cluster_id = base64.b64encode(os.urandom(32)).decode()
    secret = os.urandom(32)
    print("== starting discovery-service (real process, loopback, ephemeral ports)")
    server = ServerProcess(workdir / "state", log_path=workdir / "server.log").start()
    try:
        print(
            f"  gRPC {server.target}, landing :{server.ports['landing']}, metrics :{server.ports['metrics']}"
        )
        url = f"http://{server.target}"
        clients: list[tuple[str, DiscoveryClient]] = []
        for name, role, ip, mesh in NODES:
            c = DiscoveryClient(
                [url], cluster_id=cluster_id, secret=secret, affiliate_id=f"{name}-{secrets.token_hex(16)}"
            )
            await c.start()
            await c.set_local_data(
                affiliate_for(name, role, ip, mesh), [endpoint_from_addr(ipaddress.ip_address(ip), 51820)]
            )
            clients.append((name, c))
        print("== three clients published encrypted affiliates; waiting for everyone to see everyone")
        t0 = time.monotonic()
        await wait_for(lambda: all(len(c.affiliates) == len(NODES) - 1 for _, c in clients))
        print(
            f"  converged in {time.monotonic() - t0:.2f} s; public IP seen by the server: {clients[0][1].public_ip}"
        )
        print("== what each client decrypted")
        print_views(clients)
        print("== what the server holds (it cannot decrypt any of it)")
        await show_server_state(server.target, cluster_id)

        print("== worker-1 upgrades and republishes; the others see the change through Watch")
        name, role, ip, mesh = NODES[1]
        await clients[1][1].set_local_data(
            affiliate_for(name, role, ip, mesh, version=2),
            [endpoint_from_addr(ipaddress.ip_address(ip), 51820)],
        )
        await wait_for(
            lambda: all(
                any(d.affiliate.operating_system.endswith("v2") for d in c.affiliates.values())
                for n, c in clients
                if n != name
            )
        )
        print_views([clients[0]])

        print("== worker-2 leaves the cluster (AffiliateDelete)")
        await clients[2][1].delete_local_affiliate()
        await wait_for(lambda: len(clients[0][1].affiliates) == 1 and len(clients[1][1].affiliates) == 1)
        print_views(clients[:2])
        stats = clients[0][1].stats.as_dict()
        print(f"  cp-1 client counters: {stats}")
        for _, c in clients:
            await c.close()
    finally:
        print("== stopping the server (SIGTERM: final snapshot)")
        code = server.stop()
    saved = [r for r in server.lines() if r.get("msg") == "snapshot saved"]
    if saved:
        s = saved[-1]
        print(f"  server exited with {code}; snapshot: {s['size']} bytes, {s['affiliates']} affiliates")
    else:
        print(f"  server exited with {code}; no snapshot was saved")
    print("== demo finished")
    return code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="keep the server's state and log in this directory")
    ns = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if ns.keep:
        ns.keep.mkdir(parents=True, exist_ok=True)
        return asyncio.run(run(ns.keep))
    with tempfile.TemporaryDirectory(prefix="discovery-demo-") as tmp:
        return asyncio.run(run(Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
