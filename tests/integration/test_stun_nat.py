"""STUN from the WireGuard port in the netns lab (root): two discovery-service ``--stun-addr`` responders on
the "internet", a node on the internet and one behind each NAT type; each node classifies its NAT and the
mapped endpoint matches the router's own conntrack entry. The UDP checksum we build is checked against
the kernel's through a TUN device (no checksum offload there)."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns import Lab, Node, Router
from netns.mesh import discovery_argv

pytestmark = pytest.mark.root

PY = sys.executable
S1, S2 = "203.0.113.11", "203.0.113.12"
S1V6, S2V6, PV6 = "2001:db8::11", "2001:db8::12", "2001:db8::20"
STUN_PORT = 3478
WG_PORT = 51820

# Runs inside a node: holds the WireGuard port with an ordinary UDP socket (as WireGuard would), then
# probes both responders from that port through the raw socket and prints the report as JSON.
CLASSIFY = """
import asyncio, json, socket, sys
from kubespan.nat.rawstun import discover
port, local, servers = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]
holder = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)  # both families, like wireguard-go
holder.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
holder.bind(("::", port))
targets = [(s.rsplit(":", 1)[0].strip("[]"), int(s.rsplit(":", 1)[1])) for s in servers]
report = asyncio.run(discover(port, targets, local))
out = report.to_dict()
out["observations"] = {str(o.responder): str(o.mapped) if o.mapped else o.error for o in report.observations}
print(json.dumps(out))
"""


def start_responders(lab: Lab, *nodes_ips: tuple[Node, str, str]) -> None:
    """discovery-service with ``--stun-addr`` on an IPv4 and an IPv6 address in each node; returns when
    every one serves."""
    logs = []
    for node, ip, ip6 in nodes_ips:
        log = lab.dir / f"discovery-{node.name}.log"
        node.popen(
            *discovery_argv(
                f"{ip}:3000", "--stun-addr", f"{ip}:{STUN_PORT}", "--stun-addr", f"[{ip6}]:{STUN_PORT}"
            ),
            log=log,
            private_run=False,
        )
        logs.append(log)
    deadline = time.monotonic() + 30
    while not all(p.exists() and '"serving"' in p.read_text() for p in logs):
        if time.monotonic() > deadline:
            raise TimeoutError("discovery-service did not start:\n" + lab.report())
        time.sleep(0.1)


def classify_in(node: Node, local: str, servers: tuple[str, str] = (S1, S2)) -> dict:
    targets = [f"[{s}]:{STUN_PORT}" if ":" in s else f"{s}:{STUN_PORT}" for s in servers]
    r = node.run(PY, "-c", CLASSIFY, str(WG_PORT), local, *targets, timeout=30)
    return json.loads(r.stdout)


_CT = re.compile(
    r"src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+) .*?src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)"
)


def conntrack_mappings(router: Router, inside: str) -> dict[str, str]:
    """responder ip:port -> the public ip:port the router mapped ``inside``:51820 to, from its conntrack."""
    out: dict[str, str] = {}
    for line in router.run("cat", "/proc/net/nf_conntrack").stdout.splitlines():
        m = _CT.search(line)
        if m and m[1] == inside and m[3] == str(WG_PORT):
            out[f"{m[2]}:{m[4]}"] = f"{m[6]}:{m[8]}"
    return out


@pytest.fixture
def world() -> Iterator[tuple[Lab, dict[str, Node], dict[str, Router]]]:
    """Responders s1, s2 and a public node p on the internet; h1 behind an EIM NAT, h2 behind a symmetric one."""
    with Lab() as lab:
        net = lab.internet()
        nodes: dict[str, Node] = {}
        for name, ip, ip6 in (("s1", S1, S1V6), ("s2", S2, S2V6), ("p", "203.0.113.20", PV6)):
            nodes[name] = lab.node(name)
            lab.attach(nodes[name], net, [f"{ip}/24", f"{ip6}/64"])
        routers: dict[str, Router] = {}
        for i, nat in ((1, "eim"), (2, "symmetric")):
            lan = lab.segment(f"lan{i}")
            nodes[f"h{i}"] = lab.node(f"h{i}")
            lab.attach(nodes[f"h{i}"], lan, [f"192.168.{i}.10/24"])
            routers[nat] = lab.router(f"r{i}", lan, net, f"192.168.{i}.1/24", f"203.0.113.{i}/24", nat=nat)
        start_responders(lab, (nodes["s1"], S1, S1V6), (nodes["s2"], S2, S2V6))
        yield lab, nodes, routers


def test_nat_classes_and_mapped_endpoints(world):
    _lab, nodes, routers = world

    public = classify_in(nodes["p"], "203.0.113.20")
    assert public["class"] == "public", public
    assert public["mapped"] == f"203.0.113.20:{WG_PORT}"
    assert public["observations"] == {
        f"{S1}:{STUN_PORT}": public["mapped"],
        f"{S2}:{STUN_PORT}": public["mapped"],
    }

    v6 = classify_in(nodes["p"], PV6, (S1V6, S2V6))  # IPv6: the kernel fills the checksum (IPV6_CHECKSUM)
    assert v6["class"] == "public", v6
    assert v6["mapped"] == f"[{PV6}]:{WG_PORT}"

    eim = classify_in(nodes["h1"], "192.168.1.10")
    assert eim["class"] == "eim", eim
    assert eim["mapped"] == f"203.0.113.1:{WG_PORT}"  # masquerade keeps the free port
    assert eim["responders"] == [f"{S1}:{STUN_PORT}", f"{S2}:{STUN_PORT}"]
    assert conntrack_mappings(routers["eim"], "192.168.1.10") == eim["observations"]

    edm = classify_in(nodes["h2"], "192.168.2.10")
    assert edm["class"] == "edm", edm
    seen = edm["observations"]
    assert all(v.startswith("203.0.113.2:") for v in seen.values()) and len(set(seen.values())) == 2, seen
    assert edm["mapped"] == seen[f"{S1}:{STUN_PORT}"]
    # what each responder saw is the router's translation of the WireGuard port towards it
    assert conntrack_mappings(routers["symmetric"], "192.168.2.10") == seen


def test_one_responder_down_gives_unknown_with_the_reason(world):
    lab, nodes, _routers = world
    lab.blackhole(nodes["s2"], "203.0.113.1")  # h1's router's public address
    report = classify_in(nodes["h1"], "192.168.1.10")
    assert report["class"] == "unknown" and report["mapped"] == f"203.0.113.1:{WG_PORT}"
    assert f"{S2}:{STUN_PORT}: no answer in 2s (3 requests)" in report["error"]


def test_without_cap_net_raw_the_error_says_so(world):
    _lab, nodes, _routers = world
    script = (
        "import asyncio, os\n"
        "from kubespan.nat.rawstun import NoRawSocketPrivilege, mapped_endpoint\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "try:\n"
        f"    asyncio.run(mapped_endpoint({WG_PORT}, ('{S1}', {STUN_PORT})))\n"
        "except NoRawSocketPrivilege as e:\n"
        "    print('fallback:', e)\n"
    )
    out = nodes["h1"].run(PY, "-c", script).stdout
    assert out.startswith("fallback: no privilege (CAP_NET_RAW)"), out


# -- the UDP checksum against the kernel's -------------------------------------------------------------

TUN_CHECK = """
import fcntl, os, select, socket, struct, sys
from ipaddress import IPv4Address
from kubespan.nat.rawstun import udp_checksum, udp_datagram
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", b"kstun0", 0x0001 | 0x1000))  # TUNSETIFF: IFF_TUN|IFF_NO_PI
os.system("ip addr add 10.9.0.1/24 dev kstun0 && ip link set kstun0 up")
local, remote = IPv4Address("10.9.0.1"), IPv4Address("10.9.0.2")
results = []
# 1. the kernel's checksum on a datagram it sends out of the TUN (computed in software: no offload)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for payload in (b"", b"x", b"odd-length payload!", os.urandom(301)):
        s.sendto(payload, (str(remote), 4242))
        while True:
            select.select([fd], [], [], 5)
            pkt = os.read(fd, 4096)
            if pkt[0] >> 4 == 4 and pkt[9] == 17:
                break
        udp = pkt[(pkt[0] & 15) * 4:]
        zeroed = udp[:6] + b"\\0\\0" + udp[8:]
        results.append(struct.unpack("!H", udp[6:8])[0] == udp_checksum(local, remote, zeroed))
