"""Endpoint state machine: candidate order, detection, trials, roaming, and simulated timing targets."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field, replace
from ipaddress import ip_interface, ip_network

import pytest

from kubespan.constants import WG_KEEPALIVE_BYTES, WG_REKEY_TIMEOUT, ConfigError, DetectionTimings
from kubespan.endpoints import (
    Candidate,
    CandidateKind,
    EndpointMachine,
    Observation,
    PeerState,
    order_candidates,
)
from kubespan.wireguard.types import AddrPort, ObservedPeer, PublicKey

A = AddrPort("192.168.1.2", 51820)
B = AddrPort("203.0.113.2", 51820)
C = AddrPort("198.51.100.2", 51820)
N = AddrPort("198.51.100.77", 40123)  # a NAT mapping nobody published


def cands(*eps):
    return [Candidate(e, CandidateKind.PUBLIC) for e in eps]


# --- candidate order -----------------------------------------------------------------------------


def test_order_classes_and_stable_within_class():
    eps = [
        AddrPort("203.0.113.9", 1),  # public
        AddrPort("10.0.0.9", 1),  # private, not our subnet
        AddrPort("192.168.1.9", 1),  # same subnet
        AddrPort("198.51.100.1", 1),  # public
        AddrPort("100.64.1.1", 1),  # CGNAT: private-ish
        AddrPort("fd00::9", 1),  # ULA
        AddrPort("2001:db8::9", 1),  # same v6 subnet
    ]
    local = [ip_interface("192.168.1.1/24"), ip_interface("2001:db8::1/64")]
    got = order_candidates(eps, local, learned=[N, AddrPort("10.0.0.9", 1)])
    assert [(str(c.endpoint), c.kind) for c in got] == [
        ("192.168.1.9:1", CandidateKind.SAME_SUBNET),
        ("[2001:db8::9]:1", CandidateKind.SAME_SUBNET),
        ("10.0.0.9:1", CandidateKind.PRIVATE),
        ("100.64.1.1:1", CandidateKind.PRIVATE),
        ("[fd00::9]:1", CandidateKind.PRIVATE),
        ("203.0.113.9:1", CandidateKind.PUBLIC),
        ("198.51.100.1:1", CandidateKind.PUBLIC),
        (str(N), CandidateKind.LEARNED),
    ]


def test_order_drops_unusable_excluded_and_demotes_unreachable_family():
    eps = [
        AddrPort("0.0.0.0", 1),
        AddrPort("224.0.0.1", 1),
        AddrPort("fd7f:175a:b97c:5602::5", 1),  # inside the mesh subnet
        AddrPort("2001:db8::5", 1),  # we have no IPv6 at all
        AddrPort("203.0.113.5", 1),
    ]
    got = order_candidates(eps, [ip_network("10.0.0.0/24")], exclude=[ip_network("fd7f:175a:b97c:5602::/64")])
    assert [(str(c.endpoint), c.kind) for c in got] == [
        ("203.0.113.5:1", CandidateKind.PUBLIC),
        ("[2001:db8::5]:1", CandidateKind.OTHER_FAMILY),
    ]


def test_global_ipv6_is_preferred_among_public_endpoints_when_we_have_one_too():
    # what a node behind an IPv4 NAT with a global IPv6 address publishes: LAN, STUN-mapped v4, v6
    eps = [
        AddrPort("10.200.1.10", 51820),
        AddrPort("203.0.113.101", 40000),
        AddrPort("2001:db8:1::10", 51820),
    ]
    dual = [ip_interface("10.200.2.10/24"), ip_interface("2001:db8:2::10/64")]
    assert [str(c.endpoint) for c in order_candidates(eps, dual)] == [
        "10.200.1.10:51820",  # private first, as before (it may be a routed LAN)
        "[2001:db8:1::10]:51820",  # both sides global IPv6: no NAT on that path
        "203.0.113.101:40000",
    ]
    # we have only a ULA: the peer's IPv6 keeps its published place among the public ones
    ula = [ip_interface("10.200.2.10/24"), ip_interface("fd00::10/64")]
    assert [str(c.endpoint) for c in order_candidates(eps, ula)][1:] == [
        "203.0.113.101:40000",
        "[2001:db8:1::10]:51820",
    ]


def test_order_without_local_knowledge_keeps_all_families():
    got = order_candidates([AddrPort("2001:db8::5", 1), AddrPort("8.8.8.8", 1)], [])
    assert [c.kind for c in got] == [CandidateKind.PUBLIC, CandidateKind.PUBLIC]


# --- deterministic unit behaviour ----------------------------------------------------------------


# The logic at one-second polls: the thresholds before fast detection (probe after 1 s, one probe a
# second, dead after 4 s and 3 probes). The defaults' fast detection has its own tests below.
SLOW = DetectionTimings(probe_after=1.0, probe_interval=1.0, dead_after=4.0, dead_min_probes=3)


class Driver:
    """Feeds a machine hand-made observations at 1 s polls (``SLOW`` timings unless given)."""

    def __init__(self, eps=(A, B), timings=None, keepalive=True):
        self.now = 0.0
        timings = timings or SLOW
        self.m = EndpointMachine(timings, now=0.0, candidates=cands(*eps), keepalive=keepalive)
        self.rx = self.tx = 0
        self.hs: float | None = None
        self.endpoint: AddrPort | None = None

    def step(self, *, rx=0, tx=0, handshake=False, endpoint="keep", dt=1.0, answered=False, rtt=None):
        self.now += dt
        self.rx += rx
        self.tx += tx
        if handshake:
            self.hs = self.now
        if endpoint != "keep":
            self.endpoint = endpoint
        age = None if self.hs is None else self.now - self.hs
        obs = Observation(self.endpoint, self.rx, self.tx, age)
        d = self.m.observe(self.now, obs, answered=answered, rtt=rtt)
        if d.set_endpoint is not None:
            self.endpoint = d.set_endpoint  # the engine applies it
        return d

    def connect(self, answered=True):
        """First poll, then evidence (the trial's probe answered) on the first candidate."""
        self.step()
        self.step(rx=100, tx=100, handshake=True, answered=answered)
        assert self.m.state == PeerState.UP


def test_first_observation_configures_first_candidate_and_probes():
    d = Driver()
    dec = d.step()
    assert dec.set_endpoint == A and dec.probe
    st = d.m.status()
    assert st.state == PeerState.UNKNOWN and st.trying and st.switches == 0
    assert st.last_endpoint_change == 1.0


def test_absent_peer_reports_endpoint_to_create_with():
    m = EndpointMachine(now=0.0, candidates=cands(A, B))
    assert m.observe(1.0, None).set_endpoint == A
    assert m.observe(2.0, None).set_endpoint == A
    assert m.current == A
    assert EndpointMachine(now=0.0).observe(1.0, None).set_endpoint is None


def test_absent_peer_is_probed_with_its_add_once():
    """The engine adds an absent peer and probes it in the same pass; while it stays absent the
    probes are spaced like any probe without a session, and its first sight does not repeat one."""
    m = EndpointMachine(now=0.0, candidates=cands(A, B))
    first = m.observe(1.0, None)
    assert first.set_endpoint == A and first.probe
    assert not m.observe(2.0, None).probe, "still absent (add failed): no probe per poll"
    assert m.observe(1.0 + WG_REKEY_TIMEOUT, None).probe
    # configured now; first sight right after the add's probe: no second probe yet
    t = 1.0 + WG_REKEY_TIMEOUT
    d = m.observe(t + 0.2, Observation(A, 0, 148, None))
    assert not d.probe and d.set_endpoint is None
    # the reply to the add's probe is evidence at once
    d = m.observe(t + 0.3, Observation(A, 148, 148, 0.0), answered=True)
    assert m.state == PeerState.UP and d.state_changed


def test_first_sight_after_our_add_counts_the_traffic_since_the_add():
    """Counters of a peer we just added started at zero: a session and received bytes at its first
    sight are evidence (the add's probe may have been lost), without waiting for the next poll."""
    m = EndpointMachine(now=0.0, candidates=cands(A, B))
    assert m.observe(1.0, None).probe
    d = m.observe(1.1, Observation(A, 32, 148, 0.05))
    assert m.state == PeerState.UP and d.state_changed
    # not for a peer seen first without our add (adopted: its counters say nothing about now) ...
    other = EndpointMachine(now=0.0, candidates=cands(A, B))
    other.observe(1.1, Observation(A, 32, 148, 0.05))
    assert other.state == PeerState.UNKNOWN
    # ... nor without a session
    bare = EndpointMachine(now=0.0, candidates=cands(A, B))
    bare.observe(1.0, None)
    bare.observe(1.1, Observation(A, 148, 148, None))
    assert bare.state == PeerState.UNKNOWN


def test_first_sight_long_after_the_add_probes_again():
    m = EndpointMachine(now=0.0, candidates=cands(A))
    assert m.observe(1.0, None).probe
    assert m.observe(2.0, Observation(A, 0, 0, None)).probe  # no reply within a poll: ask again


def test_evidence_makes_up_and_counts_no_switch():
    d = Driver()
    d.connect()
    st = d.m.status()
    assert st.state == PeerState.UP and not st.trying and st.switches == 0
    assert st.last_rx_progress == 2.0


def test_rx_without_valid_session_is_not_evidence():
    d = Driver()
    d.step()
    d.step(rx=148, tx=92)  # handshake traffic only, no session
    assert d.m.state == PeerState.UNKNOWN
    d.hs = d.now - 200  # a session older than REJECT_AFTER_TIME
    d.step(rx=148)
    assert d.m.state == PeerState.UNKNOWN


def test_leftover_endpoint_is_adopted_without_switch():
    d = Driver()
    d.endpoint = B  # configured by a previous run
    dec = d.step(rx=5, tx=5)
    assert dec.set_endpoint is None and dec.probe
    assert d.m.current == B and d.m.status().switches == 0
    d.step(rx=10, handshake=True)
    assert d.m.state == PeerState.UP and d.m.current == B


def test_config_that_did_not_stick_is_reapplied():
    d = Driver()
    d.connect()
    assert d.step(rx=1, endpoint=None).set_endpoint == A
    # WireGuard shows another endpoint but nothing arrived from it: re-apply ours
    dec = d.step(endpoint=C)
    assert dec.set_endpoint == A
    assert d.m.status().roams == 0


def test_counter_reset_retries_current_endpoint():
    d = Driver()
    d.connect()
    d.rx = d.tx = 0  # wireguard-go restarted, peer re-added
    d.hs = None
    dec = d.step(endpoint=None)
    assert dec.set_endpoint == A and dec.probe
    assert d.m.status().trying
    d.step(rx=50, handshake=True)
    assert d.m.state == PeerState.UP and d.m.status().switches == 0


def test_probe_answer_is_evidence_and_teaches_responsiveness():
    d = Driver()
    d.step()
    assert d.m.status().answers_probes is None
    d.step(answered=True)  # even before the counters show it
    assert d.m.state == PeerState.UP
    assert d.m.status().answers_probes is True


def test_rx_after_probe_does_not_teach_responsiveness():
    d = Driver()
    d.connect(answered=False)
    assert d.m.state == PeerState.UP
    assert d.m.status().answers_probes is None


def test_fast_death_after_three_unanswered_probes():
    d = Driver()
    d.connect()
    # black hole: we keep sending, nothing comes back
    d.step(tx=100)  # episode start
    probes = [d.step(tx=100).probe for _ in range(3)]
    assert probes == [True, True, True]
    dec = d.step(tx=100)  # waited 4 s with 3 probes
    assert dec.set_endpoint == B and dec.probe and dec.state_changed
    st = d.m.status()
    assert st.state == PeerState.DOWN and st.switches == 1 and st.failures == 1
    assert st.last_used_endpoint == B and st.trying
    d.step(rx=64, tx=64, answered=True)
    assert d.m.state == PeerState.UP and d.m.current == B


def test_fast_death_needs_the_minimum_probe_count():
    t = replace(SLOW, probe_interval=2.0)
    d = Driver(timings=t)
    d.connect()
    d.step(tx=100)
    decs = [d.step(tx=100) for _ in range(6)]
    # probes at waited 1, 3, 5: the third one is only out at 5 s, so death waits for 6 s
    assert [x.probe for x in decs[:5]] == [True, False, True, False, True]
    assert [x.set_endpoint for x in decs] == [None] * 5 + [B]


# --- fast detection (the default timings) ----------------------------------------------------------


def fast_driver(eps=(A, B)):
    d = Driver(eps=eps, timings=DetectionTimings())
    d.connect()
    assert d.m.status().answers_probes is True
    return d


def test_fast_detection_probes_five_times_a_second_and_switches_after_one_second():
    d = fast_driver()
    t = d.m.t
    # healthy traffic: no probe, but the machine wants to be looked at every active poll
    for _ in range(4):
        dec = d.step(rx=96, tx=96, dt=0.25)
        assert not dec.probe and dec.set_endpoint is None
        assert d.m.due == pytest.approx(d.now + t.active_poll_interval)
    # black hole: the first look without rx starts an episode and probes at once ...
    assert d.step(tx=96, dt=0.25).probe
    start = d.now
    assert d.m.due == pytest.approx(start + t.probe_interval)
    decs = []
    while d.now < start + t.dead_after - 1e-9:
        decs.append(d.step(tx=96, dt=d.m.due - d.now))
    # ... then every probe_interval; the verdict comes exactly dead_after after the start
    assert d.now == pytest.approx(start + t.dead_after)
    assert [x.probe for x in decs[:-1]] == [True] * (t.dead_min_probes - 1)
    assert decs[-1].set_endpoint == B and decs[-1].probe and decs[-1].state_changed
    st = d.m.status()
    assert st.state == PeerState.DOWN and st.switches == 1 and st.probes == 1 + t.dead_min_probes + 1
    # the next candidate answers within a round trip
    d.step(rx=96, tx=96, dt=0.01, answered=True)
    assert d.m.state == PeerState.UP and d.m.current == B


def test_fast_detection_needs_both_the_window_and_the_probe_count():
    d = fast_driver()
    d.step(tx=96, dt=0.25)  # episode, probe 1
    start = d.now
    # the engine was late: polls 0.45 s apart give only three probes by 1 s
    decs = [d.step(tx=96, dt=0.45) for _ in range(2)]
    assert all(x.probe and x.set_endpoint is None for x in decs)
    for _ in range(2):  # probes 4 and 5: the window is over, but the count is not reached yet
        dec = d.step(tx=96, dt=0.2)
        assert d.now - start >= d.m.t.dead_after and dec.set_endpoint is None and dec.probe
    dec = d.step(tx=96, dt=0.2)
    assert dec.set_endpoint == B  # five probes out (the last one 0.2 s ago) and unanswered


def test_a_lost_probe_does_not_kill_a_path():
    d = fast_driver()
    assert d.step(tx=96, dt=0.25).probe  # a ping was lost: episode
    assert d.step(tx=0, dt=0.2).probe  # the first probe's answer was lost too
    d.step(rx=96, dt=0.05, answered=True)
    st = d.m.status()
    assert st.state == PeerState.UP and st.switches == 0 and st.failures == 0 and st.episodes == 1
    assert d.m.due == pytest.approx(d.now + d.m.t.active_poll_interval)  # tx grew in this poll's span


def test_idle_and_healthy_peers_are_not_probed_and_idle_ones_not_polled_fast():
    d = fast_driver()
    for _ in range(40):
        assert not d.step(rx=96, tx=96, dt=0.25).probe
    probes = d.m.status().probes
    d.step(rx=32, dt=1.0)  # the peer's keepalive; we send nothing
    assert d.m.due is None  # the regular poll will do
    for _ in range(20):
        assert not d.step(dt=1.0).probe
    assert d.m.due is None and d.m.status().probes == probes


def test_our_lone_keepalive_is_not_traffic_to_poll_fast_for():
    """An idle peer's keepalive (one 32-byte message) still starts an episode, but asks for no
    active polls: with 100 peers four go out a second, and active polls would never stop."""
    d = fast_driver()
    for _ in range(20):
        d.step(dt=1.0)
    dec = d.step(tx=WG_KEEPALIVE_BYTES, dt=1.0)
    assert dec.probe and d.m.status().episodes == 1  # tx without rx: looked into as before
    assert d.m.due == pytest.approx(d.now + d.m.t.probe_interval)  # the episode's next probe only
    d.step(rx=96, dt=0.05, answered=True)
    assert d.m.due is None  # answered: back to the regular poll
    d.step(rx=WG_KEEPALIVE_BYTES, tx=WG_KEEPALIVE_BYTES, dt=1.0)  # both keepalives in one poll
    assert d.m.due is None
    d.step(rx=96, tx=2 * WG_KEEPALIVE_BYTES, dt=1.0)  # more than a keepalive: traffic
    assert d.m.due == pytest.approx(d.now + d.m.t.active_poll_interval)


def test_fast_trials_go_round_once_then_slow_trials_take_over():
    d = fast_driver()
    t = d.m.t
    d.step(tx=96, dt=0.25)
    while d.m.current == A:
        d.step(tx=96, dt=d.m.due - d.now)
    # B does not answer either: after one fast window it is A's turn again (the old path may be back)
    switched = d.now
    while d.m.current == B:
        d.step(tx=96, dt=d.m.due - d.now)
    assert d.now - switched == pytest.approx(t.dead_after)
    assert d.m.current == A
    # A fails its fast trial too: B's next trial is a slow one (probes a second apart, 12 s)
    while d.m.current == A:
        d.step(tx=96, dt=d.m.due - d.now)
    slow = d.now
    assert d.m.due is None or d.m.due - d.now >= t.active_poll_interval - 1e-9
    probes = [d.step(tx=96, dt=0.25).probe for _ in range(int(t.trial_timeout / 0.25) - 1)]
    assert d.m.current == B and sum(probes) <= t.trial_timeout / t.slow_probe_interval + 1
    while d.m.current == B:
        d.step(tx=96, dt=0.25)
    assert d.now - slow == pytest.approx(t.trial_timeout, abs=0.25)
    assert d.m.status().switches == 4


def test_fast_trial_answer_returns_to_the_old_path():
    d = fast_driver()
    d.step(tx=96, dt=0.25)
    while d.m.current == A:
        d.step(tx=96, dt=d.m.due - d.now)
    while d.m.current == B:  # B is down as well
        d.step(tx=96, dt=d.m.due - d.now)
    d.step(rx=96, tx=96, dt=0.01, answered=True)  # A was only briefly down: it answers
    st = d.m.status()
    assert st.state == PeerState.UP and st.endpoint == A and st.switches == 2


def test_slow_round_trips_widen_the_detection_window():
    d = fast_driver()
    t = d.m.t
    for _ in range(12):  # probes answered after 0.9 s, steadily
        d.step(rx=96, tx=96, dt=1.0, answered=True, rtt=0.9)
    window = d.m.dead_window()
    assert 0.9 + t.probe_interval <= window < 1.5
    d.step(tx=96, dt=0.25)
    start = d.now
    while d.m.current == A:
        d.step(tx=96, dt=d.m.due - d.now)
    assert d.now - start == pytest.approx(window)
    # a LAN peer keeps the configured window
    assert fast_driver().m.dead_window() == t.dead_after


def test_peer_not_known_to_answer_gets_slow_probes_only():
    d = Driver(timings=DetectionTimings())
    d.connect(answered=False)
    assert d.m.status().answers_probes is None
    d.step(tx=96, dt=0.25)  # episode
    probes = [d.step(tx=96, dt=0.2).probe for _ in range(20)]  # 4 s
    assert 3 <= sum(probes) <= 5  # a second apart, not five a second
    assert d.m.current == A  # only the passive rule can kill it


def test_unknown_responsiveness_uses_passive_threshold():
    t = DetectionTimings()
    d = Driver()
    d.connect(answered=False)
    d.step(tx=100)
    deaths = [d.step(tx=100).set_endpoint for _ in range(int(t.passive_dead_after))]
    assert deaths[:-1] == [None] * (len(deaths) - 1)
    assert deaths[-1] == B


def test_peer_that_drops_probes_is_recognised_and_recovers():
    d = Driver()
    d.connect()
    assert d.m.status().answers_probes is True
    # an episode: probes go unanswered, but a passive keepalive arrives after 3.5 s
    d.step(tx=100)
    for _ in range(3):
        d.step(tx=100)
    d.step(rx=32, dt=0.5)
    st = d.m.status()
    assert st.answers_probes is False and st.failures == 0 and st.state == PeerState.UP
    # now only the passive rule applies: 10 s of silence is not death
    d.step(tx=100)
    assert all(d.step(tx=100).set_endpoint is None for _ in range(10))
    d.step(rx=32, answered=True)
    assert d.m.status().answers_probes is True


def test_calibration_probes_learn_responsiveness_under_steady_traffic():
    d = Driver()
    d.step()
    # connected, but the trial's probe answer was lost: calibrate at once ...
    assert d.step(rx=100, tx=100, handshake=True).probe
    probes = [d.step(rx=100, tx=100).probe for _ in range(11)]
    # ... and then once per calibrate_interval (5 s)
    assert [i for i, p in enumerate(probes) if p] == [4, 9]
    d.step(rx=100, tx=100, answered=True)
    assert d.m.status().answers_probes is True
    assert not any(d.step(rx=100, tx=100).probe for _ in range(20))  # no more calibration


def test_unanswered_calibration_while_traffic_flows_means_no():
    d = Driver()
    d.connect(answered=False)
    probes = [d.step(rx=100, tx=100).probe for _ in range(16)]
    assert sum(probes) == 2  # plus the one sent on connecting
    assert d.m.status().answers_probes is False
    assert not any(d.step(rx=100, tx=100).probe for _ in range(20))


def test_probes_to_a_peer_that_drops_them_are_spaced_by_keepalive_timeout():
    d = Driver()
    d.connect(answered=False)
    for _ in range(16):
        d.step(rx=100, tx=100)
    assert d.m.status().answers_probes is False
    d.step(tx=100)  # episode
    probes = [d.step(tx=100).probe for _ in range(21)]
    assert [i for i, p in enumerate(probes) if p] == [0, 10, 20]


def test_stale_session_is_dead_even_with_rx():
    d = Driver()
    d.connect()
    d.hs = d.now - 216  # only handshake attempts arrive
    dec = d.step(rx=148, tx=92)
    assert dec.set_endpoint == B
    assert d.m.state == PeerState.DOWN


def test_stale_rule_off_without_keepalive():
    d = Driver(keepalive=False)
    d.connect()
    d.hs = d.now - 1000
    assert d.step().set_endpoint is None
    assert d.m.state == PeerState.UP


def test_trial_timeout_moves_on_and_backs_off_per_sweep():
    t = replace(SLOW, trial_timeout=10.0, trial_timeout_max=40.0)
    d = Driver(eps=(A, B), timings=t)
    d.step()  # trial A at t=1
    switches = []
    for _ in range(200):
        dec = d.step(tx=100)
        if dec.set_endpoint is not None:
            switches.append((d.now, dec.set_endpoint))
    times = [s[0] for s in switches]
    gaps = [b - a for a, b in zip([1.0, *times], times, strict=False)]
    # two 10 s trials (one sweep), then two 20 s, then capped at 40 s
    assert gaps[:6] == [10.0, 10.0, 20.0, 20.0, 40.0, 40.0]
    assert [s[1] for s in switches[:4]] == [B, A, B, A]
    assert d.m.state == PeerState.UNKNOWN  # never connected: stays unknown
    assert d.m.status().failures == len(switches)


P = AddrPort("10.1.0.12", 51820)  # a private address: on our LAN, or another site's


def private_then_public(timings=None):
    d = Driver(eps=(A, B), timings=timings or DetectionTimings())
    d.m.set_candidates([Candidate(P, CandidateKind.PRIVATE), Candidate(B, CandidateKind.PUBLIC)])
    return d


def switch_times(d, until):
    out = []
    while d.now < until:
        dec = d.step(tx=148, dt=0.5)
        if dec.set_endpoint is not None:
            out.append((d.now, dec.set_endpoint, dec.fresh_session))
    return out


def test_a_never_up_peers_private_candidate_gets_a_short_first_trial():
    """Another site's private address never answers: the public candidate behind it is tried after
    private_trial_timeout (3 s), not a full trial (12.2 s); from the second sweep on every candidate
    has the full, doubling trial."""
    d = private_then_public()
    t = d.m.t
    d.step(dt=0.5)  # first sight: trial of the private candidate
    assert d.m.current == P
    started = d.now
    sw = switch_times(d, 60.0)
    assert [(ep, fresh) for _, ep, fresh in sw[:3]] == [(B, True), (P, True), (B, True)]
    gaps = [b - a for a, b in zip([started] + [x[0] for x in sw], [x[0] for x in sw], strict=False)]
    assert gaps[0] == pytest.approx(t.private_trial_timeout, abs=0.5)
    assert gaps[1] == pytest.approx(t.trial_timeout, abs=0.5)
    assert gaps[2] == pytest.approx(2 * t.trial_timeout, abs=0.5), "second sweep: private gets a full trial"


def test_an_answer_on_the_private_candidate_within_the_short_trial_keeps_it():
    d = private_then_public()
    d.step(dt=0.5)
    d.step(tx=148, dt=0.5)
    d.step(rx=92, tx=148, handshake=True, dt=0.5)  # the LAN answered within a round trip
    assert d.m.state == PeerState.UP and d.m.current == P
    assert switch_times(d, 20.0) == []


def test_a_peer_once_up_gets_full_trials_on_private_candidates():
    d = private_then_public()
    d.step(dt=0.5)
    d.step(rx=92, tx=148, handshake=True, dt=0.5)
    assert d.m.state == PeerState.UP
    d.hs = d.now - 1000  # the session expired: the path is dead, the candidates go on trial again
    sw = switch_times(d, 120.0)
    private = [b[0] - a[0] for a, b in itertools.pairwise(sw) if a[1] == P]
    assert private and min(private) >= d.m.t.trial_timeout - 0.5, sw


def test_a_sole_private_candidate_keeps_the_full_trial():
    """With nothing else to go on to, a short trial would only re-create the peer sooner."""
    d = Driver(eps=(P,), timings=DetectionTimings())
    d.m.set_candidates([Candidate(P, CandidateKind.PRIVATE)])
    d.step(dt=0.5)
    fresh = []
    while d.now < 40.0:
        if d.step(tx=148, dt=0.5).fresh_session:  # the trial starts over: a re-created peer
            fresh.append(d.now)
    assert fresh and fresh[0] - 0.5 == pytest.approx(d.m.t.trial_timeout, abs=0.5), fresh


def test_private_trial_timeout_is_checked():
    with pytest.raises(ConfigError) as e:
        DetectionTimings(private_trial_timeout=20.0)
    assert e.value.field == "private_trial_timeout" and "trial_timeout" in str(e.value)
    with pytest.raises(ConfigError):
        DetectionTimings(private_trial_timeout=0)


def test_switch_without_session_asks_for_a_fresh_peer_and_the_trial_goes_on():
    d = Driver(timings=DetectionTimings())
    d.step()  # trial A, nobody answers
    decs = []
    while d.m.current == A:
        decs.append(d.step(tx=148))
    switch = decs[-1]
    assert switch.set_endpoint == B and switch.probe and switch.fresh_session
    assert not any(x.fresh_session for x in decs[:-1])
    switched = d.now
    # the engine re-created the peer: its counters start over; that is not a restart of the trial
    d.rx = d.tx = 0
    dec = d.step(tx=148)
    assert dec.set_endpoint is None and not dec.fresh_session and d.m.status().trying
    while d.m.current == B:
        dec = d.step(tx=148)
    assert d.now - switched == pytest.approx(d.m.t.trial_timeout, abs=1.0)
    assert dec.fresh_session  # back to A, again without a session
    d.step(tx=148)  # the re-creation did not happen (say the write failed): the request lapses
    # a counter reset nobody asked for still restarts the trial on the same endpoint
    d.rx = d.tx = 0
    assert d.step(tx=10).set_endpoint == A


def test_switch_with_a_valid_session_keeps_it():
    d = fast_driver()
    d.step(tx=96, dt=0.25)
    while d.m.current == A:
        dec = d.step(tx=96, dt=d.m.due - d.now)
    assert dec.set_endpoint == B and not dec.fresh_session


def test_a_sole_path_that_died_is_tried_again_from_a_fresh_peer():
    """Nothing else to try (a relayed peer has the relay alone): the same endpoint's next trial starts
    with a new handshake, which re-latches the relay's leg after our NAT rebound; WireGuard would
    initiate only 15 s after the silence began."""
    d = fast_driver(eps=(A,))
    d.step(tx=96, dt=0.25)  # sent, nothing back: an episode begins
    began = d.now
    decs = []
    while d.m.state == PeerState.UP:
        decs.append(d.step(tx=96, dt=d.m.due - d.now))
    died = decs[-1]
    assert died.fresh_session and died.probe and died.set_endpoint is None and d.m.current == A
    assert not any(x.fresh_session for x in decs[:-1])
    assert d.now - began <= d.m.t.dead_after + 0.5, "a fast verdict"
    # the re-created peer's counters start over; its handshake answers: up on the same endpoint
    d.rx = d.tx = 0
    d.hs = None
    assert not d.step(tx=148, dt=0.2).fresh_session
    d.step(rx=92, tx=148, handshake=True, dt=0.2)
    assert d.m.state == PeerState.UP and d.m.current == A


def test_probes_spaced_by_rekey_timeout_without_session():
    d = Driver()
    d.step()  # trial starts with a probe
    probes = [d.step(tx=148).probe for _ in range(11)]
    assert [i + 2 for i, p in enumerate(probes) if p] == [6, 11]  # every 5 s, not every second


def test_single_candidate_retries_without_counting_switches():
    d = Driver(eps=(A,))
    d.connect()
    d.hs = d.now - 216
    dec = d.step(tx=1)
    assert dec.set_endpoint is None and dec.probe  # same endpoint, already configured
    st = d.m.status()
    assert st.switches == 0 and st.failures == 1 and st.trying and st.state == PeerState.DOWN


def test_roaming_is_adopted_and_learned_once():
    d = Driver()
    d.connect()
    dec = d.step(rx=64, endpoint=N)
    assert dec.learned_changed and dec.set_endpoint is None
    assert d.m.current == N and d.m.learned == (N,)
    st = d.m.status()
    assert st.roams == 1 and st.switches == 0
    # more traffic from the same place: nothing to republish
    assert not d.step(rx=64).learned_changed
    # roaming to a published candidate is not "learned"
    assert not d.step(rx=64, endpoint=B).learned_changed
    assert d.m.learned == (N,)
    # back to N: already known, order changes but the set does not
    assert not d.step(rx=64, endpoint=N).learned_changed


def test_learned_list_is_bounded_and_dead_learned_endpoints_are_dropped():
    t = DetectionTimings(learned_max=2)
    d = Driver(timings=t)
    d.connect()
    nat = [AddrPort("198.51.100.7", 40000 + i) for i in range(3)]
    for ep in nat:
        assert d.step(rx=64, endpoint=ep).learned_changed
    assert d.m.learned == (nat[2], nat[1])
    # the current (learned) path dies: it is forgotten and we move on
    d.hs = d.now - 216
    dec = d.step(rx=1)
    assert dec.learned_changed
    assert d.m.learned == (nat[1],)
    assert dec.set_endpoint is not None and dec.set_endpoint != nat[2]


def test_learned_endpoints_become_last_candidates():
    d = Driver(eps=(A,))
    d.connect()
    d.step(rx=64, endpoint=N)
    d.step(rx=64, endpoint=A)  # peer came back on A
    d.hs = d.now - 216
    assert d.step(rx=1).set_endpoint == N  # A died: try the learned one


def test_learned_max_zero_disables_learning():
    d = Driver(timings=DetectionTimings(learned_max=0))
    d.connect()
    assert not d.step(rx=64, endpoint=N).learned_changed
    assert d.m.learned == () and d.m.current == N


def test_no_candidates_waits_then_adopts_peer_initiated_path():
    d = Driver(eps=())
    assert d.step().set_endpoint is None
    assert d.m.state == PeerState.UNKNOWN
    dec = d.step(rx=148, tx=92, handshake=True, endpoint=N)
    assert d.m.state == PeerState.UP and d.m.current == N and dec.learned_changed


def test_set_candidates_replaces_list():
    d = Driver(eps=())
    d.m.set_candidates(cands(C))
    assert d.step().set_endpoint == C
    assert d.m.status().candidates == tuple(cands(C))


def test_observation_from_peer():
    p = ObservedPeer(PublicKey(b"\x01" * 32), endpoint=A, rx_bytes=5, tx_bytes=6, last_handshake=100.0)
    assert Observation.from_peer(p, 130.0) == Observation(A, 5, 6, 30.0)
    assert Observation.from_peer(p, 90.0).handshake_age == 0.0  # clock skew never gives negative ages
    q = ObservedPeer(PublicKey(b"\x01" * 32))
    assert Observation.from_peer(q, 1.0).handshake_age is None


# --- simulated network ---------------------------------------------------------------------------


@dataclass
class Remote:
    responsive: bool = True  # answers probes/pings at once
    last_sent: float = 0.0
    passive_due: float | None = None
    source: AddrPort | None = None  # where it sends from (sticky: where it was reached)


@dataclass
class Sim:
    """Us and one peer, 10 ms ticks; WireGuard timers modelled coarsely.

    Packets to a black-holed address (either direction) vanish; every packet is
    otherwise lost with probability ``loss``. The peer answers data at once if
    ``responsive``, else only by passive keepalive 10 s after data; each side
    sends a persistent keepalive 25 s after the last packet it sent *or
    received* (WireGuard resets that timer on both). A handshake happens when a
    side sends with a session older than 120 s (rate limited to one per 5 s)
    and both messages get through.
    """

    candidates: tuple
    loss: float = 0.0
    seed: int = 1
    ping_interval: float | None = 1.0
    responsive: bool = True
    poll: float = 1.0
    timings: DetectionTimings = field(default_factory=DetectionTimings)

    def __post_init__(self):
        self.rng = random.Random(self.seed)
        self.now = 0.0
        self.blackholed: set = set()
        self.endpoint: AddrPort | None = None  # our WireGuard's endpoint for the peer
        self.rx = self.tx = 0
        self.hs: float | None = None
        self.last_hs_attempt = -1e9
        self.our_last_traffic = 0.0
        # keepalive timers of the two sides are not in phase
        self.remote = Remote(self.responsive, last_sent=-self.rng.uniform(0, 25))
        self.m = EndpointMachine(self.timings, now=0.0, candidates=cands(*self.candidates))
        self.next_ping = 0.5
        self.next_poll = 0.0
        self.switch_log: list = []
        self.answered = False
        self.probes = 0

    def ok(self, addr):
        return addr is not None and addr not in self.blackholed and self.rng.random() >= self.loss

    def session_ok(self):
        return self.hs is not None and self.now - self.hs < 180

    def maybe_handshake(self, via):
        if self.hs is not None and self.now - self.hs < 120:
            return
        if self.now - self.last_hs_attempt < 5:
            return
        self.last_hs_attempt = self.now
        self.tx += 148
        if self.ok(via):
            self.remote.source = via
            if self.ok(via):
                self.rx += 92
                self.hs = self.now

    def we_send(self, data: bool, probe: bool = False):
        via = self.endpoint
        if via is None:
            return  # WireGuard sends nothing without an endpoint
        self.our_last_traffic = self.now
        self.maybe_handshake(via)
        self.tx += 96 if data else 32
        if not self.session_ok() or not self.ok(via):
            return
        self.remote.source = via
        self.remote.last_sent = self.now  # its keepalive timer restarts on receipt too
        if data:
            if self.remote.responsive:
                if self.they_send(data=True) and probe:
                    self.answered = True
            elif self.remote.passive_due is None:
                self.remote.passive_due = self.now + 10

    def they_send(self, data: bool) -> bool:
        r = self.remote
        r.last_sent = self.now
        r.passive_due = None
        if not self.session_ok() or not self.ok(r.source):
            return False
        self.rx += 96 if data else 32
        self.our_last_traffic = self.now
        if r.source != self.endpoint:
            self.endpoint = r.source  # roaming
        return True

    def run(self, until: float):
        while self.now < until:
            self.now = round(self.now + 0.01, 2)
            if self.ping_interval is not None and self.now >= self.next_ping:
                self.next_ping += self.ping_interval
                self.we_send(data=True)
            if self.now - self.our_last_traffic >= 25:
                self.we_send(data=False)
            r = self.remote
            if r.passive_due is not None and self.now >= r.passive_due:
                self.they_send(data=False)
            if self.now - r.last_sent >= 25:
                self.they_send(data=False)
            if self.now >= self.next_poll:
                self.next_poll += self.poll
                age = None if self.hs is None else self.now - self.hs
                d = self.m.observe(
                    self.now, Observation(self.endpoint, self.rx, self.tx, age), answered=self.answered
                )
                self.answered = False
                if d.set_endpoint is not None:
                    if d.set_endpoint != self.endpoint:
                        self.switch_log.append((self.now, d.set_endpoint))
                    self.endpoint = d.set_endpoint
                if d.probe:
                    self.probes += 1
                    self.we_send(data=True, probe=True)

    def time_until_up(self, limit: float) -> float | None:
        start = self.now
        while self.now - start < limit:
            self.run(self.now + 0.01)
            if self.m.state == PeerState.UP:
                return self.now - start
        return None


def test_sim_connects_quickly_and_stays_put():
    sim = Sim((A, B))
    sim.run(600)
    st = sim.m.status()
    assert st.state == PeerState.UP and st.endpoint == A
    assert st.switches == 0 and st.failures == 0
    assert st.answers_probes is not False


def test_sim_blackholed_endpoint_replaced_within_10s_under_traffic():
    for seed in range(12):
        sim = Sim((A, B), seed=seed, loss=0.01)
        sim.run(300 + seed * 0.37)
        assert sim.m.state == PeerState.UP and sim.m.current == A
        start = sim.now
        sim.blackholed.add(A)
        sim.run(start + 10)
        assert sim.switch_log and sim.switch_log[-1][1] == B
        assert sim.switch_log[-1][0] - start <= 7.0
        assert sim.m.state == PeerState.UP and sim.m.current == B, seed


def test_sim_blackholed_idle_path_detected_within_keepalive_plus_dead_after():
    sim = Sim((A, B), ping_interval=None)
    sim.run(300)
    assert sim.m.state == PeerState.UP
    start = sim.now
    sim.blackholed.add(A)
    sim.run(start + 25 + 4 + 3)
    assert sim.m.current == B and sim.m.state == PeerState.UP


@pytest.mark.parametrize("ping", [1.0, None], ids=["pinging", "idle"])
def test_sim_no_spurious_switch_under_one_percent_loss(ping):
    sim = Sim((A, B), loss=0.01, seed=42, ping_interval=ping)
    sim.run(2 * 3600)
    st = sim.m.status()
    assert st.switches == 0 and st.failures == 0, sim.switch_log
    assert st.state == PeerState.UP


def test_sim_peer_that_ignores_probes_is_not_cycled():
    # one-way traffic to a peer that only ever answers with passive keepalives
    sim = Sim((A, B), loss=0.01, seed=7, responsive=False)
    sim.run(3600)
    st = sim.m.status()
    assert st.switches == 0 and st.failures == 0, sim.switch_log
    assert st.answers_probes is not True


def test_sim_first_candidate_dead_at_start():
    sim = Sim((A, B))
    sim.blackholed.add(A)
    took = sim.time_until_up(30)
    # the dead candidate's trial, then WireGuard's rate-limited initiation to the next one
    assert took is not None and took <= DetectionTimings().trial_timeout + WG_REKEY_TIMEOUT + 2
    assert sim.m.current == B


def test_sim_dead_peer_costs_little():
    sim = Sim((A, B, C))
    sim.blackholed.update({A, B, C})
    sim.run(1800)
    st = sim.m.status()
    assert st.state == PeerState.UNKNOWN
    # backoff: 3 trials of 12 s, 3 of 24 s, 3 of 48 s, then one per 60 s
    assert 30 <= st.switches <= 40
    assert sim.probes < 1800 / 4  # well under one probe per second
    # when the path comes back, it is found within one capped trial sweep
    sim.blackholed.clear()
    took = sim.time_until_up(3 * 60 + 5)
    assert took is not None


def test_sim_peer_behind_nat_reaches_us_and_is_learned():
    sim = Sim((B,))
    sim.blackholed.add(B)  # its published endpoint is unreachable from here
    sim.run(20)
    assert sim.m.state == PeerState.UNKNOWN
    # the peer reaches us from a NAT mapping: our WireGuard roams there
    sim.remote.source = N
    sim.blackholed.discard(N)
    sim.endpoint = N
    sim.hs = sim.now
    sim.they_send(data=True)
    sim.run(sim.now + 60)
    assert sim.m.state == PeerState.UP
    assert sim.m.current == N and sim.m.learned == (N,)


def test_a_new_path_forgets_the_old_paths_round_trip():
    d = Driver()
    d.connect()
    d.step(rx=96, tx=96, answered=True, rtt=0.05)
    assert d.m.status().rtt == pytest.approx(0.05)
    d.step(rx=96, tx=96, endpoint=B)  # roamed: an authenticated packet from B
    assert d.m.current == B and d.m.status().rtt is None
