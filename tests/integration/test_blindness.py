"""The registry stays blind to NAT traversal (issue 14, nat.md §5 lab test 8).

Root test: a real discovery-service with persistence on (snapshot + journal) and STUN on two addresses,
a capture of every frame on its host, and real agents behind ``easy`` (two: they punch) and ``hard`` (two:
relayed through the public relay node). Once the matrix has settled, neither the registry's files nor the
gRPC bytes on its wire hold, in clear, any node's WireGuard public key (raw or base64: the key every punch
intent names), mesh address, STUN-mapped endpoint (text, and packed ip+port in either order) or relay
allocation endpoint. Positive controls: the capture holds the registry protocol's clear fields (the
cluster id), and decrypting the stored affiliate data with the cluster secret yields every node's NAT
class, the relay flag, a punch intent and the mapped endpoint: the facts travelled, encrypted.

Non-root test: the STUN responder keeps no per-client state (fixed-size rate tables, counters only).
"""

from __future__ import annotations

import base64
import ipaddress
import os
import signal
import struct
import sys
import time
from collections.abc import Iterator

import pytest

from discovery import crypto
from discovery.server import stun as stun_server
from discovery.server.state import Registry
from discovery.server.storage import Store, parse_journal
from kubespan.affiliate import Traversal
from netns import Lab
from netns.mesh import mesh_lab
from netns.traversal import DISC_PORT, RELAY, TraversalLab, build
from spanutil import stun

AGENTS = {"easy": "easy", "easy-2": "easy", "hard": "hard", "hard-2": "hard"}
CLUSTER = "blind-" + os.urandom(4).hex()

# every frame on every interface of the registry's namespace, length-prefixed, to argv[1]
_SNIFFER = """
import signal, socket, struct, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
with open(sys.argv[1], "wb", buffering=0) as f:
    print("capturing", flush=True)
    while True:
        frame = s.recv(65535)
        f.write(struct.pack("<I", len(frame)) + frame)
"""


def tcp_payloads(capture: bytes, port: int) -> bytes:
    """The TCP payloads (IPv4 and IPv6) to or from ``port`` in a capture, concatenated."""
    out = bytearray()
    pos = 0
    while pos + 4 <= len(capture):
        (n,) = struct.unpack_from("<I", capture, pos)
        frame = capture[pos + 4 : pos + 4 + n]
        pos += 4 + n
        if len(frame) < 14:
            continue
        ethertype = int.from_bytes(frame[12:14], "big")
        if ethertype == 0x0800 and len(frame) >= 34 and frame[23] == 6:
            ip = frame[14:]
            total = int.from_bytes(ip[2:4], "big")
            tcp = ip[(ip[0] & 0x0F) * 4 : total]
        elif ethertype == 0x86DD and len(frame) >= 54 and frame[20] == 6:
            tcp = frame[54 : 54 + int.from_bytes(frame[18:20], "big")]
        else:
            continue
        if len(tcp) < 20:
            continue
        sport, dport = struct.unpack_from(">HH", tcp)
        if port in (sport, dport):
            out += tcp[(tcp[12] >> 4) * 4 :]
    return bytes(out)


def endpoint_forms(text: str) -> list[bytes]:
    """``ip:port`` as text and packed (address then port, and port then address, as STUN packs it)."""
    host, port = text.rsplit(":", 1)
    ip = ipaddress.ip_address(host.strip("[]"))
    p = int(port).to_bytes(2, "big")
    return [text.encode(), ip.packed + p, p + ip.packed]


def secrets_of(tl: TraversalLab) -> dict[str, bytes]:
    """What the registry must never see in clear, by description."""
    out: dict[str, bytes] = {}
    for name, st in tl.statuses().items():
        assert st is not None, name
        key = base64.b64decode(st["public_key"])
        out[f"{name} public key"] = key
        out[f"{name} public key (base64)"] = st["public_key"].encode()
        mesh = ipaddress.ip_address(st["mesh_address"])
        out[f"{name} mesh address"] = mesh.packed
        out[f"{name} mesh address (text)"] = str(mesh).encode()
        mapped = st["nat"]["mapped"]
        assert mapped, (name, st["nat"])
        for i, form in enumerate(endpoint_forms(mapped)):
            out[f"{name} mapped endpoint {mapped} form {i}"] = form
        for p in st["peers"]:
            if p["path"] == "relay":
                for i, form in enumerate(endpoint_forms(p["endpoint"])):
                    out[f"{name}->{p['label']} relay endpoint {p['endpoint']} form {i}"] = form
    return out


@pytest.fixture
def lab() -> Iterator[Lab]:
    with mesh_lab(stop_timeout=5) as lab:
        yield lab


