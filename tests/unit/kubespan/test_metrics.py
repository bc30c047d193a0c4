"""The mesh's Prometheus collector: endpoint discovery's gauges (node class, published mapping, peers' classes)."""

from __future__ import annotations

from dataclasses import replace

from prometheus_client import CollectorRegistry, generate_latest

from kubespan.metrics import MeshCollector
from kubespan.snapshot import MeshStatus, NatStatus, RelayStatus
from kubespan.testing import mesh_status, peer_status


def status(nat: NatStatus, peer_class: str) -> MeshStatus:
    return mesh_status(peer_status("n2", node_id="id2", public_key="pk2", nat_class=peer_class), nat=nat)


def scrape(st: MeshStatus) -> str:
    registry = CollectorRegistry()
    MeshCollector(lambda: st, registry)
    return generate_latest(registry).decode()


def test_nat_gauges_follow_the_status() -> None:
    text = scrape(status(NatStatus("eim", "198.51.100.7:40000", "198.51.100.7:40000"), "edm"))
    assert 'kubespan_nat_class{class="eim"} 1.0' in text
    assert 'kubespan_nat_class{class="public"} 0.0' in text
    assert "kubespan_nat_mapped_endpoint_published 1.0" in text
    assert 'kubespan_peer_nat_class{class="edm",peer="n2",public_key="pk2"} 1.0' in text

    text = scrape(status(NatStatus(error="STUN: no responder configured"), "unknown"))
    assert 'kubespan_nat_class{class="unknown"} 1.0' in text
    assert "kubespan_nat_mapped_endpoint_published 0.0" in text


def test_path_gauges_follow_the_status() -> None:
    st = status(NatStatus("edm"), "edm")
    relayed = replace(
        st.peers[0],
        path="relay",
        relay_via="relay-1",
        why_not_direct="both behind symmetric NAT",
        connect_time=1.5,
    )
    text = scrape(replace(st, peers=(relayed,)))
    assert 'kubespan_peer_path{path="relay",peer="n2",public_key="pk2",relay_via="relay-1"} 1.0' in text
    assert (
        'kubespan_peer_not_direct{peer="n2",public_key="pk2",reason="both behind symmetric NAT"} 1.0' in text
    )
    assert 'kubespan_peer_connect_seconds{peer="n2",public_key="pk2"} 1.5' in text


SERVICE_STATUS = {
    "running": True,
    "allocations": [{"ports": [40100, 40101]}, {"ports": [40102, 40103]}],
    "forwarded_packets": 1532,
    "forwarded_bytes": 1_250_000,
    "dropped": {"forged_mac1": 3, "not_wireguard": 7},
    "expired": 1,
    "control": {"requests": {"ALLOCATE": 4, "PING": 9}, "refused": {"unknown_peer": 2}},
}


def test_relay_status_from_the_service_and_its_metrics() -> None:
    r = RelayStatus.of(SERVICE_STATUS)
    assert (r.running, r.allocations, r.forwarded_packets, r.forwarded_bytes) == (True, 2, 1532, 1_250_000)
    assert r.dropped == {"forged_mac1": 3, "not_wireguard": 7} and r.expired == 1
    assert r.requests == 13 and r.refused == {"unknown_peer": 2}
    reg = CollectorRegistry()
    MeshCollector(lambda: replace(status(NatStatus(), "eim"), relay=r), reg)
    text = generate_latest(reg).decode()
    assert "kubespan_relay_allocations 2.0" in text
    assert "kubespan_relay_forwarded_bytes_total 1.25e+06" in text
    assert 'kubespan_relay_dropped_total{reason="forged_mac1"} 3.0' in text
    assert 'kubespan_relay_refused_total{reason="unknown_peer"} 2.0' in text
    # a node that does not relay has none of them
    reg2 = CollectorRegistry()
    MeshCollector(lambda: status(NatStatus(), "eim"), reg2)
    assert "kubespan_relay" not in generate_latest(reg2).decode()
    # /status carries it as plain JSON
    assert replace(status(NatStatus(), "eim"), relay=r).as_dict()["relay"]["dropped"]["forged_mac1"] == 3