# 2. our datagram written into the TUN reaches a socket only if the kernel accepts its checksum
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as r:
    r.bind((str(local), 5353)); r.settimeout(5)
    for good in (True, False):
        udp = bytearray(udp_datagram(remote, local, 4000, 5353, b"checked by the kernel"))
        if not good:
            udp[-1] ^= 1
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, remote.packed, local.packed)
        csum = sum(struct.unpack("!10H", ip)); csum = (csum & 0xFFFF) + (csum >> 16); csum = (csum & 0xFFFF) + (csum >> 16)
        ip = ip[:10] + struct.pack("!H", ~csum & 0xFFFF) + ip[12:]
        os.write(fd, ip + bytes(udp))
        try:
            results.append(r.recv(100) == b"checked by the kernel")
        except TimeoutError:
            results.append(False)
print(results)
"""


def test_udp_checksum_matches_the_kernel(world):
    if not Path("/dev/net/tun").exists():
        pytest.skip("no /dev/net/tun")
    _lab, nodes, _routers = world
    out = nodes["p"].run(PY, "-c", TUN_CHECK, timeout=30).stdout.strip()
    # four kernel checksums equal ours; our good datagram is delivered, the corrupted one dropped
    assert out == str([True, True, True, True, True, False]), out


FWMARK = """
import asyncio, sys
from kubespan.nat.rawstun import StunProbeError, mapped_endpoint
async def main():
    for mark in (0, 0x20):
        try:
            print(mark, await mapped_endpoint(int(sys.argv[1]), (sys.argv[2], 3478), timeout=1, fwmark=mark))
        except StunProbeError as e:
            print(mark, "error:", e)
asyncio.run(main())
"""


def test_fwmark_lets_probes_bypass_the_mesh_routing_table(world):
    """Like the mesh's policy routing: unmarked traffic goes to a table that cannot reach the internet,
    packets marked like WireGuard's own (0x20) use the main table."""
    _lab, nodes, _routers = world
    h1 = nodes["h1"]
    h1.run("ip", "route", "add", "blackhole", "default", "table", "180")
    h1.run("ip", "rule", "add", "not", "fwmark", "0x20/0x60", "lookup", "180", "priority", "100")
    lines = h1.run(PY, "-c", FWMARK, str(WG_PORT), S1, timeout=30).stdout.splitlines()
    assert lines[0].startswith("0 error: no route to the responder: "), lines
    assert lines[1] == f"32 203.0.113.1:{WG_PORT}", lines
