"""NAT classification from STUN answers: public, endpoint-independent, endpoint-dependent, unknown."""

from __future__ import annotations

import pytest

from kubespan.nat.classify import NatClass, NatReport, Observation, classify
from kubespan.wireguard.types import AddrPort

S1, S2, S2B = (
    AddrPort.parse("203.0.113.11:3478"),
    AddrPort.parse("203.0.113.12:3478"),
    AddrPort.parse("203.0.113.12:3479"),
)
LOCAL = ["192.168.1.10", "fd00::1"]
PORT = 51820


def seen(responder: AddrPort, mapped: str) -> Observation:
    return Observation(responder, AddrPort.parse(mapped))


def lost(responder: AddrPort, error: str = "timeout") -> Observation:
    return Observation(responder, None, error)


def test_public_when_nothing_translates():
    r = classify([seen(S1, "192.168.1.10:51820"), seen(S2, "192.168.1.10:51820")], LOCAL, PORT)
    assert r.nat_class is NatClass.PUBLIC and str(r.mapped) == "192.168.1.10:51820"
    assert r.publishable == r.mapped and r.error == "" and r.responders == (S1, S2)


def test_public_needs_only_one_answer():
    r = classify([seen(S1, "[fd00::1]:51820"), lost(S2)], LOCAL, PORT)
    assert r.nat_class is NatClass.PUBLIC and r.responders == (S1,)


def test_a_local_address_on_another_port_is_translated():
    r = classify([seen(S1, "192.168.1.10:40000"), seen(S2, "192.168.1.10:40000")], LOCAL, PORT)
    assert r.nat_class is NatClass.EIM


def test_eim_when_two_responder_ips_see_one_mapping():
    r = classify([seen(S1, "198.51.100.1:51820"), seen(S2, "198.51.100.1:51820")], LOCAL, PORT)
    assert r.nat_class is NatClass.EIM and str(r.publishable) == "198.51.100.1:51820"
    assert r.to_dict() == {
        "class": "eim",
        "mapped": "198.51.100.1:51820",
        "responders": ["203.0.113.11:3478", "203.0.113.12:3478"],
        "error": None,
    }


@pytest.mark.parametrize(
    "second",
    ["198.51.100.1:62373", "198.51.100.2:38530"],  # another port; another pool address
)
def test_edm_when_the_mapping_differs(second):
    r = classify([seen(S1, "198.51.100.1:38530"), seen(S2, second)], LOCAL, PORT)
    assert r.nat_class is NatClass.EDM and str(r.mapped) == "198.51.100.1:38530"
    assert r.publishable is None


def test_port_dependent_mapping_on_one_responder_ip_is_edm_too():
    r = classify([seen(S2, "198.51.100.1:1000"), seen(S2B, "198.51.100.1:1001")], LOCAL, PORT)
    assert r.nat_class is NatClass.EDM


def test_one_responder_ip_cannot_prove_eim():
    r = classify([seen(S2, "198.51.100.1:51820"), seen(S2B, "198.51.100.1:51820")], LOCAL, PORT)
    assert r.nat_class is NatClass.UNKNOWN and str(r.mapped) == "198.51.100.1:51820"
    assert "two are needed" in r.error and r.publishable is None


def test_unknown_with_one_answer_says_what_failed():
    r = classify([seen(S1, "198.51.100.1:51820"), lost(S2, "no privilege (CAP_NET_RAW)")], LOCAL, PORT)
    assert r.nat_class is NatClass.UNKNOWN and r.mapped is not None
    assert "203.0.113.12:3478: no privilege (CAP_NET_RAW)" in r.error


def test_unknown_without_answers():
    r = classify([lost(S1), lost(S2, "")], LOCAL, PORT)
    assert r == NatReport(
        NatClass.UNKNOWN, None, (), "203.0.113.11:3478: timeout; 203.0.113.12:3478: no answer"
    )
    assert classify([], LOCAL, PORT).error == "no STUN responder configured"
