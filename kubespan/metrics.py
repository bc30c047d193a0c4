"""Prometheus metrics for the mesh, computed from its status at scrape time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kubespan.engine import MeshStatus
from kubespan.nat.classify import NatClass
from kubespan.snapshot import RelayStatus

STATE_VALUES = {"unknown": 0, "up": 1, "down": 2}
NAT_CLASSES = tuple(str(c) for c in NatClass)  # public, eim, edm, unknown


class MeshCollector:
    def __init__(self, status: Callable[[], MeshStatus | None], registry: CollectorRegistry) -> None:
        self._status = status
        registry.register(self)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        st = self._status()
        if st is None:
            return
        now = time.time()
        labels = ["peer", "public_key"]
        ready = GaugeMetricFamily("kubespan_ready", "1 when every peer is up.")
        ready.add_metric([], 1.0 if st.ready else 0.0)
        peers = GaugeMetricFamily("kubespan_peers", "Peers by state.", labels=["state"])
        counts = dict.fromkeys(STATE_VALUES, 0)
        state = GaugeMetricFamily(
            "kubespan_peer_state", "Peer state: 0 unknown, 1 up, 2 down.", labels=labels
        )
        age = GaugeMetricFamily(
            "kubespan_peer_handshake_age_seconds", "Seconds since the last handshake.", labels=labels
        )
        switches = CounterMetricFamily(
            "kubespan_peer_endpoint_switches", "Endpoint changes made by the mesh.", labels=labels
        )
        roams = CounterMetricFamily(
            "kubespan_peer_roams", "Endpoint changes made by the peer (roaming).", labels=labels
        )
        failures = CounterMetricFamily("kubespan_peer_path_failures", "Paths declared dead.", labels=labels)
        rx = CounterMetricFamily(
            "kubespan_peer_receive_bytes", "Bytes received from the peer.", labels=labels
        )
        tx = CounterMetricFamily("kubespan_peer_transmit_bytes", "Bytes sent to the peer.", labels=labels)
        cands = GaugeMetricFamily(
            "kubespan_peer_candidates", "Endpoint candidates known for the peer.", labels=labels
        )
        for p in st.peers:
            lv = [p.label, p.public_key]
            counts[p.state] = counts.get(p.state, 0) + 1
            state.add_metric(lv, STATE_VALUES.get(p.state, 0))
            if p.last_handshake:
                age.add_metric(lv, max(0.0, now - p.last_handshake))
            switches.add_metric(lv, p.endpoint_switches)
            roams.add_metric(lv, p.roams)
            failures.add_metric(lv, p.failures)
            rx.add_metric(lv, p.rx_bytes)
            tx.add_metric(lv, p.tx_bytes)
            cands.add_metric(lv, len(p.candidates))
        for name, n in counts.items():
            peers.add_metric([name], n)
        conflicts = GaugeMetricFamily("kubespan_conflicts", "Address/key conflicts among affiliates.")
        conflicts.add_metric([], len(st.conflicts))
        yield from (ready, peers, state, age, switches, roams, failures, rx, tx, cands, conflicts)
        yield from self._paths(st)
        yield from self._nat(st)
        if st.relay is not None:
            yield from self._relay(st.relay)

    @staticmethod
    def _paths(st: MeshStatus) -> Iterator[Metric]:
        """Each peer's path (1 on the current one; ``relay_via`` names the relay), why it is not
        direct (1, as a label), and the time it took to connect."""
        labels = ["peer", "public_key"]
        path = GaugeMetricFamily(
            "kubespan_peer_path",
            "The peer's path (lan, direct, relay, none): 1 on the current one.",
            labels=[*labels, "path", "relay_via"],
        )
        why = GaugeMetricFamily(
            "kubespan_peer_not_direct", "1 with the reason a peer is not direct.", labels=[*labels, "reason"]
        )
        connect = GaugeMetricFamily(
            "kubespan_peer_connect_seconds",
            "Seconds from both sides' candidates known to the first handshake.",
            labels=labels,
        )
        for p in st.peers:
            lv = [p.label, p.public_key]
            path.add_metric([*lv, p.path, p.relay_via or ""], 1.0)
            if p.why_not_direct:
                why.add_metric([*lv, p.why_not_direct], 1.0)
            if p.connect_time is not None:
                connect.add_metric(lv, p.connect_time)
        yield from (path, why, connect)

    @staticmethod
    def _nat(st: MeshStatus) -> Iterator[Metric]:
        """Endpoint discovery: this node's NAT class (1 on the current one), whether a mapped endpoint
        is published, and each peer's published class."""
        nat = GaugeMetricFamily(
            "kubespan_nat_class", "This node's NAT class from STUN (1: the current one).", labels=["class"]
        )
        for name in NAT_CLASSES:
            nat.add_metric([name], 1.0 if st.nat.nat_class == name else 0.0)
        mapped = GaugeMetricFamily(
            "kubespan_nat_mapped_endpoint_published", "1 when a STUN-mapped endpoint is published to peers."
        )
        mapped.add_metric([], 1.0 if st.nat.published else 0.0)
        peer_nat = GaugeMetricFamily(
            "kubespan_peer_nat_class",
            "The NAT class each peer publishes (1 on its current one).",
            labels=["peer", "public_key", "class"],
        )
        for p in st.peers:
            peer_nat.add_metric([p.label, p.public_key, p.nat_class], 1.0)
        yield from (nat, mapped, peer_nat)

    @staticmethod
    def _relay(r: RelayStatus) -> Iterator[Metric]:
        """The relay service of a node run with ``--relay``."""
        allocations = GaugeMetricFamily(
            "kubespan_relay_allocations", "Relay allocations held for peer pairs."
        )
        allocations.add_metric([], r.allocations)
        packets = CounterMetricFamily("kubespan_relay_forwarded_packets", "WireGuard datagrams forwarded.")
        packets.add_metric([], r.forwarded_packets)
        fwd = CounterMetricFamily("kubespan_relay_forwarded_bytes", "Bytes of WireGuard datagrams forwarded.")
        fwd.add_metric([], r.forwarded_bytes)
        dropped = CounterMetricFamily(
            "kubespan_relay_dropped", "Datagrams dropped, by reason.", labels=["reason"]
        )
        for reason, n in sorted(r.dropped.items()):
            dropped.add_metric([reason], n)
        expired = CounterMetricFamily("kubespan_relay_expired", "Allocations ended by their idle timeout.")
        expired.add_metric([], r.expired)
        refused = CounterMetricFamily(
            "kubespan_relay_refused", "Allocation requests refused, by reason.", labels=["reason"]
        )
        for reason, n in sorted(r.refused.items()):
            refused.add_metric([reason], n)
        yield from (allocations, packets, fwd, dropped, expired, refused)


