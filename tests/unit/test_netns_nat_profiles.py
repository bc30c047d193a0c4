"""The lab's NAT profile catalogue and the "can these two connect directly?" rule of nat.md §2."""

from __future__ import annotations

import itertools

import pytest

from netns.nat import NAT_TYPES
from netns.natprofiles import PROFILES, NatProfile, RouterSpec, direct_possible, direct_verdict, profile

NAMES = ["open", "forward", "easy", "easy-fw", "hard", "cgnat"]

# nat.md §2, written out pair by pair (rows and columns in NAMES order): 1 = direct, 0 = relay.
EXPECTED = {
    "open": [1, 1, 1, 1, 1, 1],
    "forward": [1, 1, 1, 1, 1, 1],
    "easy": [1, 1, 1, 1, 0, 1],
    "easy-fw": [1, 1, 1, 1, 0, 1],
    "hard": [1, 1, 0, 0, 0, 0],
    "cgnat": [1, 1, 1, 1, 0, 1],
}


def test_the_catalogue_holds_the_six_issue_14_nat_types() -> None:
    assert list(PROFILES) == NAMES
    assert {n: (p.mapping, p.filtering, p.wan_input_drop, p.layers) for n, p in PROFILES.items()} == {
        "open": ("none", "open", False, 0),
        "forward": ("eim", "open", True, 1),
        "easy": ("eim", "apdf", False, 1),
        "easy-fw": ("eim", "apdf", True, 1),
        "hard": ("edm", "apdf", True, 1),
        "cgnat": ("eim", "apdf", True, 2),
    }


def test_every_router_is_buildable_and_matches_its_declared_properties() -> None:
    for p in PROFILES.values():
        assert all(r.nat in NAT_TYPES for r in p.routers), p.name
        # symmetric mapping comes only from a fully-random router; input drop only from firewalls
        assert (p.mapping == "edm") == any(r.nat == "symmetric" for r in p.routers), p.name
        if p.routers:
            assert p.wan_input_drop == all(r.firewall for r in p.routers), p.name
            assert (p.filtering == "open") == p.routers[-1].forward_wg_port, p.name


def test_derived_port_properties() -> None:
    kept = {n: p.port_preserved for n, p in PROFILES.items()}
    assert kept == {
        "open": True,
        "forward": True,
        "easy": True,
        "easy-fw": True,
        "hard": False,
        "cgnat": True,
    }
    after_stray = {n: p.keeps_port_after_stray_inbound for n, p in PROFILES.items()}
    assert after_stray == {
        "open": True,
        "forward": True,
        "easy": False,  # nat.md §0: the UNREPLIED entry makes the next flow to that remote take a random port
        "easy-fw": True,
        "hard": False,
        "cgnat": True,
    }


@pytest.mark.parametrize(("a", "b"), list(itertools.product(NAMES, NAMES)))
def test_direct_possible_over_the_full_matrix(a: str, b: str) -> None:
    want = bool(EXPECTED[a][NAMES.index(b)])
    assert direct_possible(a, b) is want
    assert direct_possible(b, a) is want  # symmetric
    assert direct_verdict(a, b).basis == direct_verdict(b, a).basis


def test_verdicts_say_why_and_what_was_measured() -> None:
    v = direct_verdict("hard", "hard")
    assert not v.possible and v.reason == "both behind symmetric NAT" and v.basis == "reasoned"
    assert direct_verdict("hard", "easy-fw") == (
        False,
        "symmetric NAT against easy-fw's port-restricted filtering",
        "measured",
    )
    assert direct_verdict("forward", "hard").basis == "measured"  # EDM <-> port-forward: 121 ms in nat.md §0
    assert direct_verdict("easy-fw", "easy-fw").basis == "measured"
    assert direct_verdict("cgnat", "easy").basis == "reasoned"


def test_address_only_filtering_lets_a_symmetric_peer_in() -> None:
    """nat.md §2's reasoned case; no lab profile has address-dependent filtering, so it is built here."""
    adf = NatProfile(
        "eim-adf", "EIM, address-dependent filtering", "eim", "adf", True, (RouterSpec("eim", True),)
    )
    assert direct_verdict("hard", adf) == (
        True,
        "eim-adf filters by address only, so a symmetric peer gets in",
        "reasoned",
    )
    assert direct_possible(adf, "hard") and direct_possible(adf, "easy")


def test_unknown_profiles_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown NAT profile 'full-cone'; known: open, forward"):
        profile("full-cone")
    assert profile(PROFILES["hard"]) is PROFILES["hard"]