@pytest.mark.root
def test_registry_store_and_wire_hold_no_traversal_facts_in_clear(lab: Lab) -> None:
    state = lab.dir / "registry"
    state.mkdir()
    snap = state / "registry.snap"
    tl = build(lab, AGENTS, registry_flags=("--snapshot-path", str(snap)), cluster_id=CLUSTER, start=False)
    capture = lab.dir / "registry.frames"
    sniff_log = lab.dir / "sniffer.log"
    sniffer = tl.disc.popen(sys.executable, "-c", _SNIFFER, str(capture), log=sniff_log, private_run=False)
    tl.ml.wait("capture running", lambda: "capturing" in sniff_log.read_text(), 10, 0.1)
    tl.start_agents()
    tl.wait_settled(120)
    secrets = secrets_of(tl)
    classes = {n: st["nat"]["nat_class"] for n, st in tl.statuses().items() if st is not None}
    assert classes == {RELAY: "public", "easy": "eim", "easy-2": "eim", "hard": "edm", "hard-2": "edm"}

    time.sleep(1.5)  # the journal's group commit (1 s)
    journal = {p.name: p.read_bytes() for p in state.glob("registry.snap.journal.*")}
    disc = next(p for p in tl.disc.procs if "discovery.server.main" in " ".join(map(str, p.args)))
    os.killpg(disc.pid, signal.SIGTERM)  # shutdown compacts: the snapshot file holds every affiliate
    disc.wait(15)
    os.killpg(sniffer.pid, signal.SIGTERM)
    sniffer.wait(5)
    journal |= {p.name: p.read_bytes() for p in state.glob("registry.snap.journal.*")}
    stored = snap.read_bytes() + b"".join(journal.values())
    wire = tcp_payloads(capture.read_bytes(), DISC_PORT)

    # positive controls: the capture is gRPC in clear, and the store holds the affiliates
    assert len(wire) > 10_000 and CLUSTER.encode() in wire, len(wire)
    assert CLUSTER.encode() in stored and snap.stat().st_size > 0
    for name, st in tl.statuses().items():  # affiliate ids are the protocol's clear field: seen both places
        assert st is not None and st["node_id"].encode() in wire and st["node_id"].encode() in stored, name
    leaks = [
        (where, what)
        for what, b in secrets.items()
        for where, blob in (("store", stored), ("wire", wire))
        if b in blob
    ]
    assert not leaks, leaks

    # ...and the facts did travel through the registry, encrypted with the cluster secret
    key = crypto.parse_secret(tl.ml.secret_file.read_text())
    registry = Registry()
    Store(snap).load(registry)
    latest = {v.id: v for v in registry.list(CLUSTER)}
    assert len(latest) == len(tl.agents)
    by_name: dict[str, Traversal] = {}
    for view in latest.values():
        aff = crypto.decrypt_affiliate(key, view.data)
        by_name[aff.nodename] = Traversal.from_pb(aff.kubespan.traversal)
    assert {n: t.nat_class for n, t in by_name.items()} == classes
    assert {n for n, t in by_name.items() if t.relay} == {RELAY}
    records = [r for name, buf in journal.items() for r in parse_journal(buf, name, []) if r.data]
    affs = [crypto.decrypt_affiliate(key, r.data) for r in records]
    easy_keys = {base64.b64decode(tl.agents[n].status()["public_key"]) for n in ("easy", "easy-2")}
    intents = [p for a in affs for p in Traversal.from_pb(a.kubespan.traversal).punches]
    assert any(p.peer.raw in easy_keys for p in intents), intents
    mapped = {tl.agents[n].status()["nat"]["mapped"] for n in ("easy", "easy-2")}
    published = {
        f"{ipaddress.ip_address(e.ip)}:{e.port}"
        for r in records
        for blob in r.endpoints
        for e in [crypto.decrypt_endpoint(key, blob)]
    }
    assert mapped <= published, (mapped, published)


def test_stun_responder_keeps_no_per_client_state() -> None:
    responder = stun_server.StunResponder()
    tables = [responder.limiter, responder.global_limiter]
    sizes = [(len(t._tokens), len(t._stamp)) for t in tables]
    fields = set(vars(responder))
    sources = [(f"198.51.{i >> 8}.{i & 0xFF}", 1024 + i) for i in range(5000)]
    answered = 0
    for ip, port in sources:
        req = stun.binding_request(os.urandom(12))
        answered += responder.reply(req, (ip, port)) is not None
    assert answered == responder.answered > 0
    # nothing grew: the same attributes, the rate tables keep their fixed number of slots
    assert set(vars(responder)) == fields
    assert [(len(t._tokens), len(t._stamp)) for t in tables] == sizes
    # and nothing of a client is kept: no source address or port in any table's bytes
    held = b"".join(t._tokens.tobytes() + t._stamp.tobytes() for t in tables) + repr(vars(responder)).encode()
    for ip, port in sources[::97]:
        packed = ipaddress.ip_address(ip).packed
        assert packed + port.to_bytes(2, "big") not in held and ip.encode() not in held
