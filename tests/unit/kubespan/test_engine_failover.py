"""The engine runs the endpoint machines' fast detection: a pass when a machine asks for one
(EndpointMachine.due), probes 0.2 s apart to a peer that stopped answering, the next candidate
configured 1 s after the episode started; no extra passes for an idle peer (in-memory fakes)."""

from __future__ import annotations

import ipaddress
import itertools
from pathlib import Path

import pytest
from test_engine import Rig, make_rig, remote

from discovery.crypto import endpoint_from_addr
from kubespan.endpoints import PeerState
from kubespan.testing import Discovered
from kubespan.wireguard.diff import RemovePeer
from kubespan.wireguard.types import AddrPort, PublicKey


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return make_rig(tmp_path, first_contact=None)


async def test_black_holed_peer_is_probed_fast_and_switched_within_the_window(rig: Rig) -> None:
    k1, d1 = two_paths()
    async with rig.running(d1) as m:
        await rig.bring_up(k1)
        peer = m.peers[k1]
        t = m.cfg.timings
        first = peer.machine.current
        assert peer.machine.state == PeerState.UP and first == AddrPort("10.5.0.2", 51820)
        # idle: the next pass is the regular poll
        rig.clock.t += 1
        await m.reconcile()
        assert m._machines_at is None
        # traffic that is answered: once a poll saw tx grow, passes every active poll, no probes
        sent = len(m.prober.probes)
        rig.clock.t += t.poll_interval - t.active_poll_interval
        for _ in range(4):
            rig.clock.t += t.active_poll_interval
            rig.wg.traffic(k1, rx=96, tx=96)
            await m.reconcile()
            assert m._machines_at == pytest.approx(rig.clock.t + t.active_poll_interval)
        assert len(m.prober.probes) == sent
        # black hole: tx only; the engine runs the passes the machine asks for
        probe_times: list[float] = []
        start = None
        while peer.machine.current == first and rig.clock.t < 1100:
            assert m._machines_at is not None
            rig.clock.t = max(m._machines_at, rig.clock.t)
            rig.wg.traffic(k1, tx=96)
            before = len(m.prober.probes)
            await m.reconcile()
            if len(m.prober.probes) > before and peer.machine.current == first:
                probe_times.append(rig.clock.t)
                start = start if start is not None else rig.clock.t
        assert start is not None
        gaps = [b - a for a, b in itertools.pairwise(probe_times)]
        assert len(probe_times) == t.dead_min_probes
        assert all(g == pytest.approx(t.probe_interval) for g in gaps)
        assert rig.clock.t - start == pytest.approx(t.dead_after)
        # the other candidate is configured in that pass, and probed
        assert peer.machine.current == AddrPort("10.6.0.2", 51820)
        assert rig.wg.device.peers[k1].endpoint == AddrPort("10.6.0.2", 51820)
        assert m.prober.probes[-1][0] == k1
        # its answer makes the peer up at once; the status counts the probes
        m.prober.answer(k1)
        rig.clock.t += 0.01
        rig.wg.traffic(k1, rx=96, tx=96)
        await m.reconcile()
        st = next(p for p in m.status().peers if p.label == "one")
        assert st.state == "up" and st.endpoint_switches == 1 and st.probes >= t.dead_min_probes + 1


def two_paths() -> tuple[PublicKey, Discovered]:
    k1, _, d = remote("n1", "one", "10.5.0.2", 2, "10.6.0.2")
    second = endpoint_from_addr(ipaddress.ip_address("10.6.0.2"), 51820)
    return k1, Discovered(d.id, d.affiliate, (*d.endpoints, second))


async def test_a_switch_without_a_session_recreates_the_peer_once(rig: Rig) -> None:
    k1, d1 = two_paths()
    async with rig.running(d1) as m:
        peer = m.peers[k1]
        first = peer.machine.current
        # nobody answers: the trial of the first candidate times out
        applies = len(rig.wg.applies)
        while peer.machine.current == first and rig.clock.t < 1100:
            rig.clock.t += 1
            rig.wg.traffic(k1, tx=148)
            await m.reconcile()
        assert peer.machine.current == AddrPort("10.6.0.2", 51820)
        ops = [op for ops in rig.wg.applies[applies:] for op in ops]
        assert [op for op in ops if isinstance(op, RemovePeer)] == [RemovePeer(k1)]
        # re-added with the new endpoint (WireGuard initiates to it at once), and probed
        assert rig.wg.device.peers[k1].endpoint == AddrPort("10.6.0.2", 51820)
        assert rig.wg.device.peers[k1].rx_bytes == rig.wg.device.peers[k1].tx_bytes == 0
        assert m.prober.probes[-1][0] == k1
        # the next pass sees fresh counters: the trial goes on, nothing re-created again
        applies = len(rig.wg.applies)
        rig.clock.t += 1
        rig.wg.traffic(k1, tx=148)
        await m.reconcile()
        assert not [op for ops in rig.wg.applies[applies:] for op in ops if isinstance(op, RemovePeer)]
        assert peer.machine.status().trying and peer.machine.current == AddrPort("10.6.0.2", 51820)
        # its handshake answer makes it up
        rig.clock.t += 1
        rig.wg.traffic(k1, rx=92, tx=148, handshake=True)
        m.prober.answer(k1)
        await m.reconcile()
        assert peer.machine.state == PeerState.UP
