"""PeerRuntime: each value it keeps equals what computing it afresh gives, and follows its inputs."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict, replace

from kubespan.endpoints import EndpointMachine, Observation, order_candidates
from kubespan.identity import generate_private_key
from kubespan.peerspec import PeerSpec
from kubespan.runtime import PeerRuntime, peer_status
from kubespan.wireguard.types import AddrPort, ObservedPeer, PeerConfig, PresharedKey

MESH = ipaddress.ip_network("fd7f:175a:b97c:5602::/64")
PSK = PresharedKey(bytes(range(32)))
KEY = generate_private_key().public_key()
LOCAL = (ipaddress.ip_interface("10.5.0.1/24"),)


def ep(text: str, port: int = 51820) -> AddrPort:
    return AddrPort(ipaddress.ip_address(text), port)


def spec(*endpoints: AddrPort, allowed: tuple[str, ...] = ("10.5.0.2/32",)) -> PeerSpec:
    return PeerSpec(
        public_key=KEY,
        node_id="node-a",
        label="a",
        mesh_address=MESH[2],
        allowed_ips=tuple(ipaddress.ip_network(a) for a in allowed),
        endpoints=endpoints,
    )


def test_candidates_follow_endpoints_learned_and_local_addresses() -> None:
    peer = PeerRuntime(spec(ep("192.0.2.7"), ep("10.5.0.2")), EndpointMachine(now=0.0))
    first = peer.candidates(LOCAL, MESH)
    assert first == order_candidates(peer.spec.endpoints, LOCAL, exclude=[MESH])
    assert peer.candidates(LOCAL, MESH) is first, "the same inputs: the kept ordering"
    # our addresses changed (a new tuple): the same-subnet endpoint is no longer first
    moved = (ipaddress.ip_interface("192.0.2.1/24"),)
    assert peer.candidates(moved, MESH) == order_candidates(peer.spec.endpoints, moved, exclude=[MESH])
    assert peer.candidates(moved, MESH)[0].endpoint == ep("192.0.2.7")
    # a replaced spec with other endpoints
    peer.respec(spec(ep("198.51.100.3")))
    assert [c.endpoint for c in peer.candidates(moved, MESH)] == [ep("198.51.100.3")]
    # a learned (roamed) endpoint joins them
    peer.machine.set_candidates(peer.candidates(moved, MESH))
    peer.machine.observe(1.0, Observation(ep("198.51.100.3"), 0, 0, None))
    peer.machine.observe(2.0, Observation(ep("203.0.113.50", 4000), 148, 148, 0.0), answered=True)
    assert peer.machine.learned == (ep("203.0.113.50", 4000),)
    assert peer.candidates(moved, MESH) == order_candidates(
        peer.spec.endpoints, moved, learned=peer.machine.learned, exclude=[MESH]
    )


def test_config_is_kept_while_its_inputs_are_the_same_and_equals_a_fresh_one() -> None:
    peer = PeerRuntime(spec(ep("10.5.0.2")), EndpointMachine(now=0.0))
    assert peer.config is None
    first = peer.config_for(ep("10.5.0.2"), 25, PSK)
    fresh = PeerConfig(KEY, frozenset(peer.spec.allowed_ips), ep("10.5.0.2"), 25, PSK)
    assert first == fresh and peer.config is first
    assert peer.config_for(ep("10.5.0.2"), 25, PSK) is first
    assert peer.config_for(None, 25, PSK) == replace(fresh, endpoint=None)
    assert peer.config_for(None, 0, PSK).persistent_keepalive == 0
    # a replaced spec forgets its config: the new AllowedIPs are used
    peer.respec(spec(ep("10.5.0.2"), allowed=("10.5.0.2/32", "10.9.9.9/32")))
    assert peer.config is None
    assert ipaddress.ip_network("10.9.9.9/32") in peer.config_for(None, 0, PSK).allowed_ips


def test_status_is_kept_only_while_spec_observation_and_machine_are_unchanged() -> None:
    peer = PeerRuntime(spec(ep("10.5.0.2")), EndpointMachine(now=0.0))
    have = ObservedPeer(KEY, endpoint=ep("10.5.0.2"), rx_bytes=10, tx_bytes=20)
    first = peer.status(have, light=False, wall=100.0, now=1.0)
    assert first == peer_status(peer.spec, peer.machine.status(), have, wall=100.0, now=1.0)
    assert peer.status(have, light=False, wall=101.0, now=2.0) is first
    assert peer.status(replace(have), light=False, wall=101.0, now=2.0) is first, "an equal observation"
    more = replace(have, rx_bytes=30)
    assert peer.status(more, light=True, wall=101.0, now=2.0).rx_bytes == 30, "a new observation"
    # the machine moved on (it picked an endpoint): what it shows changed
    peer.machine.set_candidates(peer.candidates(LOCAL, MESH))
    peer.machine.observe(3.0, None)
    st = peer.status(more, light=False, wall=102.0, now=3.0)
    assert st == peer_status(peer.spec, peer.machine.status(), more, wall=102.0, now=3.0)
    assert st.endpoint == "10.5.0.2:51820" and st.candidates == ("10.5.0.2:51820",)
    # a light pass does not ask the machine; a replaced spec is still news
    peer.respec(spec(ep("10.5.0.2"), allowed=("10.5.0.2/32", "10.9.9.9/32")))
    assert "10.9.9.9/32" in peer.status(more, light=True, wall=102.0, now=3.0).allowed_ips


def test_status_carries_the_smoothed_probe_round_trip_and_none_before_any_answer() -> None:
    peer = PeerRuntime(spec(ep("10.5.0.2")), EndpointMachine(now=0.0))
    have = ObservedPeer(KEY, endpoint=ep("10.5.0.2"), rx_bytes=10, tx_bytes=20)
    before = peer.status(have, light=False, wall=100.0, now=1.0)
    assert before.rtt is None, "no probe answered yet: no round trip, not 0"
    peer.machine.observe(2.0, None, answered=True, rtt=0.040)
    first = peer.status(have, light=False, wall=101.0, now=2.0)
    assert first is not before and first.rtt == 0.04
    peer.machine.observe(3.0, None, answered=True, rtt=0.080)
    second = peer.status(have, light=False, wall=102.0, now=3.0)
    assert second.rtt == 0.045, "smoothed (7/8 old + 1/8 new), not the last sample"
    # the status JSON (MeshStatus.as_dict, what /status serves) carries it
    d = asdict(second)
    assert d["rtt"] == 0.045 and asdict(before)["rtt"] is None
    assert json.loads(json.dumps(d))["rtt"] == 0.045
