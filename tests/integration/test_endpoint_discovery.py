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
from netns.mesh import MeshLab, mesh_lab

pytestmark = pytest.mark.root

S1, S2 = "203.0.113.2", "203.0.113.3"  # the discovery host's two internet addresses (STUN on both)
STUN_PORT = 3478
WG_PORT = 51820
STUN_FLAGS = ("--stun-server", f"{S1}:{STUN_PORT}", "--stun-server", f"{S2}:{STUN_PORT}")


@pytest.fixture
def lab() -> Iterator[Lab]:
    with mesh_lab() as lab:
        yield lab


def test_easy_node_publishes_mapped_endpoint_and_class_and_the_mesh_connects(lab: Lab) -> None:
    ml = MeshLab(lab)
    disc = lab.node("disc")
    lab.attach(disc, lab.internet(), [f"{S1}/24", f"{S2}/24"])
    ml.start_discovery(
        disc, f"{S1}:3000", "--stun-addr", f"{S1}:{STUN_PORT}", "--stun-addr", f"{S2}:{STUN_PORT}"
    )
    serving = lab.dir / "discovery-disc.log"
    ml.wait("discovery-service serving", lambda: serving.exists() and '"serving"' in serving.read_text(), 30)
    easy, public = lab.site("easy", "easy-fw"), lab.site("open", "open")
    e, o = ml.start_node(easy.node, *STUN_FLAGS), ml.start_node(public.node, *STUN_FLAGS)
    mapped = f"{easy.public_ip}:{WG_PORT}"  # masquerade keeps the free port

    def easy_found() -> bool:
        nat = e.status()["nat"]
        return nat["nat_class"] == "eim" and nat["published"] == mapped

    ml.wait("the easy node classifies its NAT", easy_found, timeout=30)
    nat = e.status()["nat"]
    assert nat["mapped"] == mapped
    assert sorted(nat["responders"]) == [f"{S1}:{STUN_PORT}", f"{S2}:{STUN_PORT}"]
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
