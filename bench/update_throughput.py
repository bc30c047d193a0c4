"""AffiliateUpdate throughput of discovery-service as a ratio to a no-op grpc.aio handler.

Both servers run as separate processes on loopback; the load comes from h2load
(nghttp2's C load generator, a separate process) sending identical gRPC frames
to each, so the Python client is never the bottleneck. Rounds alternate between
the two servers; the median of each is compared. Target: ratio >= 0.8.

The discovery server runs with its defaults (per-RPC log line, journal on disk),
except the per-IP rate limit, which is disabled because all load comes from 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from discovery.testing import ServerProcess
from spanapi.discovery.server import cluster_pb2 as pb

TARGET = 0.8
METHOD = "/sidero.discovery.server.Cluster/AffiliateUpdate"


def grpc_frame(msg: bytes) -> bytes:
    return b"\x00" + len(msg).to_bytes(4, "big") + msg


def h2load(port: int, body: Path, seconds: float, clients: int, streams: int) -> float:
    out = subprocess.run(
        [
            "h2load",
            "-D",
            str(int(seconds)),
            "--warm-up-time",
            "1",
            "-c",
            str(clients),
            "-m",
            str(streams),
            "-d",
            str(body),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            f"http://127.0.0.1:{port}{METHOD}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    failed = re.search(r"requests: .* (\d+) failed, (\d+) errored", out)
    if not m or (failed and (int(failed.group(1)) or int(failed.group(2)))):
        raise RuntimeError(f"h2load failed:\n{out}")
    return float(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument(
        "--server-arg", action="append", default=[], help="extra discovery-service flag (repeatable)"
    )
    ns = ap.parse_args()

    req = pb.AffiliateUpdateRequest(
        cluster_id="bench-cluster-" + "x" * 30,
        affiliate_id="bench-affiliate-" + "y" * 27,
        affiliate_data=os.urandom(600),
        affiliate_endpoints=[os.urandom(16), os.urandom(32)],
    )
    req.ttl.seconds = 1800
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body.bin"
        body.write_bytes(grpc_frame(req.SerializeToString()))
        noop = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("noop_server.py"))],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert noop.stdout is not None
            noop_port = int(noop.stdout.readline().split()[1])
            with ServerProcess(
                Path(tmp) / "state", *ns.server_arg, log_path=Path(tmp) / "server.log"
            ) as server:
                port = server.ports["grpc"]
                base, ours = [], []
                for _ in range(ns.rounds):
                    base.append(h2load(noop_port, body, ns.seconds, ns.clients, ns.streams))
                    ours.append(h2load(port, body, ns.seconds, ns.clients, ns.streams))
                metrics = server.http_get("metrics", "/metrics").decode()
                ok = re.search(
                    r'grpc_server_handled_total\{.*grpc_code="OK".*grpc_method="AffiliateUpdate".*\} ([\d.e+]+)',
                    metrics,
                )
                bad = re.findall(
                    r'grpc_server_handled_total\{grpc_code="(?!OK)[A-Z_]+",.*grpc_method="AffiliateUpdate".*\} ([\d.e+]+)',
                    metrics,
                )
                journal = sum(p.stat().st_size for p in (Path(tmp) / "state").glob("*journal*"))
        finally:
            noop.terminate()
            noop.wait(5)
    b, o = statistics.median(base), statistics.median(ours)
    ratio = o / b
    print(f"no-op grpc.aio handler : {b:10.0f} req/s  (rounds: {', '.join(f'{x:.0f}' for x in base)})")
    print(f"discovery AffiliateUpdate: {o:8.0f} req/s  (rounds: {', '.join(f'{x:.0f}' for x in ours)})")
    print(
        f"server-side OK responses: {ok.group(1) if ok else '?'}; non-OK: {bad or 'none'}; journal bytes: {journal}"
    )
    verdict = "PASS" if ratio >= TARGET else "MISS"
    print(f"RESULT update_throughput ratio={ratio:.3f} target>={TARGET} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
