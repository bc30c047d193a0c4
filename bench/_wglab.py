"""Shared plumbing for the WireGuard benchmarks (wg_apply, wg_readback, reconcile_noop); its
skip_unless_root serves every lab benchmark.

Each benchmark re-runs itself *inside* one lab node: in the node's network
namespace and in a private mount namespace whose ``/run/wireguard`` is the
node's own directory (``Node.argv`` with ``private_run``). There, our code, a
wireguard-go started by :class:`UserspaceBackend` (no extra namespace
wrappers) and the ``wg``/``nft`` tools all see the same socket and the same
netns, so the C tool's timing is one plain ``fork+exec`` of ``wg``, exactly
what a caller of the C tool pays, and no ``ip netns exec``/``unshare``
wrapper is charged to either side.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from kubespan.identity import generate_private_key
from kubespan.wireguard.types import AddrPort, DeviceConfig, PeerConfig, PresharedKey

INSIDE = "--inside-node"
IFNAME = "kubespan"
PORT = 51820
FWMARK = 0x20
KEEPALIVE = 25


def skip_unless_root(name: str) -> bool:
    """Print a SKIP result and return True when not root (the lab needs network namespaces)."""
    if os.geteuid() == 0:
        return False
    print(f"{name}: needs root (network namespaces, wireguard-go, nftables); skipped")
    print(f"RESULT {name} SKIP needs-root")
    return True


def run_in_node(script: str, argv: Sequence[str], timeout: float = 900) -> int:
    """Re-run ``script argv --inside-node`` inside a fresh lab node; relay its output."""
    from netns.lab import Lab

    with Lab() as lab:
        node = lab.node("bench")
        cmd = node.argv(sys.executable, "-u", script, *argv, INSIDE, private_run=True)
        proc = subprocess.run(cmd, timeout=timeout, check=False)
        return proc.returncode


def inside(argv: Sequence[str]) -> bool:
    return INSIDE in argv


def strip_inside(argv: Sequence[str]) -> list[str]:
    return [a for a in argv if a != INSIDE]


def bench_parser(doc: str, *, rounds: int) -> argparse.ArgumentParser:
    """The arguments every WireGuard benchmark takes: ``--peers`` (1000) and ``--rounds``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--peers", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=rounds)
    return ap


def main_in_node(
    name: str,
    script: str,
    parser: argparse.ArgumentParser,
    bench: Callable[[argparse.Namespace, Path], Awaitable[int]],
) -> int:
    """A benchmark's ``main``: SKIP unless root; else re-run ``script`` inside a fresh lab node, where
    ``bench(arguments, scratch directory)`` runs."""
    if skip_unless_root(name):
        return 0
    if not inside(sys.argv):
        return run_in_node(script, sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        return asyncio.run(bench(parser.parse_args(strip_inside(sys.argv[1:])), Path(tmp)))


# --- a realistic 1000-peer configuration ---------------------------------------------------------


def make_config(n: int, seed: int = 1) -> DeviceConfig:
    """``n`` peers like a KubeSpan mesh: real X25519 keys, the cluster PSK, keepalive 25,
    2-3 allowed IPs (mesh /128, node /32, every third peer a pod /24) and an endpoint
    (every fifth one IPv6). Prefixes never overlap between peers."""
    rng = random.Random(seed)
    psk = PresharedKey(rng.randbytes(32))
    mesh = ipaddress.IPv6Network("fd7f:175a:b97c:5602::/64")
    peers = []
    for i in range(n):
        key = generate_private_key().public_key()
        nets = [
            ipaddress.ip_network(f"{mesh.network_address + rng.getrandbits(48) * 65536 + i}/128"),
            ipaddress.ip_network(f"10.{64 + (i >> 8)}.{i & 255}.{1 + rng.randrange(250)}/32"),
        ]
        if i % 3 == 0:
            nets.append(ipaddress.ip_network(f"10.{128 + (i >> 8)}.{i & 255}.0/24"))
        if i % 5 == 0:
            ip = ipaddress.ip_address(f"2001:db8:{i:x}::{rng.randrange(1, 65535):x}")
        else:
            ip = ipaddress.ip_address(f"{rng.randrange(11, 223)}.{rng.randrange(256)}.{i & 255}.{i >> 8}")
        peers.append(PeerConfig(key, frozenset(nets), AddrPort(ip, PORT), KEEPALIVE, psk))
    return DeviceConfig.of(generate_private_key(), PORT, FWMARK, peers)


def wg_conf(cfg: DeviceConfig) -> str:
    """The same configuration as a ``wg setconf`` file."""
    lines = [
        "[Interface]",
        f"PrivateKey = {cfg.private_key.b64}",
        f"ListenPort = {cfg.listen_port}",
        f"FwMark = {cfg.fwmark:#x}",
    ]
    for p in cfg.peers.values():
        lines += ["", "[Peer]", f"PublicKey = {p.public_key.b64}"]
        if p.preshared_key is not None:
            lines.append(f"PresharedKey = {p.preshared_key.b64}")
        lines.append(f"AllowedIPs = {', '.join(str(n) for n in p.allowed_ips)}")
        if p.endpoint is not None:
            lines.append(f"Endpoint = {p.endpoint}")
        if p.persistent_keepalive:
            lines.append(f"PersistentKeepalive = {p.persistent_keepalive}")
    return "\n".join(lines) + "\n"


# --- timing helpers ------------------------------------------------------------------------------


def run_tool(*argv: str) -> tuple[float, bytes, float]:
    """Run a C tool once; (wall ms, stdout, its CPU ms). Raises on failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, check=False)
    ms = (time.perf_counter() - t0) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000
    return ms, proc.stdout, cpu


def task_cpu_ms(pid: int) -> float:
    """CPU time of all threads of ``pid`` so far (ns resolution, from schedstat)."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e6


def fmt(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def here() -> Path:
    return Path(__file__).resolve().parent
