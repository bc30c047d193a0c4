"""Endpoint discovery end to end (root, netns): two ``kubespan run`` agents with ``--stun-server``, a real
discovery-service answering STUN on two internet addresses, one node behind ``easy-fw`` and one ``open``.

The easy node finds its NAT's mapping of the WireGuard port (endpoint-independent: the same ip:port for
both responders), publishes it among its endpoints and its class in the encrypted traversal field; the
open node decodes both from the affiliate and shows them in its status, and the mesh connects.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from netns import Lab
from netns.mesh import mesh_lab
from netns.traversal import STUN_IPS, STUN_PORT, build

pytestmark = pytest.mark.root

WG_PORT = 51820


@pytest.fixture
def lab() -> Iterator[Lab]:
    with mesh_lab() as lab:
        yield lab


def test_easy_node_publishes_mapped_endpoint_and_class_and_the_mesh_connects(lab: Lab) -> None:
    tl = build(lab, {"easy": "easy-fw", "open": "open"}, relays=(), cluster_id="endpoint-discovery")
    ml = tl.ml
    easy, public = tl.sites["easy"], tl.sites["open"]
    e, o = tl.agents["easy"], tl.agents["open"]
    mapped = f"{easy.public_ip}:{WG_PORT}"  # masquerade keeps the free port

    def easy_found() -> bool:
        nat = e.status()["nat"]
        return nat["nat_class"] == "eim" and nat["published"] == mapped

    ml.wait("the easy node classifies its NAT", easy_found, timeout=30)
    nat = e.status()["nat"]
    assert nat["mapped"] == mapped
    assert sorted(nat["responders"]) == sorted(f"{ip}:{STUN_PORT}" for ip in STUN_IPS)
    assert nat["error"] is None
    assert mapped in e.status()["endpoints"]  # what discovery holds

    own = o.status()["nat"]
    assert own["nat_class"] == "public" and own["published"] == f"{public.public_ip}:{WG_PORT}", own

    def open_sees_easy() -> bool:
        peer = o.peer("easy")
        return peer is not None and peer["nat_class"] == "eim" and mapped in peer["candidates"]

    ml.wait("the open node decodes the easy node's class and mapped endpoint", open_sees_easy, timeout=30)
    ml.wait("both peers up", ml.all_up, timeout=40)
    assert e.peer("open")["nat_class"] == "public"
