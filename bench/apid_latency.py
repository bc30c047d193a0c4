"""apid latency: Version through apid vs directly on machined's socket; fan-out to 10 nodes.

Targets (issue 6): added latency p50 <= 2 ms; ``nodes`` fan-out to 10 nodes p99 <= 100 ms, loopback.
Each node is its own process (the real machine API servicers over a fake node on a unix socket, plus
apid with its self-issued certificate). The client runs here, one call at a time, on a warm channel.
apid terminates TLS with Python's ssl and splices to its private grpc server (machined/tlsterm.py).
Default: an ECDSA CA and grpcio's TLS client. ``--ed25519``: an Ed25519 CA (Talos's default; every
leaf Ed25519) and our Python-ssl dialer as the client (grpcio cannot do Ed25519), so the apid row
then also holds the client-side splice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2

from machined import gen, pki, tlsterm
from spanapi.talos.machine import machine_pb2_grpc

NAME = "apid_latency"
TARGET_ADDED_P50_MS = 2.0
TARGET_FANOUT_P99_MS = 100.0


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


async def serve_node(name: str, workdir: Path, config: Path) -> None:
    from machined.apid.main import Apid
    from machined.apid.testing import start_machined

    srv, sock = await start_machined(name, workdir)
    ns = argparse.Namespace(
        config=config, machined_socket=sock, listen="127.0.0.1:0", hostname=name, address=["127.0.0.1"],
        node_port=50000, cert_ttl=pki.SERVER_TTL.total_seconds(), debug=False,
    )  # fmt: skip
    apid = Apid(ns)
    await apid.start()
    print(json.dumps({"port": apid.port, "socket": str(sock)}), flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), stop.set)  # parent closes stdin to stop us
    await stop.wait()
    await apid.stop()
    await srv.stop()


class Node:
    def __init__(self, name: str, workdir: Path, config: Path) -> None:
        d = workdir / name
        d.mkdir()
        log = d / "node.log"
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--serve", name, str(d), str(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"node {name} did not start: {log.read_text()[-2000:]}")
        info = json.loads(line)
        self.port, self.socket = info["port"], info["socket"]

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def timed(call, n: int) -> list[float]:
    for _ in range(min(50, n)):  # warm-up
        await call()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def apid_channel(s: gen.Secrets, port: int, client: pki.KeyPair, dialer: bool) -> Any:
    if dialer:
        ctx = tlsterm.client_context(s.os_ca.crt, None, client.crt, client.key)
        return tlsterm.TlsChannel.create(f"127.0.0.1:{port}", ctx, [])
    creds = grpc.ssl_channel_credentials(s.os_ca.crt, client.key, client.crt)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)


async def measure(
    s: gen.Secrets, front: Node, backends: list[Node], n: int, n_fan: int, dialer: bool = False
) -> dict[str, list[float]]:
    client = pki.issue_client(s.os_ca, ["os:reader"])
    res: dict[str, list[float]] = {}
    async with (
        grpc.aio.insecure_channel(f"unix:{front.socket}") as direct_ch,
        apid_channel(s, front.port, client, dialer) as apid_ch,
    ):
        direct = machine_pb2_grpc.MachineServiceStub(direct_ch)
        via = machine_pb2_grpc.MachineServiceStub(apid_ch)
        md_reader = (("talos-role", "os:reader"),)
        res["direct"] = await timed(lambda: direct.Version(empty_pb2.Empty(), metadata=md_reader), n)
        res["apid"] = await timed(lambda: via.Version(empty_pb2.Empty()), n)
        fan_md = [("nodes", f"127.0.0.1:{b.port}") for b in backends]

        async def fan() -> None:
            r = await via.Version(empty_pb2.Empty(), metadata=fan_md, timeout=10)
            assert len(r.messages) == len(backends) and not any(m.metadata.error for m in r.messages), r

        res["fanout"] = await timed(fan, n_fan)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--fanout-calls", type=int, default=300)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--ed25519", action="store_true", help="Ed25519 CA, Python-ssl client")
    ap.add_argument("--serve", nargs=3, metavar=("NAME", "DIR", "CONFIG"), help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.serve:
        asyncio.run(serve_node(ns.serve[0], Path(ns.serve[1]), Path(ns.serve[2])))
        return 0
    nodes: list[Node] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        s = gen.gen_secrets()
        if ns.ed25519:
            from cryptography.hazmat.primitives.asymmetric import ed25519

            ca = pki.generate_ca(key=ed25519.Ed25519PrivateKey.generate())
            s = gen.Secrets(s.cluster_id, s.cluster_secret, s.token, ca)
        cfg = work / "controlplane.yaml"
        pki.write_secret_file(
            cfg,
            gen.gen_config(
                "bench", "https://127.0.0.1:6443", s, discovery=["https://discovery.invalid/"]
            ).controlplane,
        )
        try:
            t0 = time.monotonic()
            nodes = [Node("front", work, cfg)] + [Node(f"n{i}", work, cfg) for i in range(ns.nodes)]
            print(
                f"started {len(nodes)} node processes in {time.monotonic() - t0:.1f} s (cpus: {os.cpu_count()})"
            )
            res = asyncio.run(measure(s, nodes[0], nodes[1:], ns.calls, ns.fanout_calls, ns.ed25519))
        finally:
            for nd in nodes:
                nd.stop()
    for k, xs in res.items():
        print(
            f"{k:7s} n={len(xs):5d} p50={pct(xs, 50):7.3f} ms  p90={pct(xs, 90):7.3f} ms  "
            f"p99={pct(xs, 99):7.3f} ms  mean={statistics.fmean(xs):7.3f} ms"
        )
    name = NAME + ("_ed25519" if ns.ed25519 else "")
    added = pct(res["apid"], 50) - pct(res["direct"], 50)
    fan99 = pct(res["fanout"], 99)
    print(f"added latency p50: {added:.3f} ms (target <= {TARGET_ADDED_P50_MS:g} ms)")
    print(f"fan-out to {ns.nodes} nodes p99: {fan99:.2f} ms (target <= {TARGET_FANOUT_P99_MS:g} ms)")
    print(
        f"RESULT {name} added_p50_ms={added:.3f} target<={TARGET_ADDED_P50_MS:g} {verdict(added <= TARGET_ADDED_P50_MS)}"
    )
    print(
        f"RESULT {name} fanout{ns.nodes}_p99_ms={fan99:.2f} target<={TARGET_FANOUT_P99_MS:g} "
        f"{verdict(fan99 <= TARGET_FANOUT_P99_MS)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