class DiscoveryCollector:
    """The agent's link to its discovery registries, per configured endpoint URL:
    ``kubespan_discovery_connected`` (1 once Hello is done and the Watch snapshot arrived),
    ``kubespan_discovery_affiliates`` (what that registry reports), and the client's reconnect count."""

    def __init__(self, client: Callable[[], Any], registry: CollectorRegistry) -> None:
        # returns the running discovery.client.DiscoveryClient (endpoint_status(), stats), or None
        self._client = client
        registry.register(self)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        client = self._client()
        if client is None or not hasattr(client, "endpoint_status"):
            return
        connected = GaugeMetricFamily(
            "kubespan_discovery_connected",
            "1 while the discovery endpoint is connected (Hello done, Watch snapshot received).",
            labels=["endpoint"],
        )
        affiliates = GaugeMetricFamily(
            "kubespan_discovery_affiliates", "Affiliates the discovery endpoint reports.", labels=["endpoint"]
        )
        for url, st in sorted(client.endpoint_status().items()):
            connected.add_metric([url], 1.0 if st.connected else 0.0)
            affiliates.add_metric([url], st.affiliates)
        reconnects = CounterMetricFamily(
            "kubespan_discovery_reconnects", "Discovery session reconnect attempts after an error."
        )
        reconnects.add_metric([], client.stats.reconnects)
        yield from (connected, affiliates, reconnects)
