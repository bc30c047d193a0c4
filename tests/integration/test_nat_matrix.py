"""Issue 14's proof (root, netns): the full NAT pair matrix with real ``kubespan run`` agents.

One lab (``netns.traversal.build``): a real discovery-service answering STUN on two internet addresses,
a public relay node (``open`` + ``--relay``) and one agent behind each of the six NAT profiles (open,
forward, easy, easy-fw, hard, cgnat), plus a second ``easy`` (easy<->easy is the pollution case: a
bare ``masquerade`` that keeps a conntrack entry for every stray packet) and a second ``hard``
(symmetric<->symmetric). Every pair must come up; it must be direct exactly where
``natprofiles.direct_possible`` (nat.md §2) says so, and relayed through the relay node elsewhere; and
a ping must cross the mesh between every pair's mesh addresses.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from netns import Lab
from netns.mesh import mesh_lab
from netns.natprofiles import direct_verdict
from netns.traversal import MATRIX_AGENTS, RELAY, TraversalLab, build

pytestmark = pytest.mark.root

SETTLE_TIMEOUT = 150.0
BUDGET = 240.0  # the whole test, lab build to teardown start
RETRIES = 5  # pings again, 2 s apart, for a pair whose first pings were lost


@pytest.fixture
def lab() -> Iterator[Lab]:
    with mesh_lab() as lab:
        yield lab


def test_matrix_direct_where_nat_allows_relayed_elsewhere_all_connected(lab: Lab) -> None:
    t0 = time.monotonic()
    tl: TraversalLab = build(lab, MATRIX_AGENTS)
    tl.wait_settled(SETTLE_TIMEOUT)
    m = tl.matrix()
    pairs = tl.pairs()
    assert len(pairs) == 28
    relay_ip = tl.sites[RELAY].public_ip
    relayed = []
    for a, b in pairs:
        verdict = direct_verdict(MATRIX_AGENTS[a], MATRIX_AGENTS[b])
        for x, y in ((a, b), (b, a)):
            link = m[(x, y)]
            assert link.up, (x, y, link)
            if verdict.possible:
                assert link.path == "direct", (x, y, link, verdict.reason)
                assert link.relay_via is None and link.why_not_direct is None, (x, y, link)
            else:
                assert link.path == "relay", (x, y, link, verdict.reason)
                assert link.relay_via == RELAY, (x, y, link)
                assert link.why_not_direct, (x, y, link)
                endpoint = tl.agents[x].peer(y)["endpoint"]  # type: ignore[index]
                assert str(endpoint).startswith(f"{relay_ip}:"), (x, y, endpoint)
        if not verdict.possible:
            relayed.append((a, b))
    # nat.md §2 in numbers: the symmetric nodes are relayed against each other and every port-restricted
    # EIM node; everything else (the pollution pair easy<->easy-2 included) is direct
    assert sorted(relayed) == sorted(
        [(e, h) for e in ("easy", "easy-2", "easy-fw") for h in ("hard", "hard-2")]
        + [("hard", "hard-2"), ("hard", "cgnat"), ("hard-2", "cgnat")]
    ), relayed
    assert m[("easy", "easy-2")].path == "direct" and m[("easy-2", "easy")].path == "direct"
    # every node reaches the relay node itself directly
    for name in tl.names:
        assert m[(name, RELAY)].up and m[(name, RELAY)].path == "direct", (name, m[(name, RELAY)])

    # traffic over the mesh, every pair (echo request one way, reply the other)
    with ThreadPoolExecutor(6) as pool:
        results = dict(zip(pairs, pool.map(lambda p: tl.ping(*p), pairs), strict=True))
    first = {p: r for p, r in results.items() if not r.ok}
    # A pair that lost its first pings gets a few more tries (bounded): the claim is that every pair
    # exchanges traffic, and a clean-clone run once saw a direct pair lose 3 pings right after settling
    # (issue 14 note). The first losses are printed either way.
    failed = dict(first)
    for _ in range(RETRIES):
        if not failed:
            break
        time.sleep(2)
        failed = {p: r for p in failed if not (r := tl.ping(*p)).ok}
    if first:
        print(f"first pings lost (then {'still lost' if failed else 'recovered'}): {first}")
    assert not failed, f"pings lost: {failed}\n{tl.describe()}"
    # the relay node's own counters (its /status) show what it carried for the relayed pairs
    carried = tl.agents[RELAY].status()["relay"]
    assert carried["running"] and carried["allocations"] >= 1, carried
    assert carried["forwarded_packets"] > 0 and carried["forwarded_bytes"] > 0, carried
    assert time.monotonic() - t0 < BUDGET, tl.describe()
